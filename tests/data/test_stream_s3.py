"""Shards of real CIFAR-10 images in the moto S3 server, read back through the stream."""

from pathlib import Path

import pytest

from ssl_dist import data


def source_labels(src: Path) -> dict[str, tuple[int, bytes]]:
    """key -> (class index, image bytes) of an ImageFolder, keys as `shards make` derives them."""
    classes = sorted(p.name for p in src.iterdir())
    return {f"{p.parent.name}/{p.stem}": (classes.index(p.parent.name), p.read_bytes())
            for p in src.glob("*/*.jpg")}


@pytest.mark.parametrize("world_size, num_workers", [(1, 0), (2, 1)])
def test_every_image_arrives_once_with_its_label(cifar_shards_s3, world_size, num_workers):
    expected = source_labels(cifar_shards_s3["train_src"])
    seen = {}
    for rank in range(world_size):
        loader = data.make_loader(cifar_shards_s3["train"], rank=rank, world_size=world_size, batch_size=10,
                                  num_workers=num_workers, transform=keep_bytes)
        for batch in loader:
            for key, label, raw in zip(batch["__key__"], batch["cls"].tolist(), batch["jpg"]):
                assert key not in seen, f"{key} delivered twice"
                seen[key] = (label, raw)
    assert len(seen) == len(expected) == 200  # 200 is a multiple of every global batch here: nothing dropped
    assert seen == expected


def keep_bytes(sample: dict) -> dict:
    """Keep the decoded label and the image's original bytes (to compare with the source file)."""
    return {"__key__": sample["__key__"], "cls": sample["cls"], "jpg": sample["image_bytes"]}
