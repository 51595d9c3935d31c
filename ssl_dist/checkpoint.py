"""Checkpoints: DeepSpeed shards + every rank's stream state + step + RNG + resolved config.

Layout of one checkpoint folder (the merge of every rank's local folder, done by Ray Train
when it persists the checkpoint into `storage_path/<run>/checkpoint-<step>`):

    deepspeed/             engine.save_checkpoint(..., tag="deepspeed"): model and ZeRO shards
    latest, zero_to_*.py   written by DeepSpeed on rank 0
    stream-rank00000.json  one per rank: Loader.state_dict()
    rng-rank00000.pt       one per rank: torch / numpy / python RNG states
    meta.json              rank 0: step, samples seen, world size, global batch, ZeRO stage, resolved config
    parts/rank00000.json   one per rank, written last: every file that rank wrote, with its size

A checkpoint is *complete* when meta.json is there, the part list of each of its
`world_size` ranks is there, and every file a part lists is in storage with the listed
size. A missing rank (its upload never finished) or a truncated file makes it incomplete;
`find_resume` then falls back to the newest complete checkpoint before it, and says so.

Restoring on the world size that wrote the checkpoint downloads only what a rank needs
(its own ZeRO shard, not everyone's). On another world size, one rank per node downloads
the whole checkpoint and converts it with DeepSpeed's universal checkpoint
(`ds_to_universal`), which every rank of that node then loads (`load_universal`): that is
the resharding. The stream state is resharded by `Loader.load_state_dict`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssl_dist import storage

TAG = "deepspeed"
META = "meta.json"
PARTS = "parts"
FORMAT = "ssl_dist.checkpoint/2"
NAME_RE = re.compile(r"^checkpoint-(\d{8,})(?:\.(\d+))?$")
LOCAL_PREFIX = "ssl-dist-ckpt-"


@dataclass
class TrainState:
    """Where the run is: optimizer steps done and samples consumed (global)."""

    step: int = 0
    samples_seen: int = 0


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


class IncompleteCheckpoint(CheckpointError):
    """A checkpoint folder with a part missing or truncated (an upload that never finished)."""


def stream_file(rank: int) -> str:
    return f"stream-rank{rank:05d}.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def part_file(rank: int) -> str:
    return f"{PARTS}/rank{rank:05d}.json"


# ---- names ----------------------------------------------------------------------------------


def name_key(name: str) -> tuple[int, int] | None:
    """(step, repeat) of a checkpoint folder name, None for other names.

    `checkpoint-00000030` is step 30; `checkpoint-00000030.1` is a second checkpoint of step
    30, written after a resume from an earlier one while the first still existed.
    """
    m = NAME_RE.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def is_checkpoint_dir(path: str) -> bool:
    return name_key(os.path.basename(path.rstrip("/"))) is not None


def checkpoint_name(step: int, taken: set[str] = frozenset()) -> str:
    """The folder name for a checkpoint of `step` that no existing folder in `taken` has."""
    name, repeat = f"checkpoint-{step:08d}", 0
    while name in taken:
        repeat += 1
        name = f"checkpoint-{step:08d}.{repeat}"
    return name


def list_checkpoints(run_url: str, options: dict | None = None) -> list[str]:
    """Names of the checkpoint folders of a run, oldest first (complete or not)."""
    fs, path = storage.filesystem(run_url, options)
    with storage.translate_errors(run_url):
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=False)
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in entries]
    return sorted((n for n in names if name_key(n) is not None), key=name_key)


# ---- verification ---------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """A checkpoint found complete in storage: its URL, meta.json and the files of each rank."""

    url: str
    meta: dict
    parts: list[dict] = field(default_factory=list)  # per rank: {relative path: size}

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])

    @property
    def zero_stage(self) -> int:
        return int(self.meta.get("zero_stage", self.meta["config"]["train"]["zero_stage"]))

    @property
    def global_batch(self) -> int:
        """The global batch the run asked for (kept over restarts on other world sizes)."""
        meta = self.meta
        return int(meta.get("target_global_batch")
                   or meta["config"]["data"]["batch_size"] * meta["config"]["run"]["num_workers"])


def inspect(url: str, options: dict | None = None) -> CheckpointInfo:
    """Check that the checkpoint folder at `url` is complete; its info, or IncompleteCheckpoint
    saying what is missing. Costs one recursive listing and one small read per rank."""
    fs, path = storage.filesystem(url, options)
    with storage.translate_errors(url):
        fs.invalidate_cache(path)
        try:
            listing = fs.find(path, detail=True)
        except FileNotFoundError:
            listing = {}
        sizes = {p[len(path) + 1:]: int(info.get("size") or 0) for p, info in listing.items()
                 if info.get("type", "file") != "directory"}
        if META not in sizes:
            raise IncompleteCheckpoint(f"{url} has no {META}" if sizes else f"{url} is empty or missing")
        try:
            meta = json.loads(fs.cat_file(f"{path}/{META}"))
            world = int(meta["world_size"])
        except (ValueError, KeyError) as err:
            raise IncompleteCheckpoint(f"{url}/{META} is unreadable ({err})") from None
        if not any(k.startswith(PARTS + "/") for k in sizes) and meta.get("format") != FORMAT:
            return _inspect_legacy(url, meta, sizes)
        missing = [r for r in range(world) if part_file(r) not in sizes]
        if missing:
            raise IncompleteCheckpoint(f"{url} lacks the part of rank(s) {_ranks(missing)} of {world} "
                                       f"(their upload did not finish)")
        wanted = [f"{path}/{part_file(r)}" for r in range(world)]
        raw = fs.cat(wanted, on_error="return")
        if not isinstance(raw, dict):  # fsspec returns the bytes themselves for a one-element list
            raw = {wanted[0]: raw}
    parts = []
    for r in range(world):
        data = raw.get(wanted[r])
        try:
            part = json.loads(data)
        except (TypeError, ValueError):
            raise IncompleteCheckpoint(f"{url}/{part_file(r)} is unreadable") from None
        if part.get("step") != meta["step"]:
            raise IncompleteCheckpoint(f"{url}: rank {r}'s part is of step {part.get('step')}, meta.json of "
                                       f"step {meta['step']} (parts of different checkpoints)")
        for rel, size in part["files"].items():
            if rel not in sizes:
                raise IncompleteCheckpoint(f"{url} lacks {rel}, written by rank {r}")
            if sizes[rel] != size:
                raise IncompleteCheckpoint(f"{url}/{rel} holds {sizes[rel]} bytes, rank {r} wrote {size} "
                                           f"(truncated or overwritten)")
        parts.append(part["files"])
    return CheckpointInfo(url=url, meta=meta, parts=parts)


def _inspect_legacy(url: str, meta: dict, sizes: dict) -> CheckpointInfo:
    """Checkpoints written before part lists existed: every rank's stream state must be there."""
    world = int(meta["world_size"])
    missing = [r for r in range(world) if stream_file(r) not in sizes]
    if missing or not any(k.startswith(TAG + "/") for k in sizes):
        raise IncompleteCheckpoint(f"{url} lacks the stream state of rank(s) {_ranks(missing)} or the "
                                   f"DeepSpeed shards")
    shared = {k: v for k, v in sizes.items() if not k.startswith(("stream-", "rng-"))}
    parts = [dict(shared, **{stream_file(r): sizes[stream_file(r)]},
                  **({rng_file(r): sizes[rng_file(r)]} if rng_file(r) in sizes else {})) for r in range(world)]
    return CheckpointInfo(url=url, meta=meta, parts=parts)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")


