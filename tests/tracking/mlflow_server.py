"""A real MLflow tracking server as a process of its own: `mlflow server` with a SQLite
backend and a local artifact folder, on a free loopback port.

Artifacts are proxied by the server (`--artifacts-destination`, served over HTTP), as on a
shared tracking server: the client uploads through the server's REST API, never into the
folder itself.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from services import free_port, wait_for_port


def start_mlflow_server(root: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` storing under `root`; returns (process, tracking URI). The log is
    `root/server.log`."""
    port = free_port()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    log = open(root / "server.log", "wb")  # noqa: SIM115 (kept open for the process's life)
    proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, timeout)
        wait_for_health(uri, proc, timeout)
    except BaseException:
        stop_mlflow_server(proc)
        raise
    return proc, uri


def wait_for_health(uri: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until the server answers its /health endpoint (the port opens before the app is loaded)."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow server exited with {proc.returncode}"
        try:
            if requests.get(f"{uri}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the MLflow server at {uri} did not answer /health in {timeout} s")


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    """Stop the server and its worker processes (its own process group, started for it)."""
    import os
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
