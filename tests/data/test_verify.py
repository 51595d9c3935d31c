"""The data a run reads is checked: a manifest that repeats a shard is refused, shards are verified
against their manifest digests on first read (data.verify), and an image whose header claims more
than data.max_pixels is a counted bad sample that never reaches a decoder. Over the S3 protocol
(moto on 127.0.0.1) where reads matter, with real CIFAR JPEGs."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from ssl_dist import data, shards, storage

BATCH = 10


def publish(folder: Path, url: str) -> None:
    fs, root = storage.filesystem(url, storage.storage_options(url))
    for path in sorted(folder.iterdir(), key=lambda p: p.name == "index.json"):  # manifest last
        fs.pipe_file(f"{root}/{path.name}", path.read_bytes())


def keys_only(sample: dict) -> dict:
    return {"__key__": sample["__key__"]}


def epoch(url: str, world: int, workers: int, **kw) -> tuple[list[str], list, dict]:
    """The valid keys every rank delivers in one epoch, the loaders, and {shard: reason} of what they skipped."""
    loaders = [data.make_loader(url, rank=r, world_size=world, batch_size=BATCH, num_workers=workers,
                                transform=keys_only, **kw) for r in range(world)]
    keys, reasons = [], {}
    for loader in loaders:
        for b in loader:
            keys += [k for k, v in zip(b["__key__"], b["__valid__"].tolist()) if v]
            reasons.update({name: reason for name, (_, reason) in loader.state_dict()["problems"].items()})
    return keys, loaders, reasons


def keys_of(folder: Path, entry: dict) -> set[str]:
    return {key for key, _ in shards.group_samples(shards.parse_members((folder / entry["url"]).read_bytes()))}


def with_digests(folder: Path) -> dict:
    """Write each shard's and sidecar's sha256 into the manifest of `folder`; returns it."""
    manifest = json.loads((folder / "index.json").read_text())
    for entry in manifest["shards"]:
        entry["sha256"] = hashlib.sha256((folder / entry["url"]).read_bytes()).hexdigest()
        entry["index_sha256"] = hashlib.sha256((folder / entry["index"]).read_bytes()).hexdigest()
    (folder / "index.json").write_text(json.dumps(manifest))
    return manifest


def test_a_repeated_shard_is_refused_instead_of_read_twice(cifar_local, tmp_path):
    folder = tmp_path / "twice"
    shutil.copytree(cifar_local[0], folder)
    manifest = json.loads((folder / "index.json").read_text())
    manifest["shards"].append(manifest["shards"][0])  # its 23 samples were delivered twice: 223 of 200
    manifest["num_samples"] += manifest["shards"][0]["num_samples"]
    (folder / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(data.DataError, match=r"shard #9 \(url 'shard-000000.tar'\) is listed twice \(also shard #0\)"):
        epoch(str(folder), 1, 0)


def test_verify_skips_a_shard_whose_bytes_changed_and_counts_it(cifar_local, tmp_path, bucket):
    folder = tmp_path / "changed"
    shutil.copytree(cifar_local[0], folder)
    manifest = with_digests(folder)
    tar = folder / manifest["shards"][3]["url"]
    changed = bytearray(tar.read_bytes())
    assert changed[:100].rstrip(b"\0").endswith(b".cls")
    changed[512] = ord("9") if changed[512] != ord("9") else ord("8")  # a label: same size, still decodes
    tar.write_bytes(bytes(changed))
    manifest["shards"][6]["index_sha256"] = "0" * 64  # a sidecar that is not the one indexed
    (folder / "index.json").write_text(json.dumps(manifest))
    url = f"s3://{bucket}/changed"
    publish(folder, url)
    everything = {key for entry in manifest["shards"] for key in keys_of(folder, entry)}
    bad = keys_of(folder, manifest["shards"][3]) | keys_of(folder, manifest["shards"][6])

    keys, _, _ = epoch(url, 1, 0)  # data.verify=false (the default): the changed shard is delivered
    assert sorted(keys) == sorted(everything)
    for world, workers in ((1, 0), (2, 1)):
        keys, loaders, reasons = epoch(url, world, workers, verify=True, max_skip_fraction=0.3)
        assert len(keys) == len(set(keys)) and set(keys) == everything - bad
        assert sum(loader.stats()["skipped_samples"] for loader in loaders) == 46
        assert sum(loader.stats()["skipped_shards"] for loader in loaders) == 2
        assert "does not match the sha256 in the manifest" in reasons["shard-000003.tar"]
        assert "sidecar shard-000006.idx does not match the index_sha256" in reasons["shard-000006.tar"]


def test_verify_needs_digests_in_the_manifest(cifar_local, tmp_path):
    folder = tmp_path / "older"
    shutil.copytree(cifar_local[0], folder)
    manifest = json.loads((folder / "index.json").read_text())
    for entry in manifest["shards"]:  # as manifests written before digests were
        entry.pop("sha256", None)
        entry.pop("index_sha256", None)
    (folder / "index.json").write_text(json.dumps(manifest))
    assert data.make_loader(str(folder), rank=0, world_size=1, batch_size=4).shards.total == 200  # still valid
    with pytest.raises(data.DataError, match=r"data.verify=true but .* has no sha256 for 9 of its 9 shards "
                                             r"\(shard-000000.tar, ...\): index them again with `ssl-dist shards "
                                             r"index"):
        data.make_loader(str(folder), rank=0, world_size=1, batch_size=4, verify=True)


MEASURE = """
import io, json, resource, sys
from ssl_dist import data
import torch
from PIL import Image
loader = data.make_loader(sys.argv[1], rank=0, world_size=1, batch_size=5, image_format="tensor",
                          max_skip_fraction=1)
small = io.BytesIO()
Image.new("RGB", (32, 32)).save(small, format="JPEG")
data.decode_samples([("warm", {"jpg": small.getvalue()})] * 5, "tensor")  # the decoder's first-use costs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
keys, problems = [], {}
for b in loader:
    keys += [k for k, v in zip(b["__key__"], b["__valid__"].tolist()) if v]
    problems.update(loader.state_dict()["problems"])
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"keys": len(keys), "stats": loader.stats(), "problems": problems, "grown_kib": grown}))
"""


def test_a_jpeg_claiming_20000_squared_pixels_is_a_counted_bad_sample_in_small_memory(cifar_local, tmp_path):
    """631 bytes that claim 20000 x 20000 pixels: the stream's JPEG decoder allocated 1.2 GB for it."""
    from test_decode import claiming

    folder = tmp_path / "claims"
    folder.mkdir()
    good = sorted(keys_of(cifar_local[0], cifar_local[1]["shards"][0]))[:19]
    members = dict(shards.group_samples(shards.parse_members(
        (cifar_local[0] / cifar_local[1]["shards"][0]["url"]).read_bytes())))
    with tarfile.open(folder / "part-0.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, fields in [*((k, members[k]) for k in good), ("huge/claim", {"cls": b"0",
                                                                             "jpg": claiming(20000, 20000)})]:
            for ext, value in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    shards.index_shards(str(folder))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["keys"] == 19 and seen["stats"]["skipped_samples"] == 1
    (count, reason), = seen["problems"].values()
    assert reason == ("huge/claim.jpg: image is 20000 x 20000 pixels, more than data.max_pixels=67108864: shrink it "
                      "or raise data.max_pixels")
    assert seen["grown_kib"] < 100 * 1024, seen  # it grew by 1.2 GB before
