"""One rank's batches in the training process: resume state, counts, the skip limit, lookahead.

`make_loader` (called by every rank with the same arguments but `rank`) builds a `Loader`;
iterating it starts the loader workers of `stream.ShardStream` (or runs it in-process with
num_workers=0), checks that batches arrive in order and counts them as they are handed to
the training step.

Counts. Each batch tells how many of its slots were skipped and why; the Loader adds them
up when it hands the batch over, so they cover exactly the batches that reached the
training step and survive a resume (they are part of the state). `Loader.stats()` gives
per-rank counts that add up over ranks to the global ones ("samples", "skipped_samples",
"skipped_shards", "epoch_skipped_*": a shard is counted once, by the rank that delivers
its first deliverable position in the plan) and global values that are the same on every
rank ("epoch", "dropped_remainder"). When this rank's skipped samples in the epoch exceed
`max_skip_fraction` of its share of the epoch, the stream stops with a DataError that
names the shards involved and why.

What a reader cannot do without is one global batch: a dataset with fewer samples than
batch_size x world_size is refused with a clear error, as are a missing manifest and an
empty dataset (by `reader.ShardSet`).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Iterator

from torch.utils.data import DataLoader

from ssl_dist import storage
from ssl_dist.data import handover
from ssl_dist.data.plan import Layout, Plan, replan
from ssl_dist.data.reader import ShardSet
from ssl_dist.data.retry import RetryPolicy
from ssl_dist.data.stream import ShardStream
from ssl_dist.decode import IMAGE_FORMATS, MAX_PIXELS, DataError, jpeg_decoder
from ssl_dist.failures import TooMuchBadData

PROBLEMS_KEPT = 64  # shards whose problems a rank keeps for its error message


class Loader:
    """One rank's batches, with exact resume state. Iterate it for the rest of the epoch.

    Lives in the training process, one per rank (`make_loader`); its loader workers run
    `stream.ShardStream`.

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
                 read_deadline_s: float = 300.0, lookahead: bool = True, max_pixels: int = MAX_PIXELS,
                 verify: bool = False):
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
        self.shards = ShardSet(url, self.options, policy=RetryPolicy(retries=read_retries, backoff_s=retry_backoff,
                                                                     deadline_s=read_deadline_s), verify=verify)
        self.max_pixels = max_pixels
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
                             skip=skip, transform=self.transform, image_format=self.image_format,
                             max_pixels=self.max_pixels, handover_slots=self.prefetch_factor + 2)
        if not self._use_workers:
            return iter(stream)
        # The workers hand their batches' tensors over through shared slots (handover): torch's way,
        # a new shared segment and a file-descriptor fetch per tensor per batch, costs about a decode.
        batches = iter(DataLoader(stream, batch_size=None, num_workers=self.layout.num_workers, collate_fn=_as_is,
                                  prefetch_factor=self.prefetch_factor, persistent_workers=False))
        return map(handover.Receiver().unpack, batches)

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
            raise TooMuchBadData(  # a DataError that a restart cannot fix: Ray does not retry it
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
                retry_backoff: float = 0.5, read_deadline_s: float = 300.0, prefetch_factor: int = 2,
                lookahead: bool = True, max_pixels: int = MAX_PIXELS, verify: bool = False) -> Loader:
    """The batches of rank `rank` of `world_size` from the shards at `url` (folder with index.json).

    Every rank calls this with the same arguments but `rank`. Each batch is a dict with
    "__key__" (list of `batch_size` keys), "__valid__" (bool tensor (batch_size,): False for a
    slot that holds a copy in place of a skipped sample), "__batch__" (global batch number)
    and the decoded fields (`decode.decode_sample`), collated: "image" a list of PIL images,
    or with image_format="tensor" a uint8 (batch_size, 3, H, W) tensor when sizes agree (else a
    list of (3, H, W)); "cls" an int64 tensor (batch_size,); "txt" ... lists (the encoded
    "image_bytes" stay in the loader workers: a transform sees them, a batch does not carry them);
    or, with `transform` (a function of one decoded sample dict, run in the loader workers),
    what it returns, collated the same way.
    `lookahead`: start the next epoch's loader workers before this epoch ends (see Loader).
    Skipped samples are counted in `loader.stats()`; past `max_skip_fraction` of the epoch
    the loader raises DataError naming the shards. Reads are retried with jittered exponential
    backoff from `retry_backoff` seconds (`data.retry`): data found bad `read_retries` times
    before its shard is skipped, a throttling or unreachable store until `read_deadline_s`
    seconds per read, after which the loader raises StorageError naming the store.
    `max_pixels` (data.max_pixels): an image whose header declares more is a skipped sample.
    `verify` (data.verify): each shard is checked against the manifest's sha256 on first read
    in each process; a mismatch skips the shard (the manifest must carry digests).
    """
    if storage_options is None:
        storage_options = storage.storage_options(url)
    return Loader(url, rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers, seed=seed,
                  transform=transform, storage_options=storage_options, shuffle_window=shuffle_window, epoch=epoch,
                  image_format=image_format, max_skip_fraction=max_skip_fraction, read_retries=read_retries,
                  retry_backoff=retry_backoff, read_deadline_s=read_deadline_s, prefetch_factor=prefetch_factor,
                  lookahead=lookahead, max_pixels=max_pixels, verify=verify)
