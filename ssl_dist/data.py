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
   reads (one per stretch of a shard, small gaps read through), shuffles it in memory and cuts it
   into batches. Torch's DataLoader returns the workers' batches round-robin, starting with
   its worker 0, so DataLoader worker p serves the batches of slice l = (p + skip) %
   num_workers, `skip` being the batches already consumed: a rank sees its batches in order
   j = skip, skip+1, ... (also on a resume after an odd number of batches), and every rank
   gets the same number.

Because every rank consumes the same number of batches, the position is one integer: the
global batches consumed in the current plan, plus the layout that produced them (the state
also carries the plan and the skip counts below). Restored
with the same layout, the stream continues with exactly the batches a failure-free run
would have seen. Restored with another layout (ranks, loader workers, batch size), it
recomputes which positions of the half-used window were consumed and makes a new plan of
the rest; exactly-once still holds for the epoch. Only the windows still needed are read,
each from the sample where it starts (sidecar offsets + a ranged read): a resume never
reads a shard from its start to skip samples.

Reading. Each loader worker reads its next window's byte ranges in a background thread
while it decodes the current one, so memory per worker is two windows' bytes (about
2 x shuffle_window / (world_size x num_workers) samples) whatever the shard size. Sidecars
of small shards are cached; those of large shards are read in ranges too.

Bad data. A sample is *skipped* when its bytes cannot be read or parsed (a shard truncated
after it was indexed, wrong sidecar offsets), when it has no image member, when its image
does not decode, or when its `.cls` is not an integer. A *shard* is skipped when it or its
sidecar cannot be read after `read_retries` retries with exponential backoff (deleted,
access refused, a connection to it that keeps failing): all its samples are skipped. What
is skipped depends only on the bytes in storage and on the plan, never on the layout or on
which reader meets the problem, so a resumed run (same or other layout) makes the same
skips (a transient outage that outlasts the retries is, by its nature, not repeatable).
An unreachable store, though, is not bad data: when reads keep failing and the manifest
cannot be read either, the stream stops with a StorageError instead of skipping the whole
dataset.

Equal batches on every rank. A skipped sample keeps its slot in its batch, so every rank
still gets the same number of batches of the same size (the contrastive loss all-gathers
equal tensors, and a rank that ran short would hang the others at a collective). The slot
holds a copy of a good sample, and `batch["__valid__"]` (bool tensor of batch_size) is
False there; `batch["__key__"]` names the sample whose copy fills the slot. The copy comes
from the same batch (its good samples in turn), or, when nothing in the batch is good (a
missing shard covers whole batches), from the first good sample of the epoch's sequence
after the batch's last sample (at most `FILL_SCAN_SAMPLES` samples / `FILL_SCAN_SHARDS`
unreadable shards are searched; beyond that the stream stops with an error naming them).
Filling from later samples of the same worker slice instead would shift every later batch
of that slice by the skipped count, which no other reader (or a resume with another
layout) could know without reading the bad data itself; a masked copy keeps the partition,
the resume state and exactly-once untouched. The training step hands the mask to the loss
(`nt_xent(valid=...)`), which drops the invalid slots as anchors and as negatives; the
encoder still sees real images there (sensible batch-norm statistics).

Counts. Each batch tells how many of its slots were skipped and why; the Loader adds them
up when it hands the batch over, so they cover exactly the batches that reached the
training step and survive a resume (they are part of the state). `Loader.stats()` gives
per-rank counts that add up over ranks to the global ones ("samples", "skipped_samples",
"skipped_shards", "epoch_skipped_*": a shard is counted once, by the rank that delivers
its first deliverable position in the plan) and global values that are the same on every
rank ("epoch", "dropped_remainder"). When this rank's skipped samples in the epoch exceed
`max_skip_fraction` of its share of the epoch, the stream stops with a DataError that
names the shards involved and why.

Fewer shards than readers is not an error here: readers split sample positions, not
shards, and start inside shards with ranged reads, so one shard can feed every rank and
loader worker (a loader worker with no batch in a window simply reads nothing). What a
reader cannot do without is one global batch: a dataset with fewer samples than
batch_size x world_size is refused with a clear error, as are a missing manifest and an
empty dataset.

Decoding. Images come as PIL RGB images (image_format="pil", what torchvision's PIL
transforms such as `augment.TwoViews` take) or as uint8 (3, H, W) tensors
(image_format="tensor", stacked into (B, 3, H, W) when sizes agree: for augmentation on the
accelerator). JPEGs are decoded by torchvision's libjpeg-turbo op, which gives PIL's pixels
at a third of its cost; other formats, and JPEGs it rejects, by PIL.

