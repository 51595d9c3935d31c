"""Session-wide fixtures that start the light real components: moto's S3 server over HTTP, a
local Ray head, a bucket, CIFAR-10 shards in S3. Each is started once per test session, as
separate processes on 127.0.0.1 (a free port each), only when a test asks for it, and stopped
when the tests end. The S3 endpoint and test credentials are exported through the standard
AWS environment variables, which is how a user's own job finds S3.

Fixtures only: the helpers they use are importable modules beside this file (services.py:
moto, Ray, ports, credentials; cifar.py: CIFAR-10 slices; runs.py: the CLI and a run seen
from outside). The heavy fixtures of the end-to-end runs are in e2e/conftest.py.
"""

from __future__ import annotations

import os
import uuid

import pytest
from cifar import cifar_slice
from services import TEST_ACCESS_KEY, TEST_SECRET_KEY, start_moto, start_ray_head, stop_ray_node

from ssl_dist.environ import environment


@pytest.fixture(scope="session")
def s3_endpoint():
    """Endpoint URL of a moto S3 server; AWS_* variables point every client at it."""
    proc, endpoint = start_moto()
    with environment({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
                      "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}):
        yield endpoint
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory, s3_endpoint):
    """Address of a local Ray cluster (`ray start --head`, 4 logical CPUs), one for the whole
    session (every run of tests/e2e/test_fault_tolerance.py and test_pretrain.py), stopped at the end.

    Started after the S3 server: its workers inherit the AWS_* variables, as a user's do.
    """
    os.environ["RAY_AUTH_MODE"] = "disabled"
    temp = tmp_path_factory.mktemp("ray")
    yield start_ray_head(temp, num_cpus=4)
    stop_ray_node(str(temp))


@pytest.fixture(scope="session")
def cifar_shards_s3(tmp_path_factory, s3_endpoint):
    """Shards of a real CIFAR-10 slice (20 train / 10 test images per class) in a moto bucket.

    Returns {"train": url, "test": url, "train_src": ImageFolder path, "bucket": name}.
    """
    import boto3

    from ssl_dist.shards import make_shards

    root = tmp_path_factory.mktemp("cifar")
    train_src = cifar_slice(root / "train", per_class=20)
    test_src = cifar_slice(root / "test", per_class=10, split="test")
    bucket = "cifar-shards"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    make_shards(str(train_src), f"s3://{bucket}/train", samples_per_shard=45, workers=2)
    make_shards(str(test_src), f"s3://{bucket}/test", samples_per_shard=50, workers=2)
    return {"train": f"s3://{bucket}/train", "test": f"s3://{bucket}/test", "train_src": train_src,
            "bucket": bucket}


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of this one process (no Ray): collective code run at world size 1."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield dist.new_group(backend="gloo")
    dist.destroy_process_group()
