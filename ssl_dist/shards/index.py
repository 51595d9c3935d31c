"""``ssl-dist shards index``: sidecars and a manifest for shards made elsewhere (webdataset,
img2dataset, any tar in WebDataset layout)."""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor

from ssl_dist import storage
from ssl_dist.shards.errors import ShardError
from ssl_dist.shards.digest import HashingReader
from ssl_dist.shards.manifest import new_manifest, validate_manifest, write_manifest, write_offsets
from ssl_dist.shards.samples import split_name
from ssl_dist.shards.tar import iter_tar


def index_shards(url: str, *, workers: int = 8, storage_options: dict | None = None) -> dict:
    """Write sidecars and a manifest for the ``*.tar`` shards directly under `url`.

    For shards made elsewhere, in any WebDataset layout (USTAR, GNU or PAX headers, e.g. from
    webdataset's TarWriter). Each shard is streamed once, never loaded whole; `workers` threads
    scan shards in parallel. Samples are grouped by WebDataset's key rule; shards without
    samples are left out of the manifest. Classes are unknown here, so the manifest has none;
    its "fields" are the member extensions found in any sample (e.g. ``["jpg", "json", "txt"]``
    for the image-text shards of img2dataset or webdataset's ShardWriter). Each entry carries the
    sha256 of its shard ("sha256", computed while the shard streams through) and of its sidecar
    ("index_sha256"). A manifest that would be refused (a shard over `manifest.MAX_SHARD_BYTES`)
    is not written. Returns the manifest dict. Called by ``ssl-dist shards index``.
    """
    fs, root = storage.filesystem(url, storage_options)
    with storage.translate_errors(url):
        paths = sorted(fs.glob(root + "/*.tar"))
    if not paths:
        raise ShardError(f"no *.tar shards directly under {url}: point URL at the folder that holds the shards")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        scanned = list(pool.map(lambda path: index_one_shard(fs, path, url), paths))
    entries = [entry for entry, _ in scanned if entry["num_samples"] > 0]
    fields = set().union(*(exts for _, exts in scanned))
    if not entries:
        raise ShardError(f"the shards under {url} hold no samples in WebDataset layout (members KEY.EXT)")
    manifest = new_manifest(entries, classes=None, fields=sorted(fields))
    validate_manifest(manifest, url)  # refused here, not by every later reader
    write_manifest(fs, root, url, manifest)
    return manifest


def index_one_shard(fs, path: str, url: str) -> tuple[dict, set[str]]:
    """Stream one tar, write its sidecar; returns its manifest entry and the member extensions it holds.

    The whole tar is read once, through its digest (the header walk alone would seek over the data).
    """
    name = posixpath.basename(path)
    with storage.translate_errors(url):
        size = fs.size(path)
        with fs.open(path, "rb") as f:
            reader = HashingReader(f)
            offsets, exts = scan_sample_offsets(reader, size, storage.join(url, name))
            digest = reader.hexdigest(size)
        index = name[:-len(".tar")] + ".idx"
        index_digest = write_offsets(fs, posixpath.join(posixpath.dirname(path), index), offsets)
    return {"url": name, "num_samples": len(offsets), "size": size, "index": index, "sha256": digest,
            "index_sha256": index_digest}, exts


def scan_sample_offsets(f, size: int, where: str) -> tuple[list[int], set[str]]:
    """Offsets of each sample's first member header, and every member extension seen, reading `f`
    once from start to end."""
    offsets, seen = [], set()
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
            seen.add(split[1])
    except ShardError as exc:
        raise ShardError(f"{where}: {exc}: replace or delete this shard, then index again") from None
    return offsets, seen
