"""Training metrics: a progress line on rank 0 and a CSV per attempt in the run folder.

Each start of the worker group (first start, or a restart after a failure) writes its own
`metrics/attempt-<start step>-<unix ms>.csv` under the run folder, rewritten at every flush
(files are small; object stores have no append). Read them all, in name order, for the
whole history, failures included.
"""

from __future__ import annotations

import csv
import io
import time

from ssl_dist import storage
from ssl_dist.timing import PHASES

COLUMNS = ["step", "epoch", "loss", "lr", "samples_per_s", "samples_seen", "time",
           *[f"time_{phase}" for phase in PHASES]]


class MetricsLog:
    """Rows of metrics for one attempt; only rank 0 makes one."""

    def __init__(self, run_url: str, *, start_step: int, max_steps: int, global_batch: int,
                 storage_options: dict | None = None):
        self.url = storage.join(run_url, "metrics", f"attempt-{start_step:08d}-{int(time.time() * 1000)}.csv")
        self.options = storage_options or {}
        self.rows: list[dict] = []
        self.max_steps, self.global_batch = max_steps, global_batch
        self._mark_time, self._mark_step = time.monotonic(), start_step

    def add(self, **row) -> dict:
        """Record a row; fills samples/s since the previous row. Returns the row."""
        now = time.monotonic()
        steps = row["step"] - self._mark_step
        row["samples_per_s"] = steps * self.global_batch / max(now - self._mark_time, 1e-9)
        row["time"] = time.time()
        self._mark_time, self._mark_step = now, row["step"]
        self.rows.append(row)
        return row

    def progress_line(self, row: dict) -> str:
        """`step 40/100  loss 4.1234  lr 1.0e-03  312.4 samples/s  ETA 0:00:19`"""
        rate = row["samples_per_s"] / self.global_batch
        eta = (self.max_steps - row["step"]) / rate if rate > 0 else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        return (f"step {row['step']}/{self.max_steps}  epoch {row['epoch']}  loss {row['loss']:.4f}  "
                f"lr {row['lr']:.2e}  {row['samples_per_s']:.1f} samples/s  ETA {eta_text}")

    def flush(self) -> None:
        """Write all rows of this attempt to the run folder (overwrites the attempt's file)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        fs, path = storage.filesystem(self.url, self.options)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            f.write(buf.getvalue())


def read_history(run_url: str, storage_options: dict | None = None) -> list[list[dict]]:
    """Every attempt's rows, oldest attempt first (for tests, plots and reports)."""
    fs, path = storage.filesystem(storage.join(run_url, "metrics"), storage_options)
    if not fs.exists(path):
        return []
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".csv"))
    files.sort(key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
    return [list(csv.DictReader(io.StringIO(fs.cat_file(p).decode()))) for p in files]