Speed. Per sample the stream does: its share of one ranged read, a header walk done for all
samples of the read at once with numpy (`shards.parse_samples`), one call of the JPEG
decoder, and, with a transform, one seed of torch's CPU generator (`torch.manual_seed`
would also seed every accelerator's, at a hundred times the cost). Everything else is per
batch or per window. benchmarks/data_stream.py measures it against webdataset.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl_dist import shards as shardlib
from ssl_dist import storage
from ssl_dist.decode import (IMAGE_EXTS, IMAGE_FORMATS, JPEG_EXTS, DataError, DecodeError, decode_image,  # noqa: F401
                             decode_sample, decode_samples, jpeg_decoder, to_pil)

FILL_SCAN_SAMPLES = 4096  # how far past an all-bad batch the stream looks for a good sample to copy
FILL_SCAN_SHARDS = 8  # unreadable shards met on that search before it gives up
SIDECAR_CACHE_BYTES = 64 * 2**20  # sidecars kept per loader worker
WHOLE_SIDECAR_BYTES = 2**20  # larger sidecars are read in ranges, never whole
READ_THROUGH_GAP = 64  # samples not needed that a ranged read may span rather than start another
PROBLEMS_KEPT = 64  # shards whose problems a rank keeps for its error message


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

    def first_index_in(self, lo: int, hi: int) -> int | None:
        """The smallest plan index whose sequence position lies in [lo, hi), or None."""
        found = []
        if self.leftover:
            left = np.asarray(self.leftover, dtype=np.int64)
            hits = np.flatnonzero((left >= lo) & (left < hi))
            if hits.size:
                found.append(int(hits[0]))
        if hi > self.start:
            found.append(len(self.leftover) + max(lo, self.start) - self.start)
        return min(found) if found else None


def worker_slice(plan: Plan, layout: Layout, window: int, rank: int, worker: int) -> tuple[list[int], np.ndarray]:
    """Global batch numbers and the (shuffled) plan indices that (rank, worker) serves in a window.

    Returns (batches, indices): indices has len(batches) * batch_size entries; batch
    batches[t] is indices[t*b:(t+1)*b]. Pure function: resume recomputes it.
    """
    b, workers = layout.batch_size, layout.num_workers
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


class Skip(NamedTuple):
    """Why one sample is not delivered: `reason` says it; `whole_shard` when its shard is unreadable."""

    shard: int
    key: str | None
    reason: str
    whole_shard: bool


class ShardUnreadable(Exception):
    """A shard (or its sidecar) that could not be read after the retries."""


