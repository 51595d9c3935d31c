"""Fixtures that start the real components: moto's S3 server over HTTP, a local Ray cluster.

Both are started once per test session as separate processes on 127.0.0.1 (a free port
each) and stopped when the tests end. The S3 endpoint and test credentials are exported
through the standard AWS environment variables, which is how a user's own job finds S3.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train.tar"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.tar"

TEST_ACCESS_KEY = "testing-access-key-ssl-dist"
TEST_SECRET_KEY = "testing-secret-key-ssl-dist"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def start_moto(extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start moto's standalone S3 server as a process; returns (process, endpoint URL)."""
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def s3_endpoint():
    """Endpoint URL of a moto S3 server; AWS_* variables point every client at it."""
    proc, endpoint = start_moto()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
                       "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"})
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory, s3_endpoint):
    """Address of a local Ray cluster (`ray start --head`, 4 logical CPUs), stopped at the end.

    Started after the S3 server: its workers inherit the AWS_* variables, as a user's do.
    """
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=4", "--num-gpus=0",
                    "--include-dashboard=true",
                    f"--dashboard-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    yield address
    subprocess.run([ray, "stop", "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cifar_slice(dest: Path, per_class: int, split: str = "train") -> Path:
    """Extract the first `per_class` images of each class of the shared CIFAR-10 tar into an
    ImageFolder at `dest` (real JPEGs); returns `dest`."""
    source = CIFAR_TRAIN if split == "train" else CIFAR_TEST
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


def ssl_dist_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the `ssl-dist` command as a user would; returns the completed process (text output)."""
    exe = shutil.which("ssl-dist", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


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
