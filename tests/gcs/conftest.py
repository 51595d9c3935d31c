"""Fixtures of the gs:// tests: a real GCS emulator (gcp-storage-emulator on 127.0.0.1) reached
the way a user reaches one, through STORAGE_EMULATOR_HOST, fresh buckets in it, and CIFAR-10
shards made into it.

STORAGE_EMULATOR_HOST is set for the whole session once the emulator is up (and restored at
the end): every client of the test process, and the processes it starts (the `ssl-dist`
command, a local Ray's workers), find the emulator there, as `gcloud` users' tools do.
"""

from __future__ import annotations

import os
import uuid

import pytest
from cifar import cifar_slice
from gcs_emulator import start_gcs_emulator


@pytest.fixture(scope="session")
def gcs_endpoint():
    """Endpoint URL of the GCS emulator; STORAGE_EMULATOR_HOST points every client at it."""
    proc, endpoint = start_gcs_emulator()
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved


def make_bucket(name: str) -> str:
    """Create the bucket `name` in the emulator (through gcsfs, as a user's tools would)."""
    from ssl_dist import storage

    fs, _ = storage.filesystem(f"gs://{name}")
    fs.mkdir(name)
    return name


@pytest.fixture
def gcs_bucket(gcs_endpoint):
    """A fresh, empty bucket in the emulator; returns its name."""
    return make_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def cifar_gs(tmp_path_factory, gcs_endpoint):
    """Shards of a real CIFAR-10 slice (20 train images per class) made into the emulator by
    `shards.make_shards`. Returns {"train": url, "train_src": ImageFolder path, "bucket": name}."""
    from ssl_dist.shards import make_shards

    root = tmp_path_factory.mktemp("cifar-gs")
    train_src = cifar_slice(root / "train", per_class=20)
    bucket = make_bucket("cifar-gs")
    make_shards(str(train_src), f"gs://{bucket}/train", samples_per_shard=45, workers=2)
    return {"train": f"gs://{bucket}/train", "train_src": train_src, "bucket": bucket}
