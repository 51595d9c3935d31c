"""What a checkpoint folder is: file and folder names, completeness, listing and deleting.

A checkpoint is *complete* when meta.json is there, the part list of each of its
`world_size` ranks is there, and every file a part lists is in storage with the listed
size. A missing rank (its upload never finished) or a truncated file makes it incomplete.
Everything here is I/O on storage only (fsspec): no engine, no process group, no Ray.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ssl_dist import storage

TAG = "deepspeed"
META = "meta.json"
PARTS = "parts"
FORMAT = "ssl_dist.checkpoint/2"
NAME_RE = re.compile(r"^checkpoint-(\d{8,})(?:\.(\d+))?$")


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


# ---- completeness ---------------------------------------------------------------------------


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
        """The global batch the run asked for (kept over restarts on other world sizes), as
        recorded; checkpoints older than target_global_batch ran on their configured one."""
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
    parts = [_checked_part(url, r, raw.get(wanted[r]), meta["step"], sizes) for r in range(world)]
    return CheckpointInfo(url=url, meta=meta, parts=parts)


def _checked_part(url: str, rank: int, data: bytes | None, step: int, sizes: dict) -> dict:
    """Rank `rank`'s part list ({relative path: size}), each of its files found in `sizes`."""
    try:
        part = json.loads(data)
    except (TypeError, ValueError):
        raise IncompleteCheckpoint(f"{url}/{part_file(rank)} is unreadable") from None
    if part.get("step") != step:
        raise IncompleteCheckpoint(f"{url}: rank {rank}'s part is of step {part.get('step')}, meta.json of "
                                   f"step {step} (parts of different checkpoints)")
    for rel, size in part["files"].items():
        if rel not in sizes:
            raise IncompleteCheckpoint(f"{url} lacks {rel}, written by rank {rank}")
        if sizes[rel] != size:
            raise IncompleteCheckpoint(f"{url}/{rel} holds {sizes[rel]} bytes, rank {rank} wrote {size} "
                                       f"(truncated or overwritten)")
    return part["files"]


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


def newest_complete(run_url: str, options: dict | None = None) -> CheckpointInfo | None:
    """The newest complete checkpoint of a run folder, or None (used by the driver and export)."""
    for name in reversed(list_checkpoints(run_url, options)):
        try:
            return inspect(storage.join(run_url, name), options)
        except IncompleteCheckpoint:
            continue
    return None


# ---- deleting -------------------------------------------------------------------------------


def delete_folders(run_url: str, names: list[str], options: dict | None = None) -> None:
    """Remove checkpoint folders (stale uploads) from the run folder."""
    fs, path = storage.filesystem(run_url, options)
    for name in names:
        with storage.translate_errors(run_url):
            try:
                fs.rm(f"{path}/{name}", recursive=True)
            except FileNotFoundError:
                pass


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