class ShardSet:
    """The manifest of a dataset and ranged reads of its samples.

    Made once in the training process; a copy lives in each loader worker (its filesystem,
    caches and notes of unreadable shards are per process). Reads are retried `retries`
    times with exponential backoff starting at `backoff` seconds.
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, retries: int = 3, backoff: float = 0.5):
        self.url = url.rstrip("/")
        self.options = storage_options or {}
        self.retries, self.backoff = retries, backoff
        try:
            self.manifest = shardlib.read_manifest(self.url, self.options)
        except shardlib.ShardError as exc:
            storage.check_bucket(self.url, self.options)  # a missing bucket says so, not "no index.json"
            raise DataError(str(exc)) from None
        self.shards = self.manifest["shards"]
        self.names = [s["url"] for s in self.shards]
        self.counts = np.array([s["num_samples"] for s in self.shards], dtype=np.int64)
        if self.counts.sum() == 0:
            raise DataError(f"the dataset at {url} holds no samples: make shards from a folder with images")
        self._reset()

    def _reset(self) -> None:
        self._fs, self._fs_pid, self._root = None, None, None
        self._lock = threading.Lock()
        self._offsets: OrderedDict[int, np.ndarray] = OrderedDict()
        self._offset_bytes = 0
        self.unreadable: dict[int, str] = {}  # shard -> why, for this process's current pass

    def __getstate__(self):  # for DataLoader workers started with spawn: no live filesystem or lock
        state = self.__dict__.copy()
        for name in ("_fs", "_fs_pid", "_root", "_lock", "_offsets", "_offset_bytes", "unreadable"):
            state.pop(name)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def order(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative starts) of the epoch's sequence."""
        order = np.random.default_rng([seed, epoch, 0xD15C]).permutation(len(self.shards))
        starts = np.concatenate([[0], np.cumsum(self.counts[order])])
        return order, starts

    def fs(self):
        if self._fs is None or self._fs_pid != os.getpid():  # a filesystem must not cross a fork
            self._fs, self._root = storage.filesystem(self.url, self.options)
            self._fs_pid = os.getpid()
        return self._fs

    def path(self, name: str) -> str:
        self.fs()
        return f"{self._root}/{name}"

    # -- reading with retries --

    def _retrying(self, what: str, read: Callable[[], Any]) -> Any:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return read()
            except FileNotFoundError:
                raise ShardUnreadable(f"{what} is missing") from None
            except shardlib.ShardError as exc:
                raise ShardUnreadable(str(exc)) from None
            except Exception as exc:  # s3fs/botocore/aiohttp/OS errors: retry, then judge
                if _is_range_past_end(exc):
                    return b""
                if attempt == self.retries:
                    self._check_store(exc)
                    reason = storage.explain(self.url, exc) or f"{type(exc).__name__}: {exc}"
                    raise ShardUnreadable(f"{what} cannot be read ({reason}) after {attempt + 1} attempts") from None
                time.sleep(delay)
                delay *= 2

    def _check_store(self, exc: Exception) -> None:
        """Raise StorageError if the store itself is gone (not just one object): that is no data problem."""
        fs = self.fs()
        try:
            fs.invalidate_cache()
            fs.info(self.path(shardlib.MANIFEST))
        except Exception as probe:
            reason = storage.explain(self.url, probe) or storage.explain(self.url, exc) or \
                f"{type(exc).__name__}: {exc}"
            raise storage.StorageError(f"reading {self.url} failed after {self.retries + 1} attempts and the "
                                       f"manifest cannot be read either: {reason}") from None

    def offsets(self, shard: int, first: int = 0, stop: int | None = None) -> np.ndarray:
        """Sidecar offsets of samples first..stop-1 of `shard` (retried; ShardUnreadable)."""
        entry = self.shards[shard]
        n = entry["num_samples"]
        stop = n if stop is None else stop
        if 8 * n > WHOLE_SIDECAR_BYTES:  # large sidecar: read only the part needed
            data = self._retrying(f"sidecar {entry['index']}", lambda: self.fs().cat_file(
                self.path(entry["index"]), start=8 * first, end=8 * stop))
            if len(data) != 8 * (stop - first):
                raise ShardUnreadable(f"sidecar {entry['index']} is shorter than the manifest says: re-index the "
                                      f"shards")
            return np.frombuffer(data, dtype="<u8").astype(np.int64)
        with self._lock:
            cached = self._offsets.get(shard)
            if cached is not None:
                self._offsets.move_to_end(shard)
                return cached[first:stop]
        data = self._retrying(f"sidecar {entry['index']}", lambda: self.fs().cat_file(self.path(entry["index"])))
        if len(data) != 8 * n:
            raise ShardUnreadable(f"sidecar {entry['index']} holds {len(data) / 8:g} offsets, the manifest says {n} "
                                  f"samples: re-index the shards")
        offsets = np.frombuffer(data, dtype="<u8").astype(np.int64)
        with self._lock:
            self._offsets[shard] = offsets
            self._offset_bytes += offsets.nbytes
            while self._offset_bytes > SIDECAR_CACHE_BYTES and len(self._offsets) > 1:
                self._offset_bytes -= self._offsets.popitem(last=False)[1].nbytes
        return offsets[first:stop]

    def read_samples(self, shard: int, first: int, stop: int) -> list:
        """Samples first..stop-1 of `shard`, each `(key, {ext: bytes})` or a `Skip`. Never raises for bad
        data (only StorageError when the store itself is unreachable)."""
        entry = self.shards[shard]
        n = stop - first
        if shard in self.unreadable:
            return [Skip(shard, None, self.unreadable[shard], True)] * n
        try:
            bounds = self.offsets(shard, first, stop + 1 if stop < entry["num_samples"] else stop)
            start_byte = int(bounds[0])
            end_byte = int(bounds[n]) if len(bounds) > n else entry["size"]
            data = self._retrying(entry["url"], lambda: self.fs().cat_file(self.path(entry["url"]), start=start_byte,
                                                                            end=end_byte))
        except ShardUnreadable as exc:
            self.unreadable[shard] = str(exc)
            return [Skip(shard, None, str(exc), True)] * n
        starts = bounds[:n] - start_byte
        ends = np.append(bounds[1:n + 1], entry["size"])[:n] - start_byte
        out = shardlib.parse_samples(data, starts, ends)
        for i, item in enumerate(out):
            if isinstance(item, Exception):
                if ends[i] > len(data):
                    asked = f"{start_byte + int(starts[i])}-{start_byte + int(ends[i])}"
                    item = (f"cut short: bytes {asked} asked, the shard gave bytes up to {start_byte + len(data)} "
                            f"only (truncated after it was indexed?)")
                out[i] = Skip(shard, None, f"sample #{first + i}: {item}", False)
        return out

    def read_positions(self, positions: np.ndarray, order: np.ndarray, starts: np.ndarray) -> list:
        """`read_samples` for arbitrary sequence positions, one ranged read per run of consecutive samples;
        the result is aligned with `positions`."""
        if len(positions) == 0:
            return []
        by_position = np.argsort(positions, kind="stable")
        sorted_positions = positions[by_position]
        slot = np.searchsorted(starts, sorted_positions, side="right") - 1
        local = sorted_positions - starts[slot]
        # One ranged read per stretch of a shard; small gaps (samples another reader took before a
        # resume) are read through rather than paid for with another request.
        cuts = np.flatnonzero((np.diff(slot) != 0) | (np.diff(local) > READ_THROUGH_GAP + 1)) + 1
        bounds = [0, *cuts.tolist(), len(positions)]
        found: list = []
        for a, z in zip(bounds[:-1], bounds[1:]):
            first, stop = int(local[a]), int(local[z - 1]) + 1
            items = self.read_samples(int(order[slot[a]]), first, stop)
            found.extend(items if stop - first == z - a else [items[i - first] for i in local[a:z].tolist()])
        out: list = [None] * len(positions)
        for item, i in zip(found, by_position.tolist()):
            out[i] = item
        return out

    def read_runs(self, runs: list[tuple[int, int, int]]) -> dict[tuple[int, int], tuple[str, dict]]:
        """Read runs (shard, first, stop) of consecutive samples; {(shard, i): (key, fields)}.

        Strict: raises DataError on any sample it cannot read (for evaluation, which must see all).
        """
        out = {}
        for shard, first, stop in runs:
            for i, item in enumerate(self.read_samples(shard, first, stop)):
                if isinstance(item, Skip):
                    raise DataError(f"shard {self.names[shard]} of {self.url}: {item.reason}; run "
                                    f"`ssl-dist shards check {self.url}`")
                out[(shard, first + i)] = item
        return out


