"""``ssl-dist shards make``: an image folder (or a tar of one) becomes shards, sidecars and a manifest.

Shards made here hold, for each sample, ``KEY.cls`` (the class index as ASCII digits; when the
source has classes), ``KEY.<image ext>`` (the source file's bytes, never re-encoded) and
``KEY.txt`` (the caption's bytes as they are, UTF-8; when the source has captions), in that
order. KEYs are the image's path relative to the source root without its extension, any '.'
left in the basename replaced by '_' (webdataset cuts a name at its first '.'), e.g.
``airplane/0001`` for ``SRC/airplane/0001.jpg``, so every sample traces back to its file. How
classes and captions are found (ImageFolder layout, ``x.txt`` beside ``x.jpg``, a caption
file) is in `source`.

The steps: list and check the source (`source.list_source`: every refusal happens there,
before anything is written, and what is left out is counted by reason), shuffle, plan the
shards with their exact byte sizes (`plan_shards`), write them and their sidecars in threads
(`write_planned_shards`), and last the manifest, which lists the fields the samples carry, each
shard's and sidecar's sha256 (of the bytes as they were written) and what was left out, under
"dropped".

Nothing partial is ever left under a final name, for a reader or a later run to take for a
whole shard (`final_file`): a shard appears under its name only once all its bytes are
written, and the manifest only once every shard is. Members are copied from the source in
chunks (`source.CHUNK`), so a writer's memory stays bounded whatever a member's size.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import random
from concurrent.futures import ThreadPoolExecutor, as_completed

from fsspec.implementations.local import LocalFileSystem

from ssl_dist import storage
from ssl_dist.shards.errors import ShardError
from ssl_dist.shards.manifest import MANIFEST, new_manifest, write_manifest, write_offsets
from ssl_dist.shards.source import (MAX_IMAGE_BYTES, SOURCE_IMAGE_EXTENSIONS, SourceImage, SourceReader,
                                    list_source)
from ssl_dist.shards.tar import member_tar_bytes, padded, tar_file_bytes, tar_header

PARTIAL = ".partial"  # suffix of a local shard or sidecar while it is written (renamed when whole)

__all__ = ["SOURCE_IMAGE_EXTENSIONS", "make_shards", "sample_fields"]


def make_shards(src: str, dest: str, *, samples_per_shard: int | None = None, shard_bytes: int = 256 * 2**20,
                workers: int = 4, shuffle_seed: int | None = 0, storage_options: dict | None = None,
                progress: bool = False, overwrite: bool = False, captions: str | None = None,
                image_column: str = "image", caption_column: str = "caption",
                max_image_bytes: int = MAX_IMAGE_BYTES) -> dict:
    """Turn an image folder (or an uncompressed tar of one) into shards + sidecars + manifest.

    `src`: a local folder, or a local ``.tar`` of one whose members may all sit under one
    top-level folder (e.g. ``train/<class>/0001.jpg``), which is then taken as the root: in
    ImageFolder layout (``SRC/<class>/**/<image>``), and/or with a caption ``x.txt`` beside
    each image ``x.jpg``. `captions`: a CSV/TSV/JSONL/Parquet file naming the images (paths
    relative to SRC, in `image_column`) and their captions (`caption_column`). The rules are
    in `ssl_dist.shards.source`; a bad source or caption raises ShardError before anything is
    written.
    `dest`: a local folder or object-store URL; it must not already hold shards unless
    `overwrite` (which deletes the old manifest first, then the old shards).
    Samples are shuffled with `shuffle_seed` (None: sorted by key) and cut, in that order, into
    shards of at most `samples_per_shard` samples and `shard_bytes` bytes (a single larger
    sample gets a shard of its own); `workers` threads write the shards. Image files over
    `max_image_bytes` are left out, as are links, hidden and special files (`source`).
    Returns the manifest dict that was written to ``dest/index.json``; its "dropped" says what
    was left out and why, ``{reason: {"count": n, "examples": [path, ...]}}`` (reasons in
    `source.DROP_REASONS`, ``{}`` when nothing was), which the CLI prints. Called by
    ``ssl-dist shards make``.
    """
    classes, images, dropped = list_source(src, captions, image_column=image_column, caption_column=caption_column,
                                           max_image_bytes=max_image_bytes)
    order = shuffled(images, shuffle_seed)
    plan = plan_shards(order, samples_per_shard=samples_per_shard, shard_bytes=shard_bytes)
    fs, root = storage.filesystem(dest, storage_options)
    storage.check_writable_root(dest, storage_options)
    prepare_destination(fs, root, dest, overwrite)
    tar_path = src if os.path.isfile(src) else None
    entries = write_planned_shards(fs, root, dest, plan, tar_path, workers=workers, progress=progress)
    manifest = new_manifest(entries, classes, sample_fields(images))
    manifest["dropped"] = dropped
    write_manifest(fs, root, dest, manifest)
    return manifest


def sample_fields(images: list[SourceImage]) -> list[str]:
    """The sorted member extensions the samples carry, e.g. ``["cls", "jpg"]`` (the manifest's "fields")."""
    return sorted({ext for image in images for ext, _ in sample_members(image, b"")})


def sample_members(image: SourceImage, data: bytes | None) -> list[tuple[str, bytes | None]]:
    """``(extension, bytes)`` of one sample's members in shard order; `data` is the image's bytes."""
    members = [] if image.label is None else [("cls", str(image.label).encode("ascii"))]
    members.append((image.ext, data))
    if image.caption is not None:
        members.append(("txt", image.caption))
    return members


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
    """Bytes one sample takes in a shard: its image member and its .cls and .txt, if any."""
    return sum(member_tar_bytes(f"{image.key}.{ext}", image.size if data is None else len(data))
               for ext, data in sample_members(image, None))


def prepare_destination(fs, root: str, dest: str, overwrite: bool) -> None:
    """Refuse to mix new shards with old ones; with `overwrite`, delete the old ones first."""
    with storage.translate_errors(dest):
        # *.partial: what a make that was killed while writing left (locally)
        old = fs.glob(root + "/shard-*.tar") + fs.glob(root + "/shard-*.idx") + fs.glob(root + f"/shard-*{PARTIAL}")
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
    """Write ``shard-NNNNNN.tar`` and its ``.idx``, each under its name only once whole; returns the
    shard's manifest entry, with the sha256 of each as it was written."""
    name = f"shard-{number:06d}"
    offsets = []
    with storage.translate_errors(dest), final_file(fs, posixpath.join(root, f"{name}.tar")) as f, \
            SourceReader(tar_path) as source:
        out = DigestWriter(f)
        for image in images:
            offsets.append(out.size)
            write_sample(out, image, source)
        out.write(bytes(tar_file_bytes(out.size) - out.size))
    with storage.translate_errors(dest):
        index_sha256 = write_sidecar(fs, posixpath.join(root, f"{name}.idx"), offsets)
    return {"url": f"{name}.tar", "num_samples": len(images), "size": out.size, "index": f"{name}.idx",
            "sha256": out.sha256.hexdigest(), "index_sha256": index_sha256}


def write_sample(out: DigestWriter, image: SourceImage, source: SourceReader) -> None:
    """One sample's members: each a header, its data (the image streamed from the source in
    bounded chunks) and zero padding."""
    for ext, data in sample_members(image, None):
        size = image.size if data is None else len(data)
        out.write(tar_header(f"{image.key}.{ext}", size))
        for chunk in (source.chunks(image) if data is None else (data,)):
            out.write(chunk)
        out.write(bytes(padded(size) - size))


class DigestWriter:
    """Writes to a binary file, counting the bytes and hashing them (sha256) as they go out, so
    the digest is of what was written, without reading it back."""

    def __init__(self, f):
        self.f, self.size, self.sha256 = f, 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha256.update(data)
        self.size += len(data)


@contextlib.contextmanager
def final_file(fs, path: str):
    """A binary file to write `path` through; its bytes appear under that name only if the block
    ends without an error.

    Locally it is ``path + PARTIAL``, renamed at the end (removed on an error). On an object
    store it is a multipart upload completed only at the end and aborted on an error: s3fs's
    own file object completes it on close, even when the block raised, which would leave the
    first part of a shard under its final name, so it is opened with autocommit off.
    """
    if isinstance(fs, LocalFileSystem):
        with renamed_when_whole(path) as temp, open(temp, "wb") as f:
            yield f
        return
    f = fs.open(path, "wb", autocommit=False)
    try:
        yield f
        f.close()
        f.commit()
    except BaseException:
        with contextlib.suppress(Exception):  # a failed abort leaves a pending upload, invisible, never an object
            f.discard()
        raise


def write_sidecar(fs, path: str, offsets: list[int]) -> str:
    """Write a shard's sidecar (`manifest.write_offsets`: on an object store one PUT, whole or
    nothing; locally through a rename); returns the sha256 of what it wrote."""
    if not isinstance(fs, LocalFileSystem):
        return write_offsets(fs, path, offsets)
    with renamed_when_whole(path) as temp:
        return write_offsets(fs, temp, offsets)


@contextlib.contextmanager
def renamed_when_whole(path: str):
    """The local path ``path + PARTIAL`` to write; renamed to `path` when the block ends, removed if it raises."""
    temp = path + PARTIAL
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
