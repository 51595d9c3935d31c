"""make_shards against real CIFAR JPEGs, locally and over the S3 protocol (moto).

Every test reads the shards back with an independent reader (webdataset, tarfile) or with the
ranged-read path the data stream uses (sidecar offsets -> `parse_members` -> `group_samples`).
"""

from __future__ import annotations

import json
import re
import tarfile

import pytest
from shard_readers import CLASSES, header_kinds, image_bytes, ranged_samples, webdataset_samples

from ssl_dist import decode, shards, storage
from ssl_dist.shards import ShardError
from ssl_dist.shards.make import SOURCE_IMAGE_EXTENSIONS


def test_make_local_manifest_and_contents(local, expected):
    dest, manifest = local
    assert set(manifest) == {"format", "shards", "num_samples", "fields", "classes", "created"}
    assert manifest["fields"] == ["cls", "jpg"]
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
    jpg, png = next(iter(expected.values()))[0], image_bytes("PNG")
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


def test_make_user_errors_are_clear(tmp_path, local, bucket):
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


def test_overwrite_replaces_old_shards(source, tmp_path):
    first = shards.make_shards(str(source), str(tmp_path / "d"), samples_per_shard=10)
    assert len(first["shards"]) == 20
    second = shards.make_shards(str(source), str(tmp_path / "d"), samples_per_shard=100, overwrite=True)
    assert len(second["shards"]) == 2
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "index.json", "shard-000000.idx", "shard-000000.tar", "shard-000001.idx", "shard-000001.tar"]


def test_make_packs_only_image_types_the_stream_decodes():
    """Every image file make_shards packs is of a type the stream decodes (decode.py decides)."""
    assert set(SOURCE_IMAGE_EXTENSIONS) <= set(decode.IMAGE_EXTS)
