"""Audit records in the run folder: one JSON per start of the worker group (`attempts/`) and
each rank's sample keys per step (`keys/`). Read by the benchmarks and the fault-tolerance
tests (exactly-once, exact resume); training never reads them back.

Object stores cannot append, so each record is rewritten whole at every flush.
"""

from __future__ import annotations

import json
import re
import time

from ssl_dist import storage


class AttemptLog:
    """Rank 0's record of one start of the worker group: what it resumed from, what it said,
    its timeline (unix times: start of the loop, engine built, checkpoint restored, first and
    second step done) and the time of each checkpoint's local write and report. Written to
    `attempts/attempt-<start step>-<id>.json` in the run folder (read by the benchmark).
    Every rank may make the calls; only rank 0 writes."""

    def __init__(self, run_url: str, *, rank: int, start_step: int, attempt_id: int, world_size: int,
                 resumed_from: str | None, notes: list[str], timeline: dict, restore: dict,
                 storage_options: dict | None = None):
        self.active = rank == 0
        self.url = storage.join(run_url, "attempts", f"attempt-{start_step:08d}-{attempt_id}.json")
        self.options = storage_options or {}
        self.record = {"start_step": start_step, "world_size": world_size, "resumed_from": resumed_from,
                       "notes": list(notes), "timeline": dict(timeline), "restore": dict(restore), "checkpoints": []}
        self._steps = 0

    def step_done(self, step: int) -> None:
        """Call after every step: the first two steps after a (re)start go into the timeline."""
        if not self.active or self._steps >= 2:
            return
        self._steps += 1
        self.record["timeline"]["first_step" if self._steps == 1 else "second_step"] = time.time()
        if self._steps == 2:
            self.flush()

    def checkpointed(self, step: int, name: str, timing: dict) -> None:
        """Call after each checkpoint: its name and timings (seconds)."""
        if self.active:
            self.record["checkpoints"].append({"step": step, "name": name, **timing})
            self.flush()

    def flush(self) -> None:
        storage.write_text(self.url, json.dumps(self.record, indent=1), self.options)


class KeyLog:
    """One rank's sample keys per step (train.log_keys): `keys/attempt-<start step>-<id>-rank<r>.jsonl`,
    a line {"step", "epoch", "keys"} per step, rewritten whole at each flush (object stores
    cannot append). An audit aid: exactly-once and exact-resume checks read it."""

    def __init__(self, run_url: str, *, rank: int, start_step: int, attempt_id: int,
                 storage_options: dict | None = None):
        self.url = storage.join(run_url, "keys", f"attempt-{start_step:08d}-{attempt_id}-rank{rank:05d}.jsonl")
        self.options = storage_options or {}
        self.lines: list[str] = []

    def add(self, step: int, epoch: int, batches: list[dict]) -> None:
        keys = [key for batch in batches for key in batch["__key__"]]
        self.lines.append(json.dumps({"step": step, "epoch": epoch, "keys": keys}))

    def flush(self) -> None:
        storage.write_text(self.url, "".join(line + "\n" for line in self.lines), self.options)


def read_keys(run_url: str, options: dict | None = None) -> list[dict]:
    """Every key log of a run, oldest attempt first: [{"start_step", "attempt", "rank", "rows"}]."""
    fs, path = storage.filesystem(storage.join(run_url, "keys"), options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    logs = []
    for name in fs.ls(path, detail=False):
        m = re.search(r"attempt-(\d+)-(\d+)-rank(\d+)\.jsonl$", name)
        if m:
            rows = [json.loads(line) for line in fs.cat_file(name).decode().splitlines() if line.strip()]
            logs.append({"start_step": int(m.group(1)), "attempt": int(m.group(2)), "rank": int(m.group(3)),
                         "rows": rows})
    return sorted(logs, key=lambda log: (log["attempt"], log["rank"]))
