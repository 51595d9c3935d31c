"""Write, index and check WebDataset shards and their manifest.

A dataset is a folder URL (local path, ``s3://``, ``gs://``) holding:

- ``shard-000000.tar``, ...: tar files in WebDataset layout. Each sample is a run of adjacent
  members ``KEY.EXT`` sharing one KEY; shards made here hold ``KEY.cls`` (the class index as
  ASCII digits) followed by ``KEY.<image ext>`` (the source file's bytes, never re-encoded).
- ``shard-000000.idx``, one sidecar per shard: little-endian uint64, one per sample, the byte
  offset in the tar of the header of the sample's FIRST member (for a member with a PAX or
  GNU long-name header, the offset of that extended header).
- ``index.json``, the manifest, written last::

    {"format": "ssl_dist.shards/1",
     "shards": [{"url": "shard-000000.tar", "num_samples": 5000, "size": 12697600,
                 "index": "shard-000000.idx"}, ...],     # url and index relative to the folder
     "num_samples": 50000,
     "classes": ["airplane", ...],                       # absent when unknown (index_shards)
     "created": "2025-01-01T00:00:00Z"}

Where a sample ends. Sample ``i`` of a shard occupies the bytes ``[offsets[i], offsets[i+1])``
and the last one ``[offsets[-1], size)``, ``size`` being the shard's byte size from the
manifest: ``sample_ranges(offsets, size)`` returns exactly these ranges. The last range
therefore also holds the tar's end-of-archive marker (two zero 512-byte blocks, plus zero
padding to a 10240-byte record for shards written here, at most 11 KiB in all);
``parse_members`` stops at the first all-zero header block, so a reader does a ranged read of
one range, ``parse_members`` on the bytes, then ``group_samples``, and gets exactly one sample.

Tar format. Shards written here are what ``tarfile`` writes in GNU format (one USTAR-style
header per member from ``TarInfo.tobuf``, a GNU ``L`` long-name entry only for names over 100
bytes, data padded to 512 bytes, two zero blocks, zeros up to a 10240-byte record) and never
hold PAX headers, which webdataset's ``TarWriter`` adds to every member (a CIFAR sample then
takes 4.5 KiB instead of 2.5 KiB). mtime, mode, uid, gid and owner names are fixed, so the same
source and options give byte-identical shards and sidecars (only ``created`` in the manifest
differs).

Keys. WebDataset splits a member name at the first '.' of its basename: KEY is everything
before it, EXT the rest (lower-cased). KEYs made here are the image's path relative to the
source root (class folder first) without its extension, any '.' left in the basename replaced
by '_', e.g.
``airplane/0001`` for ``SRC/airplane/0001.jpg``, so every sample traces back to its file.

Callers: ``ssl_dist.cli`` (``ssl-dist shards make|index|check``) and the data stream
(``read_manifest``, ``read_offsets``, ``sample_ranges``, ``parse_samples``; ``parse_members`` and
``group_samples`` for one sample at a time).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import random
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ssl_dist import storage

FORMAT = "ssl_dist.shards/1"
MANIFEST = "index.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what the data stream decodes
BLOCK = 512  # tar block size
RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to a multiple of this (10240)
NAME_FIELD = 100  # longer member names need a GNU long-name member in front of the header
MAX_PROBLEMS_PER_SHARD = 20  # a broken shard should not drown the report of the others


class ShardError(RuntimeError):
    """A user-facing problem with a shard source, shards or their manifest."""


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def make_shards(src: str, dest: str, *, samples_per_shard: int | None = None, shard_bytes: int = 256 * 2**20,
                workers: int = 4, shuffle_seed: int | None = 0, storage_options: dict | None = None,
                progress: bool = False, overwrite: bool = False) -> dict:
    """Turn an image folder (or an uncompressed tar of one) into shards + sidecars + manifest.

    `src`: a local folder in torchvision ImageFolder layout (``SRC/<class>/**/<image>``), or a
    local ``.tar`` of one whose members may all sit under one top-level folder (e.g.
    ``train/<class>/0001.jpg``), which is then taken as the root. Images are the files ending in
    .jpg/.jpeg/.png/.webp (any case); hidden files and folders are ignored.
    `dest`: a local folder or object-store URL; it must not already hold shards unless
    `overwrite` (which deletes the old manifest first, then the old shards).
    Samples are shuffled with `shuffle_seed` (None: sorted by key) and cut, in that order, into
    shards of at most `samples_per_shard` samples and `shard_bytes` bytes (a single larger
    sample gets a shard of its own); `workers` threads write the shards.
    Returns the manifest dict that was written to ``dest/index.json``. Called by
    ``ssl-dist shards make``.
    """
    classes, images = list_source(src)
    order = shuffled(images, shuffle_seed)
    plan = plan_shards(order, samples_per_shard=samples_per_shard, shard_bytes=shard_bytes)
    fs, root = storage.filesystem(dest, storage_options)
    storage.check_writable_root(dest, storage_options)
    prepare_destination(fs, root, dest, overwrite)
    tar_path = src if os.path.isfile(src) else None
    entries = write_planned_shards(fs, root, dest, plan, tar_path, workers=workers, progress=progress)
    manifest = new_manifest(entries, classes)
    write_manifest(fs, root, dest, manifest)
    return manifest


def index_shards(url: str, *, workers: int = 8, storage_options: dict | None = None) -> dict:
    """Write sidecars and a manifest for the ``*.tar`` shards directly under `url`.

    For shards made elsewhere, in any WebDataset layout (USTAR, GNU or PAX headers, e.g. from
    webdataset's TarWriter). Each shard is streamed once, never loaded whole; `workers` threads
    scan shards in parallel. Samples are grouped by WebDataset's key rule; shards without
    samples are left out of the manifest. Classes are unknown here, so the manifest has none.
    Returns the manifest dict. Called by ``ssl-dist shards index``.
    """
    fs, root = storage.filesystem(url, storage_options)
    with storage.translate_errors(url):
        paths = sorted(fs.glob(root + "/*.tar"))
    if not paths:
        raise ShardError(f"no *.tar shards directly under {url}: point URL at the folder that holds the shards")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        entries = list(pool.map(lambda path: index_one_shard(fs, path, url), paths))
    entries = [entry for entry in entries if entry["num_samples"] > 0]
    if not entries:
        raise ShardError(f"the shards under {url} hold no samples in WebDataset layout (members KEY.EXT)")
    manifest = new_manifest(entries, classes=None)
    write_manifest(fs, root, url, manifest)
    return manifest


def check_shards(url: str, *, workers: int = 4, storage_options: dict | None = None) -> dict:
    """Read every sample the way the data stream does and report what is wrong.

    For each shard of the manifest: its size and sample count against the manifest, the
    sidecar offsets, then every sample through a ranged read + `parse_members` +
    `group_samples`; each image is decoded with PIL and each ``.cls`` parsed as an int (within
    the manifest's classes when it has them). Returns ``{"shards": int, "samples": int (samples
    read), "problems": [str, ...]}``, each problem naming the shard and, where known, the key.
    Called by ``ssl-dist shards check``.
    """
    manifest = read_manifest(url, storage_options)
    fs, root = storage.filesystem(url, storage_options)
    num_classes = len(manifest["classes"]) if "classes" in manifest else None
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda shard: check_one_shard(fs, root, url, shard, num_classes),
                                manifest["shards"]))
    return {"shards": len(results), "samples": sum(count for count, _ in results),
            "problems": [problem for _, problems in results for problem in problems]}


def read_manifest(url: str, storage_options: dict | None = None) -> dict:
    """Load and validate ``URL/index.json``; returns it as a dict (shape in the module docstring).

    Raises ShardError when it is missing, not JSON, of another format, or lists no samples.
    Called by the data stream and by `check_shards`.
    """
    fs, root = storage.filesystem(url, storage_options)
    text = read_optional(fs, posixpath.join(root, MANIFEST), url)
    if text is None:
        raise ShardError(f"no {MANIFEST} at {url}: make shards with `ssl-dist shards make SRC {url}` or index "
                         f"existing ones with `ssl-dist shards index {url}`")
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise ShardError(f"{storage.join(url, MANIFEST)} is not valid JSON ({exc}): re-create it with "
                         f"`ssl-dist shards index {url}`") from None
    validate_manifest(manifest, url)
    return manifest


def read_offsets(url: str, shard: dict, storage_options: dict | None = None) -> np.ndarray:
    """The sample offsets of one shard (a ``manifest["shards"]`` entry) from its sidecar.

    Returns a uint64 array of ``shard["num_samples"]`` increasing byte offsets. Called by the
    data stream when it starts inside a shard, and by `check_shards`.
    """
    fs, root = storage.filesystem(url, storage_options)
    return load_offsets(fs, root, url, shard)


def sample_ranges(offsets: Iterable[int], shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` byte ranges of the samples of a shard of `shard_size` bytes.

    Sample i runs up to the next sample's offset; the last one up to the end of the shard
    (its range includes the end-of-archive zero blocks, which `parse_members` stops at).
    """
    starts = [int(offset) for offset in offsets]
    return list(zip(starts, starts[1:] + [int(shard_size)]))


