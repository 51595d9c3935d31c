"""A run seen from outside, as a user or an operator sees it: the `ssl-dist` command, the
checkpoint Ray Train's controller has registered, and the run's worker processes.

Plain functions (no fixtures), imported by name: `from runs import ssl_dist_cli`. `Driver`
runs `ssl-dist pretrain` as a process of its own, so that a test can wait for its checkpoints
and kill its workers or itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def ssl_dist_cli(*args: str, env: dict | None = None, timeout: float = 600,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the `ssl-dist` command as a user would; returns the completed process (text output)."""
    exe = shutil.which("ssl-dist", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


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


class Driver:
    """`ssl-dist pretrain` as a process of its own (so that it can be killed), its output read
    as it comes by a thread (so that a test can wait for a line, and a full pipe never blocks it)."""

    def __init__(self, args, ray_address):
        self.proc = subprocess.Popen([sys.executable, "-m", "ssl_dist.cli", *args],
                                     env={**os.environ, "RAY_ADDRESS": ray_address}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def poll(self):
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL: the whole job goes (driver, Ray Train controller, workers)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.reader.join(timeout=30)

    def wait(self, timeout=600) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(timeout=30)
        return self.proc.returncode


def start(args, ray_address) -> Driver:
    return Driver(args, ray_address)


def finish(driver: Driver, timeout=600) -> str:
    returncode = driver.wait(timeout)
    assert returncode == 0, driver.output[-4000:]
    return driver.output


def wait_for_registered(url, driver, *, after_step=0, timeout=300) -> str:
    """The name of the first checkpoint after `after_step` that Ray Train registers for the run."""
    from ssl_dist.checkpoint import name_key

    deadline = time.monotonic() + timeout
    while True:
        name = registered_checkpoint(url)
        if name is not None and name_key(name)[0] > after_step:
            return name
        assert driver.poll() is None, driver.output[-4000:]
        assert time.monotonic() < deadline, f"no checkpoint registered after {timeout} s"
        time.sleep(0.2)


def keys_per_step(url) -> dict[int, list[list[str]]]:
    """{step: [keys of rank 0, keys of rank 1, ...]} over every attempt; a step done twice (before
    a failure and again after the resume) must have had the same keys both times."""
    from ssl_dist.checkpoint import read_keys

    merged: dict[int, dict[int, list[str]]] = {}
    for log in read_keys(url):
        for row in log["rows"]:
            seen = merged.setdefault(row["step"], {})
            if log["rank"] in seen:
                assert seen[log["rank"]] == row["keys"], f"step {row['step']} saw other keys when redone"
            seen[log["rank"]] = row["keys"]
    return {step: [ranks[r] for r in sorted(ranks)] for step, ranks in merged.items()}


def kill_a_worker_and_finish(url, driver, ray_address, *, steps: int, every: int) -> int:
    """Once the run at `url` has a registered checkpoint, SIGKILL one of its 2 training workers
    from outside (like the OOM killer or a preemption); Ray Train restarts the group from that
    checkpoint in the same job. Waits for the end; returns the step it resumed from, after
    checking it is a checkpoint step and the second attempt ran to `steps`."""
    from ssl_dist import metrics

    wait_for_registered(url, driver)
    victims = train_workers(ray_address)
    assert len(victims) == 2
    os.kill(victims[-1].pid, signal.SIGKILL)
    output = finish(driver)
    attempts = [[int(r["step"]) for r in rows] for rows in metrics.read_history(url)]
    assert len(attempts) == 2, attempts
    resumed_at = attempts[1][0] - 1
    assert resumed_at % every == 0 and resumed_at >= every and attempts[1][-1] == steps
    assert f"resumed from step {resumed_at}" in output
    return resumed_at
