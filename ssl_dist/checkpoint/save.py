"""Writing a checkpoint: what each rank saves, and when the run saves.

Every rank writes its part into a local folder (`save`): DeepSpeed's files for its ZeRO
shard, its stream state and RNG state; rank 0 adds meta.json; each rank's part list (every
file it wrote, with its size and sha256) comes last, so that storage can be checked for all of it.
`save_and_report` hands that folder to Ray Train, which uploads every rank's part into
`storage_path/<run>/<name>` and merges them there. `Checkpointer` decides when.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ssl_dist import collective
from ssl_dist import config as config_lib
from ssl_dist.checkpoint.layout import (FORMAT, META, PARTS, TAG, TrainState, checkpoint_name, part_file,
                                        rng_file, stream_file)

if TYPE_CHECKING:  # resume.py imports this module (for remove_orphaned_local_folders)
    from ssl_dist.checkpoint.resume import BatchPlan

LOCAL_PREFIX = "ssl-dist-ckpt-"  # + "<pid>-": local folders of a live process are never removed


class Checkpointer:
    """Decides when this run checkpoints and writes the checkpoint. Every rank makes the same calls.

    `cfg`: the run's config as given (saved into meta.json; its data.batch_size is the
    configured one, the per-worker batch of this world size is `batch.per_worker`).
    `taken`: the checkpoint folder names already in storage (`Resume.taken`); every name this
    checkpointer picks is added to it. `clock`: seconds, for train.checkpoint_minutes.
    `attempt`: the driver's attempt id (its lease of the run folder), recorded in meta.json.
    """

    def __init__(self, cfg: config_lib.Config, *, rank: int, world_size: int, group, taken: set[str],
                 batch: BatchPlan, clock: Callable[[], float] = time.monotonic, attempt: str = ""):
        self.cfg, self.rank, self.world_size, self.group = cfg, rank, world_size, group
        self.taken, self.batch, self.clock = taken, batch, clock
        self.attempt = attempt
        self.last_save = clock()  # the timed schedule counts from this (re)start

    def due(self, step: int, *, force: bool = False, late: bool = False) -> bool:
        """Whether a checkpoint of `step` is due: every train.checkpoint_every steps, at
        train.max_steps, when `force`d, or when `late` (train.checkpoint_minutes have passed,
        by rank 0's clock). Pure: no clock, no collective."""
        every = self.cfg.train.checkpoint_every
        return bool((every and step % every == 0) or step == self.cfg.train.max_steps or force or late)

    def late(self) -> bool:
        """train.checkpoint_minutes (if set) have passed since the last save, by this rank's clock."""
        minutes = self.cfg.train.checkpoint_minutes
        return minutes > 0 and self.clock() - self.last_save >= 60 * minutes

    def decide(self, step: int, *, force: bool = False) -> bool:
        """Whether to save at `step`, the same answer on every rank (every rank calls it).

        Only rank 0's clock counts for the timed schedule (clocks differ between ranks, and a
        rank that saved alone would leave the others waiting in DeepSpeed's collective save);
        so the collective runs only when train.checkpoint_minutes > 0 and the step is not
        already due, never on a step the count of steps decides alone.
        """
        if self.due(step, force=force):
            return True
        if self.cfg.train.checkpoint_minutes <= 0:
            return False
        return collective.rank0_says(self.rank == 0 and self.late(), group=self.group)

    def save(self, state: TrainState, *, engine, loader, force: bool = False,
             before: Callable[[], None] | None = None) -> dict | None:
        """Called by every rank once per optimizer step: saves when due (`decide`), in a
        folder whose name is not in `taken`. `before` runs on every rank just before the
        write (e.g. the key log's flush, so the audit records cover what the checkpoint does).
        Returns {"name", "write_s", "report_s"} when it saved, else None."""
        if not self.decide(state.step, force=force):
            return None
        name = checkpoint_name(state.step, self.taken)
        self.taken.add(name)
        if before is not None:
            before()
        timing = save_and_report({"step": state.step, "samples_seen": state.samples_seen}, engine=engine,
                                 loader=loader, state=state, rank=self.rank, world_size=self.world_size,
                                 config=self.cfg, batch=self.batch, name=name,
                                 async_upload=self.cfg.train.async_upload, attempt=self.attempt)
        self.last_save = self.clock()
        return {"name": name, **timing}


def save_and_report(metrics: dict, *, engine, loader, state: TrainState, rank: int, world_size: int,
                    config: config_lib.Config, batch: BatchPlan, name: str | None = None,
                    async_upload: bool = True, attempt: str = "") -> dict:
    """Save this rank's part into a local folder and hand it to Ray Train, which uploads it
    into `storage_path/<run>/<name>` (rank 0's `name` is used by every rank) and merges every
    rank's part there. Every rank calls it. With `async_upload` the upload runs in Ray
    Train's background thread and the local folder is deleted once uploaded; training goes
    on after the local write. Returns {"write_s", "report_s"}.
    """
    import ray.train

    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix=f"{LOCAL_PREFIX}{os.getpid()}-")
    save(tmp, engine=engine, loader=loader, state=state, rank=rank, world_size=world_size, config=config,
         batch=batch, attempt=attempt)
    written = time.monotonic()
    mode = ray.train.CheckpointUploadMode.ASYNC if async_upload else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=name or checkpoint_name(state.step), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)
    return {"write_s": written - started, "report_s": time.monotonic() - written}


