"""Fixtures of the data stream tests: shards of a CIFAR slice on local disk and in a moto bucket.

Uneven shards on purpose: 200 real JPEGs in 8 shards of 23 samples and one of 16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cifar import cifar_slice

from ssl_dist import shards, storage

PER_CLASS = 20  # 200 real JPEGs
SPS = 23  # samples per shard: 8 shards of 23 and one of 16


@pytest.fixture(scope="session")
def cifar_local(tmp_path_factory) -> tuple[Path, dict]:
    """Shards of a CIFAR slice on local disk (uneven: 8 x 23 + 16), made once per session."""
    root = tmp_path_factory.mktemp("data_stream")
    src = cifar_slice(root / "src", PER_CLASS)
    manifest = shards.make_shards(str(src), str(root / "shards"), samples_per_shard=SPS, workers=2)
    return root / "shards", manifest


def upload(folder: Path, url: str) -> None:
    """Copy a local shard folder to an object-store URL (every file, index.json last)."""
    fs, root = storage.filesystem(url, storage.storage_options(url))
    files = sorted(p for p in folder.iterdir() if p.name != "index.json") + [folder / "index.json"]
    for path in files:
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())


@pytest.fixture(scope="session")
def cifar_s3(cifar_local, s3_endpoint) -> str:
    """The same shards in a moto bucket; returns the URL."""
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data-stream")
    upload(cifar_local[0], "s3://data-stream/cifar")
    return "s3://data-stream/cifar"
