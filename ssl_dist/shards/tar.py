"""Tar headers: parsing them (USTAR, GNU, PAX) to read shards, and writing members as tarfile does.

Tar format. Shards written here are what ``tarfile`` writes in GNU format (one USTAR-style
header per member from ``TarInfo.tobuf``, a GNU ``L`` long-name entry only for names over 100
bytes, data padded to 512 bytes, two zero blocks, zeros up to a 10240-byte record) and never
hold PAX headers, which webdataset's ``TarWriter`` adds to every member (a CIFAR sample then
takes 4.5 KiB instead of 2.5 KiB). mtime, mode, uid, gid and owner names are fixed, so the same
source and options give byte-identical shards and sidecars (only ``created`` in the manifest
differs).

Reading accepts more: one parser, `iter_tar`, reads USTAR and GNU headers, GNU long names and
PAX headers, for `parse_members` (the bytes of one sample), `index_shards` and the source
listing alike. `plain_headers` and `octal_fields` are the same header rules with numpy, many
headers at once, for the data stream's hot path (`samples.parse_samples`).
"""

from __future__ import annotations

import io
import tarfile
from typing import Iterator, NamedTuple

import numpy as np

from ssl_dist.shards.errors import ShardError

BLOCK = 512  # tar block size
RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to a multiple of this (10240)
NAME_FIELD = 100  # longer member names need a GNU long-name member in front of the header
REGULAR_KINDS = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
META_KINDS = (b"x", b"g", b"L", b"K")  # PAX extended/global header, GNU long name/link
USTAR_MAGIC = b"ustar\x0000"  # POSIX: bytes 345..500 hold a name prefix (GNU puts other data there)


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


class TarEntry(NamedTuple):
    name: str  # member name (PAX path or GNU long name applied)
    offset: int  # of its first header block: its PAX 'x' or GNU 'L' header when it has one
    data_offset: int
    size: int
    kind: bytes = b"0"  # typeflag: b"0" regular file, b"2" symlink, b"5" directory...


class TruncatedTar(ShardError):
    """A tar that ends before its end: inside a header or a member, or without its end-of-archive marker."""


def iter_tar(f, end: int, *, complete: bool = False, every_kind: bool = False) -> Iterator[TarEntry]:
    """The regular-file entries of a tar of `end` bytes read from binary file `f` (at its start).

    Reads headers in order and seeks over the data, so a shard streams through in one pass
    with nothing but headers in memory. One parser serves `parse_members`, `index_shards` and
    the source listing, so the offsets written to sidecars are the ones readers parse from.
    Stops at the end-of-archive zero block or at `end`; raises ShardError on a bad header and
    TruncatedTar on a member that runs past `end`.
    `complete`: `f` is a whole tar file, not a byte range of one, so it must end with the
    end-of-archive marker, two zero blocks, as every tar writer (GNU tar, bsdtar, tarfile)
    writes it: tarfile and webdataset stop silently where the bytes stop, so a tar cut at a
    member boundary would read as a smaller dataset. Without it raises TruncatedTar.
    `every_kind`: yield every member but the PAX/GNU extended headers (links, folders, devices:
    see `kind`), for a caller that reports what it skips.
    """
    pos, first, pending = 0, None, {}
    while pos < end:
        header = f.read(BLOCK)
        if header.count(0) == len(header):
            if complete and (len(header) < BLOCK or f.read(BLOCK) != bytes(BLOCK)):
                raise TruncatedTar(f"it ends at byte {end} inside its end-of-archive marker (two zero blocks)")
            return  # end-of-archive marker, or zero padding up to the end
        if len(header) < BLOCK:
            raise TruncatedTar(f"tar header cut short at byte {pos} of {end} (truncated?)")
        check_header(header, pos)
        kind = header[156:157]
        size = int(pending["size"]) if "size" in pending and kind not in META_KINDS else header_number(header[124:136])
        if pos + BLOCK + size > end:
            raise TruncatedTar(f"tar member at byte {pos} needs {size} bytes but only {end - pos - BLOCK} follow "
                               f"(truncated?)")
        first = pos if first is None else first
        if kind in META_KINDS:
            apply_meta(kind, f.read(padded(size))[:size], pending)
        else:
            if every_kind or kind in REGULAR_KINDS:
                yield TarEntry(pending.get("path") or header_name(header), first, pos + BLOCK, size, kind)
            first, pending = None, {}
            f.seek(pos + BLOCK + padded(size))
        pos += BLOCK + padded(size)
    if complete:
        raise TruncatedTar("it is empty (0 bytes)" if end == 0 else
                           f"it ends at byte {end} after a member, without the end-of-archive marker (two zero "
                           f"blocks) that closes a whole tar")


def apply_meta(kind: bytes, payload: bytes, pending: dict[str, str]) -> None:
    """Note what a PAX 'x' or GNU 'L' entry says about the next member; ignore 'g' and 'K'."""
    if kind == b"x":
        pending.update(parse_pax(payload))
    elif kind == b"L":
        pending["path"] = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")


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


def plain_headers(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(data size, plain) of tar header blocks, one per row: plain means a regular file with an octal size,
    no USTAR name prefix and a valid checksum (as `check_header` computes it)."""
    kind = rows[:, 156]
    size, size_ok = octal_fields(rows[:, 124:136])
    stored, stored_ok = octal_fields(rows[:, 148:156])
    computed = rows.sum(axis=1, dtype=np.int64) - rows[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    prefix = (rows[:, 257:265] == np.frombuffer(USTAR_MAGIC, dtype=np.uint8)).all(axis=1) & (rows[:, 345] != 0)
    return size, ((kind == 48) | (kind == 0)) & size_ok & stored_ok & (stored == computed) & ~prefix


def octal_fields(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) ``tarfile`` writes in GNU format for a member of `size` bytes (a GNU
    ``L`` long-name entry first for names over 100 bytes); its data and padding follow.

    The header comes from ``TarInfo.tobuf``; we skip ``TarFile.addfile`` only because it copies
    the TarInfo and the data stream for every member (a third of the time for small images),
    and so that the data can be streamed from the source in chunks. TarInfo's defaults (mtime
    0, mode 0o644, uid/gid 0, no owner names) keep the bytes identical from run to run.
    """
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


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
