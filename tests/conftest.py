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

# The read-only data folder beside the checkout (../shared); SSL_DIST_SHARED points elsewhere.
SHARED = Path(os.environ.get("SSL_DIST_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
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
    # Only this cluster's processes: `ray stop` would stop every Ray cluster on the machine.
    for proc in _node_processes(str(temp)):
        try:
            proc.kill()
        except Exception:  # noqa: BLE001 (already gone)
            pass


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


def ssl_dist_cli(*args: str, env: dict | None = None, timeout: float = 600,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the `ssl-dist` command as a user would; returns the completed process (text output)."""
    exe = shutil.which("ssl-dist", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


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


# ---- a real multi-node Ray cluster on this machine (tests/test_jobs.py) ---------------------
#
# Each Ray node is its own set of processes (GCS on the head, a raylet, agents, workers) with
# its own node id, its own temp dir and its own address on the loopback range: the head on
# 127.0.0.2, more nodes on 127.0.0.3, ... (127.0.0.1 would be replaced by Ray with the
# machine's outward address). Every port is chosen free, so the cluster lives beside any
# other Ray on the machine; it is stopped by killing its own processes by pid, never with
# `ray stop` (which stops every Ray of the user).


def _node_processes(temp_dir: str) -> list:
    """The processes of the Ray node whose temp dir is `temp_dir`: those naming it on their
    command line (raylet, GCS, dashboard, log monitor) and all their descendants (agents, workers)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != os.getpid() and any(temp_dir in arg for arg in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except psutil.Error:
            continue
    return list(found.values())


class LocalCluster:
    """A Ray head and worker nodes started with `ray start`, each on its own loopback address."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.ray = shutil.which("ray", path=str(Path(sys.executable).parent))
        self.nodes: list[dict] = []  # {"ip", "temp_dir"}
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.gcs_address = f"127.0.0.2:{self.gcs_port}"
        self.jobs_url = f"http://127.0.0.2:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]

    def start_head(self, num_cpus: int = 1) -> dict:
        node = {"ip": "127.0.0.2", "temp_dir": str(self.root / "n0")}
        subprocess.run([self.ray, "start", "--head", f"--node-ip-address={node['ip']}", f"--port={self.gcs_port}",
                        f"--num-cpus={num_cpus}", "--num-gpus=0", "--include-dashboard=true",
                        f"--dashboard-host={node['ip']}", f"--dashboard-port={self.dashboard_port}",
                        f"--ray-client-server-port={free_port()}", *self._ports(), f"--temp-dir={node['temp_dir']}",
                        "--disable-usage-stats"], check=True, env=self.env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self.nodes.append(node)
        return node

    def add_node(self, num_cpus: int = 1) -> dict:
        number = len(self.nodes)
        node = {"ip": f"127.0.0.{2 + number}", "temp_dir": str(self.root / f"n{number}")}
        subprocess.run([self.ray, "start", f"--address={self.gcs_address}", f"--node-ip-address={node['ip']}",
                        f"--num-cpus={num_cpus}", "--num-gpus=0", *self._ports(), f"--temp-dir={node['temp_dir']}",
                        "--disable-usage-stats"], check=True, env=self.env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self.nodes.append(node)
        return node

    def wait_for_jobs_api(self, timeout: float = 120) -> None:
        """Until the Jobs API accepts submissions (the head's agent registers a few s after start)."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.jobs_url}/api/jobs/", timeout=5).status_code == 200 and \
                        len(self.alive_nodes()) == len(self.nodes):
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise RuntimeError(f"the Jobs API at {self.jobs_url} did not come up in {timeout} s")

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes as the head's state API sees them: [{"node_id", "node_ip"}]."""
        import requests

        reply = requests.get(f"{self.jobs_url}/api/v0/nodes", params={"limit": 100}, timeout=10).json()
        return [{"node_id": n["node_id"], "node_ip": n["node_ip"]} for n in reply["data"]["result"]["result"]
                if n["state"] == "ALIVE"]

    def kill_node(self, node: dict) -> int:
        """SIGKILL to all the processes of a node. Returns how many."""
        procs = _node_processes(node["temp_dir"])
        for proc in procs:
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 (already gone)
                pass
        return len(procs)

    def lose_node(self, node: dict, timeout: float = 60) -> int:
        """Lose a node as a machine is lost: it freezes (SIGSTOP to all its processes: no more
        heartbeats, no more answers), the head declares it dead, then its processes are killed.
        Returns how many processes it had."""
        import psutil

        procs = _node_processes(node["temp_dir"])
        for proc in procs:
            try:
                proc.suspend()
            except psutil.Error:
                pass
        deadline = time.monotonic() + timeout
        while node["ip"] in {n["node_ip"] for n in self.alive_nodes()}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head still sees node {node['ip']} alive {timeout} s after it froze")
            time.sleep(0.5)
        self.kill_node(node)
        return len(procs)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill_node(node)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, s3_endpoint):
    """A Ray cluster of two nodes on this machine (head 127.0.0.2, worker 127.0.0.3), 1 CPU
    each, so that 2 training workers of 1 CPU land on different nodes.

    The nodes get the S3 endpoint and test credentials from their own environment, as a
    cluster gets them from an instance role: nothing is sent with a job. Token auth is off
    (RAY_AUTH_MODE=disabled, set explicitly). Node failure is detected in a few seconds.
    """
    root = tmp_path_factory.mktemp("rc")  # short: Ray's socket paths live under it; logs kept after the tests
    # A job's `python` must be this venv's, as a cluster's is its image's. Only `python` is put
    # first on PATH, not the venv's bin: its `ninja` (1.13) hashes build commands differently
    # from the system's, and DeepSpeed's CPU op would be rebuilt whenever the two alternate.
    shims = root / "bin"
    shims.mkdir()
    for name in ("python", "python3"):
        (shims / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (shims / name).chmod(0o755)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}",
           "GLOO_SOCKET_IFNAME": "lo",  # collectives over loopback only
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3",
           # a worker group that cannot be placed (a lost node not yet declared dead) is given
           # up in 30 s instead of 60, then sized again from the nodes that are alive
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
    cluster = LocalCluster(root, env)
    # Ray's own processes that look for "the" cluster (Ray Train's placement-group cleaner uses
    # the state API without an address) must find this one among the machine's Ray instances.
    env["RAY_ADDRESS"] = cluster.gcs_address
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_jobs_api()
        yield cluster
    finally:
        cluster.stop()


def registered_checkpoint(run_url: str) -> str | None:
    """The newest checkpoint Ray Train's controller has registered for the run at `run_url`
    (what a restart gets back), or None. Ray Train V2 registers a checkpoint only after its
    controller polls the workers, so "written" is not yet "registered"."""
    import json

    from ssl_dist import storage

    fs, path = storage.filesystem(run_url)
    fs.invalidate_cache()
    try:
        snapshot = json.loads(fs.cat_file(f"{path}/checkpoint_manager_snapshot.json"))
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest["checkpoint_dir_name"] if latest else None


def train_workers(ray_address: str) -> list:
    """Ray Train worker processes of the cluster at `ray_address` only (other clusters may
    share the host): children of the raylet whose GCS listens on that port, without their
    forked data-loader children (same command line, renamed pt_data_worker)."""
    import psutil

    port = ray_address.rsplit(":", 1)[1]
    workers = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "raylet" and any(a.startswith("--gcs-address=") and a.endswith(f":{port}")
                                                 for a in cmdline):
            for child in proc.children():
                try:
                    if child.name() == "ray::RayTrainWorker" and \
                            " ".join(child.cmdline()).startswith("ray::RayTrainWorker"):
                        workers.append(child)
                except psutil.NoSuchProcess:
                    pass
    return workers
