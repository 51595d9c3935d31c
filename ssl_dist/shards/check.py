"""``ssl-dist shards check``: every sample read the way the data stream reads it, and a report of
what is wrong."""

from __future__ import annotations

import io
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ssl_dist import storage
from ssl_dist.shards.errors import ShardError
from ssl_dist.shards.make import IMAGE_EXTENSIONS
from ssl_dist.shards.manifest import read_manifest, read_offsets
from ssl_dist.shards.samples import group_samples, sample_ranges
from ssl_dist.shards.tar import parse_members

MAX_PROBLEMS_PER_SHARD = 20  # a broken shard should not drown the report of the others


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
        offsets = read_offsets(url, shard, fs=fs)
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
