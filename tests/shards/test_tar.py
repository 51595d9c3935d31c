"""Tar headers: parse_members against tarfile for every header style, and on the wrong bytes."""

from __future__ import annotations

import io
import tarfile

import pytest
from shard_readers import header_kinds

from ssl_dist import shards
from ssl_dist.shards import ShardError


def test_parse_members_matches_tarfile_for_every_header_style(tmp_path):
    long_name = "k/" + "p" * 60 + "/" + "n" * 60 + ".jpg"  # USTAR: prefix + name; GNU: 'L'; PAX: 'path'
    members = [("a/short.cls", b"3"), ("a/short.jpg", b"\xff" * 700), (long_name, b"long"), ("b/empty.txt", b"")]
    for fmt, extra in ((tarfile.USTAR_FORMAT, set()), (tarfile.GNU_FORMAT, {b"L"}), (tarfile.PAX_FORMAT, {b"x"})):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            folder = tarfile.TarInfo("a")
            folder.type = tarfile.DIRTYPE  # not a regular file: skipped
            tar.addfile(folder)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1.5  # a float mtime makes PAX write 'x' headers
                tar.addfile(info, io.BytesIO(data))
        assert set(header_kinds(buf.getvalue())) == {b"0", b"5"} | extra
        assert shards.parse_members(buf.getvalue()) == members, fmt
    assert shards.group_samples(members) == [
        ("a/short", {"cls": b"3", "jpg": b"\xff" * 700}), (long_name[:-4], {"jpg": b"long"}),
        ("b/empty", {"txt": b""})]


def test_parse_members_rejects_wrong_offsets_and_truncation(local):
    dest, manifest = local
    data = (dest / "shard-000000.tar").read_bytes()
    offsets = shards.read_offsets(str(dest), manifest["shards"][0])
    start, stop = int(offsets[1]), int(offsets[2])
    with pytest.raises(ShardError, match="no tar header at byte 0"):
        shards.parse_members(data[start + 512:stop])
    with pytest.raises(ShardError, match="truncated"):
        shards.parse_members(data[start:stop - 600])
    assert shards.parse_members(data[start:start]) == []
    last = shards.sample_ranges(offsets, len(data))[-1]
    assert last == (int(offsets[-1]), len(data))
    assert len(shards.group_samples(shards.parse_members(data[last[0]:last[1]]))) == 1
