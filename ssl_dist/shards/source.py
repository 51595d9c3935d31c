"""What ``ssl-dist shards make`` packs: the images of a source folder or tar, with their class
and caption, listed and checked before anything is written.

How the layout is told (the first rule that applies):

1. ``--captions FILE``: the images are the rows of the caption file (paths relative to SRC;
   for a tar, relative to the tar's root as its member names give it), each with its caption.
   No classes: folders named in a caption file are storage, not labels.
2. Captioned folder: some image has a ``.txt`` of the same name beside it (``x.jpg`` +
   ``x.txt``). Then every image needs one. If every image lies below a top-level folder
   (ImageFolder layout, ``SRC/<class>/**/<image>``), those folders are the classes and the
   samples get ``.cls`` as well; if any image lies directly in SRC, the folder is not
   ImageFolder and no sample gets ``.cls``.
3. Otherwise ImageFolder layout is required, as before captions: the images below the class
   folders (images directly in SRC are not packed), each with its ``.cls``.

Images are the files ending in .jpg/.jpeg/.png/.webp (any case); hidden files and folders are
ignored. Captions are read here, all of them, so a bad one stops make before it writes.
"""

from __future__ import annotations

import os
import posixpath
from typing import NamedTuple

from ssl_dist.shards.captions import caption_bytes, caption_problem, read_caption_file
from ssl_dist.shards.errors import ShardError
from ssl_dist.shards.tar import iter_tar

# The image files make_shards packs (decode.IMAGE_EXTS, what the stream decodes, holds each; tested).
SOURCE_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class SourceFile(NamedTuple):
    path: str  # relative posix path
    size: int  # bytes
    where: str | int  # file path (folder source) or data offset in the source tar


class SourceImage(NamedTuple):
    key: str  # sample key, e.g. "airplane/0001"
    label: int | None  # class index; None when the source has no classes
    ext: str  # lower-case extension, the member name's suffix
    size: int  # bytes, as listed
    where: str | int  # file path (folder source) or data offset in the source tar
    caption: bytes | None  # the caption's bytes as they are; None without captions


def list_source(src: str, captions: str | None = None, *, image_column: str = "image",
                caption_column: str = "caption") -> tuple[list[str] | None, list[SourceImage]]:
    """(classes sorted by name or None, images sorted by key) of a source folder or tar; the
    layout rules are in the module docstring. Raises ShardError for anything make would refuse."""
    if not os.path.exists(src):
        raise ShardError(f"source {src} does not exist: give a local image folder (SRC/<class>/<image>) or a "
                         f".tar of one")
    tar_path = src if os.path.isfile(src) else None
    files = list_tar(src, strip_root=captions is None) if tar_path else list_folder(src)
    with SourceReader(tar_path) as read:
        if captions is not None:
            classes, images = from_caption_file(src, files, captions, image_column, caption_column)
        elif beside_captions(files):
            classes, images = from_captioned_folder(src, files, read)
        else:
            classes, images = from_class_folders(src, files)
    images.sort()
    check_unique_keys(images, src)
    return classes, images


def from_class_folders(src: str, files: list[SourceFile]) -> tuple[list[str], list[SourceImage]]:
    """ImageFolder layout without captions: the images below class folders, each labelled."""
    found = [f for f in files if "/" in f.path and image_ext(f.path)]
    if not found:
        kind = "tar" if os.path.isfile(src) else "folder"
        types = ", ".join("." + ext for ext in SOURCE_IMAGE_EXTENSIONS)
        raise ShardError(f"empty source {kind} {src}: no images ({types}) in class folders SRC/<class>/...; point "
                         f"SRC at what holds the class folders, or give captions (x.txt beside x.jpg, or "
                         f"--captions FILE)")
    classes = sorted({f.path.split("/", 1)[0] for f in found})
    label = {name: index for index, name in enumerate(classes)}
    return classes, [source_image(f, label[f.path.split("/", 1)[0]], None) for f in found]


def beside_captions(files: list[SourceFile]) -> dict[str, SourceFile]:
    """``{image path without extension: its .txt}`` for the .txt files that sit beside an image."""
    stems = {posixpath.splitext(f.path)[0] for f in files if image_ext(f.path)}
    return {f.path[:-len(".txt")]: f for f in files if f.path.endswith(".txt") and f.path[:-len(".txt")] in stems}


def from_captioned_folder(src: str, files: list[SourceFile], read) -> tuple[list[str] | None, list[SourceImage]]:
    """A folder (or tar) whose images have ``x.txt`` beside them; classes only in ImageFolder layout."""
    captions = beside_captions(files)
    found = sorted(f for f in files if image_ext(f.path))  # sorted: the same first bad caption every run
    missing = [f.path for f in found if posixpath.splitext(f.path)[0] not in captions]
    if missing:
        raise ShardError(f"{len(missing)} of {len(found)} images in {src} have no caption beside them (e.g. "
                         f"{', '.join(missing[:3])}), while others do: write x.txt beside each x.jpg, or remove "
                         f"those images")
    classes = sorted({f.path.split("/", 1)[0] for f in found}) if all("/" in f.path for f in found) else None
    label = {name: index for index, name in enumerate(classes or [])}
    images = []
    for f in found:
        txt = captions[posixpath.splitext(f.path)[0]]
        caption = read(txt)
        problem = caption_problem(caption)
        if problem is not None:
            raise ShardError(f"caption {posixpath.join(src, txt.path)} of image {f.path} {problem}: write its "
                             f"caption (UTF-8 text), or remove the image and its .txt")
        images.append(source_image(f, label[f.path.split("/", 1)[0]] if classes else None, caption))
    return classes, images