def parse_members(buf) -> list[tuple[str, bytes]]:
    """The regular-file members ``[(name, data), ...]`` in `buf`, bytes of a tar from a header on.

    `buf` (bytes-like) is what a ranged read of `sample_ranges` returns: it must start at a
    member header (or extended header) and may end at a member boundary, inside the
    end-of-archive zero blocks or at the end of the tar. Reads USTAR and GNU headers, GNU ``L``
    long names and PAX ``x`` headers (``path``/``size`` overrides); PAX ``g`` headers,
    directories and links are skipped. Raises ShardError on a bad header checksum (the bytes
    do not start at a header) or a member cut short.
    Called by the data stream on every sample it reads, and by `check_shards`.
    """
    data = buf if isinstance(buf, bytes) else bytes(buf)  # BytesIO shares bytes, copies anything else
    return [(entry.name, data[entry.data_offset:entry.data_offset + entry.size])
            for entry in iter_tar(io.BytesIO(data), len(data))]


def group_samples(members: Iterable[tuple[str, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    """Group ``(name, data)`` members into ``[(key, {ext: data}), ...]`` as webdataset does.

    KEY is the name up to the first '.' of its basename, EXT the rest, lower-cased; a new sample
    starts where KEY changes. Names without such a dot and webdataset's ``__meta__`` names are
    skipped. Raises ShardError on a repeated EXT within one sample. Called by the data stream
    after `parse_members`.
    """
    samples: list[tuple[str, dict[str, bytes]]] = []
    for name, data in members:
        split = split_name(name)
        if split is None:
            continue
        key, ext = split
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        fields = samples[-1][1]
        if ext in fields:
            raise ShardError(f"member {name} appears twice in sample {key}")
        fields[ext] = data
    return samples


def parse_samples(data, starts, ends) -> list:
    """Parse many samples of one ranged read at once (the data stream's hot path).

    `data`: bytes read from a shard from one sample's offset on; `starts[i]`, `ends[i]`: sample
    i's range in `data` (its `sample_ranges` entry minus the offset `data` starts at). An end
    past ``len(data)`` means the read came back short (a shard truncated after it was indexed):
    such a sample is reported cut short. Returns one entry per sample: ``(key, {ext: bytes})``,
    the same as ``group_samples(parse_members(data[start:end]))`` gives when that is exactly one
    sample, or a ShardError saying what is wrong with it (never raises for a bad sample).

    Samples made only of plain members (USTAR/GNU headers of regular files, no name prefix,
    ASCII names split by the simple rule: what ``make_shards`` writes) are parsed for all
    samples at once with numpy (headers, sizes, checksums, names), leaving about a microsecond
    of Python per sample; any other sample (PAX or GNU long-name headers, base-256 sizes, a
    bad checksum, an odd name, anything wrong) goes through `parse_members` + `group_samples`,
    which stay the definition of what a sample is.
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    cut = ends > len(data)
    results = _parse_plain_samples(data, starts, ends, ~cut)
    for number in np.flatnonzero(cut).tolist():
        results[number] = ShardError(f"sample cut short: its bytes end at {int(ends[number])}, the read at "
                                     f"{len(data)} (shard truncated?)")
    for number, result in enumerate(results):
        if result is None:
            results[number] = _parse_sample_slowly(data, int(starts[number]), int(ends[number]))
    return results


MAX_PLAIN_MEMBERS = 16  # a sample with more members is parsed the slow way
_EXTS: dict[bytes, str] = {}  # member name suffix -> lower-case EXT, as met


def _parse_plain_samples(data: bytes, starts: np.ndarray, ends: np.ndarray, todo: np.ndarray) -> list:
    """(key, fields) for each sample in `todo` whose members are all plain, None for the others."""
    n = len(starts)
    out: list = [None] * n
    if len(data) < BLOCK or not todo.any():
        return out
    blocks = np.lib.stride_tricks.sliding_window_view(np.frombuffer(data, dtype=np.uint8), BLOCK)
    pos = starts.copy()
    plain = todo & (starts < ends)
    active = plain.copy()
    count = np.zeros(n, dtype=np.int64)
    found = []  # per step: (sample, header position, size, name bytes)
    for step in range(MAX_PLAIN_MEMBERS):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        p = pos[idx]
        fits = p + BLOCK <= ends[idx]
        plain[idx[~fits]] = active[idx[~fits]] = False
        idx, p = idx[fits], p[fits]
        rows = blocks[p]
        zero = ~rows.any(axis=1)  # end-of-archive block: the sample ends here, as parse_members stops
        active[idx[zero]] = False
        plain[idx[zero]] &= count[idx[zero]] > 0
        idx, p, rows = idx[~zero], p[~zero], rows[~zero]
        size, good = _plain_headers(rows)
        good &= p + BLOCK + size <= ends[idx]
        plain[idx[~good]] = active[idx[~good]] = False
        idx, p, size, rows = idx[good], p[good], size[good], rows[good]
        found.append((idx, p, size, rows[:, :NAME_FIELD]))
        count[idx] += 1
        following = p + BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
        pos[idx] = following
        active[idx] = following < ends[idx]
    plain &= ~active  # more members than the cap
    sample = np.concatenate([f[0] for f in found])
    if not sample.size:
        return out
    header = np.concatenate([f[1] for f in found])
    size = np.concatenate([f[2] for f in found])
    names = np.concatenate([f[3] for f in found])
    step = np.concatenate([np.full(len(f[0]), k) for k, f in enumerate(found)])
    order = np.lexsort((step, sample))
    sample, header, size, names = sample[order], header[order], size[order], names[order]
    # Names: ASCII, KEY.EXT with a non-empty basename before the first dot, no webdataset meta name.
    column = np.arange(NAME_FIELD)
    nul = names == 0
    length = np.where(nul.any(axis=1), nul.argmax(axis=1), NAME_FIELD)
    inside = column < length[:, None]
    slash = (names == 47) & inside
    last_slash = np.where(slash.any(axis=1), NAME_FIELD - 1 - slash[:, ::-1].argmax(axis=1), -1)
    dots = (names == 46) & inside & (column > last_slash[:, None])
    dot = np.where(dots.any(axis=1), dots.argmax(axis=1), -1)
    good = ((names < 128) | ~inside).all(axis=1) & (dot > last_slash + 1) & ~((names[:, 0] == 95) & (names[:, 1] == 95))
    # Every member of a sample must carry the sample's key (else the range holds two samples).
    first = np.flatnonzero(np.r_[True, sample[1:] != sample[:-1]])
    lead = np.repeat(first, np.diff(np.r_[first, len(sample)]))
    good &= (dot == dot[lead]) & ((names == names[lead]) | (column >= dot[:, None])).all(axis=1)
    np.logical_and.at(plain, sample, good)
    exts = _EXTS
    bounds = np.r_[first, len(sample)].tolist()
    sample, header, size, dot, length = (a.tolist() for a in (sample, header, size, dot, length))
    for a, z in zip(bounds[:-1], bounds[1:]):
        number = sample[a]
        if not plain[number]:
            continue
        fields = {}
        for m in range(a, z):
            h, d = header[m], dot[m]
            raw_ext = data[h + d + 1:h + length[m]]
            ext = exts.get(raw_ext)
            if ext is None:
                ext = exts.setdefault(raw_ext, raw_ext.decode("ascii").lower())
            if ext in fields:
                break  # a repeated member: an error, worded by the slow path
            fields[ext] = data[h + BLOCK:h + BLOCK + size[m]]
        else:
            out[number] = (data[header[a]:header[a] + dot[a]].decode("ascii"), fields)
    return out


def _plain_headers(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data size, plain) of tar header blocks, one per row: plain means a regular file with an octal size,
    no USTAR name prefix and a valid checksum (as `check_header` computes it)."""
    kind = rows[:, 156]
    size, size_ok = _octal(rows[:, 124:136])
    stored, stored_ok = _octal(rows[:, 148:156])
    computed = rows.sum(axis=1, dtype=np.int64) - rows[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    prefix = (rows[:, 257:265] == np.frombuffer(USTAR_MAGIC, dtype=np.uint8)).all(axis=1) & (rows[:, 345] != 0)
    return size, ((kind == 48) | (kind == 0)) & size_ok & stored_ok & (stored == computed) & ~prefix


def _octal(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Numeric header fields as `header_number` reads them, row by row: (value, readable the simple way).

    Simple: optional spaces, octal digits, optional spaces, then NUL or the field's end. Anything
    else (base-256, odd spellings) is left to `header_number` on the slow path.
    """
    field = field.astype(np.int64)
    value = np.zeros(len(field), dtype=np.int64)
    started = np.zeros(len(field), dtype=bool)
    trailing = np.zeros(len(field), dtype=bool)
    nul = np.zeros(len(field), dtype=bool)
    bad = np.zeros(len(field), dtype=bool)
    for column in range(field.shape[1]):
        c = field[:, column]
        nul |= c == 0
        live = ~nul
        digit = live & (c >= 48) & (c <= 55)
        space = live & (c == 32)
        bad |= (live & ~digit & ~space) | (digit & trailing)
        trailing |= space & started
        value = np.where(digit, value * 8 + c - 48, value)
        started |= digit
    return value, started & ~bad


def _parse_sample_slowly(data: bytes, start: int, end: int):
    """`parse_members` + `group_samples` on one sample's bytes: (key, fields) or a ShardError."""
    try:
        samples = group_samples(parse_members(data[start:end]))
    except ShardError as exc:
        return exc
    if len(samples) != 1:
        found = ", ".join(key for key, _ in samples[:3]) or "no sample"
        return ShardError(f"{len(samples)} samples ({found}) where the sidecar has one: wrong sidecar offsets?")
    return samples[0]


# ---------------------------------------------------------------------------------------------
# Source listing: what to write, in which order, into which shard
# ---------------------------------------------------------------------------------------------


class SourceImage(NamedTuple):
    key: str  # sample key, e.g. "airplane/0001"
    label: int  # class index
    ext: str  # lower-case extension, the member name's suffix
    size: int  # bytes, as listed
    where: str | int  # file path (folder source) or data offset in the source tar


def list_source(src: str) -> tuple[list[str], list[SourceImage]]:
    """(classes sorted by name, images sorted by key) of an ImageFolder folder or tar."""
    if not os.path.exists(src):
        raise ShardError(f"source {src} does not exist: give a local image folder (SRC/<class>/<image>) or a "
                         f".tar of one")
    files = list_tar(src) if os.path.isfile(src) else list_folder(src)
    found = [(path, size, where) for path, size, where in files if is_class_image(path)]
    if not found:
        kind = "tar" if os.path.isfile(src) else "folder"
        raise ShardError(f"empty source {kind} {src}: no images ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}) "
                         f"in class folders SRC/<class>/...; point SRC at what holds the class folders")
    classes = sorted({path.split("/", 1)[0] for path, _, _ in found})
    label = {name: index for index, name in enumerate(classes)}
    images = sorted(source_image(path, size, where, label) for path, size, where in found)
    check_unique_keys(images, src)
    return classes, images


def list_folder(root: str) -> list[tuple[str, int, str]]:
    """``(relative posix path, size, absolute path)`` of the visible files below `root`."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        relative = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in filenames:
            if not name.startswith("."):
                path = os.path.join(dirpath, name)
                files.append((name if relative == "." else f"{relative}/{name}", os.path.getsize(path), path))
    return files


def list_tar(path: str) -> list[tuple[str, int, int]]:
    """``(relative path, size, data offset)`` of the regular members of an uncompressed tar.

    Reads the headers once from start to end, skipping the data (which each shard writer
    reads later by offset). When every image sits below one top-level folder at least two
    levels deep (``train/<class>/x.jpg``), that folder is the root and is stripped.
    """
    try:
        with open(path, "rb") as f:
            members = [(relative_name(e.name), e.size, e.data_offset) for e in iter_tar(f, os.path.getsize(path))]
    except ShardError as exc:
        raise ShardError(f"source {path} is not a readable uncompressed tar ({exc}): give an image folder or a "
                         f"plain .tar (decompress a .tar.gz first)") from None
    members = [(name, size, where) for name, size, where in members
               if not any(part.startswith(".") for part in name.split("/"))]
    images = [name.split("/") for name, _, _ in members if image_ext(name)]
    tops = {parts[0] for parts in images}
    if len(tops) == 1 and all(len(parts) >= 3 for parts in images):
        cut = len(tops.pop()) + 1
        members = [(name[cut:], size, where) for name, size, where in members]
    return members


def relative_name(name: str) -> str:
    """A tar member name without leading '/' or './' parts."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    return "/".join(parts)


def is_class_image(path: str) -> bool:
    """Whether a relative path is an image inside a class folder (not directly in the root)."""
    return "/" in path and image_ext(path) is not None


def image_ext(path: str) -> str | None:
    """The lower-case image extension of `path`, or None if it is not an image we read."""
    ext = posixpath.splitext(path)[1][1:].lower()
    return ext if ext in IMAGE_EXTENSIONS else None


def source_image(path: str, size: int, where, label: dict[str, int]) -> SourceImage:
    """The sample for one image: key from its path, label from its class folder."""
    stem, _ = posixpath.splitext(path)
    folder, _, base = stem.rpartition("/")
    # webdataset cuts the member name at the first '.' of its basename: keep dots out of it
    key = f"{folder}/{base.replace('.', '_')}"
    return SourceImage(key, label[path.split("/", 1)[0]], image_ext(path), size, where)


def check_unique_keys(images: list[SourceImage], src: str) -> None:
    """Raise ShardError if two images map to one key (e.g. ``a.b.jpg`` and ``a_b.png``)."""
    for before, after in zip(images, images[1:]):
        if before.key == after.key:
            raise ShardError(f"two images in {src} give the same sample key {before.key!r} (same name up to the "
                             f"extension, or '.' vs '_'): rename one of them")


def shuffled(images: list[SourceImage], seed: int | None) -> list[SourceImage]:
    """`images` in a deterministic random order (class-sorted shards make poor contrastive batches)."""
    if seed is None:
        return list(images)
    order = list(images)
    random.Random(seed).shuffle(order)
    return order


def plan_shards(images: list[SourceImage], *, samples_per_shard: int | None,
                shard_bytes: int) -> list[list[SourceImage]]:
    """Cut `images`, in order, into shards whose tar files stay within both bounds.

    Sizes are computed exactly from the listed file sizes (headers, padding, end blocks and
    record padding included), so no shard file exceeds `shard_bytes` unless it holds a single
    sample that is larger on its own.
    """
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ShardError(f"samples_per_shard must be at least 1, not {samples_per_shard}")
    shards: list[list[SourceImage]] = [[]]
    used = 0
    for image in images:
        size = sample_tar_bytes(image)
        current = shards[-1]
        full = samples_per_shard is not None and len(current) >= samples_per_shard
        if current and (full or tar_file_bytes(used + size) > shard_bytes):
            shards.append([])
            used = 0
        shards[-1].append(image)
        used += size
    return shards


def sample_tar_bytes(image: SourceImage) -> int:
    """Bytes one sample takes in a shard: its .cls member and its image member."""
    return (member_tar_bytes(f"{image.key}.cls", len(str(image.label)))
            + member_tar_bytes(f"{image.key}.{image.ext}", image.size))


def member_tar_bytes(name: str, size: int) -> int:
    """Bytes of one GNU-format member: header, long-name member if needed, padded data."""
    name_bytes = len(name.encode("utf-8", "surrogateescape"))
    long_name = BLOCK + padded(name_bytes + 1) if name_bytes > NAME_FIELD else 0
    return long_name + BLOCK + padded(size)


def tar_file_bytes(member_bytes: int) -> int:
    """Size of a tar file written by tarfile: members + two zero blocks, padded to a record."""
    total = member_bytes + 2 * BLOCK
    return -(-total // RECORD) * RECORD


def padded(size: int) -> int:
    """`size` rounded up to whole tar blocks."""
    return -(-size // BLOCK) * BLOCK


# ---------------------------------------------------------------------------------------------
# Writing shards and the manifest
# ---------------------------------------------------------------------------------------------


def prepare_destination(fs, root: str, dest: str, overwrite: bool) -> None:
    """Refuse to mix new shards with old ones; with `overwrite`, delete the old ones first."""
    with storage.translate_errors(dest):
        old = fs.glob(root + "/shard-*.tar") + fs.glob(root + "/shard-*.idx")
        manifest = posixpath.join(root, MANIFEST)
        has_manifest = fs.exists(manifest)
        if not (old or has_manifest):
            return
        if not overwrite:
            raise ShardError(f"{dest} already holds shards: delete them, choose another destination, or overwrite "
                             f"them (`--overwrite`)")
        if has_manifest:
            fs.rm_file(manifest)  # first, so an interrupted run never leaves a manifest over missing shards
        for path in old:
            fs.rm_file(path)


def write_planned_shards(fs, root: str, dest: str, plan: list[list[SourceImage]], tar_path: str | None, *,
                         workers: int, progress: bool) -> list[dict]:
    """Write every planned shard and its sidecar with `workers` threads; manifest entries in order."""
    bar = progress_bar(sum(len(shard) for shard in plan), progress)
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        futures = {pool.submit(write_shard, fs, root, dest, number, images, tar_path): number
                   for number, images in enumerate(plan)}
        entries = [None] * len(plan)
        for future in as_completed(futures):
            entries[futures[future]] = future.result()
            if bar is not None:
                bar.update(entries[futures[future]]["num_samples"])
    finally:
        pool.shutdown(cancel_futures=True)  # after a failure, do not write the shards still queued
        if bar is not None:
            bar.close()
    return entries


def progress_bar(total: int, enabled: bool):
    """A tqdm bar counting samples (rate and ETA), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="shards", smoothing=0.1)


def write_shard(fs, root: str, dest: str, number: int, images: list[SourceImage], tar_path: str | None) -> dict:
    """Write ``shard-NNNNNN.tar`` and its ``.idx``; returns the shard's manifest entry."""
    name = f"shard-{number:06d}"
    offsets, size = [], 0
    with storage.translate_errors(dest), fs.open(posixpath.join(root, f"{name}.tar"), "wb") as out, \
            SourceReader(tar_path) as read:
        for image in images:
            offsets.append(size)
            sample = (tar_member(f"{image.key}.cls", str(image.label).encode("ascii"))
                      + tar_member(f"{image.key}.{image.ext}", read(image)))
            out.write(sample)
            size += len(sample)
        out.write(bytes(tar_file_bytes(size) - size))
        size = tar_file_bytes(size)
    with storage.translate_errors(dest):
        fs.pipe_file(posixpath.join(root, f"{name}.idx"), np.asarray(offsets, dtype="<u8").tobytes())
    return {"url": f"{name}.tar", "num_samples": len(images), "size": size, "index": f"{name}.idx"}


def tar_member(name: str, data: bytes) -> bytes:
    """One member exactly as ``tarfile`` writes it in GNU format: header, data, zero padding.

    The header comes from ``TarInfo.tobuf``; we skip ``TarFile.addfile`` only because it copies
    the TarInfo and the data stream for every member (a third of the time for small images).
    TarInfo's defaults (mtime 0, mode 0o644, uid/gid 0, no owner names) keep the bytes
    identical from run to run.
    """
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + data + bytes(padded(len(data)) - len(data))


class SourceReader:
    """Context manager giving a callable that returns the bytes of a `SourceImage`.

    One open descriptor of the source tar per shard writer; `os.pread` reads by offset and is
    safe to share between threads.
    """

    def __init__(self, tar_path: str | None):
        self.tar_path = tar_path
        self.fd = None

    def __enter__(self):
        if self.tar_path is not None:
            self.fd = os.open(self.tar_path, os.O_RDONLY)
        return self.read

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)

    def read(self, image: SourceImage) -> bytes:
        # OSError becomes ShardError here, so that translate_errors(dest) around the writer
        # does not blame a source file's permissions on the destination's credentials
        try:
            if self.fd is None:
                with open(image.where, "rb") as f:
                    return f.read()
            data = os.pread(self.fd, image.size, image.where)
        except OSError as exc:
            raise ShardError(f"cannot read source image {image.key}.{image.ext} ({exc})") from None
        if len(data) != image.size:
            raise ShardError(f"source tar {self.tar_path} changed while shards were made from it ({image.key})")
        return data


def new_manifest(entries: list[dict], classes: list[str] | None) -> dict:
    """The manifest dict for these shard entries (shape in the module docstring)."""
    manifest = {"format": FORMAT, "shards": entries, "num_samples": sum(e["num_samples"] for e in entries)}
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


def validate_manifest(manifest, url: str) -> None:
    """Raise ShardError unless `manifest` has the documented shape and at least one sample."""
    fix = f"re-create it with `ssl-dist shards index {url}`"
    where = storage.join(url, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardError(f"{where} has format {found!r}, expected {FORMAT!r}: {fix}")
    shards = manifest.get("shards")
    fields = {"url": str, "num_samples": int, "size": int, "index": str}
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and all(isinstance(s.get(k), t) for k, t in fields.items()) for s in shards):
        raise ShardError(f"{where}: 'shards' must be a list of {{url, num_samples, size, index}}: {fix}")
    total = sum(s["num_samples"] for s in shards)
    if total == 0:
        raise ShardError(f"{where} lists no samples: make shards with `ssl-dist shards make SRC {url}`")
    if manifest.get("num_samples") != total:
        raise ShardError(f"{where}: num_samples is {manifest.get('num_samples')} but its shards hold {total}: {fix}")


def read_optional(fs, path: str, url: str) -> bytes | None:
    """The bytes at `path`, or None if it does not exist; other storage errors as StorageError."""
    with storage.translate_errors(url):
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None


def load_offsets(fs, root: str, url: str, shard: dict) -> np.ndarray:
    """`read_offsets` on an open filesystem: the sidecar as uint64, checked against the manifest."""
    where = storage.join(url, shard["index"])
    data = read_optional(fs, posixpath.join(root, shard["index"]), url)
    if data is None:
        raise ShardError(f"sidecar {where} is missing: re-create it with `ssl-dist shards index {url}`")
    if len(data) != 8 * shard["num_samples"]:
        raise ShardError(f"sidecar {where} holds {len(data) / 8:g} offsets but the manifest says "
                         f"{shard['num_samples']} samples: re-create it with `ssl-dist shards index {url}`")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


# ---------------------------------------------------------------------------------------------
# Indexing shards made elsewhere
# ---------------------------------------------------------------------------------------------


def index_one_shard(fs, path: str, url: str) -> dict:
    """Stream one tar, write its sidecar, return its manifest entry."""
    name = posixpath.basename(path)
    with storage.translate_errors(url):
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            offsets = scan_sample_offsets(f, size, storage.join(url, name))
        index = name[:-len(".tar")] + ".idx"
        fs.pipe_file(posixpath.join(posixpath.dirname(path), index), np.asarray(offsets, dtype="<u8").tobytes())
    return {"url": name, "num_samples": len(offsets), "size": size, "index": index}


def scan_sample_offsets(f, size: int, where: str) -> list[int]:
    """Offsets of each sample's first member header, reading `f` once from start to end."""
    offsets = []
    key, exts = None, set()
    try:
        for entry in iter_tar(f, size):
            split = split_name(entry.name)
            if split is None:
                continue
            if split[0] != key:
                key, exts = split[0], set()
                offsets.append(entry.offset)  # of its PAX/long-name header, if it has one
            if split[1] in exts:
                raise ShardError(f"member {entry.name} appears twice in sample {key}")
            exts.add(split[1])
    except ShardError as exc:
        raise ShardError(f"{where}: {exc}: replace or delete this shard, then index again") from None
    return offsets


META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset skips these names
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, lower-case ext)`` of a member name by webdataset's rule, or None if it has none."""
    if META_NAME.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    match = KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


# ---------------------------------------------------------------------------------------------
# Parsing tar headers (the data stream's hot path)
# ---------------------------------------------------------------------------------------------

REGULAR_KINDS = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
META_KINDS = (b"x", b"g", b"L", b"K")  # PAX extended/global header, GNU long name/link
USTAR_MAGIC = b"ustar\x0000"  # POSIX: bytes 345..500 hold a name prefix (GNU puts other data there)


class TarEntry(NamedTuple):
    name: str  # member name (PAX path or GNU long name applied)
    offset: int  # of its first header block: its PAX 'x' or GNU 'L' header when it has one
    data_offset: int
    size: int


def iter_tar(f, end: int) -> Iterator[TarEntry]:
    """The regular-file entries of a tar of `end` bytes read from binary file `f` (at its start).

    Reads headers in order and seeks over the data, so a shard streams through in one pass
    with nothing but headers in memory. One parser serves `parse_members`, `index_shards` and
    the source listing, so the offsets written to sidecars are the ones readers parse from.
    Stops at the end-of-archive zero block or at `end`; raises ShardError on a bad header or a
    member that runs past `end`.
    """
    pos, first, pending = 0, None, {}
    while pos < end:
        header = f.read(BLOCK)
        if header.count(0) == len(header):
            return  # end-of-archive marker, or zero padding up to the end
        if len(header) < BLOCK:
            raise ShardError(f"tar header cut short at byte {pos} of {end} (truncated?)")
        check_header(header, pos)
        kind = header[156:157]
        size = int(pending["size"]) if "size" in pending and kind not in META_KINDS else header_number(header[124:136])
        if pos + BLOCK + size > end:
            raise ShardError(f"tar member at byte {pos} needs {size} bytes but only {end - pos - BLOCK} follow "
                             f"(truncated?)")
        first = pos if first is None else first
        if kind in META_KINDS:
            apply_meta(kind, f.read(padded(size))[:size], pending)
        else:
            if kind in REGULAR_KINDS:
                yield TarEntry(pending.get("path") or header_name(header), first, pos + BLOCK, size)
            first, pending = None, {}
            f.seek(pos + BLOCK + padded(size))
        pos += BLOCK + padded(size)


def apply_meta(kind: bytes, payload: bytes, pending: dict[str, str]) -> None:
    """Note what a PAX 'x' or GNU 'L' entry says about the next member; ignore 'g' and 'K'."""
    if kind == b"x":
        pending.update(parse_pax(payload))
    elif kind == b"L":
        pending["path"] = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")


def check_header(header: bytes, pos: int) -> None:
    """Raise ShardError unless `header` carries a valid tar checksum (so it really is a header)."""
    try:
        stored = header_number(header[148:156])
    except ShardError:
        stored = None
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])  # checksum field counted as spaces
    if stored != computed:
        raise ShardError(f"no tar header at byte {pos} (checksum {computed} != {stored}): wrong offset or "
                         f"corrupt shard")


def header_number(field: bytes) -> int:
    """A numeric header field: octal ASCII, or GNU base-256 when the high bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ShardError(f"bad number {field!r} in a tar header: corrupt shard") from None


def header_name(header: bytes) -> str:
    """The member name in a USTAR/GNU header (prefix + '/' + name for POSIX USTAR)."""
    name = header[:100].split(b"\0", 1)[0]
    if header[257:265] == USTAR_MAGIC:
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def parse_pax(data: bytes) -> dict[str, str]:
    """The ``path`` and ``size`` records of a PAX extended header ("LEN key=value\\n" records)."""
    records: dict[str, str] = {}
    pos = 0
    try:
        while pos < len(data) and data[pos] != 0:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            if length <= space - pos:
                raise ValueError(f"record length {length}")
            key, _, value = data[space + 1:pos + length - 1].partition(b"=")
            if key in (b"path", b"size"):
                records[key.decode()] = value.decode("utf-8", "surrogateescape")
            pos += length
        int(records.get("size", 0))
    except ValueError as exc:
        raise ShardError(f"bad PAX header ({exc}): corrupt shard") from None
    return records


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------


def check_one_shard(fs, root: str, url: str, shard: dict, num_classes: int | None) -> tuple[int, list[str]]:
    """(samples read, problems) for one manifest entry."""
    where = storage.join(url, shard["url"])
    path = posixpath.join(root, shard["url"])
    with storage.translate_errors(url):
        if not fs.exists(path):
            return 0, [f"{where}: missing (the manifest lists it): restore it or re-index with "
                       f"`ssl-dist shards index {url}`"]
        size = fs.size(path)
    problems = []
    if size != shard["size"]:
        problems.append(f"{where}: {size} bytes but the manifest says {shard['size']} (truncated or replaced?)")
    try:
        offsets = load_offsets(fs, root, url, shard)
    except ShardError as exc:
        return 0, problems + [f"{where}: {exc}"]
    problems += check_offsets(offsets, size, where)
    with storage.translate_errors(url), fs.open(path, "rb") as f:
        count = check_samples(f, offsets, size, where, num_classes, problems)
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        problems = problems[:MAX_PROBLEMS_PER_SHARD] + [
            f"{where}: ... and {len(problems) - MAX_PROBLEMS_PER_SHARD} more problems"]
    return count, problems


def check_offsets(offsets: np.ndarray, size: int, where: str) -> list[str]:
    """Problems with the sidecar offsets themselves: their order, samples past the end of the file."""
    problems = []
    if len(offsets) > 1 and not bool(np.all(offsets[1:] > offsets[:-1])):
        problems.append(f"{where}: sidecar offsets are not increasing: re-index the shards")
    beyond = int(np.sum(offsets >= size))
    if beyond:
        problems.append(f"{where}: {beyond} of {len(offsets)} samples start past the end of the file "
                        f"({size} bytes; truncated?)")
    return problems


def check_samples(f, offsets: np.ndarray, size: int, where: str, num_classes: int | None,
                  problems: list[str]) -> int:
    """Read each sample's range in order, parse and decode it, add to `problems`; returns samples read."""
    if len(offsets) and offsets[0] > 0:
        problems += check_prologue(f, int(offsets[0]), where)
    count, previous = 0, "the start"
    for number, (start, stop) in enumerate(sample_ranges(offsets, size)):
        if start >= size or stop <= start:
            continue  # reported by check_offsets
        f.seek(start)
        try:
            samples = group_samples(parse_members(f.read(stop - start)))
        except ShardError as exc:
            problems.append(f"{where}: sample #{number} at byte {start} (after {previous}): {exc}")
            continue
        if len(samples) != 1:
            names = ", ".join(key for key, _ in samples) or "nothing"
            problems.append(f"{where}: sample #{number} at byte {start} holds {names} instead of one sample")
            continue
        key, fields = samples[0]
        count, previous = count + 1, key
        problems += [f"{where}: {key}{problem}" for problem in check_sample(fields, num_classes)]
    return count


def check_prologue(f, length: int, where: str) -> list[str]:
    """Problems in the bytes before the first sample (only headers such as a PAX 'g' belong there)."""
    f.seek(0)
    try:
        stray = group_samples(parse_members(f.read(length)))
    except ShardError as exc:
        return [f"{where}: bytes before the first sample: {exc}"]
    return [f"{where}: {len(stray)} samples before the first sidecar offset (e.g. {stray[0][0]})"] if stray else []


def check_sample(fields: dict[str, bytes], num_classes: int | None) -> list[str]:
    """Problems of one sample, each to follow its key: an image that does not decode, a bad label."""
    from PIL import Image

    problems = []
    exts = [ext for ext in IMAGE_EXTENSIONS if ext in fields]
    if not exts:
        problems.append(f": no image member ({'/'.join(IMAGE_EXTENSIONS)}), only {', '.join(sorted(fields))}")
    for ext in exts:
        stream = io.BytesIO(fields[ext])
        try:
            with Image.open(stream) as image:
                image.load()
        except Exception as exc:  # PIL raises many types for a broken file
            reason = str(exc).replace(f" {stream!r}", "")  # "cannot identify image file <_io.BytesIO ...>"
            problems.append(f".{ext}: image does not decode ({type(exc).__name__}: {reason})")
    if "cls" in fields:
        try:
            label = int(fields["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            problems.append(f".cls: {fields['cls'][:20]!r} is not an integer class index")
        else:
            if num_classes is not None and not 0 <= label < num_classes:
                problems.append(f".cls: class {label} outside the manifest's {num_classes} classes")
    elif num_classes is not None:
        problems.append(": no .cls member although the manifest lists classes")
    return problems
