"""What runs in the loader workers: one rank's batches of one plan, decoded, augmented, collated.

Each loader worker reads its windows (`plan.worker_slice`) through its copy of the
`reader.ShardSet`, decodes every sample with `decode.decode_samples` (the one definition
of a good sample), applies the transform with a seed of (seed, epoch, key) and yields whole
batches; the Loader in the training process checks their order and counts them.

Bad data. A sample is *skipped* when its bytes cannot be read or parsed, when its shard
cannot be read or does not match its manifest digest (see `reader`), or when it is not a
good sample (`decode`: no image member, an image whose header declares more than
`max_pixels` pixels, an image that does not decode, a `.cls` that is not an integer...).

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

Speed. Per sample the stream does: its share of one ranged read, a header walk done for all
samples of the read at once with numpy (`shards.parse_samples`), one call of the JPEG
decoder (as tensors, into its row of the batch: `decode.decode_samples`), and, with a
transform, one seed of torch's CPU generator (`torch.manual_seed` would also seed every
accelerator's, at a hundred times the cost). Everything else is per batch or per window,
and a batch leaves the worker through a shared slot (`handover`).
benchmarks/data_stream.py measures it against webdataset and breaks its cost down by stage.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ssl_dist import shards as shardlib
from ssl_dist import storage
from ssl_dist.data import handover
from ssl_dist.data.plan import Layout, Plan, worker_slice
from ssl_dist.data.reader import ShardSet, Skip
from ssl_dist.decode import MAX_PIXELS, DataError, decode_samples

FILL_SCAN_SAMPLES = 4096  # how far past an all-bad batch the stream looks for a good sample to copy
FILL_SCAN_SHARDS = 8  # unreadable shards met on that search before it gives up


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch (the stream seeds torch's CPU generator
    with it before each sample's transform; the training step seeds per-batch augmentation with it)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and numbers field by field; other values stay lists.

    b samples of tensors (C, H, W) give (b, C, H, W) (a list when sizes differ; the tensor itself,
    uncopied, when they are its rows in order, as `decode.decode_samples` makes them), ints give a
    (b,) tensor, tuples of tensors a tuple of stacked tensors (two views: ((b, ...), (b, ...))).
    Runs in the loader workers, once per batch.
    """
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            rows = _rows_of(values)
            try:
                batch[name] = rows if rows is not None else torch.stack(values)
            except RuntimeError:  # different sizes: left as a list
                batch[name] = values
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            batch[name] = torch.tensor(values)
        elif isinstance(first, tuple) and first and isinstance(first[0], torch.Tensor):
            batch[name] = tuple(torch.stack(v) for v in zip(*values))
        else:
            batch[name] = values
    return batch


