"""make_shards against real CIFAR JPEGs, locally and over the S3 protocol (moto).

Every test reads the shards back with an independent reader (webdataset, tarfile) or with the
ranged-read path the data stream uses (sidecar offsets -> `parse_members` -> `group_samples`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tracemalloc

import pytest
from shard_readers import CLASSES, header_kinds, image_bytes, ranged_samples, webdataset_samples

from ssl_dist import cli, decode, shards, storage
from ssl_dist.shards import ShardError, make
from ssl_dist.shards.make import SOURCE_IMAGE_EXTENSIONS


def test_make_local_manifest_and_contents(local, expected):
    dest, manifest = local
    assert set(manifest) == {"format", "shards", "num_samples", "fields", "classes", "created", "dropped"}
    assert manifest["dropped"] == {}  # nothing in the CIFAR slice is left out
    assert manifest["fields"] == ["cls", "jpg"]
    assert manifest["format"] == "ssl_dist.shards/1"
    assert manifest["classes"] == CLASSES
    assert manifest["num_samples"] == len(expected) == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created"])
    assert [s["num_samples"] for s in manifest["shards"]] == [64, 64, 64, 8]
    for number, shard in enumerate(manifest["shards"]):
        assert shard == {"url": f"shard-{number:06d}.tar", "num_samples": shard["num_samples"],
                         "size": (dest / shard["url"]).stat().st_size, "index": f"shard-{number:06d}.idx",
                         "sha256": hashlib.sha256((dest / shard["url"]).read_bytes()).hexdigest(),
                         "index_sha256": hashlib.sha256((dest / shard["index"]).read_bytes()).hexdigest()}
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
    fs, root = storage.filesystem(url, storage.storage_options(url))
    for shard in manifest["shards"]:  # the digests of the bytes as they went out are those of the objects
        assert shard["sha256"] == hashlib.sha256(fs.cat_file(f"{root}/{shard['url']}")).hexdigest()
        assert shard["index_sha256"] == hashlib.sha256(fs.cat_file(f"{root}/{shard['index']}")).hexdigest()

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


# ---- what make refuses, leaves out and never leaves behind (issue 14) ---------------------------


def small_source(source, root, per_class: int = 7):
    """The first `per_class` CIFAR JPEGs of two classes, as an ImageFolder at `root`."""
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for image in sorted((source / cls).glob("*.jpg"))[:per_class]:
            shutil.copy(image, root / cls / image.name)
    return root


def test_truncated_source_tar_is_refused(source, tmp_path, capsys):
    src = small_source(source, tmp_path / "src")
    archive = tmp_path / "train.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="train")
    data = archive.read_bytes()
    with tarfile.open(archive) as tar:
        files = [m for m in tar if m.isfile()]
    assert len(files) == 14
    last = files[-1]
    end_marker = last.offset_data + -(-last.size // 512) * 512
    cuts = {"at a member boundary": files[3].offset,  # the first 3 images complete, nothing cut mid-way
            "inside a member": files[3].offset_data + 100,
            "inside the end-of-archive marker": end_marker + 512}
    for how, cut in cuts.items():
        cut_tar = tmp_path / "cut.tar"
        cut_tar.write_bytes(data[:cut])
        dest = tmp_path / "out"
        assert cli.main(["shards", "make", str(cut_tar), str(dest)]) == 2, how
        err = capsys.readouterr().err
        assert re.search(f"source tar {re.escape(str(cut_tar))} is cut short .*: copy or download it again", err), \
            (how, err)
        assert err.count("\n") == 1, err  # one message
        assert not dest.exists() or not any(dest.iterdir()), (how, sorted(dest.iterdir()))
    cut_tar.write_bytes(data[:end_marker + 1024])  # both zero blocks, no record padding: complete
    assert shards.make_shards(str(cut_tar), str(tmp_path / "whole"))["num_samples"] == 14


def test_links_are_not_followed_and_links_out_are_warned(source, tmp_path, caplog, capsys):
    src = small_source(source, tmp_path / "src", per_class=2)
    packed = sorted(f"{p.parent.name}/{p.stem}" for p in src.glob("*/*.jpg"))
    outside = tmp_path / "outside"
    (outside / "more").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(b"SECRET-BYTES" * 100)
    shutil.copy(next((source / "bird").glob("*.jpg")), outside / "more" / "x.jpg")
    (src / "cat" / "evil.jpg").symlink_to(outside / "secret.jpg")  # a file link out
    (src / "bird").symlink_to(outside / "more", target_is_directory=True)  # a class folder linked in from outside
    first = sorted((src / "cat").glob("*.jpg"))[0].name
    (src / "cat" / "again.jpg").symlink_to(first)  # inside: would pack that image twice
    (src / "dog" / "loop").symlink_to("..", target_is_directory=True)  # inside: a loop
    dest = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ssl_dist.shards"):
        assert cli.main(["shards", "make", str(src), str(dest)]) == 0
    manifest = shards.read_manifest(str(dest))
    assert manifest["classes"] == ["cat", "dog"]
    assert sorted(key for key, _ in ranged_samples(str(dest), manifest)) == packed
    for path in dest.iterdir():
        assert b"SECRET-BYTES" not in path.read_bytes(), path
    assert manifest["dropped"] == {
        "link_outside": {"count": 2, "examples": ["bird", "cat/evil.jpg"]},
        "link_inside": {"count": 2, "examples": ["cat/again.jpg", "dog/loop"]}}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "2 links" in warning and "outside" in warning and "cat/evil.jpg" in warning, warning
    out = capsys.readouterr().out
    assert "left out 4 files or folders" in out, out
    assert re.search(r"2 links pointing outside the source.*\(e\.g\. bird, cat/evil\.jpg\)", out), out
    assert re.search(r"2 links inside the source.*\(e\.g\. cat/again\.jpg, dog/loop\)", out), out


def test_make_reports_what_it_dropped_and_why(source, tmp_path):
    src = small_source(source, tmp_path / "src", per_class=3)
    jpg = next((source / "cat").glob("*.jpg")).read_bytes()
    for rel, data in {"README.md": b"about", "cat/notes.txt": b"no image", ".git/config": b"x",
                      "cat/.DS_Store": b"x", "top.jpg": jpg, "cat/empty.jpg": b""}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    os.mkfifo(src / "dog" / "pipe.jpg")  # read, it would block make forever
    made = shards.make_shards(str(src), str(tmp_path / "out"))
    assert made["num_samples"] == 6
    assert made["dropped"] == {
        "empty": {"count": 1, "examples": ["cat/empty.jpg"]},
        "hidden": {"count": 2, "examples": [".git", "cat/.DS_Store"]},
        "not_image": {"count": 2, "examples": ["README.md", "cat/notes.txt"]},
        "not_regular": {"count": 1, "examples": ["dog/pipe.jpg"]},
        "outside_class_folder": {"count": 1, "examples": ["top.jpg"]}}
    assert shards.read_manifest(str(tmp_path / "out")) == made  # the record of what was left out is kept

    archive = tmp_path / "src.tar"  # in a tar: links are members, never followed
    with tarfile.open(archive, "w") as tar:
        for path in sorted((src / "cat").glob("*.jpg"))[:3]:
            tar.add(path, arcname=f"cat/{path.name}")
        for kind, name in ((tarfile.SYMTYPE, "cat/sym.jpg"), (tarfile.LNKTYPE, "cat/hard.jpg")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
        info = tarfile.TarInfo("cat/.hidden.jpg")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    made = shards.make_shards(str(archive), str(tmp_path / "from_tar"))
    assert made["num_samples"] == 3
    assert made["dropped"] == {"hidden": {"count": 1, "examples": ["cat/.hidden.jpg"]},
                               "tar_link": {"count": 2, "examples": ["cat/hard.jpg", "cat/sym.jpg"]}}


def sparse(path, size: int):
    """A file of `size` zero bytes that takes no disk space."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def test_large_members_are_streamed_in_bounded_memory(source, tmp_path):
    src = small_source(source, tmp_path / "src", per_class=1)
    big = 48 * 2**20
    sparse(src / "cat" / "big.jpg", big)
    tracemalloc.start()
    try:
        made = shards.make_shards(str(src), str(tmp_path / "out"), workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.0f} MiB for a {big / 2**20:.0f} MiB member"
    shard = tmp_path / "out" / made["shards"][0]["url"]
    with tarfile.open(shard) as tar:
        member = tar.getmember("cat/big.jpg")
        assert member.size == big
        stream = tar.extractfile(member)
        assert all(chunk.count(0) == len(chunk) for chunk in iter(lambda: stream.read(2**20), b""))
    digest = hashlib.sha256()
    with open(shard, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    assert made["shards"][0]["sha256"] == digest.hexdigest()


def test_members_over_the_size_limit_are_dropped_unread(source, tmp_path):
    src = small_source(source, tmp_path / "src", per_class=1)
    sparse(src / "cat" / "huge.jpg", 6 * 2**30)  # not a training image: 6 GiB
    tracemalloc.start()
    try:
        made = shards.make_shards(str(src), str(tmp_path / "out"), workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * 2**20
    assert made["num_samples"] == 2
    assert made["dropped"] == {"too_large": {"count": 1, "examples": ["cat/huge.jpg"]}}


@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("failure", ["unreadable", "shrunk"])
def test_a_failed_write_leaves_no_partial_object(store, failure, tmp_path, monkeypatch, request):
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    for n in range(6):  # 3 MiB each: on S3 the fourth starts after a 5 MiB part went up
        (src / f"{n}.jpg").write_bytes(os.urandom(3 * 2**20))
    failing = src / "3.jpg"
    planned = make.plan_shards

    def plan_then_break_the_source(*args, **kwargs):
        plan = planned(*args, **kwargs)
        if failure == "unreadable":
            failing.unlink()
            failing.mkdir()  # reading it fails (even as root)
        else:
            with open(failing, "r+b") as f:
                f.truncate(2**20)  # cut mid-way: the planned member is longer than the file
        return plan

    monkeypatch.setattr(make, "plan_shards", plan_then_break_the_source)
    if store == "local":
        url, options = str(tmp_path / "out"), None
    else:
        url = f"s3://{request.getfixturevalue('bucket')}/out"
        options = {**storage.storage_options(url), "default_block_size": 5 * 2**20}
    with pytest.raises(ShardError, match="cat/3.jpg"):
        shards.make_shards(str(tmp_path / "src"), url, shuffle_seed=None, workers=1, storage_options=options)
    fs, root = storage.filesystem(url, options)
    fs.invalidate_cache()
    assert fs.find(root) == []  # no shard, no sidecar, no manifest, no temp file
    if store == "s3":
        assert fs.list_multipart_uploads(root.split("/")[0]) == []  # aborted, not left pending
