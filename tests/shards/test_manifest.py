"""The manifest (read and refused with one clear message) and the one sidecar reader, read_offsets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ssl_dist import shards, storage
from ssl_dist.shards import ShardError


def test_read_manifest_user_errors_are_clear(tmp_path, bucket):
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


def test_read_offsets_whole_or_a_range_on_the_callers_filesystem(local):
    dest, manifest = local
    shard = manifest["shards"][1]
    whole = shards.read_offsets(str(dest), shard)
    assert whole.dtype == np.uint64 and len(whole) == 64 and whole[0] == 0
    assert whole.tobytes() == (dest / shard["index"]).read_bytes()  # little-endian uint64, as written
    fs, _ = storage.filesystem(str(dest))
    part = shards.read_offsets(str(dest), shard, fs=fs, first=10, stop=20)  # how the stream reads large sidecars
    assert part.dtype == np.uint64 and part.tolist() == whole[10:20].tolist()
    assert shards.read_offsets(f"file://{dest}", shard, first=63).tolist() == whole[63:].tolist()
    with pytest.raises(ValueError):
        shards.read_offsets(str(dest), shard, first=5, stop=65)


def test_read_offsets_refuses_a_missing_or_wrong_sidecar(local, tmp_path):
    dest, manifest = local
    broken = tmp_path / "broken"
    shutil.copytree(dest, broken)
    first, second = manifest["shards"][:2]
    (broken / first["index"]).unlink()
    with pytest.raises(ShardError, match=r"sidecar .*broken/shard-000000\.idx is missing: re-create it with "
                                         r"`ssl-dist shards index"):
        shards.read_offsets(str(broken), first)
    sidecar = broken / second["index"]
    sidecar.write_bytes(sidecar.read_bytes()[:-8])
    with pytest.raises(ShardError, match="holds 63 offsets but the manifest says 64 samples: re-create it"):
        shards.read_offsets(str(broken), second)
    assert len(shards.read_offsets(str(broken), second, first=0, stop=63)) == 63
    with pytest.raises(ShardError, match="shorter than the manifest's 64 samples say"):
        shards.read_offsets(str(broken), second, first=60, stop=64)