# ---- which checkpoint to resume from --------------------------------------------------------


@dataclass
class Resume:
    """What `find_resume` decided: the checkpoint (None: start from step 0), what it said
    about the ones it skipped, the folders to delete (newer than any registered checkpoint,
    so no one refers to them), and every folder name in use after that."""

    info: CheckpointInfo | None
    notes: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)
    attempt_id: int = 0  # rank 0's start time in ms: names this attempt's records


def find_resume(run_url: str, options: dict | None = None, handed: str | None = None) -> Resume:
    """The checkpoint a (re)started run continues from.

    `handed`: the folder name of the checkpoint Ray Train handed back (its newest
    registered one), or None. It is used if complete; otherwise the newest complete
    checkpoint before it. Without one (a first start, or a run folder whose Ray Train
    snapshot is gone) the newest complete checkpoint in the run folder is used. Folders
    newer than both the handed and the chosen checkpoint are uploads that never counted
    (a worker died before Ray Train registered them): they are returned as `stale`.
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
            break
        except IncompleteCheckpoint as err:
            notes.append(f"checkpoint {name} is incomplete ({err}): falling back to an earlier one")
    if handed is not None and chosen is None:
        notes.append(f"no complete checkpoint at or before {handed}: starting from step 0")
    horizon = max([k for k in (newest_allowed, name_key(chosen.name) if chosen else None) if k is not None],
                  default=None)
    stale = [n for n in names if horizon is None or name_key(n) > horizon]
    if handed is None and chosen is None:
        stale = names  # nothing registered and nothing usable: all of them are dead uploads
    return Resume(info=chosen, notes=notes, stale=stale, taken=set(names) - set(stale))


def agree_on_resume(run_url: str, options: dict | None, handed, cfg, *, rank: int, local_rank: int,
                    group=None) -> Resume:
    """`find_resume` on rank 0, checked against this run's config, stale uploads deleted; the
    same decision on every rank (or the same error: no rank is left waiting). Every rank
    calls it. `handed` is `ray.train.get_checkpoint()`."""
    payload: object = None
    if rank == 0:
        try:
            handed_name = os.path.basename(handed.path.rstrip("/")) if handed is not None else None
            payload = find_resume(run_url, options, handed_name)
            if payload.info is not None:
                check_compatible(payload.info, cfg)
            if payload.stale:
                delete_folders(run_url, payload.stale, options)
                payload.notes.append(f"deleted {len(payload.stale)} checkpoint folder(s) that never counted "
                                     f"(uploads cut short by a failure): {', '.join(payload.stale)}")
            payload.attempt_id = int(time.time() * 1000)
        except Exception as err:  # noqa: BLE001 (re-raised on every rank below)
            payload = err
    payload = _broadcast(payload, group)
    if local_rank == 0:
        remove_orphaned_local_folders()
    if isinstance(payload, BaseException):
        raise payload
    return payload


def check_compatible(info: CheckpointInfo, cfg) -> None:
    """A checkpoint can resume this run only with the same model and ZeRO stage."""
    import dataclasses

    from ssl_dist import config as config_lib

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


def rank0_says(flag: bool, group=None) -> bool:
    """Rank 0's `flag` on every rank (for decisions taken by one clock, e.g. timed checkpoints)."""
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.broadcast(value, src=0, group=group)
    return bool(value.item())


