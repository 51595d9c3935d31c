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

Images are the files ending in .jpg/.jpeg/.png/.webp (any case). Captions are read here, all
of them, so a bad one stops make before it writes.

What is left out is counted by reason (`Dropped`, `DROP_REASONS`), kept in the manifest under
"dropped" and printed at the end, never left out silently: hidden files and folders, files that
are not images, images outside the layout (directly in SRC for ImageFolder, not named by the
caption file), empty images, images over `max_image_bytes` (a member of several GiB is no
training image, and the stream would read it whole), special files (a FIFO would block make),
and links. Links are never followed, whether they point inside SRC (the target is packed under
its own name already, or left out for a reason: following would pack it twice, and a folder
link can loop) or outside (that would pack files the user did not choose to pack: those are
warned about as well). A tar source must be whole (see `list_tar`); its link members are
reported, never followed.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from collections import defaultdict
from typing import Iterator, NamedTuple

from ssl_dist.shards.captions import MAX_CAPTION_BYTES, caption_bytes, caption_problem, read_caption_file
from ssl_dist.shards.errors import ShardError
from ssl_dist.shards.tar import REGULAR_KINDS, TruncatedTar, iter_tar

log = logging.getLogger(__name__)

# The image files make_shards packs (decode.IMAGE_EXTS, what the stream decodes, holds each; tested).
SOURCE_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Larger image files are left out (and reported): a 16-bit RGBA PNG at the stream's default pixel
# limit (data.max_pixels, 8192**2) is 512 MiB even uncompressed, so only files that are no
# training image reach this, and each sample of a shard is read whole by the stream.
MAX_IMAGE_BYTES = 2**30
CHUNK = 2**20  # bytes copied from the source at a time: a writer's memory, whatever a member's size

# Why a file of the source is left out; the keys are what the manifest's "dropped" holds.
DROP_REASONS = {
    "link_outside": "links pointing outside the source, not followed",
    "link_inside": "links inside the source, not followed: their targets are listed as themselves",
    "tar_link": "link members of the source tar, not followed",
    "not_regular": "special files (FIFOs, devices, sockets)",
    "hidden": "hidden files and folders (names starting with '.')",
    "not_image": "files that are neither images (.jpg, .jpeg, .png, .webp) nor their captions",
    "outside_class_folder": "images directly in SRC, outside the class folders",
    "not_in_caption_file": "images the caption file does not name",
    "empty": "empty images (0 bytes)",
    "too_large": "images over the size limit (--max-image-bytes)",
}
EXAMPLES = 3  # paths kept per reason in the report


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
    path: str  # relative posix path in the source, for messages


class Dropped:
    """What the listing leaves out, by reason (a `DROP_REASONS` key): every path, reported as
    counts and the first few paths in sorted order (the same report every run)."""

    def __init__(self):
        self.paths: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, path: str) -> None:
        self.paths[reason].append(path)

    def report(self) -> dict[str, dict]:
        """``{reason: {"count": n, "examples": [path, ...]}}``, reasons sorted (the manifest's "dropped")."""
        return {reason: {"count": len(paths), "examples": sorted(paths)[:EXAMPLES]}
                for reason, paths in sorted(self.paths.items())}


def dropped_summary(dropped: dict[str, dict]) -> list[str]:
    """Lines telling what make left out and why (`Dropped.report`'s dict); none if nothing was."""
    if not dropped:
        return []
    total = sum(entry["count"] for entry in dropped.values())
    return [f"left out {total} files or folders:"] + [
        f"  {entry['count']} {DROP_REASONS.get(reason, reason)} (e.g. {', '.join(entry['examples'])})"
        for reason, entry in dropped.items()]


def list_source(src: str, captions: str | None = None, *, image_column: str = "image",
                caption_column: str = "caption", max_image_bytes: int = MAX_IMAGE_BYTES,
                ) -> tuple[list[str] | None, list[SourceImage], dict[str, dict]]:
    """(classes sorted by name or None, images sorted by key, what was left out as
    `Dropped.report` gives it) of a source folder or tar; the layout rules are in the module
    docstring. Raises ShardError for anything make would refuse. Links pointing outside the
    source are also logged as a warning."""
    if not os.path.exists(src):
        raise ShardError(f"source {src} does not exist: give a local image folder (SRC/<class>/<image>) or a "
                         f".tar of one")
    if max_image_bytes < 1:
        raise ShardError(f"max_image_bytes must be at least 1, not {max_image_bytes}")
    tar_path = src if os.path.isfile(src) else None
    dropped = Dropped()
    files = list_tar(src, dropped, strip_root=captions is None) if tar_path else list_folder(src, dropped)
    warn_links_out(src, dropped)  # before any refusal: a source of links out would look empty
    with SourceReader(tar_path) as source:
        if captions is not None:
            classes, images = from_caption_file(src, files, captions, image_column, caption_column, dropped)
        elif beside_captions(files):
            classes, images = from_captioned_folder(src, files, source.read, dropped)
        else:
            classes, images = from_class_folders(src, files, dropped)
    images = within_size(images, max_image_bytes, dropped, src)
    images.sort()
    check_unique_keys(images, src)
    return classes, images, dropped.report()


