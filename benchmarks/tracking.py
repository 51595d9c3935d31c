"""What experiment tracking costs the training loop, on this machine.

    python benchmarks/tracking.py [--rows 200] [--log-every 10] [--repeats 3]

Rank 0's `MetricsLog` gets a row at every log step and flushes it (the CSV rewritten, the
TensorBoard file copied, the trackers' sinks fed). This times exactly that, on the thread
that trains, for the same rows with:

1. no tracker: the CSV and TensorBoard files only                  -> the baseline
2. + MLflow: a real `mlflow server` (SQLite, on 127.0.0.1), as the tests start it
3. + W&B in offline mode (WANDB_MODE=offline), its files copied into the run folder
4. + both

Per configuration: the median milliseconds per log step on the training thread (over
--repeats runs of --rows log steps each), its ratio to the baseline, and how long `close()`
waits at the attempt's end for the trackers' last rows. The run folder is local, as in the
quickstart; on an object store the baseline's CSV rewrite is the larger cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "tracking")]

from mlflow_server import start_mlflow_server, stop_mlflow_server  # noqa: E402 (tests/tracking)

from ssl_dist import config, metrics, tracking  # noqa: E402
from ssl_dist.tracking.parent import open_run  # noqa: E402

CONFIGS = {"none": (), "mlflow": ("mlflow",), "wandb offline": ("wandb",), "mlflow + wandb": ("mlflow", "wandb")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200, help="log steps per run (default: %(default)s)")
    parser.add_argument("--log-every", type=int, default=10, help="optimizer steps per log step (train.log_every)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration, interleaved")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ssl-dist-bench-tracking-"))
    os.environ.update({"WANDB_MODE": "offline", "WANDB_DIR": str(work / "wandb-local"),
                       "WANDB_DATA_DIR": str(work / "wandb-data"), "WANDB_SILENT": "true"})
    (work / "mlflow").mkdir()
    server, uri = start_mlflow_server(work / "mlflow")
    try:
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        closes: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for repeat in range(args.repeats):
            for name, trackers in CONFIGS.items():  # interleaved: the host's load drifts
                per_row, close_s = one_run(work / f"run-{repeat}-{name.replace(' ', '').replace('+', '-')}", trackers, uri,
                                           rows=args.rows, log_every=args.log_every)
                times[name].append(per_row)
                closes[name].append(close_s)
    finally:
        stop_mlflow_server(server)
    print_table(times, closes, rows=args.rows, repeats=args.repeats)


def one_run(run_dir: Path, trackers: tuple[str, ...], uri: str, *, rows: int, log_every: int) -> tuple[float, float]:
    """(median ms per log step on this thread, seconds close() took) for one attempt's rows."""
    overrides = [f"run.name={run_dir.name}", f"run.storage_path={run_dir.parent}"]
    if "mlflow" in trackers:
        overrides += [f"track.mlflow_uri={uri}", "track.experiment=bench"]
    if "wandb" in trackers:
        overrides += ["track.wandb_project=bench"]
    cfg = config.load(None, overrides)
    run_url = str(run_dir)
    quiet = lambda line: None  # noqa: E731 (the trackers' own lines are not what is timed)
    opened = open_run(cfg, run_url=run_url, attempt="bench", resume=None, say=quiet)
    name = metrics.attempt_name(0)
    sinks = tracking.attempt_sinks(opened.for_workers(), cfg, attempt=name, run_url=run_url, storage_options={},
                                   say=quiet)
    log = metrics.MetricsLog(run_url, start_step=0, max_steps=rows * log_every, global_batch=256, name=name,
                             sinks=sinks)
    per_row = []
    for i in range(1, rows + 1):
        step = i * log_every
        started = time.perf_counter()
        log.add(step=step, epoch=step // 100, loss=5.0 / (1 + i), lr=1e-3, samples_seen=step * 256,
                skipped_samples=0, skipped_shards=0, dropped_remainder=0,
                time_data=0.01, time_forward=0.1, time_backward=0.2, time_step=0.05)
        log.flush()
        per_row.append(time.perf_counter() - started)
    started = time.perf_counter()
    log.close()
    close_s = time.perf_counter() - started
    return 1000 * statistics.median(per_row), close_s


def print_table(times: dict, closes: dict, *, rows: int, repeats: int) -> None:
    base = statistics.median(times["none"])
    print(f"\nrank 0's cost per log step on the training thread ({rows} log steps, median of {repeats} runs; "
          f"local run folder)\n")
    print("| trackers | ms per log step | ratio to none | close() at the attempt's end, s |")
    print("|---|---|---|---|")
    for name in CONFIGS:
        ms = statistics.median(times[name])
        print(f"| {name} | {ms:.2f} | {ms / base:.2f}x | {statistics.median(closes[name]):.2f} |")


if __name__ == "__main__":
    main()
