"""Shards: make / index / check against real CIFAR JPEGs, locally and over the S3 protocol (moto).

Every test reads the shards back with an independent reader (webdataset, tarfile) or with the
ranged-read path the data stream uses (sidecar offsets -> `parse_members` -> `group_samples`).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import cifar_slice
from ssl_dist import shards, storage
from ssl_dist.shards import ShardError

PER_CLASS = 20
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A CIFAR ImageFolder slice: 10 classes x 20 real JPEGs."""
    return cifar_slice(tmp_path_factory.mktemp("cifar") / "train", PER_CLASS)


@pytest.fixture(scope="module")
def expected(source) -> dict[str, tuple[bytes, int]]:
    """key -> (image bytes, label) for every image of the source folder."""
    return {f"{p.parent.name}/{p.stem}": (p.read_bytes(), CLASSES.index(p.parent.name))
            for p in sorted(source.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def local(source, tmp_path_factory) -> tuple[Path, dict]:
    """Shards of the slice in a local folder: 64 samples per shard, so the last one holds 8."""
    dest = tmp_path_factory.mktemp("local") / "shards"
    return dest, shards.make_shards(str(source), str(dest), samples_per_shard=64, workers=2)


def webdataset_samples(folder: Path, manifest: dict) -> list[dict]:
    """All samples as webdataset itself reads them (no decoding)."""
    import webdataset as wds

    urls = [str(folder / s["url"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def ranged_samples(url: str, manifest: dict) -> list[tuple[str, dict[str, bytes]]]:
    """All samples read the way the data stream does: one ranged read per sidecar offset."""
    fs, root = storage.filesystem(url, storage.storage_options(url))
    samples = []
    for shard in manifest["shards"]:
        offsets = shards.read_offsets(url, shard, storage.storage_options(url))
        for start, stop in shards.sample_ranges(offsets, shard["size"]):
            buf = fs.cat_file(f"{root}/{shard['url']}", start=start, end=stop)
            one = shards.group_samples(shards.parse_members(buf))
            assert len(one) == 1, f"{shard['url']}@{start}: {[k for k, _ in one]}"
            samples.append(one[0])
    return samples


def header_kinds(tar: Path | bytes) -> list[bytes]:
    """Typeflag of every header block in a tar (a file or its bytes), walking the raw 512-byte blocks."""
    data = tar if isinstance(tar, bytes) else tar.read_bytes()
    kinds, pos = [], 0
    while pos < len(data) and data[pos:pos + 512] != bytes(512):
        header = data[pos:pos + 512]
        kinds.append(header[156:157])
        size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    return kinds


# ------------------------------------------------------------------ make_shards


def test_make_local_manifest_and_contents(local, expected):
    dest, manifest = local
    assert set(manifest) == {"format", "shards", "num_samples", "classes", "created"}
    assert manifest["format"] == "ssl_dist.shards/1"
    assert manifest["classes"] == CLASSES
    assert manifest["num_samples"] == len(expected) == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created"])
    assert [s["num_samples"] for s in manifest["shards"]] == [64, 64, 64, 8]
    for number, shard in enumerate(manifest["shards"]):
        assert shard == {"url": f"shard-{number:06d}.tar", "num_samples": shard["num_samples"],
                         "size": (dest / shard["url"]).stat().st_size, "index": f"shard-{number:06d}.idx"}
        assert (dest / shard["index"]).stat().st_size == 8 * shard["num_samples"]
    assert json.loads((dest / "index.json").read_text()) == manifest
    assert shards.read_manifest(str(dest)) == manifest

    samples = webdataset_samples(dest, manifest)
    assert sorted(s["__key__"] for s in samples) == sorted(expected)  # each image exactly once
    for sample in samples:
        image, label = expected[sample["__key__"]]
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"jpg", "cls"}
        assert sample["jpg"] == image
        assert int(sample["cls"].decode("ascii")) == label
    # shuffled across classes: the first shard holds many classes, not one
    assert len({int(s["cls"]) for s in samples[:64]}) >= 8


def test_make_s3_read_back_by_ranges(source, expected, bucket):
    url = f"s3://{bucket}/cifar"
    made = shards.make_shards(str(source), url, samples_per_shard=50, workers=3,
                              storage_options=storage.storage_options(url))
    manifest = shards.read_manifest(url, storage.storage_options(url))
    assert manifest == made
    assert [s["num_samples"] for s in manifest["shards"]] == [50] * 4

    samples = ranged_samples(url, manifest)
    assert sorted(key for key, _ in samples) == sorted(expected)
    for key, fields in samples:
        assert fields == {"cls": str(expected[key][1]).encode(), "jpg": expected[key][0]}
    assert shards.check_shards(url, storage_options=storage.storage_options(url)) == {
        "shards": 4, "samples": 200, "problems": []}


def test_make_bounds_by_bytes_and_count(source, tmp_path):
    limit = 40 * 1024  # a sample takes 2.5-3 KiB, so about a dozen per shard
    manifest = shards.make_shards(str(source), str(tmp_path / "b"), shard_bytes=limit, workers=2)
    counts = [s["num_samples"] for s in manifest["shards"]]
    assert sum(counts) == 200 and len(counts) > 10
    assert all(s["size"] <= limit for s in manifest["shards"])
    assert counts[-1] < max(counts)  # the remainder ends up in a smaller last shard

    both = shards.make_shards(str(source), str(tmp_path / "c"), shard_bytes=limit, samples_per_shard=7, workers=2)
    assert [s["num_samples"] for s in both["shards"]] == [7] * 28 + [4]
    assert all(s["size"] <= limit for s in both["shards"])

    tiny = shards.make_shards(str(source), str(tmp_path / "d"), shard_bytes=1, workers=2)
    assert [s["num_samples"] for s in tiny["shards"]] == [1] * 200  # one sample per shard, never none


def test_make_no_pax_and_deterministic(local, source, tmp_path):
    dest, manifest = local
    for shard in manifest["shards"]:
        kinds = header_kinds(dest / shard["url"])
        assert set(kinds) == {b"0"}, kinds  # no PAX 'x'/'g', no long names for these short keys
        assert len(kinds) == 2 * shard["num_samples"]
        with tarfile.open(dest / shard["url"]) as tar:
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" and not m.pax_headers for m in tar)

    again = shards.make_shards(str(source), str(tmp_path / "again"), samples_per_shard=64, workers=3)
    assert again["shards"] == manifest["shards"]
    for shard in manifest["shards"]:
        for name in (shard["url"], shard["index"]):
            assert (tmp_path / "again" / name).read_bytes() == (dest / name).read_bytes()

    sorted_run = shards.make_shards(str(source), str(tmp_path / "sorted"), shuffle_seed=None, workers=2)
    keys = [key for key, _ in ranged_samples(str(tmp_path / "sorted"), sorted_run)]
    assert keys == sorted(keys)
    shards.make_shards(str(source), str(tmp_path / "other"), shuffle_seed=1, samples_per_shard=64)
    assert (tmp_path / "other" / "shard-000000.tar").read_bytes() != (dest / "shard-000000.tar").read_bytes()


def test_make_from_tar_equals_from_folder(local, source, tmp_path):
    dest, manifest = local
    archive = tmp_path / "train.tar"
    with tarfile.open(archive, "w") as tar:  # like the shared CIFAR tar: train/<class>/<n>.jpg, dirs included
        tar.add(source, arcname="train")
    made = shards.make_shards(str(archive), str(tmp_path / "from_tar"), samples_per_shard=64, workers=2)
    assert made["classes"] == CLASSES
    assert made["shards"] == manifest["shards"]
    for shard in manifest["shards"]:
        assert (tmp_path / "from_tar" / shard["url"]).read_bytes() == (dest / shard["url"]).read_bytes()


def test_make_keys_from_nested_paths_and_odd_names(tmp_path, expected):
    jpg, png = next(iter(expected.values()))[0], _png_bytes()
    long_dir = "d" * 120
    for rel, data in {"cat/a.b.jpg": jpg, f"cat/{long_dir}/x.JPEG": jpg, "dog/sub/y.png": png,
                      "dog/notes.txt": b"not an image", "dog/.hidden.jpg": b"junk", "README.md": b"x"}.items():
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_bytes(data)
    made = shards.make_shards(str(tmp_path / "src"), str(tmp_path / "out"), shuffle_seed=None)
    samples = ranged_samples(str(tmp_path / "out"), made)
    assert [(key, sorted(fields)) for key, fields in samples] == [
        ("cat/a_b", ["cls", "jpg"]), (f"cat/{long_dir}/x", ["cls", "jpeg"]), ("dog/sub/y", ["cls", "png"])]
    assert b"L" in header_kinds(tmp_path / "out" / "shard-000000.tar")  # GNU long name, not PAX
    assert shards.check_shards(str(tmp_path / "out"))["problems"] == []


# ------------------------------------------------------------------ index_shards


def test_index_shards_written_by_webdataset(source, expected, tmp_path):
    import webdataset as wds

    folder = tmp_path / "wds"
    folder.mkdir()
    items = sorted(expected.items())
    for number in range(3):
        with wds.TarWriter(str(folder / f"part-{number}.tar")) as writer:
            for key, (image, label) in items[number::3]:
                writer.write({"__key__": key, "jpg": image, "cls": str(label).encode()})
    assert b"x" in header_kinds(folder / "part-0.tar")  # TarWriter writes PAX headers

    manifest = shards.index_shards(str(folder), workers=2)
    assert set(manifest) == {"format", "shards", "num_samples", "created"}  # classes unknown
    assert [s["url"] for s in manifest["shards"]] == ["part-0.tar", "part-1.tar", "part-2.tar"]
    assert [s["index"] for s in manifest["shards"]] == ["part-0.idx", "part-1.idx", "part-2.idx"]
    assert manifest["num_samples"] == 200

    by_ranges = ranged_samples(str(folder), manifest)
    by_webdataset = webdataset_samples(folder, manifest)
    assert [key for key, _ in by_ranges] == [s["__key__"] for s in by_webdataset]
    assert sorted(key for key, _ in by_ranges) == sorted(expected)
    for key, fields in by_ranges:
        assert fields["jpg"] == expected[key][0]
    offsets = shards.read_offsets(str(folder), manifest["shards"][0])
    assert offsets.dtype == np.uint64 and offsets[0] == 0
    assert shards.check_shards(str(folder))["problems"] == []


def test_index_shards_on_s3_matches_make(local, bucket):
    dest, made = local
    url = f"s3://{bucket}/copied"
    fs, root = storage.filesystem(url, storage.storage_options(url))
    for shard in made["shards"]:
        fs.put_file(str(dest / shard["url"]), f"{root}/{shard['url']}")
    indexed = shards.index_shards(url, storage_options=storage.storage_options(url))
    assert indexed["shards"] == made["shards"]
    for shard in made["shards"]:
        assert fs.cat_file(f"{root}/{shard['index']}") == (dest / shard["index"]).read_bytes()


# ------------------------------------------------------------------ check_shards


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


# ------------------------------------------------------------------ parse_members / group_samples


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


def test_group_samples_follows_webdataset_rules():
    members = [("x/a.b.JPG", b"1"), ("x/a.b.cls", b"2"), ("noext", b""), ("__meta__", b""), ("x/c.jpg", b"3")]
    assert shards.group_samples(members) == [("x/a", {"b.jpg": b"1", "b.cls": b"2"}), ("x/c", {"jpg": b"3"})]
    with pytest.raises(ShardError, match="appears twice"):
        shards.group_samples([("k.jpg", b""), ("k.jpg", b"")])


# ------------------------------------------------------------------ user errors


def test_user_errors_are_clear(tmp_path, local, bucket):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(ShardError, match=r"empty source folder .*empty: no images \(\.jpg, \.jpeg, \.png, \.webp\)"):
        shards.make_shards(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(ShardError, match="source .*nowhere does not exist"):
        shards.make_shards(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    (tmp_path / "dup" / "cat").mkdir(parents=True)
    (tmp_path / "dup" / "cat" / "x.jpg").write_bytes(b"1")
    (tmp_path / "dup" / "cat" / "x.png").write_bytes(b"2")
    with pytest.raises(ShardError, match="same sample key 'cat/x'.*rename one"):
        shards.make_shards(str(tmp_path / "dup"), str(tmp_path / "out"))
    (tmp_path / "junk.tar").write_bytes(b"\x1f\x8b" + bytes(2000))
    with pytest.raises(ShardError, match="not a readable uncompressed tar"):
        shards.make_shards(str(tmp_path / "junk.tar"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "index.json").exists()

    dest, _ = local
    src = tmp_path / "one"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "x.jpg").write_bytes(b"1")
    with pytest.raises(ShardError, match="already holds shards.*overwrite"):
        shards.make_shards(str(src), str(dest))
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket-here' .* does not exist"):
        shards.make_shards(str(src), "s3://no-such-bucket-here/x",
                           storage_options=storage.storage_options("s3://no-such-bucket-here/x"))

    with pytest.raises(ShardError, match=r"no index.json at .*nothing: make shards with `ssl-dist shards make SRC"):
        shards.read_manifest(str(tmp_path / "nothing"))
    with pytest.raises(ShardError, match="no index.json at s3://"):
        shards.read_manifest(f"s3://{bucket}/none", storage.storage_options(f"s3://{bucket}/none"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ShardError, match="format 'other', expected 'ssl_dist.shards/1'"):
        shards.read_manifest(str(tmp_path / "bad"))
    (tmp_path / "bad" / "index.json").write_text(json.dumps({"format": "ssl_dist.shards/1", "shards": [],
                                                             "num_samples": 0}))
    with pytest.raises(ShardError, match="lists no samples"):
        shards.read_manifest(str(tmp_path / "bad"))
    with pytest.raises(ShardError, match="no \\*.tar shards"):
        shards.index_shards(str(tmp_path / "bad"))


def test_overwrite_replaces_old_shards(source, tmp_path):
    first = shards.make_shards(str(source), str(tmp_path / "d"), samples_per_shard=10)
    assert len(first["shards"]) == 20
    second = shards.make_shards(str(source), str(tmp_path / "d"), samples_per_shard=100, overwrite=True)
    assert len(second["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "index.json", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar"]


def _png_bytes() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(out, format="PNG")
    return out.getvalue()