def within_size(images: list[SourceImage], max_image_bytes: int, dropped: Dropped, src: str) -> list[SourceImage]:
    """The images that are neither empty nor over `max_image_bytes`; ShardError if that is none."""
    kept = []
    for image in images:
        if image.size == 0:
            dropped.add("empty", image.path)
        elif image.size > max_image_bytes:
            dropped.add("too_large", image.path)
        else:
            kept.append(image)
    if images and not kept:
        raise ShardError(f"every image in {src} is empty or over {max_image_bytes} bytes (e.g. {images[0].path}): "
                         f"give real images, or raise the limit with --max-image-bytes")
    return kept


def warn_links_out(src: str, dropped: Dropped) -> None:
    """Log a warning for links pointing outside the source: the user may have meant them to be packed."""
    out = dropped.paths.get("link_outside")
    if out:
        log.warning("skipped %d links in %s that point outside it (e.g. %s): make never packs files outside "
                    "SRC; copy them into SRC to pack them", len(out), src, ", ".join(sorted(out)[:EXAMPLES]))


def from_class_folders(src: str, files: list[SourceFile], dropped: Dropped) -> tuple[list[str], list[SourceImage]]:
    """ImageFolder layout without captions: the images below class folders, each labelled."""
    for f in files:
        if not image_ext(f.path):
            dropped.add("not_image", f.path)
        elif "/" not in f.path:
            dropped.add("outside_class_folder", f.path)
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


def from_captioned_folder(src: str, files: list[SourceFile], read,
                          dropped: Dropped) -> tuple[list[str] | None, list[SourceImage]]:
    """A folder (or tar) whose images have ``x.txt`` beside them; classes only in ImageFolder layout.
    `read` gives a `SourceFile`'s bytes (`SourceReader.read`)."""
    captions = beside_captions(files)
    used = {txt.path for txt in captions.values()}
    for f in files:
        if not image_ext(f.path) and f.path not in used:
            dropped.add("not_image", f.path)
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
        if txt.size > MAX_CAPTION_BYTES:  # checked before reading: a mislabeled file is never read whole
            raise ShardError(f"caption {posixpath.join(src, txt.path)} of image {f.path} is {txt.size} bytes, over "
                             f"the {MAX_CAPTION_BYTES} a caption may take: write its caption (UTF-8 text), or "
                             f"remove the image and its .txt")
        caption = read(txt)
        problem = caption_problem(caption)
        if problem is not None:
            raise ShardError(f"caption {posixpath.join(src, txt.path)} of image {f.path} {problem}: write its "
                             f"caption (UTF-8 text), or remove the image and its .txt")
        images.append(source_image(f, label[f.path.split("/", 1)[0]] if classes else None, caption))
    return classes, images


def from_caption_file(src: str, files: list[SourceFile], captions: str, image_column: str, caption_column: str,
                      dropped: Dropped) -> tuple[None, list[SourceImage]]:
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
    for f in files:
        if not image_ext(f.path):
            dropped.add("not_image", f.path)
        elif f.path not in named:
            dropped.add("not_in_caption_file", f.path)
    return None, images


