"""Real CIFAR-10 images for the tests: slices of the shared tars as ImageFolders.

The read-only data folder is ../shared beside the checkout; SSL_DIST_SHARED points elsewhere
(it holds data/cifar10/{train,test}.tar).
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("SSL_DIST_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train.tar"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.tar"


def cifar_slice(dest: Path, per_class: int, split: str = "train") -> Path:
    """Extract the first `per_class` images of each class of the shared CIFAR-10 tar into an
    ImageFolder at `dest` (real JPEGs); returns `dest`."""
    source = CIFAR_TRAIN if split == "train" else CIFAR_TEST
    if not source.is_file():
        pytest.fail(f"{source} is missing: the tests read real CIFAR-10 images from ../shared/data/cifar10 "
                    "beside the checkout; set SSL_DIST_SHARED to the folder that holds data/cifar10")
    counts: dict[str, int] = {}
    with tarfile.open(source) as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            _, cls, name = member.name.split("/")
            if counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            out = dest / cls / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    return dest