def _is_range_past_end(exc: Exception) -> bool:
    """A ranged read that starts past the end of an object (a truncated shard): no bytes, not an error."""
    import errno

    text = str(exc)
    return getattr(exc, "errno", None) == errno.EINVAL and ("Range" in text or "range" in text) or \
        "InvalidRange" in text


def runs_of(positions: np.ndarray, order: np.ndarray, starts: np.ndarray) -> list[tuple[int, int, int]]:
    """Group sequence positions into runs (shard, first, stop) of consecutive samples."""
    pos = np.sort(np.asarray(positions, dtype=np.int64))
    if len(pos) == 0:
        return []
    slot = np.searchsorted(starts, pos, side="right") - 1
    local = pos - starts[slot]
    cuts = np.flatnonzero((np.diff(slot) != 0) | (np.diff(local) != 1)) + 1
    bounds = [0, *cuts.tolist(), len(pos)]
    return [(int(order[slot[a]]), int(local[a]), int(local[z - 1]) + 1) for a, z in zip(bounds[:-1], bounds[1:])]


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and numbers field by field; other values stay lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            try:
                batch[name] = torch.stack(values)
            except RuntimeError:  # different sizes: left as a list
                batch[name] = values
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            batch[name] = torch.tensor(values)
        elif isinstance(first, tuple) and first and isinstance(first[0], torch.Tensor):
            batch[name] = tuple(torch.stack(v) for v in zip(*values))
        else:
            batch[name] = values
    return batch


# ---- the stream (runs inside each loader worker) -----------------------------------------


class _Pass:
    """What one worker knows during one pass over its part of a plan."""

    def __init__(self, shards: ShardSet, plan: Plan, layout: Layout, seed: int):
        self.order, self.starts = shards.order(seed, plan.epoch)
        self.deliverable = plan.num_batches(layout) * layout.global_batch
        self._anchors: dict[int, int] = {}
        self.fillers: OrderedDict[int, dict] = OrderedDict()
        self.plan = plan

    def slot(self, position: int) -> int:
        return int(np.searchsorted(self.starts, position, side="right")) - 1

    def anchor(self, slot: int) -> int:
        """The plan index at which the shard in `slot` counts as skipped: its first deliverable one."""
        if slot not in self._anchors:
            first = self.plan.first_index_in(int(self.starts[slot]), int(self.starts[slot + 1]))
            self._anchors[slot] = first if first is not None and first < self.deliverable else -1
        return self._anchors[slot]


