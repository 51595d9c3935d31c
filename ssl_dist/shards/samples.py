"""Samples: tar members grouped into WebDataset samples, and where each sample's bytes lie.

Keys. WebDataset splits a member name at the first '.' of its basename: KEY is everything
before it, EXT the rest (lower-cased); each sample is a run of adjacent members sharing one KEY.

Where a sample ends. Sample ``i`` of a shard occupies the bytes ``[offsets[i], offsets[i+1])``
and the last one ``[offsets[-1], size)``, ``size`` being the shard's byte size from the
manifest: ``sample_ranges(offsets, size)`` returns exactly these ranges. The last range
therefore also holds the tar's end-of-archive marker (two zero 512-byte blocks, plus zero
padding to a 10240-byte record for shards written here, at most 11 KiB in all);
``parse_members`` stops at the first all-zero header block, so a reader does a ranged read of
one range, ``parse_members`` on the bytes, then ``group_samples``, and gets exactly one sample.
The data stream reads many at once with ``parse_samples``.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from ssl_dist.shards.errors import ShardError
from ssl_dist.shards.tar import BLOCK, NAME_FIELD, parse_members, plain_headers

META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset skips these names
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
MAX_PLAIN_MEMBERS = 16  # a sample with more members is parsed the slow way
_EXTS: dict[bytes, str] = {}  # member name suffix -> lower-case EXT, as met


def sample_ranges(offsets: Iterable[int], shard_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` byte ranges of the samples of a shard of `shard_size` bytes.

    Sample i runs up to the next sample's offset; the last one up to the end of the shard
    (its range includes the end-of-archive zero blocks, which `parse_members` stops at).
    """
    starts = [int(offset) for offset in offsets]
    return list(zip(starts, starts[1:] + [int(shard_size)]))


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


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, lower-case ext)`` of a member name by webdataset's rule, or None if it has none."""
    if META_NAME.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
        return None
    match = KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


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
        size, good = plain_headers(rows)
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
