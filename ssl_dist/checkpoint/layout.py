"""What a checkpoint folder is: file and folder names, completeness, listing, moving aside and deleting.

A checkpoint is *complete* when meta.json is there, the part list of each of its
`world_size` ranks is there, and every file a part lists is in storage with the listed
size and sha256. A missing rank (its upload never finished), a truncated or altered file,
or a name outside the folder makes it incomplete.
Everything here is I/O on storage only (fsspec): no engine, no process group, no Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field

from ssl_dist import storage
from ssl_dist.lease import LEASE  # the live driver's lease: never moved or deleted here

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
    digests: list[dict] = field(default_factory=list)  # per rank: {relative path: sha256}; [] before digests
    notes: list[str] = field(default_factory=list)  # what a user should know of it (checked by size only)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def sha256(self) -> dict[str, str]:
        """{relative path: sha256} of every file its parts list ({} for one written before digests)."""
        return {rel: digest for listed in self.digests for rel, digest in listed.items()}

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
    def step_batch(self) -> int:
        """Samples per optimizer step of the attempt that wrote it: its loader's global batch on
        its world size times its train.accumulate (what optim.lr_scaling scaled by)."""
        meta = self.meta
        loader_batch = meta.get("global_batch") or self.global_batch
        return int(loader_batch) * int(meta["config"].get("train", {}).get("accumulate", 1))

    @property
    def global_batch(self) -> int:
        """The global batch the run asked for (kept over restarts on other world sizes), as
        recorded; checkpoints older than target_global_batch ran on their configured one."""
        meta = self.meta
        return int(meta.get("target_global_batch")
                   or meta["config"]["data"]["batch_size"] * meta["config"]["run"]["num_workers"])


def inspect(url: str, options: dict | None = None, *, digests: bool = True) -> CheckpointInfo:
    """Check that the checkpoint folder at `url` is complete; its info, or IncompleteCheckpoint
    saying what is missing, truncated, altered, or named outside the folder. Any process.

    Costs one recursive listing and one small read per rank, and with `digests` (the
    default) one read of every file the parts list, hashed (sha256) against the digest its
    rank wrote: a same-size bit flip makes the checkpoint incomplete. Callers walking back
    through a run (`find_resume`, `newest_complete`) stop at the first complete one, so only
    the checkpoint they choose is read whole. A checkpoint written before digests is checked
    by size only, and its `notes` say so.
    """
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
        checked = [_checked_part(url, r, raw.get(wanted[r]), meta["step"], sizes) for r in range(world)]
        parts, listed = [files for files, _ in checked], [sha for _, sha in checked]
        info = CheckpointInfo(url=url, meta=meta, parts=parts, digests=listed if any(listed) else [])
        if not all(listed):
            info.notes.append(f"{url} was written before checkpoints carried digests: its files are checked by "
                              f"size only")
        if digests and info.digests:
            _check_digests(url, fs, path, info)
    return info


def _checked_part(url: str, rank: int, data: bytes | None, step: int, sizes: dict) -> tuple[dict, dict]:
    """Rank `rank`'s part list: ({relative path: size}, {relative path: sha256}, empty for a
    part written before digests), each of its files inside the folder and found in `sizes`."""
    try:
        part = json.loads(data)
        files, digests = part["files"], part.get("sha256", {})
        if not isinstance(files, dict) or not isinstance(digests, dict):
            raise TypeError(type(files).__name__)
    except (TypeError, ValueError, KeyError):
        raise IncompleteCheckpoint(f"{url}/{part_file(rank)} is unreadable") from None
    if part.get("step") != step:
        raise IncompleteCheckpoint(f"{url}: rank {rank}'s part is of step {part.get('step')}, meta.json of "
                                   f"step {step} (parts of different checkpoints)")
    for rel in [*files, *digests]:
        check_name(url, rel, part_file(rank))
    for rel, size in files.items():
        if rel not in sizes:
            raise IncompleteCheckpoint(f"{url} lacks {rel}, written by rank {rank}")
        if sizes[rel] != size:
            raise IncompleteCheckpoint(f"{url}/{rel} holds {sizes[rel]} bytes, rank {rank} wrote {size} "
                                       f"(truncated or overwritten)")
    if digests and digests.keys() != files.keys():
        raise IncompleteCheckpoint(f"{url}/{part_file(rank)} lists a digest for other files than it lists")
    return files, digests


def _check_digests(url: str, fs, path: str, info: CheckpointInfo) -> None:
    """IncompleteCheckpoint unless every file of every part hashes to the digest its rank
    wrote. The files are read in a few threads, each streamed: memory stays small."""
    from concurrent.futures import ThreadPoolExecutor

    expected = {(rel, rank): digest for rank, listed in enumerate(info.digests) for rel, digest in listed.items()}
    names = sorted({rel for rel, _ in expected})
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        found = dict(zip(names, pool.map(lambda rel: file_sha256(fs, f"{path}/{rel}"), names)))
    for (rel, rank), digest in sorted(expected.items()):
        if found[rel] != digest:
            raise IncompleteCheckpoint(f"{url}/{rel} does not match the sha256 rank {rank} wrote (altered since: "
                                       f"a bad disk or an overwrite)")


def file_sha256(fs, path: str) -> str:
    """The sha256 (hex) of the file at `path` of `fs`, read in 1 MiB blocks. Any process."""
    with fs.open(path, "rb", block_size=2**20) as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_name(url: str, rel: str, where: str) -> None:
    """IncompleteCheckpoint unless `rel`, a file name read from storage (a part list, a
    listing), stays inside the checkpoint folder `url`: relative, "/"-separated, no empty,
    "." or ".." segment, no backslash (a Windows separator). Used wherever such a name
    becomes a path (inspect, restore's download)."""
    inside = (isinstance(rel, str) and "\\" not in rel and "\0" not in rel
              and all(segment not in ("", ".", "..") for segment in rel.split("/")))
    if not inside:
        raise IncompleteCheckpoint(f"{url}: {where} names a file outside its checkpoint folder ({rel!r}): "
                                   f"refusing the checkpoint; delete it, or use another checkpoint of the run")


def _inspect_legacy(url: str, meta: dict, sizes: dict) -> CheckpointInfo:
    """Checkpoints written before part lists existed: every rank's stream state must be there
    (checked by presence only, and its notes say so)."""
    for rel in sizes:
        check_name(url, rel, "its listing")
    world = int(meta["world_size"])
    missing = [r for r in range(world) if stream_file(r) not in sizes]
    if missing or not any(k.startswith(TAG + "/") for k in sizes):
        raise IncompleteCheckpoint(f"{url} lacks the stream state of rank(s) {_ranks(missing)} or the "
                                   f"DeepSpeed shards")
    shared = {k: v for k, v in sizes.items() if not k.startswith(("stream-", "rng-"))}
    parts = [dict(shared, **{stream_file(r): sizes[stream_file(r)]},
                  **({rng_file(r): sizes[rng_file(r)]} if rng_file(r) in sizes else {})) for r in range(world)]
    note = f"{url} was written before checkpoints listed their files: it is checked by the files' presence only"
    return CheckpointInfo(url=url, meta=meta, parts=parts, notes=[note])


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


# ---- moving aside and deleting: only what this project wrote ---------------------------------

SET_ASIDE = "set-aside"  # <run>/set-aside/<checkpoint name>-<UTC time>: folders resume will not use
# The top-level entries of a run folder that this project writes (besides the checkpoint
# folders): its records, metrics and config, and Ray Train's own files there (V2: the
# checkpoint manager's snapshot, the storage probe, the hang detector's diagnostics).
# `--no-resume` moves or deletes these and nothing else; any other entry is left and named.
RUN_ARTEFACTS = frozenset({"config.yaml", "curves.png", "metrics", "tensorboard", "attempts", "keys", SET_ASIDE,
                           "checkpoint_manager_snapshot.json", ".validate_storage_marker", "hang_detector"})


@dataclass
class Cleared:
    """What `move_run_aside` or `clear_run` did to a run folder."""

    entries: list[str]  # this project's entries moved (or deleted), by name
    left: list[str]  # the folder's other entries, left where they are
    moved_to: str | None = None  # the URL they went to (None: deleted, or nothing to move)

    @property
    def checkpoints(self) -> int:
        return sum(1 for name in self.entries if name_key(name) is not None)


def utc_stamp(now: float | None = None) -> str:
    """YYYYmmddTHHMMSSZ of `now` (default: the current time), for the names of what is moved aside."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))


def run_entries(run_url: str, options: dict | None = None) -> tuple[list[str], list[str]]:
    """(this project's entries, other entries) at the top of a run folder, by name; the lease
    is in neither (it belongs to the driver that holds it)."""
    fs, path = storage.filesystem(run_url, options)
    with storage.translate_errors(run_url):
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return [], []
        names = sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)} - {LEASE, ""})
    ours = [n for n in names if n in RUN_ARTEFACTS or name_key(n) is not None]
    return ours, [n for n in names if n not in ours]


def move_run_aside(run_url: str, options: dict | None = None, *, now: float | None = None) -> Cleared:
    """Move what a previous run wrote in its folder into the sibling `<run>.previous-<UTC time>`,
    for a run started over with `--no-resume`; other entries stay. Driver only, lease held.
    Locally each entry is renamed; on an object store each key is copied, then deleted."""
    ours, others = run_entries(run_url, options)
    if not ours:
        return Cleared(entries=[], left=others)
    fs, path = storage.filesystem(run_url, options)
    dest = f"{run_url.rstrip('/')}.previous-{utc_stamp(now)}"
    with storage.translate_errors(run_url):
        for repeat in range(1, 1000):  # two starts over within one second
            if not fs.exists(storage.filesystem(dest, options)[1]):
                break
            dest = f"{run_url.rstrip('/')}.previous-{utc_stamp(now)}-{repeat}"
        for name in ours:
            _move(fs, f"{path}/{name}", f"{storage.filesystem(dest, options)[1]}/{name}")
        fs.invalidate_cache(path)
    return Cleared(entries=ours, left=others, moved_to=dest)


def clear_run(run_url: str, options: dict | None = None) -> Cleared:
    """Delete what a previous run wrote in its folder (checkpoints, Ray Train's snapshot,
    metrics, records, config.yaml), for `--no-resume --delete-previous`; other entries stay.
    Driver only, lease held."""
    ours, others = run_entries(run_url, options)
    fs, path = storage.filesystem(run_url, options)
    with storage.translate_errors(run_url):
        for name in ours:
            fs.rm(f"{path}/{name}", recursive=True)
        fs.invalidate_cache(path)
    return Cleared(entries=ours, left=others)


def set_aside(run_url: str, names: list[str], options: dict | None = None, *, now: float | None = None) -> list[str]:
    """Move checkpoint folders that a resume will not use into `<run>/set-aside/<name>-<UTC time>`
    (nothing is deleted: a complete one stays usable there). Returns their new URLs."""
    fs, path = storage.filesystem(run_url, options)
    moved = []
    with storage.translate_errors(run_url):
        for name in names:
            target = f"{SET_ASIDE}/{name}-{utc_stamp(now)}"
            repeat = 0
            while fs.exists(f"{path}/{target}"):
                repeat += 1
                target = f"{SET_ASIDE}/{name}-{utc_stamp(now)}-{repeat}"
            _move(fs, f"{path}/{name}", f"{path}/{target}")
            moved.append(storage.join(run_url, target))
        fs.invalidate_cache(path)
    return moved


def _move(fs, src: str, dst: str) -> None:
    """Move a file or folder within one filesystem: a rename locally; on an object store every
    key is copied first and deleted only after all of them are copied."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)
        return
    keys = [k for k, info in fs.find(src, detail=True).items() if info.get("type", "file") != "directory"]
    for key in keys:
        fs.copy(key, dst + key[len(src):])
    if keys:
        fs.rm(keys)
    fs.invalidate_cache(src)
