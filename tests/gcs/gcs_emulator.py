"""The GCS emulator the gs:// tests talk to: `gcp-storage-emulator` (the JSON API of Google
Cloud Storage, in memory) started as a process on 127.0.0.1, a free port.

Plain functions (no fixtures): conftest.py beside this file starts it for the tests.
"""

from __future__ import annotations

import subprocess
import sys

from services import free_port, wait_for_port


def start_gcs_emulator() -> tuple[subprocess.Popen, str]:
    """Start the emulator (in memory, quiet) as a process; returns (process, endpoint URL).

    It answers anonymous requests only and does not enforce preconditions (ifGenerationMatch):
    tests that need them check what is sent (tests/gcs/test_lease_gcs.py)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    return proc, f"http://127.0.0.1:{port}"
