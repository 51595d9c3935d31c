"""Fixtures of the shard tests: a slice of real CIFAR-10 JPEGs and shards made from it.

Fixtures only: the readers the tests compare shards with are in shard_readers.py beside this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cifar import cifar_slice
from shard_readers import CLASSES

from ssl_dist import shards

PER_CLASS = 20


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A CIFAR ImageFolder slice: 10 classes x 20 real JPEGs."""
    return cifar_slice(tmp_path_factory.mktemp("cifar") / "train", PER_CLASS)


@pytest.fixture(scope="module")
def expected(source) -> dict[str, tuple[bytes, int]]:
    """key -> (image bytes, label) for every image of the source folder."""
    return {f"{p.parent.name}/{p.stem}": (p.read_bytes(), CLASSES.index(p.parent.name))
            for p in sorted(source.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def local(source, tmp_path_factory) -> tuple[Path, dict]:
    """Shards of the slice in a local folder: 64 samples per shard, so the last one holds 8."""
    dest = tmp_path_factory.mktemp("local") / "shards"
    return dest, shards.make_shards(str(source), str(dest), samples_per_shard=64, workers=2)
