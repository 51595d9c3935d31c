"""What the shard tests compare shards with: independent readers (webdataset itself, a walk over
the raw tar header blocks) and the ranged-read path the data stream takes."""

from __future__ import annotations

import io
from pathlib import Path

from ssl_dist import shards, storage

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


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


def image_bytes(fmt: str) -> bytes:
    """A tiny red image encoded by PIL in format `fmt` ("PNG", "PPM", "BMP", ...)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(out, format=fmt)
    return out.getvalue()
