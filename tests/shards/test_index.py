"""index_shards on shards made elsewhere (webdataset's TarWriter, PAX headers) and copied to S3 (moto)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from shard_readers import header_kinds, ranged_samples, webdataset_samples

from ssl_dist import shards, storage
from ssl_dist.shards import ShardError


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
    assert set(manifest) == {"format", "shards", "num_samples", "fields", "created"}  # classes unknown
    assert manifest["fields"] == ["cls", "jpg"]
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


def test_index_without_shards_is_clear(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text(json.dumps({"format": "ssl_dist.shards/1", "shards": [],
                                                             "num_samples": 0}))
    with pytest.raises(ShardError, match="no \\*.tar shards"):
        shards.index_shards(str(tmp_path / "bad"))


def test_index_writes_the_digest_of_each_shard_and_sidecar(local, tmp_path):
    dest, made = local
    folder = tmp_path / "copied"
    folder.mkdir()
    for shard in made["shards"]:
        shutil.copy(dest / shard["url"], folder / shard["url"])
    indexed = shards.index_shards(str(folder))
    for shard in indexed["shards"]:
        assert shard["sha256"] == hashlib.sha256((folder / shard["url"]).read_bytes()).hexdigest()
        assert shard["index_sha256"] == hashlib.sha256((folder / shard["index"]).read_bytes()).hexdigest()
    assert shards.read_manifest(str(folder))["shards"] == indexed["shards"]  # as written to index.json


def test_index_refuses_a_shard_larger_than_a_manifest_may_say(tmp_path, monkeypatch):
    from ssl_dist.shards import manifest

    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "part-0.tar").write_bytes(b"\0" * 1024)
    with tarfile.open(folder / "part-1.tar", "w", format=tarfile.GNU_FORMAT) as tar:  # one sample
        info = tarfile.TarInfo("a.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    monkeypatch.setattr(manifest, "MAX_SHARD_BYTES", 2048)  # instead of writing a 64 GiB file
    with pytest.raises(ShardError, match=r"shard #0 \('part-1.tar'\): size 10240: more than"):
        shards.index_shards(str(folder))
    assert not (folder / "index.json").exists()