def _rows_of(values: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor whose rows, in order, `values` are (what stacking them would give), or None."""
    base = values[0]._base
    if base is None or base.shape[0] != len(values) or not base.is_contiguous():
        return None
    step = base.stride(0)
    for row, value in enumerate(values):
        if value._base is not base or value.storage_offset() != base.storage_offset() + row * step or \
                value.shape != base.shape[1:]:
            return None
    return base


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

    Made by the Loader in the training process, iterated in each loader worker (or in the
    training process itself with num_workers=0). Iterating yields dicts `{"__key__": [b keys],
    "__valid__": bool tensor (b,), "__batch__": global batch number, "__skips__": [(shard,
    key, reason, whole_shard, counts_shard)], fields...}` for global batches skip, skip+1, ...
    of the plan (those of this worker only, when run under a DataLoader with workers), or one
    `{"__error__": (type name, message)}` where it must stop. The fields are those of the
    decoded samples (`decode.decode_sample`), or of what `transform` returns, collated
    (`collate`): e.g. "image" (b, 3, H, W) uint8 with image_format="tensor" and equal sizes.
    `max_pixels`: the largest image decoded (data.max_pixels); a larger one is a skipped sample.
    `handover_slots`: under a DataLoader, batches go to the Loader through a ring of this many shared
    slots per worker (`handover`; the Loader unpacks them); 0 yields them as they are.
    """

    def __init__(self, shards: ShardSet | str, *, rank: int, layout: Layout, plan: Plan, seed: int, skip: int = 0,
                 transform: Callable[[dict], dict] | None = None, storage_options: dict | None = None,
                 image_format: str = "pil", max_pixels: int = MAX_PIXELS, handover_slots: int = 0):
        self.shards = shards if isinstance(shards, ShardSet) else ShardSet(shards, storage_options)
        self.url = self.shards.url
        self.rank, self.layout, self.plan, self.seed = rank, layout, plan, seed
        self.skip, self.transform, self.image_format = skip, transform, image_format
        self.max_pixels, self.handover_slots = max_pixels, handover_slots

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.layout.num_workers:
            raise DataError(f"stream built for {self.layout.num_workers} loader workers runs under {workers}")
        # In a loader worker, batches leave through a ring of shared slots (`handover`), read by the Loader.
        sender = handover.Sender(physical, self.handover_slots) if info is not None and self.handover_slots else None
        try:
            for batch in self._serve((physical + self.skip) % workers):
                yield sender.pack(batch) if sender is not None else batch
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
        """Global batch `j` from its raw samples (`raw`, aligned with its plan indices `group` and
        sequence `positions`): decoded, transformed, skipped slots filled and masked, collated."""
        rng_state = torch.get_rng_state() if self.transform is not None else None
        try:
            outputs, skips = self._decode(run, raw, positions)
            valid = self._fill(run, outputs, skips, positions)
        finally:
            if rng_state is not None:
                torch.set_rng_state(rng_state)  # the caller's generator is left as it was
        if self.transform is None:  # the encoded bytes stay in the worker: they would double what crosses over
            for sample in outputs:
                sample.pop("image_bytes", None)  # the stream's own dicts (decode_samples made them for this batch)
        batch = collate(outputs)
        batch["__key__"] = [o["__key__"] for o in outputs]
        batch["__valid__"] = valid
        batch["__batch__"] = j
        batch["__skips__"] = [
            (self.shards.names[s.shard], s.key, s.reason, s.whole_shard,
             s.whole_shard and run.anchor(run.slot(int(positions[i]))) == int(group[i]))
            for i, s in skips]
        return batch

    def _decode(self, run: _Pass, raw: list, positions: np.ndarray) -> tuple[list, list[tuple[int, Skip]]]:
        """Each slot's sample, decoded and transformed (None where it is skipped), and the skipped slots
        [(slot, Skip)] in slot order."""
        outputs: list = [None] * len(raw)
        skips: list[tuple[int, Skip]] = []
        good = [i for i, item in enumerate(raw) if not isinstance(item, Skip)]
        for i, sample in zip(good, decode_samples([raw[i] for i in good], self.image_format, self.max_pixels)):
            if isinstance(sample, str):
                shard = int(run.order[run.slot(int(positions[i]))])
                skips.append((i, Skip(shard, raw[i][0], sample, False)))
            else:
                outputs[i] = self._apply(sample)
        skips += [(i, item) for i, item in enumerate(raw) if isinstance(item, Skip)]
        skips.sort(key=lambda s: s[0])
        return outputs, skips

    def _fill(self, run: _Pass, outputs: list, skips: list[tuple[int, Skip]], positions: np.ndarray) -> torch.Tensor:
        """Fill the skipped slots with copies of the batch's good samples in turn (or of the filler when it
        has none); returns `__valid__`, a bool tensor (b,), False in those slots."""
        valid = torch.ones(len(outputs), dtype=torch.bool)
        if skips:
            present = [o for o in outputs if o is not None]
            if not present:
                present = [self._filler(run, int(positions.max()))]
            for n, (i, _) in enumerate(skips):
                outputs[i] = present[n % len(present)]
                valid[i] = False
        return valid

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
                (sample,) = decode_samples([item], self.image_format, self.max_pixels)
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
