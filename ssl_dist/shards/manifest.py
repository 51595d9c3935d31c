"""The manifest (``index.json``) and the sidecars: reading, validating and writing them.

The manifest's shape is in the package docstring. A sidecar (``shard-000000.idx``, one per
shard) holds one little-endian uint64 per sample: the byte offset in the tar of the header of
the sample's FIRST member (for a member with a PAX or GNU long-name header, the offset of that
extended header). `read_offsets` is the one reader of sidecars (the data stream and
`check_shards` use it), `write_offsets` the one writer (`make_shards`, `index_shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from datetime import datetime, timezone

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ssl_dist import storage
from ssl_dist.shards.errors import ShardError

FORMAT = "ssl_dist.shards/1"
MANIFEST = "index.json"
DIGESTS = ("sha256", "index_sha256")  # optional entry fields: hex sha256 of the shard's bytes, of its sidecar's
# 64 GiB: WebDataset shards are 0.1-10 GB (a few hundred MB advised); a larger size is a typo or a
# hostile manifest (10**12 was accepted), and the stream plans reads with it.
MAX_SHARD_BYTES = 2**36
TAR_BLOCK = 512
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|[A-Za-z]:")  # s3://, file://, C:
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(url: str, storage_options: dict | None = None) -> dict:
    """Load and validate ``URL/index.json``; returns it as a dict (shape in the package docstring).

    Raises ShardError when it is missing, not JSON, of another format, or lists no samples.
    Called by the data stream and by `check_shards`.
    """
    fs, root = storage.filesystem(url, storage_options)
    with storage.translate_errors(url):
        try:
            text = fs.cat_file(posixpath.join(root, MANIFEST))
        except FileNotFoundError:
            raise ShardError(f"no {MANIFEST} at {url}: make shards with `ssl-dist shards make SRC {url}` or index "
                             f"existing ones with `ssl-dist shards index {url}`") from None
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ShardError(f"{storage.join(url, MANIFEST)} is not valid JSON ({exc}): re-create it with "
                         f"`ssl-dist shards index {url}`") from None
    validate_manifest(manifest, url)
    return manifest


def validate_manifest(manifest, url: str) -> None:
    """Raise ShardError unless `manifest` has the documented shape and at least one sample.

    Every entry's ``url`` and ``index`` must name a file inside the dataset folder (`name_problem`),
    no file may be listed twice (a repeated shard would deliver its samples twice), counts and
    sizes must be possible (`count_problem`) and digests, where present, sha256 hex digests.
    One message per problem, naming the entry and the fix. Called by `read_manifest` (so by the
    data stream, `check_shards` and evaluation) and by `index_shards` before it writes.
    """
    fix = f"re-create it with `ssl-dist shards index {url}`"
    where = storage.join(url, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(f"{where} has format {found!r}, expected {FORMAT!r}: {fix}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and "num_samples" in s and "size" in s and isinstance(s.get("url"), str)
            and isinstance(s.get("index"), str) for s in shards):
        raise ShardError(f"{where}: 'shards' must be a list of {{url, num_samples, size, index}}: {fix}")
    listed: dict[str, int] = {}  # file name -> the entry that lists it
    for number, shard in enumerate(shards):
        for field in ("url", "index"):
            name = shard[field]
            problem = name_problem(name)
            if problem:
                raise ShardError(f"{where}: shard #{number} ({field} {name!r}) {problem}: entries name files inside "
                                 f"{url} by their path relative to it (e.g. 'shard-000000.tar'): {fix}")
            if name in listed:
                also = "its own url" if listed[name] == number else f"shard #{listed[name]}"
                raise ShardError(f"{where}: shard #{number} ({field} {name!r}) is listed twice (also {also}): each "
                                 f"shard and sidecar must be listed once, or its samples are read twice: {fix}")
            listed[name] = number
        problem = count_problem(shard)
        if problem:
            raise ShardError(f"{where}: shard #{number} ({shard['url']!r}): {problem}: {fix}")
    total = sum(s["num_samples"] for s in shards)
    if total == 0:
        raise ShardError(f"{where} lists no samples: make shards with `ssl-dist shards make SRC {url}`")
    found = manifest.get("num_samples")
    if not _whole(found) or found != total:
        raise ShardError(f"{where}: num_samples is {found} but its shards hold {total}: {fix}")
    # "fields" came after format 1 was first written: a manifest without it is still valid
    found = manifest.get("fields", [])
    if not isinstance(found, list) or not all(isinstance(f, str) and f for f in found):
        raise ShardError(f"{where}: 'fields' must be a list of member extensions such as [\"cls\", \"jpg\"]: {fix}")


def name_problem(name: str) -> str | None:
    """Why `name` (an entry's url or index) could address a file outside the dataset folder, or None.

    A name is a relative path of non-empty segments, none of them '.' or '..', without a scheme,
    a drive, a backslash or control characters: joined to the folder's URL, it stays inside it
    (on S3 a '..' or a leading '/' would read another prefix's or another bucket's keys).
    """
    if not name:
        return "is empty"
    if _SCHEME.match(name):
        return f"starts with a scheme or drive ({name.split(':')[0]}:)"
    if name.startswith("/"):
        return "is absolute"
    if "\\" in name:
        return "holds a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    segments = name.split("/")
    if "" in segments:
        return "has an empty segment ('//' or a trailing '/')"
    if ".." in segments:
        return "has a '..' segment"
    if "." in segments:
        return "has a '.' segment"
    return None


def count_problem(shard: dict) -> str | None:
    """Why an entry's num_samples, size or digests are impossible, or None.

    Counts are whole numbers (not booleans: JSON's true would count as 1); a shard holds at most
    `MAX_SHARD_BYTES`, and at least 512 bytes per sample (each sample starts with a tar header).
    """
    count, size = shard["num_samples"], shard["size"]
    for key, value in (("num_samples", count), ("size", size)):
        if not _whole(value):
            return f"{key} {value!r}: must be a whole number"
        if value < 0:
            return f"{key} {value}: must be at least 0"
    if size > MAX_SHARD_BYTES:
        return (f"size {size}: more than {MAX_SHARD_BYTES // 2**30} GiB, which no shard holds (split such a tar "
                f"into shards of a few GiB at most)")
    if size < TAR_BLOCK * count:
        return f"size {size}: too small for {count} samples (each starts with a {TAR_BLOCK}-byte tar header)"
    for key in DIGESTS:
        if key in shard and not (isinstance(shard[key], str) and _SHA256.fullmatch(shard[key])):
            return f"{key} {shard[key]!r}: must be 64 lowercase hex digits (a sha256 digest)"
    return None


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def new_manifest(entries: list[dict], classes: list[str] | None, fields: list[str]) -> dict:
    """The manifest dict for these shard entries (shape in the package docstring); `fields`: the
    member extensions the samples carry."""
    manifest = {"format": FORMAT, "shards": entries, "num_samples": sum(e["num_samples"] for e in entries),
                "fields": sorted(fields)}
    if classes is not None:
        manifest["classes"] = list(classes)
    manifest["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return manifest


def write_manifest(fs, root: str, url: str, manifest: dict) -> None:
    """Write ``index.json``, one shard per line; locally through a rename, so it is never half-written."""
    shards = ",\n  ".join(json.dumps(shard) for shard in manifest["shards"])
    fields = [f'"shards": [\n  {shards}\n ]' if key == "shards" else f"{json.dumps(key)}: {json.dumps(value)}"
              for key, value in manifest.items()]
    text = ("{" + ",\n ".join(fields) + "}\n").encode("utf-8")
    path = posixpath.join(root, MANIFEST)
    with storage.translate_errors(url):
        if isinstance(fs, LocalFileSystem):
            fs.pipe_file(path + ".tmp", text)
            os.replace(path + ".tmp", path)
        else:
            fs.pipe_file(path, text)  # an object-store PUT is atomic


def read_offsets(url: str, shard: dict, storage_options: dict | None = None, *, fs=None, first: int = 0,
                 stop: int | None = None) -> np.ndarray:
    """The byte offsets of samples ``first..stop-1`` (default: all) of one shard, from its sidecar.

    `shard` is a ``manifest["shards"]`` entry of the dataset at `url`. The one reader of
    sidecars: `check_shards` reads each whole; the data stream passes its own filesystem `fs`
    (one per loader process) and, for a sidecar too large to read whole, the range it needs,
    of which only those bytes are read. Returns a uint64 array of ``stop - first`` offsets.
    Raises ShardError when the sidecar is missing or its length disagrees with the manifest,
    StorageError for rejected credentials or an unreachable store; other errors of the store
    are raised as they come (the stream retries them).
    """
    count = shard["num_samples"]
    stop = count if stop is None else stop
    if not 0 <= first <= stop <= count:
        raise ValueError(f"samples {first}..{stop} of a shard of {count}")
    whole = (first, stop) == (0, count)
    if fs is None:
        fs, _ = storage.filesystem(url, storage_options)
    where = storage.join(url, shard["index"])  # fsspec takes the URL itself, protocol and all
    fix = f"re-create it with `ssl-dist shards index {url}`"
    with storage.translate_errors(url):
        try:
            # A range even for the whole sidecar: s3fs asks for an object's size (a HEAD) before
            # reading it whole, and the manifest knows it. One offset more than the manifest
            # says is asked for, so that a longer sidecar is seen as one.
            data = fs.cat_file(where, start=8 * first, end=8 * (stop + 1) if whole else 8 * stop)
        except FileNotFoundError:
            raise ShardError(f"sidecar {where} is missing: {fix}") from None
    if whole and len(data) != 8 * count:
        raise ShardError(f"sidecar {where} holds {len(data) / 8:g} offsets but the manifest says {count} samples: "
                         f"{fix}")
    if len(data) != 8 * (stop - first):
        raise ShardError(f"sidecar {where} is shorter than the manifest's {count} samples say: {fix}")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def write_offsets(fs, path: str, offsets: list[int]) -> str:
    """Write a sidecar: `offsets` as little-endian uint64 (callers translate storage errors); returns
    the sha256 (hex) of what it wrote, the entry's "index_sha256"."""
    data = np.asarray(offsets, dtype="<u8").tobytes()
    fs.pipe_file(path, data)
    return hashlib.sha256(data).hexdigest()
