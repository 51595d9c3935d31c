"""The manifest (read and refused with one clear message) and the one sidecar reader, read_offsets."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ssl_dist import shards, storage
from ssl_dist.shards import ShardError
from ssl_dist.shards.manifest import validate_manifest


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
    sidecar.write_bytes((dest / second["index"]).read_bytes() + bytes(8))
    with pytest.raises(ShardError, match="holds 65 offsets but the manifest says 64 samples"):
        shards.read_offsets(str(broken), second)


# ------------------------------------------------------------------ what a manifest may say


def manifest_with(manifest: dict, number: int = 0, **changes) -> dict:
    """A copy of `manifest` with entry `number` changed (num_samples kept consistent)."""
    entries = [dict(entry) for entry in manifest["shards"]]
    entries[number].update(changes)
    total = sum(e["num_samples"] for e in entries if isinstance(e["num_samples"], int))
    return {**manifest, "shards": entries, "num_samples": total}


OUTSIDE = {  # a name -> what the message says about it
    "../other/shard-000000.tar": "'..'",
    "sub/../../shard-000000.tar": "'..'",
    "/etc/shard-000000.tar": "absolute",
    "s3://other-bucket/shard-000000.tar": "scheme",
    "file:///tmp/shard-000000.tar": "scheme",
    "sub\\shard-000000.tar": "backslash",
    "sub//shard-000000.tar": "empty",
    "./shard-000000.tar": "'.'",
    "": "empty",
}


@pytest.mark.parametrize("field", ["url", "index"])
@pytest.mark.parametrize("name", list(OUTSIDE))
def test_manifest_entries_must_name_files_inside_the_folder(local, field, name):
    dest, manifest = local
    bad = manifest_with(manifest, 1, **{field: name})
    with pytest.raises(ShardError) as refused:
        validate_manifest(bad, str(dest))
    message = str(refused.value)
    assert f"shard #1 ({field} {name!r})" in message and OUTSIDE[name] in message, message
    assert "inside" in message and "ssl-dist shards index" in message, message
    ok = manifest_with(manifest, 1, url="sub/part-1.tar", index="sub/part-1.idx")  # a subfolder stays inside
    validate_manifest(ok, str(dest))


def test_manifest_refuses_a_shard_or_sidecar_listed_twice(local):
    dest, manifest = local
    twice = {**manifest, "shards": manifest["shards"] + [manifest["shards"][0]],
             "num_samples": manifest["num_samples"] + manifest["shards"][0]["num_samples"]}
    with pytest.raises(ShardError, match=r"shard #4 \(url 'shard-000000.tar'\) is listed twice \(also shard #0\)"):
        validate_manifest(twice, str(dest))
    shared_sidecar = manifest_with(manifest, 2, index=manifest["shards"][1]["index"])
    with pytest.raises(ShardError, match=r"shard #2 \(index 'shard-000001.idx'\) is listed twice \(also shard #1\)"):
        validate_manifest(shared_sidecar, str(dest))


BAD_ENTRIES = [  # (change to entry #1, what the message says)
    ({"num_samples": True}, r"num_samples True: must be a whole number"),
    ({"num_samples": 2.0}, r"num_samples 2.0: must be a whole number"),
    ({"num_samples": -1}, r"num_samples -1: must be at least 0"),
    ({"size": False}, r"size False: must be a whole number"),
    ({"size": 10**12}, r"size 1000000000000: more than 64 GiB"),
    ({"size": 512 * 64 - 1}, r"size 32767: too small for 64 samples \(each starts with a 512-byte tar header"),
    ({"sha256": "AB" * 32}, r"sha256 'ABAB.*': must be 64 lowercase hex digits"),
    ({"sha256": "ab" * 31}, r"sha256 'abab.*': must be 64 lowercase hex digits"),
    ({"index_sha256": 7}, r"index_sha256 7: must be 64 lowercase hex digits"),
]


@pytest.mark.parametrize("change, said", BAD_ENTRIES, ids=[str(c) for c, _ in BAD_ENTRIES])
def test_manifest_refuses_impossible_counts_sizes_and_digests(local, change, said):
    dest, manifest = local
    with pytest.raises(ShardError, match=rf"index.json: shard #1 \('shard-000001.tar'\): {said}.*: re-create it"):
        validate_manifest(manifest_with(manifest, 1, **change), str(dest))


def test_manifest_refuses_a_boolean_total_and_keeps_older_manifests_valid(local):
    dest, manifest = local
    one = manifest_with(manifest, 0, num_samples=1, size=2048)
    one = {**one, "shards": one["shards"][:1], "num_samples": True}  # True == 1: the sum check alone lets it in
    with pytest.raises(ShardError, match=r"num_samples is True but its shards hold 1"):
        validate_manifest(one, str(dest))
    older = {**manifest, "shards": [{k: v for k, v in e.items() if k not in ("sha256", "index_sha256")}
                                    for e in manifest["shards"]]}
    validate_manifest(older, str(dest))  # no digests: still valid
    digests = manifest_with(manifest, 0, sha256="0" * 64, index_sha256="a" * 64)
    validate_manifest(digests, str(dest))
    empty = manifest_with(manifest, 3, num_samples=0, size=0)  # a shard without samples is allowed
    validate_manifest(empty, str(dest))


def test_check_never_reads_outside_the_dataset_folder(local, bucket, s3_endpoint, tmp_path):
    """A manifest naming the shards of another folder ('..') or of another bucket (an absolute name)
    is refused before anything is read; `shards check` read (and passed) those shards before."""
    import boto3

    dest, made = local
    shutil.copytree(dest, tmp_path / "private")
    (tmp_path / "mine").mkdir()
    for entry in made["shards"]:
        shutil.copy(dest / entry["index"], tmp_path / "mine" / entry["index"])
    entries = [{**e, "url": "../private/" + e["url"]} for e in made["shards"]]
    (tmp_path / "mine" / "index.json").write_text(json.dumps({**made, "shards": entries}))
    with pytest.raises(ShardError, match=r"index.json: shard #0 \(url '../private/shard-000000.tar'\) .*inside"):
        shards.check_shards(str(tmp_path / "mine"))

    url = f"s3://{bucket}/mine"
    options = storage.storage_options(url)
    fs, root = storage.filesystem(url, options)
    other = f"{bucket}-other"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=other)
    for entry in made["shards"]:
        fs.put_file(str(dest / entry["url"]), f"{other}/private/{entry['url']}")
        fs.put_file(str(dest / entry["index"]), f"{root}/{entry['index']}")
    entries = [{**e, "url": f"/{other}/private/{e['url']}"} for e in made["shards"]]
    fs.pipe_file(f"{root}/index.json", json.dumps({**made, "shards": entries}).encode())
    with pytest.raises(ShardError, match=rf"shard #0 \(url '/{other}/private/shard-000000.tar'\) .*absolute"):
        shards.check_shards(url, storage_options=options)


def test_a_whole_sidecar_costs_one_request_on_s3(local, tmp_path):
    # At scale the sidecar reads are as many as the shard reads (docs/scaling.md): s3fs's
    # cat_file of a whole object first asks for its size (a HEAD) before the GET. The
    # manifest knows the size, so a sidecar is one ranged GET, counted by moto's recorder.
    import boto3
    import requests
    import s3fs
    from services import TEST_ACCESS_KEY, TEST_SECRET_KEY, start_moto

    dest, manifest = local
    recording = tmp_path / "requests.jsonl"
    proc, endpoint = start_moto({"MOTO_RECORDER_FILEPATH": str(recording)})
    try:
        fs = s3fs.S3FileSystem(key=TEST_ACCESS_KEY, secret=TEST_SECRET_KEY,
                               client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=TEST_ACCESS_KEY,
                     aws_secret_access_key=TEST_SECRET_KEY, region_name="us-east-1").create_bucket(Bucket="sidecars")
        fs.put(str(dest) + "/", "sidecars/set/", recursive=True)
        shard = manifest["shards"][1]
        requests.post(f"{endpoint}/moto-api/recorder/start-recording").raise_for_status()
        offsets = shards.read_offsets("s3://sidecars/set", shard, fs=fs)
        requests.post(f"{endpoint}/moto-api/recorder/stop-recording").raise_for_status()
    finally:
        proc.terminate()
    assert offsets.tobytes() == (dest / shard["index"]).read_bytes()
    made = [json.loads(line) for line in recording.read_text().splitlines()]
    assert [(r["method"], r["url"].split("?")[0].rsplit("/", 1)[-1]) for r in made] == [("GET", shard["index"])]
