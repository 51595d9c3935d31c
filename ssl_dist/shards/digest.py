"""The sha256 digests a manifest entry carries ("sha256" of the shard's bytes, "index_sha256" of its
sidecar's), computed while a shard is read for another purpose.

`index_shards` walks a tar's headers and seeks over the data; `check_shards` reads one sample's
range at a time. Wrapped in a `HashingReader`, both still read what they read, and every byte
of the shard passes through the digest once, in order: a seek forward reads the bytes in
between instead of skipping them, a read of bytes already digested does not digest them again.
"""

from __future__ import annotations

import hashlib

import numpy as np

CHUNK_BYTES = 4 * 2**20  # what a seek forward reads at a time: memory stays small whatever the gap


class HashingReader:
    """A binary file (`read`, `seek`) whose bytes, from the start, go through sha256 as they are read.

    `hexdigest(end)` reads whatever was not read yet up to `end` (the file's size) and returns the
    digest of bytes 0..end-1. One reader per file, used from one thread.
    """

    def __init__(self, f):
        self._f, self._digest = f, hashlib.sha256()
        self._pos = 0  # where the caller is
        self._done = 0  # bytes 0.._done-1 are digested

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("HashingReader seeks to absolute positions only")
        if pos > self._done:
            self._catch_up(pos)
        self._f.seek(pos)
        self._pos = pos
        return pos

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        if self._pos <= self._done < self._pos + len(data):
            self._digest.update(memoryview(data)[self._done - self._pos:])
            self._done = self._pos + len(data)
        self._pos += len(data)
        return data

    def hexdigest(self, end: int) -> str:
        """The sha256 of bytes 0..end-1 (hex), reading those not read yet."""
        self._catch_up(end)
        return self._digest.hexdigest()

    def _catch_up(self, pos: int) -> None:
        self._f.seek(self._done)
        while self._done < pos:
            data = self._f.read(min(CHUNK_BYTES, pos - self._done))
            if not data:
                break  # the file is shorter: the digest says so
            self._digest.update(data)
            self._done += len(data)
        self._f.seek(self._pos)


def sidecar_sha256(offsets) -> str:
    """The sha256 (hex) of a sidecar holding `offsets`: of the bytes `manifest.write_offsets` writes."""
    return hashlib.sha256(np.asarray(offsets, dtype="<u8").tobytes()).hexdigest()