def delete_folders(run_url: str, names: list[str], options: dict | None = None) -> None:
    """Remove checkpoint folders (stale uploads) from the run folder."""
    fs, path = storage.filesystem(run_url, options)
    for name in names:
        with storage.translate_errors(run_url):
            try:
                fs.rm(f"{path}/{name}", recursive=True)
            except FileNotFoundError:
                pass


def newest_complete(run_url: str, options: dict | None = None) -> CheckpointInfo | None:
    """The newest complete checkpoint of a run folder, or None (used by the driver and export)."""
    for name in reversed(list_checkpoints(run_url, options)):
        try:
            return inspect(storage.join(run_url, name), options)
        except IncompleteCheckpoint:
            continue
    return None


def clear_run(run_url: str, options: dict | None = None) -> int:
    """Delete what a previous run left in its folder (checkpoints, Ray Train's snapshot,
    metrics, key logs), for a run started over with `--no-resume`. Returns the number of
    checkpoint folders deleted."""
    fs, path = storage.filesystem(run_url, options)
    with storage.translate_errors(run_url):
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return 0
        entries = fs.ls(path, detail=False)
        count = sum(1 for p in entries if is_checkpoint_dir(p))
        for entry in entries:
            fs.rm(entry, recursive=True)
        fs.invalidate_cache(path)
    return count


# ---- global batch on another world size -----------------------------------------------------


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


# ---- save -----------------------------------------------------------------------------------


