"""Captions for ``ssl-dist shards make``: read from a caption file or from ``.txt`` files beside
the images, and checked before anything is written.

Two sources of captions:

- a caption file (``--captions FILE``): CSV, TSV, JSONL or Parquet, told apart by the file's
  extension (.csv, .tsv, .jsonl/.ndjson, .parquet/.pq), one row per image, the image path
  (relative to SRC) in `image_column` and its caption in `caption_column`. Rows are numbered
  from 1: the records after the header of a CSV/TSV, the lines of a JSONL, the rows of a
  Parquet file, so "row 3" is the third image the file names;
- a ``.txt`` beside each image (``x.jpg`` + ``x.txt`` in one folder), read as bytes.

A caption is refused at make time, naming its row or file, when it is empty (or whitespace
only), longer than MAX_CAPTION_BYTES (a ``.txt`` beside an image is refused by its size,
unread: a file that large is no caption, and every caption is held in memory until written)
or not UTF-8: make is where the user can still fix the source, and a sample whose
``.txt`` is not UTF-8 is one the stream would skip (decode.py's rule for ``.txt``; shards made
elsewhere get it skipped, not refused). Caption bytes are kept as they are (no stripping, no
re-encoding beyond UTF-8 for a text column).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Iterator, NamedTuple

from ssl_dist.shards.errors import ShardError

# A caption is text for a tokenizer (CLIP reads 77 tokens); long dense captions take a few KiB.
MAX_CAPTION_BYTES = 2**20
TABLE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                 ".pq": "parquet"}


class CaptionRow(NamedTuple):
    row: int  # 1-based row of the caption file
    image: str  # image path as the file gives it, relative to SRC
    caption: object  # str or bytes as read; checked by `caption_bytes`


def caption_problem(data: bytes) -> str | None:
    """Why `data` is not a caption make accepts, or None: empty / whitespace only, or not UTF-8.

    The UTF-8 rule is decode.field_value's for ``.txt`` (a test holds them together); it is
    repeated here because decode imports torch, which ``shards make`` does not need.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if not text.strip():
        return "is empty"
    return None


def caption_bytes(value, where: str, fix: str) -> bytes:
    """A caption cell (str, bytes or other) as the bytes to store; ShardError naming `where` otherwise."""
    if value is None:
        raise ShardError(f"{where}: the caption is empty: {fix}")
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")  # lone surrogates: bytes that were not UTF-8 (see read_delimited)
        except UnicodeEncodeError:
            raise ShardError(f"{where}: the caption is not UTF-8 text: {fix}") from None
    if not isinstance(value, bytes):
        raise ShardError(f"{where}: the caption is a {type(value).__name__}, not text: {fix}")
    if len(value) > MAX_CAPTION_BYTES:
        raise ShardError(f"{where}: the caption is {len(value)} bytes, over the {MAX_CAPTION_BYTES} a caption may "
                         f"take: {fix}")
    problem = caption_problem(value)
    if problem is not None:
        raise ShardError(f"{where}: the caption {problem}: {fix}")
    return value


def read_caption_file(path: str, image_column: str, caption_column: str) -> list[CaptionRow]:
    """Every row of a caption file, in file order. ShardError for an unknown format, a missing
    column (naming the columns present) or a row that does not parse."""
    if not os.path.isfile(path):
        raise ShardError(f"caption file {path} does not exist: give a CSV, TSV, JSONL or Parquet file")
    kind = TABLE_FORMATS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ShardError(f"caption file {path}: unknown format; name it .csv, .tsv, .jsonl or .parquet "
                         f"(the extension says how to read it)")
    columns = (image_column, caption_column)
    if kind == "parquet":
        return read_parquet(path, columns)
    if kind == "jsonl":
        return list(read_jsonl(path, columns))
    return list(read_delimited(path, columns, "\t" if kind == "tsv" else ","))


def missing_columns(path: str, columns: tuple[str, str], present: list[str], where: str = "") -> ShardError:
    """The error for a caption file without the image or caption column."""
    missing = [c for c in columns if c not in present]
    flags = {columns[0]: "--image-column", columns[1]: "--caption-column"}
    return ShardError(f"caption file {path}{where} has no column {', '.join(repr(c) for c in missing)} (columns: "
                      f"{', '.join(present) or 'none'}): name the right one with "
                      f"{' / '.join(flags[c] for c in missing)}")


def read_delimited(path: str, columns: tuple[str, str], delimiter: str) -> Iterator[CaptionRow]:
    """Rows of a CSV/TSV with a header line.

    Read with surrogateescape, so bytes that are not UTF-8 reach `caption_bytes` as lone
    surrogates and are refused there with their row, instead of failing the whole file.
    """
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        present = list(reader.fieldnames or [])
        if any(c not in present for c in columns):
            raise missing_columns(path, columns, present)
        for row, record in enumerate(reader, start=1):
            yield CaptionRow(row, record[columns[0]] or "", record[columns[1]])


def read_jsonl(path: str, columns: tuple[str, str]) -> Iterator[CaptionRow]:
    """Rows of a JSONL file, one object per line; blank lines are skipped but counted."""
    with open(path, "rb") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:  # UnicodeDecodeError included
                raise ShardError(f"caption file {path} row {row} is not a UTF-8 JSON object ({exc}): fix that "
                                 f"line") from None
            if not isinstance(record, dict) or any(c not in record for c in columns):
                raise missing_columns(path, columns, list(record) if isinstance(record, dict) else [],
                                      f" row {row}")
            image = record[columns[0]]
            yield CaptionRow(row, image if isinstance(image, str) else str(image), record[columns[1]])


def read_parquet(path: str, columns: tuple[str, str]) -> list[CaptionRow]:
    """Rows of a Parquet file; only the two columns are read."""
    import pyarrow.parquet as pq

    try:
        present = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError... for a file that is not Parquet
        raise ShardError(f"caption file {path} is not a readable Parquet file ({exc})") from None
    if any(c not in present for c in columns):
        raise missing_columns(path, columns, present)
    table = pq.read_table(path, columns=list(columns))
    images, captions = (table.column(c).to_pylist() for c in columns)
    return [CaptionRow(row, "" if image is None else str(image), caption)
            for row, (image, caption) in enumerate(zip(images, captions), start=1)]
