"""check_shards: what is wrong with shards, found the way the data stream reads and decodes them."""

from __future__ import annotations

import re
import shutil
import tarfile

from ssl_dist import shards


def test_check_reports_corrupt_image_and_truncated_shard(local, tmp_path):
    dest, manifest = local
    broken = tmp_path / "broken"
    shutil.copytree(dest, broken)
    with tarfile.open(broken / "shard-000000.tar") as tar:
        victim = next(m for m in tar if m.name.endswith(".jpg"))
    with open(broken / "shard-000000.tar", "r+b") as f:
        f.seek(victim.offset_data)
        f.write(b"this is no JPEG!" * 4)
    second = broken / "shard-000001.tar"
    second.write_bytes(second.read_bytes()[:second.stat().st_size // 2])

    report = shards.check_shards(str(broken), workers=2)
    assert report["shards"] == 4 and report["samples"] < 200
    problems = "\n".join(report["problems"])
    victim_key = victim.name[:-len(".jpg")]
    assert re.search(rf"shard-000000\.tar: {victim_key}\.jpg: image does not decode", problems), problems
    assert re.search(r"shard-000001\.tar: \d+ bytes but the manifest says", problems), problems
    assert re.search(r"shard-000001\.tar: \d+ of 64 samples start past the end", problems), problems
    assert not any("shard-000002" in p or "shard-000003" in p for p in report["problems"])


def test_check_reports_bad_label_and_missing_sidecar(local, tmp_path):
    dest, _ = local
    broken = tmp_path / "broken"
    shutil.copytree(dest, broken)
    (broken / "shard-000003.idx").unlink()
    data = bytearray((broken / "shard-000002.tar").read_bytes())
    header = data[:512]
    assert header[:100].rstrip(b"\0").endswith(b".cls")
    data[512] = ord("x")  # the first sample's label digit
    (broken / "shard-000002.tar").write_bytes(bytes(data))
    problems = "\n".join(shards.check_shards(str(broken))["problems"])
    assert "shard-000002.tar: " in problems and ".cls: b'x' is not an integer class index" in problems
    assert "shard-000003.tar: sidecar" in problems and "shard-000003.idx is missing" in problems
