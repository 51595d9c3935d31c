"""ShardStream: an exactly-once, resumable, elastic stream of batches from WebDataset shards.

How an epoch is laid out (all of it a function of the manifest, the seed and the epoch):

1. The shards are permuted (seed, epoch); concatenated, they give the epoch's *sequence*
   of sample positions 0..T-1.
2. A *plan* is the part of that sequence still to be delivered: `leftover` positions (what a
   resume with another layout carried over from a half-used window) followed by the
   positions `start..T-1`. A fresh epoch's plan is simply 0..T-1.
3. The plan is cut into global batches of B = batch_size x world_size samples (a remainder
   smaller than B is dropped and reported), and the batches are grouped into *windows* of
   about `shuffle_window` samples.
4. In a window, rank r takes a contiguous slice; in it, loader worker l takes a contiguous
   sub-slice holding exactly the batches j with j % num_workers == l, reads it with ranged
   reads (one per run of consecutive samples of a shard), shuffles it in memory and cuts it
   into batches. Torch's DataLoader returns the workers' batches round-robin, so a rank
   sees its batches in order j = 0, 1, 2, ... and every rank gets the same number.

Because every rank consumes the same number of batches, the state is one integer: the
global batches consumed in the current plan, plus the layout that produced them. Restored
with the same layout, the stream continues with exactly the batches a failure-free run
would have seen. Restored with another layout (ranks, loader workers, batch size), it
recomputes which positions of the half-used window were consumed and makes a new plan of
the rest; exactly-once still holds for the epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, asdict
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl_dist import shards as shardlib
from ssl_dist import storage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


class DataError(RuntimeError):
    """A user-facing data problem (missing manifest, empty dataset, corrupt shard...)."""


# ---- the epoch plan -----------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a plan's batches are spread: equal layouts give identical batches."""

    world_size: int
    num_workers: int
    batch_size: int
    window_batches: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size


@dataclass
class Plan:
    """The positions of one epoch still to be delivered: `leftover` then `start..total-1`."""

    epoch: int
    total: int
    start: int = 0
    leftover: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.leftover) + self.total - self.start

    def at(self, indices: np.ndarray) -> np.ndarray:
        """Sequence positions of arbitrary plan indices."""
        indices = np.asarray(indices, dtype=np.int64)
        n_left = len(self.leftover)
        out = indices - n_left + self.start
        head = indices < n_left
        if head.any():
            out[head] = np.asarray(self.leftover, dtype=np.int64)[indices[head]]
        return out

    def num_batches(self, layout: Layout) -> int:
        return len(self) // layout.global_batch

    def dropped(self, layout: Layout) -> int:
        """Samples of this plan that no batch holds (fewer than one global batch)."""
        return len(self) - self.num_batches(layout) * layout.global_batch

    def window_of(self, batch: int, layout: Layout) -> tuple[int, int, int]:
        """(window index, first batch of the window, batches in the window) for global batch `batch`."""
        w = batch // layout.window_batches
        first = w * layout.window_batches
        return w, first, min(layout.window_batches, self.num_batches(layout) - first)

    def key(self) -> list[int]:
        """Identifies this plan among the re-plans of one epoch (seeds its shuffles)."""
        return [self.epoch, self.start, len(self.leftover)]


def worker_slice(plan: Plan, layout: Layout, window: int, rank: int, worker: int) -> tuple[list[int], np.ndarray]:
    """Global batch numbers and the (shuffled) plan indices that (rank, worker) serves in a window.

    Returns (batches, indices): indices has len(batches) * batch_size entries; batch
    batches[t] is indices[t*b:(t+1)*b]. Pure function: resume recomputes it.
    """
    b, world, workers = layout.batch_size, layout.world_size, layout.num_workers
    first = window * layout.window_batches
    k = min(layout.window_batches, plan.num_batches(layout) - first)
    window_start = first * layout.global_batch
    rank_start = window_start + rank * k * b
    mine = [j for j in range(first, first + k) if j % workers == worker]
    before = sum(1 for j in range(first, first + k) if j % workers < worker)
    lo = rank_start + before * b
    indices = np.arange(lo, lo + len(mine) * b, dtype=np.int64)
    rng = np.random.default_rng([*plan.key(), window, rank, worker, 0x5EED])
    rng.shuffle(indices)
    return mine, indices


