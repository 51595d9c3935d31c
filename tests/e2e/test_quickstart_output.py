"""What a new user sees from the README's first command: `ssl-dist quickstart` on a Ray it
starts itself (no RAY_ADDRESS, as on a laptop), shortened. Its output holds progress, the
scores, the run folder, the curves' PNG and the TensorBoard command, and none of the
third-party lines that tell a user nothing here (`ssl_dist.quiet`); a run that fails on its
workers still shows the workers' error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ssl_dist import plots
from ssl_dist.methods.simclr import SimCLR

HERE = Path(__file__).resolve().parent

# Lines a user cannot act on, by what makes them (each seen in a quickstart's output before
# ssl_dist.quiet): a part of the line that no other line holds.
NOISE = {
    "Ray's error about Ray Train's PreemptionWatcher actor": "PreemptionWatcher",
    "DeepSpeed's accelerator warning": "Setting accelerator to CPU",
    "torch's CUDA_HOME warning, from DeepSpeed's op builder": "No CUDA runtime is found",
    "torch's FutureWarning, from DeepSpeed's ZeRO": "all_gather_into_tensor",
    "Ray Train's line per rank per checkpoint": "Checkpoint successfully created",
    "Ray Train's line per rank per report": "Reporting training result",
    "Ray Train's start-up lines": "Requesting resources",
    "Ray Train's start-up lines (2)": "Attempting to start training worker group",
    "Ray Train's start-up lines (3)": "Started training worker group",
    "Ray Train's start-up lines (4)": "Setting up process group for",
    "Ray Train's PlacementGroupCleaner, with another Ray on the machine": "Found multiple active Ray instances",
}
SHORT = ["--per-class", "50", "train.max_steps=6", "train.log_every=3", "train.checkpoint_every=3"]


class FailsOnTheWorkers(SimCLR):
    """SimCLR whose model cannot be built: an error raised on every worker, never on the driver."""

    def build_module(self):
        raise RuntimeError("FailsOnTheWorkers: no module today (the test's own error)")


def quickstart(out: Path, *args: str, extra_path: str = "") -> subprocess.CompletedProcess:
    """`ssl-dist quickstart --out OUT ARGS` as a user runs it: its own local Ray (RAY_ADDRESS
    unset), token authentication off as in every test; stdout and stderr as the user sees them."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH", "")) if p)
    exe = shutil.which("ssl-dist", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, "quickstart", "--out", str(out), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def noise_in(output: str) -> dict[str, list[str]]:
    return {what: [line for line in output.splitlines() if part in line][:2]
            for what, part in NOISE.items() if part in output}


def test_quickstart_shows_progress_scores_and_where_to_look_and_no_noise(tmp_path, ray_address):
    # ray_address: another Ray runs on the machine (the session's), as it may on a user's
    done = quickstart(tmp_path / "qs", *SHORT)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert noise_in(output) == {}, output

    run = tmp_path / "qs" / "quickstart"
    assert "step 6/6" in output  # the progress line (the record off a terminal, where no bar is drawn)
    lines = done.stdout.splitlines()
    assert any(line.startswith("kNN top-1, pretrained encoder:") for line in lines)
    assert any(line.startswith("kNN top-1, random initialisation:") for line in lines)
    assert any(line.startswith(f"run folder: {run}") for line in lines), done.stdout
    assert f"curves: {run / plots.PNG_NAME}" in lines, done.stdout
    assert plots.read_summary((run / plots.PNG_NAME).read_bytes())["steps"] == [3, 6]
    assert any(f"tensorboard --logdir {run / 'tensorboard'}" in line for line in lines), done.stdout
    assert list((run / "tensorboard").iterdir())


def test_a_run_that_fails_on_its_workers_still_shows_their_error(tmp_path):
    # The same short quickstart with a method whose model raises on every worker (shipped to
    # them by value); no retries. The filters drop known lines only: the workers' error shows.
    done = quickstart(tmp_path / "qs", *SHORT, "method.name=test_quickstart_output:FailsOnTheWorkers",
                      "run.max_failures=0", extra_path=f"{HERE}{os.pathsep}{HERE.parent}")
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-4000:]
    assert "FailsOnTheWorkers: no module today (the test's own error)" in output, output[-4000:]
    assert "RuntimeError" in output
    assert noise_in(output) == {}, output
