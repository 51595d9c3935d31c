"""``ssl-dist shards check``: every sample read the way the data stream reads it, and a report of
what is wrong."""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ssl_dist import storage
from ssl_dist.shards.digest import HashingReader, sidecar_sha256
from ssl_dist.shards.errors import ShardError
from ssl_dist.shards.manifest import read_manifest, read_offsets
from ssl_dist.shards.samples import group_samples, sample_ranges
from ssl_dist.shards.tar import parse_members

MAX_PROBLEMS_PER_SHARD = 20  # a broken shard should not drown the report of the others


def check_shards(url: str, *, workers: int = 4, storage_options: dict | None = None,
                 max_pixels: int | None = None) -> dict:
    """Read every sample the way the data stream does and report what is wrong.

    For each shard of the manifest: its size and sample count against the manifest, the
    sidecar offsets, then every sample through a ranged read + `parse_members` +
    `group_samples`, judged by `decode.sample_problems` (the stream's own decoding of the
    image, ``.cls``, ``.json`` and ``.txt``, and its pixel limit, `max_pixels`, default
    `decode.MAX_PIXELS`: a sample passes here exactly when the stream decodes it), each
    ``.cls`` within the manifest's classes when it has them; where the manifest carries
    digests, the shard's bytes (read once, as the samples are) and its sidecar's. Returns
    ``{"shards": int, "samples": int (samples read), "problems": [str, ...]}``, each problem
    naming the shard and, where known, the key. Called by ``ssl-dist shards check``.
    """
    manifest = read_manifest(url, storage_options)
    fs, root = storage.filesystem(url, storage_options)
    num_classes = len(manifest["classes"]) if "classes" in manifest else None
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda shard: check_one_shard(fs, root, url, shard, num_classes, max_pixels),
                                manifest["shards"]))
    return {"shards": len(results), "samples": sum(count for count, _ in results),
            "problems": [problem for _, problems in results for problem in problems]}


def check_one_shard(fs, root: str, url: str, shard: dict, num_classes: int | None,
                    max_pixels: int | None = None) -> tuple[int, list[str]]:
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
    fix = f"restore it, or re-index with `ssl-dist shards index {url}`"
    if "index_sha256" in shard and sidecar_sha256(offsets) != shard["index_sha256"]:
        problems.append(f"{where}: sidecar {shard['index']} does not match the index_sha256 in the manifest "
                        f"(changed after it was indexed?): {fix}")
    problems += check_offsets(offsets, size, where)
    with storage.translate_errors(url), fs.open(path, "rb") as f:
        reader = HashingReader(f)  # every byte passes through the digest once, as the samples are read
        count = check_samples(reader, offsets, size, where, num_classes, problems, max_pixels)
        if "sha256" in shard and reader.hexdigest(size) != shard["sha256"]:
            problems.append(f"{where}: its bytes do not match the sha256 in the manifest (changed after it was "
                            f"indexed?): {fix}")
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
                  problems: list[str], max_pixels: int | None = None) -> int:
    """Read each sample's range in order, parse and decode it, add to `problems`; returns samples read."""
    # Imported here: decode imports torch, which `ssl-dist shards make` and the driver (which
    # reads manifests) have no use for. The same rules as the stream's, so check passes exactly
    # the samples the stream decodes.
    from ssl_dist.decode import MAX_PIXELS, sample_problems

    limit = MAX_PIXELS if max_pixels is None else max_pixels

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
        problems += [f"{where}: {key}{problem}" for problem in sample_problems(key, fields, num_classes, limit)]
    return count


def check_prologue(f, length: int, where: str) -> list[str]:
    """Problems in the bytes before the first sample (only headers such as a PAX 'g' belong there)."""
    f.seek(0)
    try:
        stray = group_samples(parse_members(f.read(length)))
    except ShardError as exc:
        return [f"{where}: bytes before the first sample: {exc}"]
    return [f"{where}: {len(stray)} samples before the first sidecar offset (e.g. {stray[0][0]})"] if stray else []
