"""A run seen from outside, as a user or an operator sees it: the `ssl-dist` command, the
checkpoint Ray Train's controller has registered, and the run's worker processes.

Plain functions (no fixtures), imported by name: `from runs import ssl_dist_cli`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
