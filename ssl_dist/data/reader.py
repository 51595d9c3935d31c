"""Reading samples from the shards: ranged reads, retries (`data.retry`), the sidecar cache.

A `ShardSet` is made once in the training process (by the Loader) and copied into each
loader worker, where it reads. The manifest and sidecars are read through the shards
package (`shards.read_manifest`, `shards.load_offsets`); the bytes of a stretch of samples
come from one ranged read and are parsed by `shards.parse_samples`.

Reading. Each loader worker reads its next window's byte ranges in a background thread
(see `stream.ShardStream`) while it decodes the current one, so memory per worker is two
windows' bytes (about 2 x shuffle_window / (world_size x num_workers) samples) whatever the
shard size. Sidecars of small shards are cached (`SIDECAR_CACHE_BYTES` per loader worker);
those of large shards are read in ranges too.

Retries. Every read goes through one retry layer (`_retrying`, with a `retry.RetryPolicy`);
the S3 clients below it try each request once (`storage.single_attempt`). A store that
throttles (503 SlowDown, 429 ...), times out or cannot be reached is waited for, with
jittered exponential backoff, up to the read's deadline (`data.read_deadline_s`); past it
the reader raises StorageError naming the store and the deadline, and skips nothing: an
outage is not bad data.

Unreadable data. A sample whose bytes cannot be read or parsed (a shard truncated after it
was indexed, wrong sidecar offsets) comes back as a `Skip`. A *shard* is skipped when the
store's answer about it or its sidecar stays bad after `retries` retries (listed but
missing, a sidecar of the wrong length, access to it refused): all its samples come back as
`Skip(whole_shard=True)`. What is skipped depends only on the bytes in storage and on the
plan, never on the layout or on which reader meets the problem, so a resumed run (same or
other layout) makes the same skips. Before skipping a shard the reader checks that the
store itself still answers (the manifest can be read): a bucket deleted or credentials
withdrawn mid-run raise StorageError instead of skipping the whole dataset.

Verifying (`verify`, data.verify). The first time a process reads a shard, it reads the
whole shard (the bytes the manifest's size covers, in ranged reads of `VERIFY_CHUNK_BYTES`)
and its sidecar, and compares their sha256 with the manifest's "sha256" / "index_sha256".
A mismatch is bad data, repeatable like the rest: the shard is skipped (all its samples
`Skip(whole_shard=True)`), and the verdict is kept for the life of the process, so a shard
is read whole once per process that reads it (loader workers live one epoch). The samples
the stream then reads are the bytes that were verified, unless the object is replaced
between the two reads.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Any, Callable, NamedTuple

import numpy as np

from ssl_dist import shards as shardlib
from ssl_dist import storage
from ssl_dist.data import retry
from ssl_dist.decode import DataError
from ssl_dist.shards.digest import sidecar_sha256

SIDECAR_CACHE_BYTES = 64 * 2**20  # sidecars kept per loader worker
WHOLE_SIDECAR_BYTES = 2**20  # larger sidecars are read in ranges, never whole
VERIFY_CHUNK_BYTES = 16 * 2**20  # one ranged read of a shard being verified
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
    (`read_runs`). Reads, the manifest's included, are retried as `policy` says (default:
    `retry.RetryPolicy()`); `storage_options` are made single-attempt for that
    (`storage.single_attempt`). Raises DataError for a missing manifest or an empty dataset,
    StorageError for a missing bucket or a store unreachable past the policy's deadline.
    `verify`: check each shard against the manifest's digests on first read (see the module
    docstring); a manifest without them is refused then (DataError).
    """

    def __init__(self, url: str, storage_options: dict | None = None, *, policy: retry.RetryPolicy | None = None,
                 verify: bool = False):
        self.url = url.rstrip("/")
        self.options = storage.single_attempt(self.url, storage_options)
        self.policy = policy or retry.RetryPolicy()
        try:
            self.manifest = self._retrying(shardlib.MANIFEST, lambda: shardlib.read_manifest(self.url, self.options),
                                           shard=False)
        except shardlib.ShardError as exc:
            # a missing bucket says so, not "no index.json"
            self._retrying("the bucket", lambda: storage.check_bucket(self.url, self.options), shard=False)
            raise DataError(str(exc)) from None
        self.shards = self.manifest["shards"]
        self.names = [s["url"] for s in self.shards]
        self.counts = np.array([s["num_samples"] for s in self.shards], dtype=np.int64)
        if self.counts.sum() == 0:
            raise DataError(f"the dataset at {url} holds no samples: make shards from a folder with images")
        self.verify = verify
        undigested = [s["url"] for s in self.shards if "sha256" not in s]
        if verify and undigested:
            raise DataError(f"data.verify=true but the manifest of {self.url} has no sha256 for {len(undigested)} of "
                            f"its {len(self.shards)} shards ({undigested[0]}, ...): index them again with `ssl-dist "
                            f"shards index {self.url}` (it writes the digests), or set data.verify=false")
        self._reset()

    def _reset(self) -> None:
        self._fs, self._fs_pid, self._root = None, None, None
        self._lock = threading.Lock()
        self._offsets: OrderedDict[int, np.ndarray] = OrderedDict()
        self._offset_bytes = 0
        self.unreadable: dict[int, str] = {}  # shard -> why, for this process's current pass
        self._verified: dict[int, str | None] = {}  # shard -> None (matches its digests) or why not, this process

    def __getstate__(self):  # for DataLoader workers started with spawn: no live filesystem or lock
        state = self.__dict__.copy()
        for name in ("_fs", "_fs_pid", "_root", "_lock", "_offsets", "_offset_bytes", "unreadable", "_verified"):
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

    def _retrying(self, what: str, read: Callable[[], Any], *, shard: bool = True) -> Any:
        """`read()` under the retry policy: its value (b"" for a range past the end of an object).

        A store that keeps throttling, timing out or refusing connections past the deadline:
        StorageError naming it. Data found bad after `policy.retries` retries: ShardUnreadable
        for a shard's read (once `_check_store` has found the store itself answering). Another
        read (`shard=False`: the manifest, the store probe) raises bad data's error at once.
        """
        attempts = self.policy.start()
        while True:
            try:
                return read()
            except Exception as exc:  # s3fs/botocore/aiohttp/OS errors, ShardError: judged by retry.classify
                if _is_range_past_end(exc):
                    return b""
                kind = retry.classify(exc)
                # bad data is retried only where it would be skipped: the manifest's answer is final
                if (shard or kind == retry.TRANSIENT) and attempts.again(kind):
                    continue
                if kind == retry.TRANSIENT:
                    raise storage.StorageError(self._unreachable(what, exc, attempts)) from None
                if not shard:
                    raise
                self._check_store(exc, attempts)
                if isinstance(exc, FileNotFoundError):
                    # A 404 for a key the manifest lists: S3 reads its writes (strongly consistent), and the
                    # manifest is written last, so this is the data as it is, repeatable on resume; the
                    # retries give a store that is only eventually consistent its chance.
                    raise ShardUnreadable(f"{what} is missing (listed in {shardlib.MANIFEST}, not in the store)") \
                        from None
                if isinstance(exc, shardlib.ShardError):
                    raise ShardUnreadable(str(exc)) from None
                raise ShardUnreadable(f"{what} cannot be read ({self._reason(exc)}) after {attempts.count} "
                                      f"attempts") from None

    def _unreachable(self, what: str, exc: Exception, attempts: retry.Attempts) -> str:
        """The one message of a store that stayed throttling or unreachable past the deadline."""
        state = "throttling (asking us to slow down)" if retry.is_throttling(exc) else "failing"
        return (f"{storage.describe_store(self.url, self.options)} kept {state} for {attempts.elapsed:.0f} s "
                f"({attempts.count} attempts) while reading {what} of {self.url}, past data.read_deadline_s="
                f"{self.policy.deadline_s:g} s ({self._reason(exc)}); nothing was skipped as bad data: rerun "
                f"(it resumes) once the store answers, or raise data.read_deadline_s")

    def _check_store(self, exc: Exception, attempts: retry.Attempts) -> None:
        """Raise StorageError if the store itself is gone (not just one object): that is no data problem.

        Called before a shard is skipped: the manifest must still be there (a HEAD request,
        retried like any read), else the bucket, the credentials or the manifest went away."""
        fs = self.fs()

        def probe():
            fs.invalidate_cache()
            return fs.info(self.path(shardlib.MANIFEST))

        try:
            self._retrying(shardlib.MANIFEST, probe, shard=False)
        except storage.StorageError:
            raise
        except Exception as failed:
            reason = storage.explain(self.url, failed) or self._reason(exc)
            store = storage.describe_store(self.url, self.options)
            raise storage.StorageError(f"reading {self.url} failed after {attempts.count} attempts and the "
                                       f"manifest cannot be read either ({store}): {reason}") from None

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
            if self.verify:
                self._check_digests(shard)
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

    def _check_digests(self, shard: int) -> None:
        """Raise ShardUnreadable unless `shard` and its sidecar match the manifest's sha256 digests.

        Reads the whole shard (ranged reads, retried like any read) the first time this process
        asks; the verdict is kept, so later calls cost nothing.
        """
        with self._lock:
            known = shard in self._verified
            reason = self._verified.get(shard)
        if not known:
            reason = self._digest_problem(shard)
            with self._lock:
                self._verified[shard] = reason
        if reason is not None:
            raise ShardUnreadable(reason)

    def _digest_problem(self, shard: int) -> str | None:
        entry = self.shards[shard]
        digest = hashlib.sha256()
        for start in range(0, entry["size"], VERIFY_CHUNK_BYTES):
            end = min(start + VERIFY_CHUNK_BYTES, entry["size"])
            digest.update(self._retrying(entry["url"], lambda start=start, end=end: self.fs().cat_file(
                self.path(entry["url"]), start=start, end=end)))
        fix = f"restore it, or re-index with `ssl-dist shards index {self.url}`"
        if digest.hexdigest() != entry["sha256"]:
            return f"{entry['url']} does not match the sha256 in the manifest (changed after it was indexed?): {fix}"
        if "index_sha256" in entry and sidecar_sha256(self.offsets(shard)) != entry["index_sha256"]:
            return (f"sidecar {entry['index']} does not match the index_sha256 in the manifest (changed after it was "
                    f"indexed?): {fix}")
        return None

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
