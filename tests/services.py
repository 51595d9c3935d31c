"""The real services the tests talk to, started as processes on this machine: moto's S3
server, a Ray head (`ray start --head`) and multi-node Ray clusters on loopback addresses,
with the free ports they need and the test credentials they are given.

Plain functions and classes (no fixtures): tests and benchmarks import them by name
(`from services import free_port`); the fixtures that start them live in conftest.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def ray_executable() -> str:
    """This venv's `ray` command."""
    return shutil.which("ray", path=str(Path(sys.executable).parent))


def start_ray_head(temp_dir: Path, num_cpus: int = 4) -> str:
    """`ray start --head` on 127.0.0.1 (free ports, its own temp dir, token auth off); returns
    its address. Stop it with `stop_ray_node(temp_dir)`, never with `ray stop`."""
    port = free_port()
    # RAY_ADDRESS: Ray's own processes that look for "the" cluster without an address (Ray
    # Train's placement-group cleaner, which frees a dead controller's CPUs) must find this one
    # among the machine's Ray instances, as e2e/conftest.py's cluster does.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": f"127.0.0.1:{port}"}
    subprocess.run([ray_executable(), "start", "--head", f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
                    "--include-dashboard=true", f"--dashboard-port={free_port()}", f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], check=True, env=env, stdout=subprocess.DEVNULL)
    return f"127.0.0.1:{port}"


def node_processes(temp_dir: str) -> list:
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


def stop_ray_node(temp_dir: str) -> int:
    """SIGKILL to the processes of the Ray node whose temp dir is `temp_dir` (only this node's:
    `ray stop` would stop every Ray cluster on the machine). Returns how many."""
    procs = node_processes(str(temp_dir))
    for proc in procs:
        try:
            proc.kill()
        except Exception:  # noqa: BLE001 (already gone)
            pass
    return len(procs)


# ---- a real multi-node Ray cluster on this machine (tests/e2e/test_jobs.py) -----------------
#
# Each Ray node is its own set of processes (GCS on the head, a raylet, agents, workers) with
# its own node id, its own temp dir and its own address on the loopback range: the head on
# 127.0.0.2, more nodes on 127.0.0.3, ... (127.0.0.1 would be replaced by Ray with the
# machine's outward address). Every port is chosen free, so the cluster lives beside any
# other Ray on the machine; it is stopped by killing its own processes by pid, never with
# `ray stop` (which stops every Ray of the user).


class LocalCluster:
    """A Ray head and worker nodes started with `ray start`, each on its own loopback address."""

    def __init__(self, root: Path, env: dict):
        self.root, self.env = root, env
        self.ray = ray_executable()
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
        return stop_ray_node(node["temp_dir"])

    def lose_node(self, node: dict, timeout: float = 60) -> int:
        """Lose a node as a machine is lost: it freezes (SIGSTOP to all its processes: no more
        heartbeats, no more answers), the head declares it dead, then its processes are killed.
        Returns how many processes it had."""
        import psutil

        procs = node_processes(node["temp_dir"])
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
