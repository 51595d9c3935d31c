"""check_shards: what is wrong with shards, found the way the data stream reads and decodes them."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile

from shard_readers import image_bytes

from ssl_dist import decode, shards


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


def test_check_judges_samples_as_the_stream_decodes_them(tmp_path, expected):
    """A sample the stream skips is a problem for `shards check`, one it decodes is not: both ask decode.py.

    Each of these samples was judged the other way by check's own rules before (PIL on every
    image member of 4 types, .json and .txt not looked at).
    """
    jpg = next(iter(expected.values()))[0]
    samples = {
        "good/ppm": {"cls": b"1", "ppm": image_bytes("PPM")},  # image types the stream decodes...
        "good/bmp": {"bmp": image_bytes("BMP")},  # ...that check called 'no image member'
        "good/second": {"jpg": jpg, "png": b"not the image"},  # the stream takes the .jpg, the rest stays bytes
        "good/json": {"jpg": jpg, "json": b'{"caption": "a plane"}'},
        "bad/json": {"jpg": jpg, "json": b"{not json"},  # the stream skips these two; check passed them
        "bad/txt": {"jpg": jpg, "txt": b"\xff\xfe not UTF-8"},
        "bad/jpg": {"cls": b"2", "jpg": b"no JPEG"},
    }
    folder = tmp_path / "made_elsewhere"
    folder.mkdir()
    with tarfile.open(folder / "part-0.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, fields in samples.items():
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shards.index_shards(str(folder))

    decoded = decode.decode_samples(list(samples.items()))
    skipped = {key for key, sample in zip(samples, decoded) if isinstance(sample, str)}
    assert skipped == {"bad/json", "bad/txt", "bad/jpg"}
    report = shards.check_shards(str(folder))
    assert report["samples"] == len(samples)
    assert {re.match(r".*part-0\.tar: ([^.:]+)", problem).group(1) for problem in report["problems"]} == skipped
    problems = "\n".join(report["problems"])
    assert "bad/json.json: does not parse" in problems and "bad/txt.txt: is not UTF-8 text" in problems
    assert "bad/jpg.jpg: image does not decode" in problems


def with_digests(folder) -> dict:
    """Write the sha256 of each shard and sidecar of `folder` into its manifest (as `shards index` and
    `shards make` write them); returns the manifest."""
    manifest = json.loads((folder / "index.json").read_text())
    for entry in manifest["shards"]:
        entry["sha256"] = hashlib.sha256((folder / entry["url"]).read_bytes()).hexdigest()
        entry["index_sha256"] = hashlib.sha256((folder / entry["index"]).read_bytes()).hexdigest()
    (folder / "index.json").write_text(json.dumps(manifest))
    return manifest


def test_check_verifies_the_digests_of_shards_and_sidecars(local, tmp_path, capsys):
    from ssl_dist import cli

    dest, _ = local
    folder = tmp_path / "digests"
    shutil.copytree(dest, folder)
    manifest = with_digests(folder)
    assert shards.check_shards(str(folder))["problems"] == []
    # a same-size change that decodes: a label digit, and a sidecar whose digest is not the manifest's
    data = bytearray((folder / "shard-000002.tar").read_bytes())
    data[512] = ord("9") if data[512] != ord("9") else ord("8")
    (folder / "shard-000002.tar").write_bytes(bytes(data))
    manifest["shards"][3]["index_sha256"] = "0" * 64
    (folder / "index.json").write_text(json.dumps(manifest))

    problems = shards.check_shards(str(folder))["problems"]
    assert len(problems) == 2, problems
    assert re.fullmatch(r".*/shard-000002\.tar: its bytes do not match the sha256 in the manifest \(changed after "
                        r"it was indexed\?\): restore it, or re-index with `ssl-dist shards index .*`", problems[0])
    assert re.fullmatch(r".*/shard-000003\.tar: sidecar shard-000003\.idx does not match the index_sha256 in the "
                        r"manifest .*", problems[1])
    assert cli.main(["shards", "check", str(folder)]) == 1
    assert "2 problems" in capsys.readouterr().out


def test_check_refuses_images_over_the_pixel_limit(tmp_path, expected):
    from test_decode import claiming

    jpg = next(iter(expected.values()))[0]
    folder = tmp_path / "large"
    folder.mkdir()
    with tarfile.open(folder / "part-0.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, data in (("good", jpg), ("large", claiming(9000, 9000))):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shards.index_shards(str(folder))
    problems = shards.check_shards(str(folder))["problems"]
    assert len(problems) == 1 and problems[0].endswith(
        "part-0.tar: large.jpg: image is 9000 x 9000 pixels, more than data.max_pixels=67108864: shrink it or raise "
        "data.max_pixels"), problems
    assert len(shards.check_shards(str(folder), max_pixels=32 * 32 - 1)["problems"]) == 2  # the 32 x 32 one too