def consumed_positions(plan: Plan, layout: Layout, batches: int) -> tuple[int, np.ndarray]:
    """What `batches` consumed global batches used of `plan`.

    Returns (plan index where the first not fully used window starts, plan indices used in
    that window). Everything before the first value is used.
    """
    if batches == 0:
        return 0, np.empty(0, dtype=np.int64)
    w, first, k = plan.window_of(batches, layout) if batches < plan.num_batches(layout) else \
        plan.window_of(batches - 1, layout)
    window_start = first * layout.global_batch
    if batches >= first + k:  # the whole window (and so everything before) is used
        return window_start + k * layout.global_batch, np.empty(0, dtype=np.int64)
    used = []
    for rank in range(layout.world_size):
        for worker in range(layout.num_workers):
            mine, indices = worker_slice(plan, layout, w, rank, worker)
            for t, j in enumerate(mine):
                if j < batches:
                    used.append(indices[t * layout.batch_size:(t + 1) * layout.batch_size])
    return window_start, np.sort(np.concatenate(used)) if used else np.empty(0, dtype=np.int64)


def replan(plan: Plan, layout: Layout, batches: int) -> Plan:
    """The plan of what `plan` still holds after `batches` global batches under `layout`."""
    window_start, used = consumed_positions(plan, layout, batches)
    w_end = min(window_start + layout.window_batches * layout.global_batch, len(plan))
    if len(used) == 0:
        w_end = window_start
    window = np.arange(window_start, w_end, dtype=np.int64)
    left_idx = np.setdiff1d(window, used, assume_unique=True)
    # Positions after the window: leftover of the old plan not yet reached, then the range.
    n_left = len(plan.leftover)
    rest_left = plan.leftover[w_end:] if w_end < n_left else []
    start = plan.start + max(0, w_end - n_left)
    leftover = plan.at(left_idx).tolist() + list(rest_left)
    return Plan(epoch=plan.epoch, total=plan.total, start=start, leftover=leftover)


# ---- the shards ---------------------------------------------------------------------------


class ShardSet:
    """The manifest of a dataset and ranged reads of its samples; one per loader worker."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.options = storage_options or {}
        self.manifest = shardlib.read_manifest(self.url, self.options)
        self.shards = self.manifest["shards"]
        self.counts = np.array([s["num_samples"] for s in self.shards], dtype=np.int64)
        if self.counts.sum() == 0:
            raise DataError(f"the dataset at {url} holds no samples: make shards from a folder with images")
        self._offsets: dict[int, np.ndarray] = {}
        self._fs = None

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def order(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative starts) of the epoch's sequence."""
        order = np.random.default_rng([seed, epoch, 0xD15C]).permutation(len(self.shards))
        starts = np.concatenate([[0], np.cumsum(self.counts[order])])
        return order, starts

    def fs(self):
        if self._fs is None:  # created lazily: a filesystem must not cross a fork
            self._fs, _ = storage.filesystem(self.url, self.options)
        return self._fs

    def offsets(self, shard: int) -> np.ndarray:
        if shard not in self._offsets:
            if len(self._offsets) > 64:  # bounded: only the shards being read are needed
                self._offsets.pop(next(iter(self._offsets)))
            self._offsets[shard] = shardlib.read_offsets(self.url, self.shards[shard], self.options)
        return self._offsets[shard]

    def read_runs(self, runs: list[tuple[int, int, int]]) -> dict[tuple[int, int], tuple[str, dict]]:
        """Read runs (shard, first, stop) of consecutive samples; {(shard, i): (key, fields)}."""
        out = {}
        fs = self.fs()
        for shard, first, stop in runs:
            entry = self.shards[shard]
            ranges = shardlib.sample_ranges(self.offsets(shard), entry["size"])
            start_byte, end_byte = ranges[first][0], ranges[stop - 1][1]
            path = storage.filesystem(storage.join(self.url, entry["url"]), self.options)[1]
            with storage.translate_errors(self.url):
                data = fs.cat_file(path, start=start_byte, end=end_byte)
            samples = shardlib.group_samples(shardlib.parse_members(data))
            if len(samples) != stop - first:
                raise DataError(f"shard {entry['url']} of {self.url}: expected {stop - first} samples at "
                                f"offsets {start_byte}..{end_byte}, found {len(samples)}: the shard or its "
                                f"sidecar index is corrupt; run `ssl-dist shards check {self.url}`")
            for i, sample in enumerate(samples):
                out[(shard, first + i)] = sample
        return out


