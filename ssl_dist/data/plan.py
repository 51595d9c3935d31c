"""The epoch plan: which sample positions each rank and loader worker serves, and what is left.

Pure math on integers (numpy), no I/O, no torch, like mosaicml/streaming's `partition/`: the
Loader (training process) calls `replan` on a resume, each ShardStream (loader worker) calls
`worker_slice` for its windows, and both get the same answer anywhere.

How an epoch is laid out (all of it a function of the manifest, the seed and the epoch):

1. The shards are permuted (seed, epoch; `reader.ShardSet.order`); concatenated, they give
   the epoch's *sequence* of sample positions 0..T-1.
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
also carries the plan and the skip counts, see `loader.Loader.state_dict`). Restored
with the same layout, the stream continues with exactly the batches a failure-free run
would have seen. Restored with another layout (ranks, loader workers, batch size), it
recomputes which positions of the half-used window were consumed and makes a new plan of
the rest; exactly-once still holds for the epoch. Only the windows still needed are read,
each from the sample where it starts (sidecar offsets + a ranged read): a resume never
reads a shard from its start to skip samples.

Fewer shards than readers is not an error: readers split sample positions, not shards, and
start inside shards with ranged reads, so one shard can feed every rank and loader worker
(a loader worker with no batch in a window simply reads nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Layout:
    """How a plan's batches are spread: equal layouts give identical batches.

    `window_batches` global batches of `batch_size` x `world_size` samples make a shuffle
    window; each rank's part of it is split over `num_workers` loader workers (1 when the
    stream runs in the training process).
    """

    world_size: int
    num_workers: int
    batch_size: int
    window_batches: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size


@dataclass
class Plan:
    """The positions of one epoch still to be delivered: `leftover` then `start..total-1`.

    Positions index the epoch's sequence (the shards in their epoch order, concatenated);
    *plan indices* index this plan (0..len-1). A fresh epoch is `Plan(epoch, total)`.
    """

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
        """Global batches in this plan (the same for every rank)."""
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
    batches[t] is indices[t*b:(t+1)*b]. Pure function: each loader worker calls it for its
    windows (`stream.ShardStream`), and a resume recomputes it (`consumed_positions`).
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
    that window). Everything before the first value is used. Called on a resume into another
    layout (`replan`, from `Loader.load_state_dict` in the training process).
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
    """The plan of what `plan` still holds after `batches` global batches under `layout`.

    Exactly the positions no consumed batch delivered, whatever layout reads the new plan.
    """
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


def runs_of(positions: np.ndarray, order: np.ndarray, starts: np.ndarray) -> list[tuple[int, int, int]]:
    """Group sequence positions into runs (shard, first, stop) of consecutive samples.

    `order` and `starts` are the epoch's shard order and cumulative starts (`ShardSet.order`);
    the runs are what `ShardSet.read_runs` takes.
    """
    pos = np.sort(np.asarray(positions, dtype=np.int64))
    if len(pos) == 0:
        return []
    slot = np.searchsorted(starts, pos, side="right") - 1
    local = pos - starts[slot]
    cuts = np.flatnonzero((np.diff(slot) != 0) | (np.diff(local) != 1)) + 1
    bounds = [0, *cuts.tolist(), len(pos)]
    return [(int(order[slot[a]]), int(local[a]), int(local[z - 1]) + 1) for a, z in zip(bounds[:-1], bounds[1:])]