def save(directory: str | Path, *, engine, loader, state: TrainState, rank: int, world_size: int,
         config: config_lib.Config, batch: BatchPlan, attempt: str = "") -> None:
    """Write this rank's part of a checkpoint into the local `directory`, a folder of this
    rank's own: its part list is every file in it, so a folder shared with another rank would
    list that rank's files, half-written. Every rank calls it (DeepSpeed's save is
    collective). meta.json records the loader's global batch on this world size and the
    run's target (`batch.global_batch`), which a restart keeps."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=TAG)
    (directory / stream_file(rank)).write_text(json.dumps(loader.state_dict()))
    torch.save(rng_state(), directory / rng_file(rank))
    if rank == 0:
        meta = {"format": FORMAT, "step": state.step, "samples_seen": state.samples_seen, "world_size": world_size,
                "global_batch": loader.layout.global_batch, "target_global_batch": batch.global_batch,
                "zero_stage": config.train.zero_stage, "time": time.time(), "attempt": attempt,
                "config": config_lib.to_dict(config)}
        (directory / META).write_text(json.dumps(meta, indent=1))
    # Last: the list of what this rank wrote, with each file's size and sha256, so that storage
    # can be checked for all of it. DeepSpeed writes its files itself: they are hashed here,
    # read back from the local disk they were just written to (its page cache), before upload.
    written = [p for p in sorted(directory.rglob("*")) if p.is_file()]
    files = {p.relative_to(directory).as_posix(): p.stat().st_size for p in written}
    digests = {p.relative_to(directory).as_posix(): _sha256(p) for p in written}
    (directory / PARTS).mkdir(exist_ok=True)
    (directory / part_file(rank)).write_text(json.dumps({"rank": rank, "step": state.step, "files": files,
                                                         "sha256": digests}))


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def remove_orphaned_local_folders() -> None:
    """Delete local checkpoint folders left by processes that died before uploading them
    (a killed worker's folders stay in the node's temp dir otherwise). Folders of live
    processes, e.g. other runs on the same node, are kept. One process per node calls it."""
    import psutil

    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{LOCAL_PREFIX}*"):
        try:
            pid = int(path.name[len(LOCAL_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not psutil.pid_exists(pid):
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict:
    """RNG states as tensors and ints only, so that loading needs no unpickling of objects
    (`restore.set_rng_state` puts them back)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss": py_gauss}}
