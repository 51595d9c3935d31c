"""Where a (re)started run continues, and with which batch.

`find_resume` falls back from an incomplete checkpoint to the newest complete one before
it, and says so; `agree_on_resume` makes that rank 0's decision for every rank.
`decide_batch` is the one place that says what the run's global batch is and how it splits
over this many workers: a restart on another number of workers (elastic, or `--resume` with
another run.num_workers) keeps the global batch of the run's start.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

from ssl_dist import collective, storage
from ssl_dist import config as config_lib
from ssl_dist.checkpoint.layout import (CheckpointError, CheckpointInfo, IncompleteCheckpoint, inspect,
                                        list_checkpoints, name_key, set_aside)
from ssl_dist.checkpoint.save import remove_orphaned_local_folders


@dataclass
class Resume:
    """What `find_resume` decided: the checkpoint (None: start from step 0), what it said
    about the ones it skipped, the folders it will not use that must leave the run folder
    (newer than any registered checkpoint, so no one refers to them: `agree_on_resume` moves
    them into set-aside/, never deletes them), and every folder name in use after that."""

    info: CheckpointInfo | None
    notes: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)
    attempt_id: int = 0  # rank 0's start time in ms: names this attempt's records


def find_resume(run_url: str, options: dict | None = None, handed: str | None = None) -> Resume:
    """The checkpoint a (re)started run continues from. Any one process (no collective).

    `handed`: the folder name of the checkpoint Ray Train handed back (its newest
    registered one), or None. It is used if complete; otherwise the newest complete
    checkpoint before it. Without one (a first start, or a run folder whose Ray Train
    snapshot is gone) the newest complete checkpoint in the run folder is used. Folders
    newer than both the handed and the chosen checkpoint are uploads that never counted
    (a worker died before Ray Train registered them), or complete ones of a lineage this
    resume does not continue: they are returned as `stale`.
    """
    names = list_checkpoints(run_url, options)
    if handed is not None and handed not in names:
        names = sorted(set(names) | {handed}, key=name_key)
    newest_allowed = name_key(handed) if handed is not None else None
    notes = []
    chosen = None
    for name in reversed(names):
        if newest_allowed is not None and name_key(name) > newest_allowed:
            continue
        try:
            chosen = inspect(storage.join(run_url, name), options)
            notes.extend(chosen.notes)  # e.g. written before digests: checked by size only
            break
        except IncompleteCheckpoint as err:
            notes.append(f"checkpoint {name} is incomplete ({err}): falling back to an earlier one")
    if handed is not None and chosen is None:
        notes.append(f"no complete checkpoint at or before {handed}: starting from step 0")
    horizon = max([k for k in (newest_allowed, name_key(chosen.name) if chosen else None) if k is not None],
                  default=None)
    stale = [n for n in names if horizon is None or name_key(n) > horizon]
    if handed is None and chosen is None:
        stale = names  # nothing registered and nothing complete: all of them are cut-short uploads
    return Resume(info=chosen, notes=notes, stale=stale, taken=set(names) - set(stale))


def agree_on_resume(run_url: str, options: dict | None, handed, cfg: config_lib.Config, *, rank: int,
                    local_rank: int, group=None) -> Resume:
    """`find_resume` on rank 0, checked against this run's config, the folders it will not use
    moved into `<run>/set-aside/` (a complete checkpoint is never deleted: a bit flip found
    later, or a resume that chose wrongly, can still be undone by hand); the same decision on
    every rank (or the same error: no rank is left waiting). Every rank calls it. `handed`
    is `ray.train.get_checkpoint()`."""
    payload: object = None
    if rank == 0:
        try:
            handed_name = os.path.basename(handed.path.rstrip("/")) if handed is not None else None
            payload = find_resume(run_url, options, handed_name)
            if payload.info is not None:
                check_compatible(payload.info, cfg)
            if payload.stale:
                moved = set_aside(run_url, payload.stale, options)
                payload.notes.append(f"moved {len(moved)} checkpoint folder(s) this resume does not use (newer "
                                     f"than the one it continues from, or incomplete) aside, nothing deleted: "
                                     + ", ".join(f"{name} -> {url}" for name, url in zip(payload.stale, moved)))
            payload.attempt_id = int(time.time() * 1000)
        except Exception as err:  # noqa: BLE001 (re-raised on every rank below)
            payload = err
    payload = collective.broadcast(payload, group)
    if local_rank == 0:
        remove_orphaned_local_folders()
    if isinstance(payload, BaseException):
        raise payload
    return payload


def check_compatible(info: CheckpointInfo, cfg: config_lib.Config) -> None:
    """A checkpoint can resume this run only with the same model and ZeRO stage. Any process."""
    try:  # through the config's own defaults, so that a field added since then is no difference
        then = dataclasses.asdict(config_lib.from_dict(info.meta["config"]).model)
    except config_lib.ConfigError:
        then = info.meta["config"]["model"]
    diff = [f"model.{k}: {then[k]!r} there, {v!r} here" for k, v in dataclasses.asdict(cfg.model).items()
            if k in then and then[k] != v]
    if diff:
        raise CheckpointError(f"{info.url} holds another model ({', '.join(diff)}): use the checkpoint's model "
                              f"settings, or a new run.name to start over")
    if info.zero_stage != cfg.train.zero_stage:
        raise CheckpointError(f"{info.url} was written with ZeRO stage {info.zero_stage}, this run uses "
                              f"{cfg.train.zero_stage}: resume with train.zero_stage={info.zero_stage}")


# ---- the batch decision -------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """The batch of a (re)started run on this many workers (see `decide_batch`)."""

    global_batch: int  # the run's target global batch (kept across restarts on any worker count)
    per_worker: int  # samples per worker per micro-batch on this world size
    note: str | None  # what train.indivisible_batch did, when the target does not divide


def decide_batch(cfg: config_lib.Config, world_size: int, info: CheckpointInfo | None) -> BatchPlan:
    """The run's global batch and this world size's share of it. Pure: any process, and
    every rank computes the same plan from the same inputs.

    The target is the one the checkpoint `info` recorded (the run's batch at its first
    start), or, for a run starting at step 0, data.batch_size x run.num_workers of `cfg`
    (the config as given, not one with a per-worker batch already put in). On a world size
    that does not divide it, train.indivisible_batch decides (CheckpointError under "error").
    """
    target = info.global_batch if info is not None else cfg.data.batch_size * cfg.run.num_workers
    per_worker, note = worker_batch(target, world_size, cfg.data.batch_size, cfg.train.indivisible_batch)
    return BatchPlan(global_batch=target, per_worker=per_worker, note=note)


def worker_batch(global_batch: int, world_size: int, configured: int, policy: str) -> tuple[int, str | None]:
    """Per-worker batch that keeps the run's `global_batch` on `world_size` workers.

    Returns (batch, note): note is None when the global batch is kept exactly, else says what
    `policy` (train.indivisible_batch) did. `configured` is data.batch_size.
    """
    if global_batch % world_size == 0:
        return global_batch // world_size, None
    if policy == "error":
        raise CheckpointError(f"the run's global batch of {global_batch} does not divide among {world_size} "
                              f"workers: run on a number of workers that divides it, or set "
                              f"train.indivisible_batch=round_down or keep_per_worker")
    if policy == "keep_per_worker":
        batch = configured
    else:
        batch = max(1, global_batch // world_size)
    return batch, (f"the run's global batch of {global_batch} does not divide among {world_size} workers: "
                   f"train.indivisible_batch={policy} gives {batch} per worker, a global batch of "
                   f"{batch * world_size}")