def save(directory: str | Path, *, engine, loader, state: TrainState, rank: int, world_size: int,
         config: dict, target_global_batch: int | None = None) -> None:
    """Write this rank's part of a checkpoint into the local `directory`. Every rank calls it
    (DeepSpeed's save is collective)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=TAG)
    (directory / stream_file(rank)).write_text(json.dumps(loader.state_dict()))
    torch.save(rng_state(), directory / rng_file(rank))
    if rank == 0:
        meta = {"format": FORMAT, "step": state.step, "samples_seen": state.samples_seen, "world_size": world_size,
                "global_batch": loader.layout.global_batch,
                "target_global_batch": target_global_batch or loader.layout.global_batch,
                "zero_stage": config["train"]["zero_stage"], "time": time.time(), "config": config}
        (directory / META).write_text(json.dumps(meta, indent=1))
    # Last: the list of what this rank wrote, so that storage can be checked for all of it.
    files = {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file()}
    (directory / PARTS).mkdir(exist_ok=True)
    (directory / part_file(rank)).write_text(json.dumps({"rank": rank, "step": state.step, "files": files}))


def save_and_report(metrics: dict, *, engine, loader, state: TrainState, rank: int, world_size: int,
                    config: dict, name: str | None = None, target_global_batch: int | None = None,
                    async_upload: bool = True) -> dict:
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
         target_global_batch=target_global_batch)
    written = time.monotonic()
    mode = ray.train.CheckpointUploadMode.ASYNC if async_upload else ray.train.CheckpointUploadMode.SYNC
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=name or checkpoint_name(state.step), checkpoint_upload_mode=mode,
                     delete_local_checkpoint_after_upload=True)
    return {"write_s": written - started, "report_s": time.monotonic() - written}


def remove_orphaned_local_folders() -> None:
    """Delete local checkpoint folders left by processes that died before uploading them
    (a killed worker's folders stay in the node's temp dir otherwise). Folders of live
    processes, e.g. other runs on the same node, are kept."""
    import psutil

    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{LOCAL_PREFIX}*"):
        try:
            pid = int(path.name[len(LOCAL_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not psutil.pid_exists(pid):
            shutil.rmtree(path, ignore_errors=True)


# ---- restore --------------------------------------------------------------------------------


def restore(info: CheckpointInfo, *, engine, loader, rank: int, world_size: int, local_rank: int = 0,
            options: dict | None = None, group=None) -> tuple[TrainState, dict]:
    """Load a complete checkpoint into this rank's engine and loader. Every rank calls it
    (it is collective). Returns (state, timings in seconds: download, convert, load)."""
    import torch.distributed as dist

    stage = engine.zero_optimization_stage()
    timings = {"download_s": 0.0, "convert_s": 0.0, "load_s": 0.0}
    fs, path = storage.filesystem(info.url, options)
    reshard = info.world_size != world_size and stage > 0
    token = _broadcast(uuid.uuid4().hex if rank == 0 else None, group)
    with tempfile.TemporaryDirectory(prefix="ssl-dist-restore-") as own:
        # Small files every rank reads: the stream state of every old rank, its own RNG state.
        small = [META, *[stream_file(r) for r in range(info.world_size)]]
        if rank < info.world_size and rng_file(rank) in info.parts[rank]:
            small.append(rng_file(rank))
        started = time.monotonic()
        if not reshard:
            _download(fs, path, small + _deepspeed_files_for(info, rank), own)
            timings["download_s"] = time.monotonic() - started
            started = time.monotonic()
            load_path, _ = engine.load_checkpoint(own, tag=TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed found no checkpoint in {info.url}/{TAG}")
            timings["load_s"] = time.monotonic() - started
        else:
            _download(fs, path, small, own)
            # One rank per node downloads everything and converts; the node's ranks share it.
            shared = Path(tempfile.gettempdir()) / f"ssl-dist-universal-{token}"
            failure = None
            if local_rank == 0:
                try:
                    everything = sorted({f for part in info.parts for f in part if f.startswith(TAG + "/")})
                    _download(fs, path, everything, str(shared / "raw"))
                    timings["download_s"] = time.monotonic() - started
                    started = time.monotonic()
                    to_universal(shared / "raw" / TAG, shared / "universal" / TAG)
                    timings["convert_s"] = time.monotonic() - started
                except Exception as err:  # noqa: BLE001 (every rank must learn of it, or the others wait forever)
                    failure = err
                finally:
                    shutil.rmtree(shared / "raw", ignore_errors=True)
            if not _all_ok(failure is None, group):
                if local_rank == 0:
                    shutil.rmtree(shared, ignore_errors=True)
                if failure is not None:
                    raise CheckpointError(f"converting {info.url} (written by {info.world_size} workers) for "
                                          f"{world_size} workers failed: {failure}") from failure
                raise CheckpointError(f"converting {info.url} for {world_size} workers failed on another node")
            started = time.monotonic()
            try:
                load_universal(engine, shared / "universal")
            finally:
                dist.barrier(group=group)
                if local_rank == 0:
                    shutil.rmtree(shared, ignore_errors=True)
            timings["load_s"] = time.monotonic() - started
        own = Path(own)
        meta = json.loads((own / META).read_text())
        states = [json.loads((own / stream_file(r)).read_text()) for r in range(info.world_size)]
        loader.load_state_dict(states)
        if (own / rng_file(rank)).exists():
            set_rng_state(torch.load(own / rng_file(rank), weights_only=True))
    return TrainState(step=meta["step"], samples_seen=meta["samples_seen"]), timings


def _deepspeed_files_for(info: CheckpointInfo, rank: int) -> list[str]:
    """The DeepSpeed files rank `rank` reads when the world size is unchanged: its own ZeRO
    shards and the shared model states (not the other ranks' optimizer shards)."""
    mine = re.compile(rf"(?:^|_)zero_pp_rank_{rank}_")
    anyone = re.compile(r"(?:^|_)zero_pp_rank_\d+_")
    files = set()
    for part in info.parts:
        for rel in part:
            if not rel.startswith(TAG + "/"):
                continue
            base = rel.rsplit("/", 1)[-1]
            if mine.search(base) or not anyone.search(base):
                files.add(rel)
    return sorted(files)


def _download(fs, path: str, files: list[str], local: str) -> None:
    """Fetch `files` (relative to the checkpoint folder `path`) into the local folder `local`."""
    for rel in files:
        Path(local, rel).parent.mkdir(parents=True, exist_ok=True)
    with storage.translate_errors(path):
        fs.get([f"{path}/{rel}" for rel in files], [str(Path(local, rel)) for rel in files])


def _broadcast(value, group=None):
    """Rank 0's `value` on every rank (`group`: a gloo group, so CPU objects travel)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _all_ok(ok: bool, group=None) -> bool:
    """True on every rank when `ok` is true on every rank (a barrier that carries failure)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def to_universal(source: str | Path, target: str | Path) -> None:
    """Convert a DeepSpeed ZeRO checkpoint tag folder into a universal checkpoint folder.

    `--inject_missing_state`: DeepSpeed only writes the universal-checkpoint info for models
    that declare it (Megatron); a plain torch module needs it added. One process, no pool:
    this runs inside a Ray worker.
    """
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # per-parameter progress bars and prints
        ds_to_universal(args)


def load_universal(engine, directory: str | Path) -> None:
    """Load the universal checkpoint `directory/<TAG>` into `engine`, whatever its world size.

    `load_universal` is a DeepSpeed config flag that only its load path reads, so it is
    switched on around this one load (the engine was built before we knew). DeepSpeed
    restores parameters and optimizer state from the universal files but not the module's
    buffers (BatchNorm statistics): those come from rank 0's model states.
    """
    directory = Path(directory)
    config = engine._config  # noqa: SLF001 (DeepSpeed has no public setter for this flag)
    previous = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = previous
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no universal checkpoint in {directory}")
    states = sorted((directory / TAG).glob("*mp_rank_00_model_states.pt"))
    rank0 = [p for p in states if p.name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    module_state = torch.load((rank0 or states)[0], map_location="cpu", weights_only=False)["module"]
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in module_state:
                buffer.copy_(module_state[name])


# ---- records of an attempt ------------------------------------------------------------------


class AttemptLog:
    """Rank 0's record of one start of the worker group: what it resumed from, what it said,
    its timeline (unix times: start of the loop, engine built, checkpoint restored, first and
    second step done) and the time of each checkpoint's local write and report. Written to
    `attempts/attempt-<start step>-<id>.json` in the run folder (read by the benchmark)."""

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
        if not self.active or self._steps >= 2:
            return
        self._steps += 1
        self.record["timeline"]["first_step" if self._steps == 1 else "second_step"] = time.time()
        if self._steps == 2:
            self.flush()

    def checkpointed(self, step: int, name: str, timing: dict) -> None:
        if self.active:
            self.record["checkpoints"].append({"step": step, "name": name, **timing})
            self.flush()

    def flush(self) -> None:
        _write_text(self.url, json.dumps(self.record, indent=1), self.options)


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
        _write_text(self.url, "".join(line + "\n" for line in self.lines), self.options)


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


def _write_text(url: str, text: str, options: dict) -> None:
    fs, path = storage.filesystem(url, options)
    with storage.translate_errors(url):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            f.write(text)


# ---- RNG ------------------------------------------------------------------------------------


def rng_state() -> dict:
    """RNG states as tensors and ints only, so that loading needs no unpickling of objects."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss": py_gauss}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
