"""Training metrics: a progress line on rank 0, a CSV and TensorBoard event files per attempt
in the run folder, and the driver's progress bar.

Each start of the worker group (first start, or a restart after a failure) writes its own
`metrics/attempt-<start step>-<unix ms>.csv` under the run folder, rewritten at every flush
(files are small; object stores have no append). Read them all, in name order, for the
whole history, failures included. The same rows go to TensorBoard: one event file per
attempt under `tensorboard/` (written locally, copied to the run folder at every flush), so
`tensorboard --logdir <run>/tensorboard` shows a restart as a second line over the same
steps.

Evaluation scores (kNN top-1 during training) are a column of the row of the step they were
measured at; a row that holds only a score (evaluation at a step that was not logged) has
the other columns empty.

The same numbers go to the attempt's sinks, if any (`ssl_dist.tracking`: an MLflow run, a
W&B run, named after the attempt's CSV): `log(step, values)` per row, `flush()` and
`close()` with the CSV's. A sink that raises is dropped with one warning; the CSV and the
TensorBoard files never depend on it.
"""

from __future__ import annotations

import csv
import io
import os
import re
import struct
import sys
import tempfile
import threading
import time

from ssl_dist import storage, tracking
from ssl_dist.timing import PHASES

EVAL_COLUMNS = ("knn_top1", "zero_shot_top1")  # live_eval's scores (eval.every)
COLUMNS = ["step", "epoch", "loss", "lr", "samples_per_s", "samples_seen", "time",
           "skipped_samples", "skipped_shards", "dropped_remainder",
           *[f"time_{phase}" for phase in PHASES], *EVAL_COLUMNS]
TENSORBOARD_DIR = "tensorboard"


def attempt_name(start_step: int) -> str:
    """`attempt-<start step>-<unix ms>`: the name of an attempt's CSV (and of its tracker runs)."""
    return f"attempt-{start_step:08d}-{int(time.time() * 1000)}"


def duration(seconds: float) -> str:
    """`0:00:19`, `11d 13:46:40`: hours, minutes, seconds, and days from one day on."""
    days, rest = divmod(int(seconds), 86400)
    clock = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