def runs_of(positions: np.ndarray, order: np.ndarray, starts: np.ndarray) -> list[tuple[int, int, int]]:
    """Group sequence positions into runs (shard, first, stop) of consecutive samples."""
    pos = np.sort(positions)
    slot = np.searchsorted(starts, pos, side="right") - 1
    local = pos - starts[slot]
    runs = []
    for s, i in zip(slot.tolist(), local.tolist()):
        shard = int(order[s])
        if runs and runs[-1][0] == shard and runs[-1][2] == i:
            runs[-1][2] = i + 1
        else:
            runs.append([shard, i, i + 1])
    return [tuple(r) for r in runs]


# ---- decoding -----------------------------------------------------------------------------


def decode_sample(key: str, fields: dict[str, bytes]) -> dict[str, Any]:
    """{ext: bytes} -> {"__key__", "image": PIL.Image (RGB), "image_bytes": the encoded image,
    "cls": int, other fields as bytes}."""
    from PIL import Image

    sample: dict[str, Any] = {"__key__": key}
    for ext, value in fields.items():
        if ext in IMAGE_EXTS:
            image = Image.open(io.BytesIO(value))
            sample["image"] = image.convert("RGB")
            sample["image_bytes"] = value
        elif ext == "cls":
            sample["cls"] = int(value.decode().strip())
        elif ext == "json":
            sample["json"] = json.loads(value)
        else:
            sample[ext] = value
    return sample


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and numbers field by field; other values stay lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            batch[name] = torch.tensor(values)
        elif isinstance(values[0], tuple) and isinstance(values[0][0], torch.Tensor):
            batch[name] = tuple(torch.stack(v) for v in zip(*values))
        else:
            batch[name] = values
    return batch


# ---- the stream (runs inside each loader worker) -----------------------------------------