def list_folder(root: str, dropped: Dropped) -> list[SourceFile]:
    """The regular, visible files below `root`, links not followed (module docstring); what is
    skipped goes to `dropped`, a hidden folder or a folder link as one entry."""
    real_root = os.path.realpath(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks off: links are decided below
        relative = os.path.relpath(dirpath, root).replace(os.sep, "/")
        prefix = "" if relative == "." else relative + "/"
        entered = []
        for name in dirnames:
            reason = skip_reason(os.path.join(dirpath, name), name, real_root)
            if reason is None:
                entered.append(name)
            else:
                dropped.add(reason, prefix + name)
        dirnames[:] = entered
        for name in filenames:
            path = os.path.join(dirpath, name)
            reason = skip_reason(path, name, real_root)
            info = None if reason else os.lstat(path)
            if info is not None and stat.S_ISREG(info.st_mode):
                files.append(SourceFile(prefix + name, info.st_size, path))
            else:
                dropped.add(reason or "not_regular", prefix + name)
    return files


def skip_reason(path: str, name: str, real_root: str) -> str | None:
    """Why a folder entry is not listed ("hidden", "link_inside", "link_outside"), or None."""
    if name.startswith("."):
        return "hidden"
    if os.path.islink(path):
        target = os.path.realpath(path)
        try:
            inside = os.path.commonpath([target, real_root]) == real_root
        except ValueError:  # another drive (Windows)
            inside = False
        return "link_inside" if inside else "link_outside"
    return None


def list_tar(path: str, dropped: Dropped, strip_root: bool = True) -> list[SourceFile]:
    """The regular, visible members of an uncompressed tar (`where`: their data offset); the
    others go to `dropped` (folders aside).

    Reads the headers once from start to end, skipping the data (which each shard writer
    reads later by offset). The tar must be whole, up to its end-of-archive marker: a tar cut
    short (an interrupted download or copy) reads, without that check, as a smaller dataset,
    cut at any member boundary. With `strip_root`, when every image sits below one top-level
    folder at least two levels deep (``train/<class>/x.jpg``), that folder is the root and is
    stripped.
    """
    try:
        with open(path, "rb") as f:
            entries = list(iter_tar(f, os.path.getsize(path), complete=True, every_kind=True))
    except TruncatedTar as exc:
        raise ShardError(f"source tar {path} is cut short ({exc}): copy or download it again") from None
    except ShardError as exc:
        raise ShardError(f"source {path} is not a readable uncompressed tar ({exc}): give an image folder or a "
                         f"plain .tar (decompress a .tar.gz first)") from None
    members = []
    for entry in entries:
        name = relative_name(entry.name)
        if entry.kind == b"5" or not name:  # folders are implied by the paths
            continue
        if any(part.startswith(".") for part in name.split("/")):
            dropped.add("hidden", name)
        elif entry.kind in (b"1", b"2"):  # hard and symbolic links
            dropped.add("tar_link", name)
        elif entry.kind not in REGULAR_KINDS:
            dropped.add("not_regular", name)
        else:
            members.append(SourceFile(name, entry.size, entry.data_offset))
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
    return SourceImage(f"{folder}/{base}" if folder else base, label, image_ext(f.path), f.size, f.where, caption,
                       f.path)


def check_unique_keys(images: list[SourceImage], src: str) -> None:
    """Raise ShardError if two images map to one key (e.g. ``a.b.jpg`` and ``a_b.png``)."""
    for before, after in zip(images, images[1:]):
        if before.key == after.key:
            raise ShardError(f"two images in {src} give the same sample key {before.key!r} (same name up to the "
                             f"extension, or '.' vs '_'): rename one of them")


class SourceReader:
    """Context manager giving the reader of the bytes of `SourceImage`s and `SourceFile`s.

    One open descriptor of the source tar per shard writer; `os.pread` reads by offset and is
    safe to share between threads. Every read is in chunks of at most CHUNK bytes, so memory
    stays bounded whatever a member's size. OSError becomes ShardError here, so that
    translate_errors(dest) around a writer does not blame a source file's permissions on the
    destination's credentials.
    """

    def __init__(self, tar_path: str | None):
        self.tar_path = tar_path
        self.fd = None

    def __enter__(self):
        if self.tar_path is not None:
            self.fd = os.open(self.tar_path, os.O_RDONLY)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)

    def read(self, item: SourceImage | SourceFile) -> bytes:
        """The bytes of `item` whole (callers bound its size: captions)."""
        return b"".join(self.chunks(item))

    def chunks(self, item: SourceImage | SourceFile, size: int = CHUNK) -> Iterator[bytes]:
        """The bytes of `item` in pieces of at most `size` bytes. ShardError when it cannot be
        read, or no longer holds exactly the bytes it was listed with."""
        if self.fd is not None:
            yield from self.tar_chunks(item, size)
        else:
            yield from self.file_chunks(item, size)

    def tar_chunks(self, item, size: int) -> Iterator[bytes]:
        for start in range(0, item.size, size):
            want = min(size, item.size - start)
            data = self.guarded(item, os.pread, self.fd, want, item.where + start)
            if len(data) != want:
                raise ShardError(f"source tar {self.tar_path} changed while shards were made from it ({item.path}): "
                                 f"make them again from a tar that stays as it is")
            yield data

    def file_chunks(self, item, size: int) -> Iterator[bytes]:
        with self.guarded(item, open_regular, item.where) as f:
            left = item.size
            while left:
                data = self.guarded(item, f.read, min(size, left))
                if not data:
                    break
                left -= len(data)
                yield data
            if left or self.guarded(item, f.read, 1):
                raise ShardError(f"source file {item.path} changed while shards were made from it (listed with "
                                 f"{item.size} bytes, it now holds {'fewer' if left else 'more'}): make them again "
                                 f"when the source stays as it is")

    @staticmethod
    def guarded(item, call, *args):
        """`call(*args)`, with an OSError raised as the ShardError naming the source file."""
        try:
            return call(*args)
        except OSError as exc:
            raise ShardError(f"cannot read source file {item.path} ({exc}): make it a readable file, or remove "
                             f"it") from None


def open_regular(path: str):
    """`path` opened for binary reading, refused (OSError) unless it is still a regular file: not
    replaced by a link (O_NOFOLLOW) or a FIFO (O_NONBLOCK keeps opening one from blocking)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is no longer a regular file")
    return os.fdopen(fd, "rb")