class MetricsLog:
    """Rows of metrics for one attempt; only rank 0 makes one. `name`: the attempt's
    (`attempt_name`); `sinks`: trackers that get every row too (`tracking.attempt_sinks`)."""

    def __init__(self, run_url: str, *, start_step: int, max_steps: int, global_batch: int,
                 storage_options: dict | None = None, tensorboard: bool = True, name: str | None = None,
                 sinks=(), deadline: float | None = None):
        self.name = name or attempt_name(start_step)
        self.url = storage.join(run_url, "metrics", f"{self.name}.csv")
        self.sinks = list(sinks)
        self.run_url = run_url
        self.options = storage_options or {}
        self.rows: list[dict] = []
        self.max_steps, self.global_batch = max_steps, global_batch
        self.deadline = deadline  # time.monotonic() at which train.max_minutes ends the run, or None
        self._mark_time, self._mark_step = time.monotonic(), start_step
        self._start_step = start_step
        self._tensorboard = tensorboard
        self._writer = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def add(self, **row) -> dict:
        """Record a row; fills samples/s since the previous row. Returns the row."""
        now = time.monotonic()
        steps = row["step"] - self._mark_step
        row["samples_per_s"] = steps * self.global_batch / max(now - self._mark_time, 1e-9)
        row["time"] = time.time()
        self._mark_time, self._mark_step = now, row["step"]
        self.rows.append(row)
        values = {k: v for k, v in row.items() if k not in ("step", "time")}
        self._scalars(row["step"], values, prefix="train/")
        self._to_sinks("log", row["step"], _numbers(values))
        return row

    def add_eval(self, step: int, **scores: float) -> None:
        """Attach evaluation scores (e.g. knn_top1=0.41) to the row of `step`, or add a row for them."""
        if self.rows and int(self.rows[-1]["step"]) == step:
            self.rows[-1].update(scores)
        else:
            self.rows.append({"step": step, "time": time.time(), **scores})
        self._scalars(step, scores, prefix="eval/")
        self._to_sinks("log", step, _numbers(scores))

    def progress_line(self, row: dict) -> str:
        """`step 40/100  loss 4.1234  lr 1.0e-03  312.4 samples/s  ETA 0:00:19`: the steps left at
        this rate, or the time budget's end (train.max_minutes) where that comes first."""
        rate = row["samples_per_s"] / self.global_batch
        left = [(self.max_steps - row["step"]) / rate] if rate > 0 else []
        if self.deadline is not None:
            left.append(max(0.0, self.deadline - time.monotonic()))
        eta_text = duration(min(left)) if left else "?"
        return (f"step {row['step']}/{self.max_steps}  epoch {row['epoch']}  loss {row['loss']:.4f}  "
                f"lr {row['lr']:.2e}  {row['samples_per_s']:.1f} samples/s  ETA {eta_text}")

    def flush(self) -> None:
        """Write all rows of this attempt to the run folder (overwrites the attempt's file), and
        copy the attempt's TensorBoard event file there."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        storage.write_text(self.url, buf.getvalue(), self.options)
        self._flush_tensorboard()
        self._to_sinks("flush")

    def close(self) -> None:
        """Last flush; removes the local copy of the event file; ends the sinks' runs. The
        writer is closed before the copy: tensorboardX's flush() writes out only what its
        thread has taken from its queue, and the last scalars of a run were at times missing
        from the copied file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.flush()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        self._to_sinks("close")
        self.sinks = []

    def _to_sinks(self, method: str, *args) -> None:
        """Call `method` of every sink; one that raises gets one warning and is dropped."""
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as err:  # noqa: BLE001 (a tracker never fails a run)
                tracking.warning(sink.name, err, self.run_url)
                self.sinks.remove(sink)

    # ---- TensorBoard: written locally by tensorboardX, copied whole at every flush --------------

    def _scalars(self, step: int, values: dict, *, prefix: str) -> None:
        if not self._tensorboard:
            return
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._tmp = tempfile.TemporaryDirectory(prefix="ssl-dist-tb-")
            self._writer = SummaryWriter(self._tmp.name, filename_suffix=f".attempt-{self._start_step:08d}",
                                         flush_secs=3600)
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(prefix + key, value, step)

    def _flush_tensorboard(self) -> None:
        if self._tmp is None:
            return
        if self._writer is not None:
            self._writer.flush()
        fs, path = storage.filesystem(storage.join(self.run_url, TENSORBOARD_DIR), self.options)
        fs.makedirs(path, exist_ok=True)
        for name in os.listdir(self._tmp.name):
            fs.put_file(os.path.join(self._tmp.name, name), f"{path}/{name}")


def _numbers(values: dict) -> dict[str, float]:
    """The numeric entries of a row (what a tracker plots; empty cells and flags left out)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _attempt_files(run_url: str, storage_options: dict | None):
    fs, path = storage.filesystem(storage.join(run_url, "metrics"), storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return fs, []
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".csv"))
    files.sort(key=lambda p: int(p.rsplit("-", 1)[1].split(".")[0]))
    return fs, files


def read_history(run_url: str, storage_options: dict | None = None) -> list[list[dict]]:
    """Every attempt's rows, oldest attempt first (for tests, plots and reports)."""
    fs, files = _attempt_files(run_url, storage_options)
    return [list(csv.DictReader(io.StringIO(fs.cat_file(p).decode()))) for p in files]


def read_latest_attempt(run_url: str, storage_options: dict | None = None) -> list[dict]:
    """The newest attempt's rows (one listing and one read: what a progress bar polls)."""
    fs, files = _attempt_files(run_url, storage_options)
    return list(csv.DictReader(io.StringIO(fs.cat_file(files[-1]).decode()))) if files else []


