"""Shards in Google Cloud Storage (the real emulator): `ssl-dist shards make` uploads them,
`shards index` indexes shards copied there, `shards check` decodes them, and the stream reads
every image back exactly once, with its label and its bytes as they were."""

from __future__ import annotations

from pathlib import Path

from ssl_dist import cli, data, shards, storage


def source_labels(src: Path) -> dict[str, tuple[int, bytes]]:
    """key -> (class index, image bytes) of an ImageFolder, keys as `shards make` derives them."""
    classes = sorted(p.name for p in src.iterdir())
    return {f"{p.parent.name}/{p.stem}": (classes.index(p.parent.name), p.read_bytes())
            for p in src.glob("*/*.jpg")}


def keep_bytes(sample: dict) -> dict:
    return {"__key__": sample["__key__"], "cls": sample["cls"], "jpg": sample["image_bytes"]}


def test_shards_made_into_gs_are_streamed_back_exactly_once(cifar_gs, gcs_bucket, capsys):
    src = cifar_gs["train_src"]
    url = f"gs://{gcs_bucket}/made"
    assert cli.main(["shards", "make", str(src), url, "--samples-per-shard", "45"]) == 0
    assert f"wrote 5 shards, 200 samples, to {url}" in capsys.readouterr().out
    fs, root = storage.filesystem(url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == \
        ["index.json"] + [f"shard-{i:06d}.{ext}" for i in range(5) for ext in ("idx", "tar")]
    assert cli.main(["shards", "check", url]) == 0
    assert "5 shards, 200 samples, 0 problems" in capsys.readouterr().out

    expected = source_labels(src)
    seen = {}
    for rank in range(2):
        loader = data.make_loader(url, rank=rank, world_size=2, batch_size=10, num_workers=1, transform=keep_bytes,
                                  verify=True)
        for batch in loader:
            for key, label, raw in zip(batch["__key__"], batch["cls"].tolist(), batch["jpg"]):
                assert key not in seen, f"{key} delivered twice"
                seen[key] = (label, raw)
        assert loader.stats()["skipped_samples"] == 0
    assert len(seen) == 200 and seen == expected  # 200: a multiple of the global batch, nothing dropped


def test_shards_copied_into_gs_are_indexed_there(cifar_gs, gcs_bucket, capsys):
    made = shards.read_manifest(cifar_gs["train"])
    fs, source = storage.filesystem(cifar_gs["train"])
    url = f"gs://{gcs_bucket}/copied"
    for entry in made["shards"]:  # the tars only, as another tool would have written them
        fs.copy(f"{source}/{entry['url']}", f"{gcs_bucket}/copied/{entry['url']}")
    assert cli.main(["shards", "index", url]) == 0
    assert f"indexed 5 shards, 200 samples, at {url}" in capsys.readouterr().out
    indexed = shards.read_manifest(url)
    assert indexed["shards"] == made["shards"]  # the same sizes, counts, sidecars and digests
    for entry in made["shards"]:
        assert fs.cat_file(f"{gcs_bucket}/copied/{entry['index']}") == fs.cat_file(f"{source}/{entry['index']}")
