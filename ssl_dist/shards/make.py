"""``ssl-dist shards make``: an image folder (or a tar of one) becomes shards, sidecars and a manifest.

Shards made here hold, for each sample, ``KEY.cls`` (the class index as ASCII digits) followed
by ``KEY.<image ext>`` (the source file's bytes, never re-encoded). KEYs are the image's path
relative to the source root (class folder first) without its extension, any '.' left in the
basename replaced by '_' (webdataset cuts a name at its first '.'), e.g. ``airplane/0001`` for
``SRC/airplane/0001.jpg``, so every sample traces back to its file.

The steps: list the source (`list_source`), shuffle, plan the shards with their exact byte
sizes (`plan_shards`), write them and their sidecars in threads (`write_planned_shards`), and
last the manifest.
"""

from __future__ import annotations

import os
import posixpath
import random
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import NamedTuple

from ssl_dist import storage
from ssl_dist.shards.errors import ShardError
from ssl_dist.shards.manifest import MANIFEST, new_manifest, write_manifest, write_offsets
from ssl_dist.shards.tar import iter_tar, member_tar_bytes, tar_file_bytes, tar_member

# The image files make_shards packs (decode.IMAGE_EXTS, what the stream decodes, holds each; tested).
SOURCE_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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
        types = ", ".join("." + ext for ext in SOURCE_IMAGE_EXTENSIONS)
        raise ShardError(f"empty source {kind} {src}: no images ({types}) in class folders SRC/<class>/...; point "
                         f"SRC at what holds the class folders")
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
    return ext if ext in SOURCE_IMAGE_EXTENSIONS else None


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
        write_offsets(fs, posixpath.join(root, f"{name}.idx"), offsets)
    return {"url": f"{name}.tar", "num_samples": len(images), "size": size, "index": f"{name}.idx"}


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