def read_tensorboard(run_url: str, storage_options: dict | None = None) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{event file name: {tag: [(step, value), ...]}} of the run's TensorBoard files.

    Reads the TFRecord framing (length, CRC, Event proto, CRC) with tensorboardX's own
    Event message: no TensorBoard installation needed to check what a run wrote.
    """
    from tensorboardX.proto import event_pb2

    fs, path = storage.filesystem(storage.join(run_url, TENSORBOARD_DIR), storage_options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    files = {}
    for file in sorted(fs.ls(path, detail=False)):
        data, pos, scalars = fs.cat_file(file), 0, {}
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
        files[file.rsplit("/", 1)[-1]] = scalars
    return files


# ---- the driver's progress bar -----------------------------------------------------------------

_PROGRESS = re.compile(r"step (?P<step>\d+)/(?P<max_steps>\d+)\s+epoch (?P<epoch>\d+)\s+loss (?P<loss>\S+)\s+"
                       r"lr (?P<lr>\S+)\s+(?P<samples_per_s>\S+) samples/s")


def parse_progress_line(line: str) -> dict | None:
    """The numbers of a `MetricsLog.progress_line` found in `line` (which may carry Ray's
    `(RayTrainWorker pid=...)` prefix), or None."""
    match = _PROGRESS.search(line)
    if match is None:
        return None
    try:
        return {"step": int(match["step"]), "max_steps": int(match["max_steps"]), "epoch": int(match["epoch"]),
                "loss": float(match["loss"]), "lr": float(match["lr"]),
                "samples_per_s": float(match["samples_per_s"])}
    except ValueError:
        return None


class ProgressBar:
    """A tqdm bar of optimizer steps with loss and samples/s (tqdm gives the ETA), on a terminal only.

    Off when stderr is not a terminal (a job's log, CI): there the rank-0 progress lines are
    the record, and a bar's carriage returns would only clutter it.
    """

    def __init__(self, *, enabled: bool | None = None, file=None):
        self.file = file or sys.stderr
        self.enabled = self.file.isatty() if enabled is None else enabled
        self._bar = None

    def update(self, row: dict) -> None:
        """Move the bar to `row["step"]` (of `row["max_steps"]`, if given)."""
        if not self.enabled or not row.get("step"):
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=row.get("max_steps"), initial=int(row["step"]), unit="step", file=self.file,
                             dynamic_ncols=True, smoothing=0.3, desc="pretrain")
        if row.get("max_steps") and self._bar.total != row["max_steps"]:
            self._bar.total = row["max_steps"]
        self._bar.update(int(row["step"]) - self._bar.n)
        postfix = {}
        if row.get("loss") not in (None, ""):
            postfix["loss"] = f"{float(row['loss']):.4f}"
        if row.get("samples_per_s") not in (None, ""):
            postfix["samples/s"] = f"{float(row['samples_per_s']):.1f}"
        self._bar.set_postfix(postfix, refresh=True)

    def write(self, line: str, file=None) -> None:
        """Print `line` above the bar."""
        file = file or sys.stdout
        if self._bar is not None:
            self._bar.write(line, file=file)
        else:
            print(line, file=file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class watch_run:
    """Context manager: while a run goes on, a thread reads its newest metrics CSV every
    `interval` seconds and moves a `ProgressBar` (the driver's bar of `ssl-dist pretrain`).

    Rank 0 rewrites that CSV at every log step, so the bar needs no channel of its own and
    works the same for a local run and for a job's driver on a cluster.
    """

    def __init__(self, run_url: str, storage_options: dict | None, *, max_steps: int, interval: float = 2.0,
                 enabled: bool | None = None, file=None):
        self.run_url, self.options, self.max_steps, self.interval = run_url, storage_options, max_steps, interval
        self.bar = ProgressBar(enabled=enabled, file=file)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="ssl-dist-progress", daemon=True)
        self._since = time.time()

    def __enter__(self):
        if self.bar.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)
            self._poll_once()
        self.bar.close()
        return False

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll_once()

    def _poll_once(self) -> None:
        try:
            rows = [r for r in read_latest_attempt(self.run_url, self.options) if r.get("loss")]
        except Exception:  # noqa: BLE001 (a progress bar never fails a run; the next poll retries)
            return
        if rows and float(rows[-1]["time"]) >= self._since - 5:  # this run's rows, not an older run's
            self.bar.update({**rows[-1], "step": int(rows[-1]["step"]), "max_steps": self.max_steps})