def from_caption_file(src: str, files: list[SourceFile], captions: str, image_column: str,
                      caption_column: str) -> tuple[None, list[SourceImage]]:
    """The images a caption file names, each with its caption; every row is checked first."""
    rows = read_caption_file(captions, image_column, caption_column)
    if not rows:
        raise ShardError(f"caption file {captions} names no images: give one row per image")
    by_path = {f.path: f for f in files}
    named: dict[str, int] = {}
    images = []
    for row in rows:
        where = f"caption file {captions} row {row.row}"
        path = relative_name(row.image)
        source = by_path.get(path)
        if source is None:
            raise ShardError(f"{where}: image {row.image!r} does not exist in {src}: fix the path (relative to "
                             f"SRC) or remove the row")
        if not image_ext(path):
            types = ", ".join("." + ext for ext in SOURCE_IMAGE_EXTENSIONS)
            raise ShardError(f"{where}: {row.image!r} is not an image make packs ({types}): convert it or remove "
                             f"the row")
        if path in named:
            raise ShardError(f"{where}: image {path} is already named by row {named[path]}: keep one row per image")
        named[path] = row.row
        images.append(source_image(source, None, caption_bytes(row.caption, where,
                                                               "write its caption or remove the row")))
    return None, images


def list_folder(root: str) -> list[SourceFile]:
    """The visible files below `root`."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        relative = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in filenames:
            if not name.startswith("."):
                path = os.path.join(dirpath, name)
                files.append(SourceFile(name if relative == "." else f"{relative}/{name}", os.path.getsize(path),
                                        path))
    return files


def list_tar(path: str, strip_root: bool = True) -> list[SourceFile]:
    """The regular, visible members of an uncompressed tar (`where`: their data offset).

    Reads the headers once from start to end, skipping the data (which each shard writer
    reads later by offset). With `strip_root`, when every image sits below one top-level folder
    at least two levels deep (``train/<class>/x.jpg``), that folder is the root and is stripped.
    """
    try:
        with open(path, "rb") as f:
            members = [SourceFile(relative_name(e.name), e.size, e.data_offset)
                       for e in iter_tar(f, os.path.getsize(path))]
    except ShardError as exc:
        raise ShardError(f"source {path} is not a readable uncompressed tar ({exc}): give an image folder or a "
                         f"plain .tar (decompress a .tar.gz first)") from None
    members = [m for m in members if not any(part.startswith(".") for part in m.path.split("/"))]
    images = [m.path.split("/") for m in members if image_ext(m.path)]
    tops = {parts[0] for parts in images}
    if strip_root and len(tops) == 1 and all(len(parts) >= 3 for parts in images):
        cut = len(tops.pop()) + 1
        members = [m._replace(path=m.path[cut:]) for m in members]
    return members


def relative_name(name: str) -> str:
    """A tar member name (or caption-file path) without leading '/' or './' parts."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    return "/".join(parts)


def image_ext(path: str) -> str | None:
    """The lower-case image extension of `path`, or None if it is not an image we read."""
    ext = posixpath.splitext(path)[1][1:].lower()
    return ext if ext in SOURCE_IMAGE_EXTENSIONS else None


def source_image(f: SourceFile, label: int | None, caption: bytes | None) -> SourceImage:
    """The sample for one image: key from its path (folder and basename, no extension)."""
    stem, _ = posixpath.splitext(f.path)
    folder, _, base = stem.rpartition("/")
    # webdataset cuts the member name at the first '.' of its basename: keep dots out of it
    base = base.replace(".", "_")
    return SourceImage(f"{folder}/{base}" if folder else base, label, image_ext(f.path), f.size, f.where, caption)


def check_unique_keys(images: list[SourceImage], src: str) -> None:
    """Raise ShardError if two images map to one key (e.g. ``a.b.jpg`` and ``a_b.png``)."""
    for before, after in zip(images, images[1:]):
        if before.key == after.key:
            raise ShardError(f"two images in {src} give the same sample key {before.key!r} (same name up to the "
                             f"extension, or '.' vs '_'): rename one of them")


class SourceReader:
    """Context manager giving a callable that returns the bytes of a `SourceImage` or `SourceFile`.

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

    def read(self, item: SourceImage | SourceFile) -> bytes:
        # OSError becomes ShardError here, so that translate_errors(dest) around the writer
        # does not blame a source file's permissions on the destination's credentials
        name = item.path if isinstance(item, SourceFile) else f"{item.key}.{item.ext}"
        try:
            if self.fd is None:
                with open(item.where, "rb") as f:
                    return f.read()
            data = os.pread(self.fd, item.size, item.where)
        except OSError as exc:
            raise ShardError(f"cannot read source file {name} ({exc})") from None
        if len(data) != item.size:
            raise ShardError(f"source tar {self.tar_path} changed while shards were made from it ({name})")
        return data
