"""Reading what W&B's offline mode wrote, with wandb's own reader (`wandb leet inspect`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def wandb_records(folder: Path) -> list[dict]:
    """The records of an offline run's .wandb file, read by wandb's own reader (`wandb leet inspect`)."""
    exe = Path(sys.executable).parent / "wandb"
    out = subprocess.run([str(exe), "leet", "inspect", "--json", str(folder)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def run_record(records: list[dict]) -> dict:
    """The run's own record: its name, group, job type, project, config."""
    return next(r["run"] for r in records if r["type"] == "run")


def artifact_records(records: list[dict]) -> list[dict]:
    """The artifacts the run logged: name, type, and manifest (`contents`: path, local_path, size...)."""
    return [r["artifact"] for r in records if r["type"] == "artifact"]