class ShardStream(IterableDataset):
    """Batches of one rank for one plan; each DataLoader worker serves its own batches.

    Iterating yields dicts `{"__key__": [b keys], "__batch__": global batch number, fields...}`
    for global batches skip, skip+1, ... of the plan (those of this worker only, when run
    under a DataLoader with workers).
    """

    def __init__(self, url: str, *, rank: int, layout: Layout, plan: Plan, seed: int, skip: int = 0,
                 transform: Callable[[dict], dict] | None = None, storage_options: dict | None = None):
        self.url, self.rank, self.layout, self.plan, self.seed = url, rank, layout, plan, seed
        self.skip, self.transform, self.options = skip, transform, storage_options

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.layout.num_workers:
            raise DataError(f"stream built for {self.layout.num_workers} loader workers runs under {workers}")
        shards = ShardSet(self.url, self.options)
        order, starts = shards.order(self.seed, self.plan.epoch)
        windows = self._windows(worker)
        # Prefetch: the next window's bytes are read while this window is decoded.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._read, shards, order, starts, *windows[0]) if windows else None
            for i, (window, _, _) in enumerate(windows):
                mine, indices, samples = pending.result()
                if i + 1 < len(windows):
                    pending = pool.submit(self._read, shards, order, starts, *windows[i + 1])
                yield from self._batches(mine, indices, samples)

    def _windows(self, worker: int) -> list[tuple[int, list[int], np.ndarray]]:
        """(window, batches, plan indices) this worker still has to serve, in order."""
        n = self.plan.num_batches(self.layout)
        out = []
        for w in range((n + self.layout.window_batches - 1) // self.layout.window_batches):
            if (w + 1) * self.layout.window_batches <= self.skip:
                continue  # fully consumed before the resume: not even read
            mine, indices = worker_slice(self.plan, self.layout, w, self.rank, worker)
            if mine and mine[-1] >= self.skip:
                out.append((w, mine, indices))
        return out

    def _read(self, shards: ShardSet, order, starts, window, mine, indices):
        b = self.layout.batch_size
        keep = [t for t, j in enumerate(mine) if j >= self.skip]
        needed = np.concatenate([indices[t * b:(t + 1) * b] for t in keep])
        positions = self.plan.at(needed)
        runs = runs_of(positions, order, starts)
        raw = shards.read_runs(runs)
        slot = np.searchsorted(starts, positions, side="right") - 1
        by_index = {}
        for idx, pos, s in zip(needed.tolist(), positions.tolist(), slot.tolist()):
            by_index[idx] = raw[(int(order[s]), pos - int(starts[s]))]
        return [mine[t] for t in keep], [indices[t * b:(t + 1) * b] for t in keep], by_index

    def _batches(self, mine, index_groups, samples) -> Iterator[dict]:
        for j, group in zip(mine, index_groups):
            decoded = []
            for idx in group.tolist():
                key, fields = samples[idx]
                try:
                    sample = decode_sample(key, fields)
                except Exception as err:
                    raise DataError(f"sample {key!r} of {self.url} cannot be decoded ({err}): "
                                    f"run `ssl-dist shards check {self.url}`") from None
                if self.transform is not None:
                    # Random draws are a function of (seed, epoch, sample), so a resumed run, or
                    # one with other ranks or loader workers, augments each sample the same way.
                    torch.manual_seed(sample_seed(self.seed, self.plan.epoch, key))
                    sample = self.transform(sample)
                decoded.append(sample)
            batch = collate(decoded)
            batch["__batch__"] = j
            yield batch


# ---- the loader (runs in the training process) -------------------------------------------


class Loader:
    """One rank's batches, with exact resume state. Iterate it for the rest of the epoch.

    `state_dict()` counts only batches handed to the caller (not those prefetched by loader
    workers). `load_state_dict(states)` takes every rank's state of the run being resumed,
    whatever its number of ranks, loader workers or batch size.
    """

    def __init__(self, url: str, *, rank: int, world_size: int, batch_size: int, num_workers: int = 0,
                 seed: int = 0, transform: Callable | None = None, storage_options: dict | None = None,
                 shuffle_window: int = 4096, epoch: int = 0, prefetch_factor: int = 2):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside a world of {world_size}")
        self.url, self.rank, self.seed, self.transform = url, rank, seed, transform
        self.options = storage_options or {}
        self.prefetch_factor = prefetch_factor
        self.shards = ShardSet(url, self.options)
        window_batches = max(1, shuffle_window // (batch_size * world_size))
        self.layout = Layout(world_size=world_size, num_workers=max(1, num_workers), batch_size=batch_size,
                             window_batches=window_batches)
        self._use_workers = num_workers > 0
        if self.shards.total < self.layout.global_batch:
            raise DataError(f"the dataset at {url} has {self.shards.total} samples, fewer than one global batch "
                            f"({batch_size} x {world_size}): use a smaller data.batch_size")
        self.set_epoch(epoch)

    # -- epochs and state --

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning (a fresh plan over every sample)."""
        self.plan = Plan(epoch=epoch, total=self.shards.total)
        self.batches = 0

    def __len__(self) -> int:
        """Batches left in this epoch for this rank (the same on every rank)."""
        return self.plan.num_batches(self.layout) - self.batches

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    @property
    def dropped(self) -> int:
        """Samples of this epoch's plan that fall in the remainder smaller than a global batch."""
        return self.plan.dropped(self.layout)

    def state_dict(self) -> dict:
        """This rank's position: small, JSON-serialisable, the same on every rank but `rank`."""
        return {"version": 1, "rank": self.rank, "seed": self.seed, "epoch": self.plan.epoch,
                "batches": self.batches, "layout": asdict(self.layout),
                "plan": {"total": self.plan.total, "start": self.plan.start, "leftover": list(self.plan.leftover)}}

    def load_state_dict(self, states: list[dict] | dict) -> None:
        """Continue where the run that saved `states` (one per rank of that run) stopped."""
        states = [states] if isinstance(states, dict) else list(states)
        if not states:
            raise DataError("no stream state to resume from")
        ref = states[0]
        for s in states[1:]:
            if (s["epoch"], s["batches"], s["plan"]) != (ref["epoch"], ref["batches"], ref["plan"]):
                raise DataError("the ranks' stream states disagree (different epoch or position): the checkpoint "
                                "mixes parts of different steps")
        if ref["seed"] != self.seed:
            raise DataError(f"the saved stream used seed {ref['seed']}, this one {self.seed}: keep data.seed to resume")
        if ref["plan"]["total"] != self.shards.total:
            raise DataError(f"the saved stream covered {ref['plan']['total']} samples, the dataset at {self.url} "
                            f"now holds {self.shards.total}: resume on the same shards")
        plan = Plan(epoch=ref["epoch"], total=ref["plan"]["total"], start=ref["plan"]["start"],
                    leftover=list(ref["plan"]["leftover"]))
        old = Layout(**ref["layout"])
        if old == self.layout:
            self.plan, self.batches = plan, ref["batches"]
        elif ref["batches"] >= plan.num_batches(old):  # the epoch was finished
            self.set_epoch(ref["epoch"] + 1)
        else:
            self.plan, self.batches = replan(plan, old, ref["batches"]), 0

    # -- iteration --

    def __iter__(self) -> Iterator[dict]:
        stream = ShardStream(self.url, rank=self.rank, layout=self.layout, plan=self.plan, seed=self.seed,
                             skip=self.batches, transform=self.transform, storage_options=self.options)
        if self._use_workers:
            source = DataLoader(stream, batch_size=None, num_workers=self.layout.num_workers,
                                prefetch_factor=self.prefetch_factor, persistent_workers=False)
        else:
            source = stream
        for batch in source:
            if batch["__batch__"] != self.batches:
                raise DataError(f"stream out of order: got batch {batch['__batch__']}, expected {self.batches}")
            # Counted when handed over, so the state never includes prefetched batches.
            self.batches += 1
            yield batch
        if self.batches >= self.plan.num_batches(self.layout):
            self.set_epoch(self.plan.epoch + 1)


def make_loader(url: str, *, rank: int, world_size: int, batch_size: int, num_workers: int = 0, seed: int = 0,
                transform: Callable | None = None, storage_options: dict | None = None, shuffle_window: int = 4096,
                epoch: int = 0) -> Loader:
    """The batches of rank `rank` of `world_size` from the shards at `url` (folder with index.json).

    Every rank calls this with the same arguments but `rank`. Each batch is a dict with
    "__key__" (list of `batch_size` keys), "__batch__" (global batch number) and the
    decoded fields ("image": PIL image, "cls": int tensor ...) or what `transform` (a
    function of one decoded sample dict, run in the loader workers) returns.
    """
    if storage_options is None:
        storage_options = storage.storage_options(url)
    return Loader(url, rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers, seed=seed,
                  transform=transform, storage_options=storage_options, shuffle_window=shuffle_window, epoch=epoch)