class ShardStream(IterableDataset):
    """Batches of one rank for one plan; each DataLoader worker serves its own batches.

    Iterating yields dicts `{"__key__": [b keys], "__valid__": bool tensor (b,), "__batch__":
    global batch number, "__skips__": [(shard, key, reason, whole_shard, counts_shard)], fields...}`
    for global batches skip, skip+1, ... of the plan (those of this worker only, when run under
    a DataLoader with workers), or one `{"__error__": (type name, message)}` where it must stop.
    """

    def __init__(self, shards: ShardSet | str, *, rank: int, layout: Layout, plan: Plan, seed: int, skip: int = 0,
                 transform: Callable[[dict], dict] | None = None, storage_options: dict | None = None,
                 image_format: str = "pil"):
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet(shards, storage_options)
        self.url = self.shards.url
        self.rank, self.layout, self.plan, self.seed = rank, layout, plan, seed
        self.skip, self.transform, self.image_format = skip, transform, image_format

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.layout.num_workers:
            raise DataError(f"stream built for {self.layout.num_workers} loader workers runs under {workers}")
        try:
            yield from self._serve((physical + self.skip) % workers)
        except (DataError, shardlib.ShardError, storage.StorageError) as exc:
            # Raised by the Loader in the training process, without a loader worker's traceback around it.
            yield {"__error__": (type(exc).__name__, str(exc))}

    def _serve(self, worker: int) -> Iterator[dict]:
        self.shards.unreadable.clear()
        run = _Pass(self.shards, self.plan, self.layout, self.seed)
        windows = self._windows(worker)
        # Prefetch: the next window's bytes are read while this window is decoded.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ssl-dist-read") as pool:
            upcoming = next(windows, None)
            pending = pool.submit(self._read, run, *upcoming) if upcoming else None
            while pending is not None:
                mine, groups, items, positions = pending.result()
                upcoming = next(windows, None)
                pending = pool.submit(self._read, run, *upcoming) if upcoming else None
                for j, group, raw, where in zip(mine, groups, items, positions):
                    yield self._batch(run, j, group, raw, where)
                run.fillers.clear()

    def _windows(self, worker: int) -> Iterator[tuple[list[int], np.ndarray]]:
        """(batches, plan indices) this worker still has to serve, window by window (lazily: an epoch
        of a billion samples has a quarter of a million windows)."""
        n = self.plan.num_batches(self.layout)
        per_window = self.layout.window_batches
        for w in range(self.skip // per_window, (n + per_window - 1) // per_window):
            mine, indices = worker_slice(self.plan, self.layout, w, self.rank, worker)
            if mine and mine[-1] >= self.skip:
                yield mine, indices

    def _read(self, run: _Pass, mine: list[int], indices: np.ndarray):
        b = self.layout.batch_size
        keep = [t for t, j in enumerate(mine) if j >= self.skip]
        groups = [indices[t * b:(t + 1) * b] for t in keep]
        positions = self.plan.at(np.concatenate(groups))
        items = self.shards.read_positions(positions, run.order, run.starts)
        return ([mine[t] for t in keep], groups, [items[k * b:(k + 1) * b] for k in range(len(keep))],
                [positions[k * b:(k + 1) * b] for k in range(len(keep))])

    def _apply(self, sample: dict) -> dict:
        if self.transform is None:
            return sample
        # Random draws are a function of (seed, epoch, sample), so a resumed run, or one with other
        # ranks or loader workers, augments each sample the same way. Only torch's CPU generator is
        # seeded (torchvision's transforms draw from it); torch.manual_seed would also seed every
        # accelerator's, at a hundred times the cost.
        torch.default_generator.manual_seed(sample_seed(self.seed, self.plan.epoch, sample["__key__"]))
        out = self.transform(sample)
        if isinstance(out, dict) and "__key__" not in out:
            out["__key__"] = sample["__key__"]
        return out

    def _batch(self, run: _Pass, j: int, group: np.ndarray, raw: list, positions: np.ndarray) -> dict:
        outputs: list = [None] * len(raw)
        skips: list[tuple[int, Skip]] = []
        good = [i for i, item in enumerate(raw) if not isinstance(item, Skip)]
        decoded = decode_samples([raw[i] for i in good], self.image_format)
        rng_state = torch.get_rng_state() if self.transform is not None else None
        try:
            for i, sample in zip(good, decoded):
                if isinstance(sample, str):
                    shard = int(run.order[run.slot(int(positions[i]))])
                    skips.append((i, Skip(shard, raw[i][0], sample, False)))
                else:
                    outputs[i] = self._apply(sample)
            for i, item in enumerate(raw):
                if isinstance(item, Skip):
                    skips.append((i, item))
            valid = torch.ones(len(raw), dtype=torch.bool)
            if skips:
                skips.sort(key=lambda s: s[0])
                present = [o for o in outputs if o is not None]
                if not present:
                    present = [self._filler(run, int(positions.max()))]
                for n, (i, _) in enumerate(skips):
                    outputs[i] = present[n % len(present)]
                    valid[i] = False
        finally:
            if rng_state is not None:
                torch.set_rng_state(rng_state)  # the caller's generator is left as it was
        batch = collate(outputs)
        batch["__key__"] = [o["__key__"] for o in outputs]
        batch["__valid__"] = valid
        batch["__batch__"] = j
        batch["__skips__"] = [
            (self.shards.names[s.shard], s.key, s.reason, s.whole_shard,
             s.whole_shard and run.anchor(run.slot(int(positions[i]))) == int(group[i]))
            for i, s in skips]
        return batch

    def _filler(self, run: _Pass, after: int) -> dict:
        """A copy for the slots of a batch with no good sample: the first good sample of the epoch's
        sequence after position `after` (the batch's last), found the same way by every reader."""
        if after in run.fillers:
            return run.fillers[after]
        total = int(run.starts[-1])
        position, scanned, bad = (after + 1) % total, 0, {}
        while scanned < min(FILL_SCAN_SAMPLES, total) and len(bad) < min(FILL_SCAN_SHARDS, len(run.order)):
            slot = run.slot(position)
            shard, lo, hi = int(run.order[slot]), int(run.starts[slot]), int(run.starts[slot + 1])
            first = position - lo
            stop = min(hi - lo, first + 32)
            items = self.shards.read_samples(shard, first, stop)
            if isinstance(items[0], Skip) and items[0].whole_shard:
                bad[shard] = items[0].reason
                scanned += hi - lo - first
                position = hi % total
                continue
            for item in items:
                scanned += 1
                if isinstance(item, Skip):
                    continue
                (sample,) = decode_samples([item], self.image_format)
                if not isinstance(sample, str):
                    run.fillers[after] = self._apply(sample)
                    if len(run.fillers) > 16:
                        run.fillers.popitem(last=False)
                    return run.fillers[after]
            position = (lo + stop) % total
        names = "; ".join(f"{self.shards.names[s]}: {why}" for s, why in bad.items())
        raise DataError(f"a batch of {self.url} has no readable sample and none of the next {scanned} samples of the "
                        f"epoch could be read either ({names or 'they do not decode'}): check the shards with "
                        f"`ssl-dist shards check {self.url}`")


# ---- the loader (runs in the training process) -------------------------------------------


class Loader:
    """One rank's batches, with exact resume state. Iterate it for the rest of the epoch.

    `state_dict()` counts only batches handed to the caller (not those prefetched by loader
    workers). `load_state_dict(states)` takes every rank's state of the run being resumed,
    whatever its number of ranks, loader workers or batch size. `stats()` gives the skip
    counts for the training metrics.

    Epoch boundaries: with loader workers and `lookahead`, the next epoch's workers start
    once the rest of this epoch is prefetched (its last num_workers x prefetch_factor
    batches), so the next epoch's first batches are ready when it begins; for that while,
    two sets of workers exist. The batches are the same either way.
    """

    def __init__(self, url: str, *, rank: int, world_size: int, batch_size: int, num_workers: int = 0,
                 seed: int = 0, transform: Callable | None = None, storage_options: dict | None = None,
                 shuffle_window: int = 4096, epoch: int = 0, prefetch_factor: int = 2, image_format: str = "pil",
                 max_skip_fraction: float = 0.01, read_retries: int = 3, retry_backoff: float = 0.5,
                 lookahead: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside a world of {world_size}")
        if batch_size < 1 or num_workers < 0:
            raise DataError(f"batch_size must be at least 1 and num_workers at least 0, not {batch_size} and "
                            f"{num_workers}")
        if image_format not in IMAGE_FORMATS:
            raise DataError(f"image_format must be one of {IMAGE_FORMATS}, not {image_format!r}")
        if not 0 <= max_skip_fraction <= 1:
            raise DataError(f"max_skip_fraction must lie in [0, 1], not {max_skip_fraction}")
        self.url, self.rank, self.seed, self.transform = url, rank, seed, transform
        self.options = storage_options or {}
        self.prefetch_factor, self.image_format, self.max_skip_fraction = prefetch_factor, image_format, \
            max_skip_fraction
        self.shards = ShardSet(url, self.options, retries=read_retries, backoff=retry_backoff)
        jpeg_decoder()  # looked up here, so that forked loader workers inherit it instead of importing it again
        window_batches = max(1, shuffle_window // (batch_size * world_size))
        self.layout = Layout(world_size=world_size, num_workers=max(1, num_workers), batch_size=batch_size,
                             window_batches=window_batches)
        self._use_workers = num_workers > 0
        if self.shards.total < self.layout.global_batch:
            raise DataError(f"the dataset at {url} has {self.shards.total} samples, fewer than one global batch "
                            f"({batch_size} x {world_size} ranks = {self.layout.global_batch}): use a smaller "
                            f"data.batch_size (or fewer workers)")
        self.skipped_samples = 0  # run totals, this rank's share
        self.skipped_shards = 0
        self.lookahead = lookahead
        self._ahead: tuple | None = None  # ((plan, batches) it starts at, its batch iterator)
        self._start_epoch(epoch)

    # -- epochs and state --

    def _start_epoch(self, epoch: int) -> None:
        self.plan = Plan(epoch=epoch, total=self.shards.total)
        self.batches = 0
        self._samples = 0  # this epoch, this rank's share
        self._skipped = 0
        self._shards: list[str] = []  # shards this rank counted as skipped in this epoch
        self._known: set[str] = set()  # shards any rank counted in this epoch (as far as we know)
        self._problems: dict[str, list] = {}  # shard -> [skipped samples, a reason]
        self._carried = 0  # skipped samples of this epoch counted before the last resume (all ranks)
        self._carried_here = 0  # the part of them this rank's counters hold

    def set_epoch(self, epoch: int) -> None:
        """Move to epoch `epoch`, from its beginning. The current epoch is kept where it is, so a loop
        that calls `set_epoch(e)` at the top of every epoch does not undo a resume."""
        if epoch != self.plan.epoch:
            self._start_epoch(epoch)

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

    def stats(self) -> dict:
        """Counts for the training metrics.

        Per rank, adding up over ranks to the global figure: "samples" (delivered in this epoch),
        "skipped_samples" / "skipped_shards" (since the run started, across resumes),
        "epoch_skipped_samples" / "epoch_skipped_shards" (this epoch). The same on every rank:
        "epoch", "batches" (global batches consumed in the current plan of the epoch),
        "dropped_remainder" (samples of this epoch no batch delivers).
        """
        return {"epoch": self.epoch, "batches": self.batches, "samples": self._samples,
                "skipped_samples": self.skipped_samples, "skipped_shards": self.skipped_shards,
                "epoch_skipped_samples": self._skipped, "epoch_skipped_shards": len(self._shards),
                "dropped_remainder": self.dropped}

    def state_dict(self) -> dict:
        """This rank's position and counts: small, JSON-serialisable."""
        return {"version": 2, "rank": self.rank, "seed": self.seed, "epoch": self.plan.epoch,
                "batches": self.batches, "layout": asdict(self.layout),
                "plan": {"total": self.plan.total, "start": self.plan.start, "leftover": list(self.plan.leftover)},
                "counts": {"samples": self._samples, "epoch_skipped_samples": self._skipped,
                           "epoch_skipped_shards": list(self._shards), "skipped_samples": self.skipped_samples,
                           "skipped_shards": self.skipped_shards},
                "problems": {name: list(p) for name, p in self._problems.items()}}

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
        finished = ref["batches"] >= plan.num_batches(old)
        counts = [s.get("counts", {}) for s in states]
        # Run totals: every rank's share goes to rank 0, so the sum over the new ranks stays exact.
        mine = self.rank == 0
        self.skipped_samples = sum(c.get("skipped_samples", 0) for c in counts) if mine else 0
        self.skipped_shards = sum(c.get("skipped_shards", 0) for c in counts) if mine else 0
        if finished:
            self._start_epoch(ref["epoch"] + 1)
            return
        if old == self.layout:
            self.plan, self.batches = plan, ref["batches"]
        else:
            self.plan, self.batches = replan(plan, old, ref["batches"]), 0
        known = sorted({name for c in counts for name in c.get("epoch_skipped_shards", [])})
        self._known = set(known)
        self._shards = known if mine else []
        self._carried = sum(c.get("epoch_skipped_samples", 0) for c in counts)
        self._carried_here = self._carried if mine else 0
        self._skipped = self._carried_here
        self._samples = sum(c.get("samples", 0) for c in counts) if mine else 0
        self._problems = {}
        for s in states:
            for name, (count, reason) in s.get("problems", {}).items():
                self._note_problem(name, reason, count)

    # -- iteration --

    def _source(self, plan: Plan, skip: int) -> Iterator[dict]:
        """The batches of `plan` from batch `skip` on. With loader workers, they start now."""
        stream = ShardStream(self.shards, rank=self.rank, layout=self.layout, plan=plan, seed=self.seed,
                             skip=skip, transform=self.transform, image_format=self.image_format)
        if not self._use_workers:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.layout.num_workers, collate_fn=_as_is,
                               prefetch_factor=self.prefetch_factor, persistent_workers=False))

    def __iter__(self) -> Iterator[dict]:
        # The next epoch's loader workers were started while this epoch's last batches trained
        # (see below); any other position (a resume, set_epoch) starts its own.
        ahead, self._ahead = self._ahead, None
        source = ahead[1] if ahead is not None and ahead[0] == (self.plan, self.batches) else \
            self._source(self.plan, self.batches)
        del ahead  # a stale one shuts its workers down
        last = self.plan.num_batches(self.layout)
        try:
            for batch in source:
                if "__error__" in batch:
                    kind, message = batch["__error__"]
                    raise storage.StorageError(message) if kind == "StorageError" else DataError(message)
                if batch["__batch__"] != self.batches:
                    raise DataError(f"stream out of order: got batch {batch['__batch__']}, expected {self.batches}")
                # Counted when handed over, so the state never includes prefetched batches.
                self.batches += 1
                self._count(batch.pop("__skips__"), int(batch["__valid__"].sum()))
                if self._use_workers and self.lookahead and self._ahead is None and \
                        last - self.batches <= self.layout.num_workers * self.prefetch_factor:
                    # What is left of this epoch is prefetched already, so its workers are idle: start
                    # the next epoch's now, and their first batches are ready when this epoch ends
                    # (else every epoch begins with a wait for worker start-up and the first reads).
                    following = Plan(epoch=self.plan.epoch + 1, total=self.shards.total)
                    self._ahead = ((following, 0), self._source(following, 0))
                yield batch
        finally:
            # Released here, in the consumer's thread. Held on (by the traceback of an error
            # raised above), a reader generator would be closed later by the garbage collector
            # in whatever thread runs it, possibly fsspec's IO thread, which that generator's
            # read-ahead thread is waiting on: a deadlock.
            del source
        if self.batches >= last:
            self._start_epoch(self.plan.epoch + 1)

    def _count(self, skips: list, valid: int) -> None:
        self._samples += valid
        if not skips:
            return
        self._skipped += len(skips)
        self.skipped_samples += len(skips)
        for name, key, reason, whole_shard, counts_shard in skips:
            self._note_problem(name, reason, 1)
            if counts_shard and name not in self._known:
                self._known.add(name)
                self._shards.append(name)
                self.skipped_shards += 1
        world = self.layout.world_size
        share = self._carried / world + (self._skipped - self._carried_here)
        if share > self.max_skip_fraction * self.shards.total / world:
            worst = sorted(self._problems.items(), key=lambda item: -item[1][0])[:10]
            named = "; ".join(f"{name}: {count} skipped ({reason})" for name, (count, reason) in worst)
            raise DataError(
                f"too much bad data in {self.url}: rank {self.rank} skipped {self._skipped} samples of epoch "
                f"{self.epoch} so far, more than max_skip_fraction={self.max_skip_fraction:g} of its share "
                f"({self.shards.total} samples / {world} ranks). Shards: {named}. Check them with `ssl-dist shards "
                f"check {self.url}`, then restore them or re-index (`ssl-dist shards index`), or raise the limit")

    def _note_problem(self, name: str, reason: str, count: int) -> None:
        if name in self._problems:
            self._problems[name][0] += count
        elif len(self._problems) < PROBLEMS_KEPT:
            self._problems[name] = [count, reason]


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate_fn: batches are made by the stream (torch's default would walk every key and
    image of every batch again)."""
    return batch


def make_loader(url: str, *, rank: int, world_size: int, batch_size: int, num_workers: int = 0, seed: int = 0,
                transform: Callable | None = None, storage_options: dict | None = None, shuffle_window: int = 4096,
                epoch: int = 0, image_format: str = "pil", max_skip_fraction: float = 0.01, read_retries: int = 3,
                retry_backoff: float = 0.5, prefetch_factor: int = 2, lookahead: bool = True) -> Loader:
    """The batches of rank `rank` of `world_size` from the shards at `url` (folder with index.json).

    Every rank calls this with the same arguments but `rank`. Each batch is a dict with
    "__key__" (list of `batch_size` keys), "__valid__" (bool tensor: False for a slot that
    holds a copy in place of a skipped sample), "__batch__" (global batch number) and the
    decoded fields ("image": PIL image, or a uint8 (3, H, W) tensor with
    image_format="tensor", stacked when sizes agree; "cls": int tensor ...) or what
    `transform` (a function of one decoded sample dict, run in the loader workers) returns.
    `lookahead`: start the next epoch's loader workers before this epoch ends (see Loader).
    Skipped samples are counted in `loader.stats()`; past `max_skip_fraction` of the epoch
    the loader raises DataError naming the shards. Shard reads are retried `read_retries`
    times with exponential backoff from `retry_backoff` seconds.
    """
    if storage_options is None:
        storage_options = storage.storage_options(url)
    return Loader(url, rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers, seed=seed,
                  transform=transform, storage_options=storage_options, shuffle_window=shuffle_window, epoch=epoch,
                  image_format=image_format, max_skip_fraction=max_skip_fraction, read_retries=read_retries,
                  retry_backoff=retry_backoff, prefetch_factor=prefetch_factor, lookahead=lookahead)
