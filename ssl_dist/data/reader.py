"""Reading samples from the shards: ranged reads, retries with backoff, the sidecar cache.

A `ShardSet` is made once in the training process (by the Loader) and copied into each
loader worker, where it reads. The manifest and sidecars are read through the shards
package (`shards.read_manifest`, `shards.load_offsets`); the bytes of a stretch of samples
come from one ranged read and are parsed by `shards.parse_samples`.

Reading. Each loader worker reads its next window's byte ranges in a background thread
(see `stream.ShardStream`) while it decodes the current one, so memory per worker is two
windows' bytes (about 2 x shuffle_window / (world_size x num_workers) samples) whatever the
shard size. Sidecars of small shards are cached (`SIDECAR_CACHE_BYTES` per loader worker);
those of large shards are read in ranges too.

Unreadable data. A sample whose bytes cannot be read or parsed (a shard truncated after it
was indexed, wrong sidecar offsets) comes back as a `Skip`. A *shard* is skipped when it or
its sidecar cannot be read after `retries` retries with exponential backoff (deleted,
access refused, a connection to it that keeps failing): all its samples come back as
`Skip(whole_shard=True)`. What is skipped depends only on the bytes in storage and on the
plan, never on the layout or on which reader meets the problem, so a resumed run (same or
other layout) makes the same skips (a transient outage that outlasts the retries is, by its
nature, not repeatable). An unreachable store, though, is not bad data: when reads keep
failing and the manifest cannot be read either, the reader raises StorageError instead of
skipping the whole dataset.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import numpy as np

from ssl_dist import shards as shardlib
from ssl_dist import storage
from ssl_dist.decode import DataError

SIDECAR_CACHE_BYTES = 64 * 2**20  # sidecars kept per loader worker
WHOLE_SIDECAR_BYTES = 2**20  # larger sidecars are read in ranges, never whole
READ_THROUGH_GAP = 64  # samples not needed that a ranged read may span rather than start another


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

    Made once in the training process (by the Loader, which reads the manifest through it);
    a copy lives in each loader worker, where the reads happen (its filesystem, caches and
    notes of unreadable shards are per process). Evaluation reads through one too
    (`read_runs`). Reads are retried `retries` times with exponential backoff starting at
    `backoff` seconds. Raises DataError for a missing manifest or an empty dataset,
    StorageError for a missing bucket.
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
                    raise ShardUnreadable(f"{what} cannot be read ({self._reason(exc)}) after {attempt + 1} "
                                          f"attempts") from None
                time.sleep(delay)
                delay *= 2

    def _check_store(self, exc: Exception) -> None:
        """Raise StorageError if the store itself is gone (not just one object): that is no data problem."""
        fs = self.fs()
        try:
            fs.invalidate_cache()
            fs.info(self.path(shardlib.MANIFEST))
        except Exception as probe:
            reason = storage.explain(self.url, probe) or self._reason(exc)
            raise storage.StorageError(f"reading {self.url} failed after {self.retries + 1} attempts and the "
                                       f"manifest cannot be read either: {reason}") from None

    def _reason(self, exc: Exception) -> str:
        """What went wrong, in a few words (a StorageError of `shards.read_offsets` says it already)."""
        if isinstance(exc, storage.StorageError):
            return str(exc)
        return storage.explain(self.url, exc) or f"{type(exc).__name__}: {exc}"

    def offsets(self, shard: int, first: int = 0, stop: int | None = None) -> np.ndarray:
        """Sidecar offsets (int64) of samples first..stop-1 of `shard` (retried; ShardUnreadable).

        Read by `shards.read_offsets` (the one sidecar reader) on this process's filesystem:
        small sidecars whole and cached, large ones only in the range asked for.
        """
        n = self.shards[shard]["num_samples"]
        stop = n if stop is None else stop
        if 8 * n > WHOLE_SIDECAR_BYTES:  # large sidecar: read only the part needed
            return self._sidecar(shard, first, stop)
        with self._lock:
            cached = self._offsets.get(shard)
            if cached is not None:
                self._offsets.move_to_end(shard)
                return cached[first:stop]
        offsets = self._sidecar(shard, 0, n)
        with self._lock:
            self._offsets[shard] = offsets
            self._offset_bytes += offsets.nbytes
            while self._offset_bytes > SIDECAR_CACHE_BYTES and len(self._offsets) > 1:
                self._offset_bytes -= self._offsets.popitem(last=False)[1].nbytes
        return offsets[first:stop]

    def _sidecar(self, shard: int, first: int, stop: int) -> np.ndarray:
        entry = self.shards[shard]
        offsets = self._retrying(f"sidecar {entry['index']}", lambda: shardlib.read_offsets(
            self.url, entry, fs=self.fs(), first=first, stop=stop))
        if isinstance(offsets, bytes):  # the range starts past the end of the sidecar
            raise ShardUnreadable(f"sidecar {entry['index']} is shorter than the manifest says: re-index the shards")
        return offsets.astype(np.int64)

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
        the result is aligned with `positions`. `order`, `starts`: `order(seed, epoch)`. Called by the
        stream's read-ahead thread in a loader worker, one window at a time."""
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
