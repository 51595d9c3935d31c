"""decode.py, the one definition of a good sample: the stream's decoder against PIL on real
CIFAR JPEGs, and `sample_problems` (what `shards check` reports) against what the stream skips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from cifar import cifar_slice
from PIL import Image

from ssl_dist import data, decode, jpeg, shards


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[tuple[str, dict[str, bytes]]]:
    """The raw samples of one shard of real CIFAR JPEGs (23 of them), as the stream parses them."""
    root = tmp_path_factory.mktemp("decode")
    shards.make_shards(str(cifar_slice(root / "src", 3)), str(root / "shards"), samples_per_shard=23, workers=1)
    return shards.group_samples(shards.parse_members((root / "shards" / "shard-000000.tar").read_bytes()))


def encoded(fmt: str, size=(5, 4)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(out, format=fmt)
    return out.getvalue()


def test_decoder_gives_the_pixels_pil_gives(samples):
    assert len(samples) == 23
    decoded = data.decode_samples(samples, "tensor")
    as_pil = data.decode_samples(samples, "pil")
    for (key, fields), tensor, pil in zip(samples, decoded, as_pil):
        reference = np.asarray(Image.open(io.BytesIO(fields["jpg"])).convert("RGB"))
        assert tensor["image"].dtype == torch.uint8 and tensor["image"].shape == (3, 32, 32)
        assert np.array_equal(tensor["image"].permute(1, 2, 0).numpy(), reference), key
        assert np.array_equal(np.asarray(pil["image"]), reference) and pil["cls"] == tensor["cls"]
    assert jpeg.jpeg_decoder().name == "simplejpeg"  # a dependency: the stream's decoder here
    for decoder in (jpeg.simplejpeg_decoder(), jpeg.torchvision_decoder()):  # and its fallback
        for key, fields in samples:
            reference = Image.open(io.BytesIO(fields["jpg"]))
            assert decoder.size(fields["jpg"]) == reference.size, (decoder.name, key)
            assert np.array_equal(decoder.decode(fields["jpg"]).permute(1, 2, 0).numpy(),
                                  np.asarray(reference.convert("RGB"))), (decoder.name, key)
    png = encoded("PNG")
    sample = data.decode_sample("k", {"png": png, "cls": b" 7\n", "txt": b"hi"}, "tensor")
    # .txt is text (it was bytes until decode.py); the other assertions are the stream test's of before
    assert sample["image"].shape == (3, 4, 5) and sample["cls"] == 7 and sample["txt"] == "hi"
    bad = data.decode_samples([("a", {"jpg": b"no jpeg"}), ("b", {"cls": b"1"}), ("c", {"jpg": samples[0][1]["jpg"],
                                                                                    "cls": b"x"})])
    assert "a.jpg: image does not decode" in bad[0] and "b: no image member" in bad[1]
    assert "c: .cls b'x' is not an integer" in bad[2]


def test_sample_problems_say_what_the_stream_skips(samples):
    jpg = samples[0][1]["jpg"]
    cases = {  # key -> (members, the problems with num_classes=None, the extra ones with num_classes=10)
        "good": ({"jpg": jpg, "cls": b"3"}, [], []),
        "png": ({"png": encoded("PNG"), "json": b'{"a": 1}', "txt": "é".encode()}, [],
                [": no .cls member although the manifest lists classes"]),
        "bmp": ({"bmp": encoded("BMP"), "cls": b"12"}, [], [".cls: class 12 outside the manifest's 10 classes"]),
        "none": ({"cls": b"1"}, [": no image member (jpg/jpeg/png/webp/ppm/bmp), only cls"], []),
        "broken": ({"jpg": b"no jpeg", "cls": b"1"},
                   [".jpg: image does not decode (UnidentifiedImageError: cannot identify image file)"], []),
        "label": ({"jpg": jpg, "cls": b"x"}, [".cls: b'x' is not an integer class index"], []),
        "json": ({"jpg": jpg, "cls": b"1", "json": b"{"}, [".json: does not parse (Expecting property name "
                                                           "enclosed in double quotes: line 1 column 2 (char 1))"], []),
        "text": ({"jpg": jpg, "cls": b"1", "txt": b"\xff"}, [".txt: is not UTF-8 text (invalid start byte at byte 0)"],
                 []),
    }
    for key, (fields, problems, with_classes) in cases.items():
        assert decode.sample_problems(key, fields) == problems, key
        assert decode.sample_problems(key, fields, num_classes=10) == problems + with_classes, key
        (decoded,) = decode.decode_samples([(key, fields)])
        assert isinstance(decoded, str) == bool(problems), key  # a problem is exactly a sample the stream skips
        if problems:
            with pytest.raises(data.DataError) as caught:  # DecodeError is a DataError (and a ValueError)
                decode.decode_sample(key, fields)
            assert isinstance(caught.value, decode.DecodeError) and isinstance(caught.value, ValueError)
            assert str(caught.value) == decoded and caught.value.problem == problems[0]
    # every member is looked at, not only the first problem
    assert decode.sample_problems("k", {"jpg": b"x", "cls": b"y"}, num_classes=3) == [
        ".jpg: image does not decode (UnidentifiedImageError: cannot identify image file)",
        ".cls: b'y' is not an integer class index"]


# ------------------------------------------------------------------ the pixel limit


def claiming(width: int, height: int, *, comment: bytes = b"") -> bytes:
    """A real 8 x 8 JPEG (about 630 bytes) whose frame header (SOF0) claims width x height pixels; `comment`:
    a COM segment put before it."""
    jpeg = bytearray(encoded("JPEG", (8, 8)))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    if comment:
        jpeg[sof:sof] = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return bytes(jpeg)


def png_claiming(width: int, height: int) -> bytes:
    """A real 4 x 4 PNG whose IHDR claims width x height (its CRC fixed, so PIL opens it)."""
    import zlib

    png = bytearray(encoded("PNG", (4, 4)))
    png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    return bytes(png)


def test_images_over_the_pixel_limit_are_refused_from_their_header(samples):
    # 9000 x 9000 = 81 M pixels, over the default 8192 x 8192: decoded (243 MB) before, refused now
    for key, fields in {"jpg": {"jpg": claiming(9000, 9000)}, "png": {"png": png_claiming(9000, 9000)},
                        # a naive search for the first SOF bytes would read the 8 x 8 one in the comment
                        "hidden": {"jpg": claiming(9000, 9000, comment=b"\xff\xc0\x00\x11\x08\x00\x08\x00\x08")}
                        }.items():
        ext = next(iter(fields))
        reason = "image is 9000 x 9000 pixels, more than data.max_pixels=67108864: shrink it or raise data.max_pixels"
        (decoded,) = decode.decode_samples([(key, fields)], "tensor")
        assert decoded == f"{key}.{ext}: {reason}", key
        assert decode.sample_problems(key, fields) == [f".{ext}: {reason}"], key
    # the limit is width x height, for every accepted type, inclusive
    jpg = samples[0][1]["jpg"]  # 32 x 32
    reference = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    tensor = decode.decode_image(jpg, "jpg", max_pixels=32 * 32)
    assert np.array_equal(tensor.permute(1, 2, 0).numpy(), reference)  # the same pixels as without a limit
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp"), ("PPM", "ppm"), ("WEBP", "webp")):
        image = encoded(fmt, (7, 3))
        assert decode.decode_image(image, ext, max_pixels=21).shape == (3, 3, 7), fmt
        (refused,) = decode.decode_samples([("k", {ext: image})], max_pixels=20)
        assert refused == f"k.{ext}: image is 7 x 3 pixels, more than data.max_pixels=20: shrink it or raise " \
                          f"data.max_pixels", fmt


def test_one_pixel_limit_for_the_stream_shards_check_and_evaluation(samples, tmp_path):
    """The same sample over the limit is a skipped sample in the stream, a problem for `shards check`,
    and an error for evaluation (which must see every sample); each says the size and data.max_pixels."""
    import tarfile

    from ssl_dist import evaluate

    folder = tmp_path / "claims"
    folder.mkdir()
    members = [*samples[:8], ("small/one", {"cls": b"1", "jpg": encoded("JPEG", (8, 8))}),
               ("large/one", {"cls": b"3", "jpg": claiming(9000, 9000)})]
    with tarfile.open(folder / "part-0.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, fields in members:
            for ext, value in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    shards.index_shards(str(folder))
    reason = "large/one.jpg: image is 9000 x 9000 pixels, more than data.max_pixels=67108864"

    loader = data.make_loader(str(folder), rank=0, world_size=1, batch_size=5, max_skip_fraction=1)
    keys, problems = [], {}
    for b in loader:
        keys += [k for k, v in zip(b["__key__"], b["__valid__"].tolist()) if v]
        problems.update(loader.state_dict()["problems"])  # shard -> [skipped, a reason], for this epoch
    assert len(keys) == 9 and loader.stats()["skipped_samples"] == 1
    assert problems == {"part-0.tar": [1, reason + ": shrink it or raise data.max_pixels"]}
    assert [p.split("part-0.tar: ")[1] for p in shards.check_shards(str(folder))["problems"]] == [
        reason + ": shrink it or raise data.max_pixels"]
    assert len(shards.check_shards(str(folder), max_pixels=1000)["problems"]) == 9
    with pytest.raises(data.DataError, match=reason):
        list(evaluate.iter_labeled(str(folder), image_size=32, batch_size=4))
    # and each passes on the limit it is given: over 1000 pixels, only the 8 x 8 image is left
    small = data.make_loader(str(folder), rank=0, world_size=1, batch_size=5, max_skip_fraction=1, max_pixels=1000)
    keys = [k for b in small for k, v in zip(b["__key__"], b["__valid__"].tolist()) if v]
    assert keys == ["small/one"] and small.stats()["skipped_samples"] == 9
    with pytest.raises(data.DataError, match=r"is 32 x 32 pixels, more than data.max_pixels=1000"):
        list(evaluate.iter_labeled(str(folder), image_size=32, batch_size=4, max_pixels=1000))


def test_a_batch_of_jpegs_is_decoded_in_place_and_a_mixed_one_sample_by_sample(samples):
    """As tensors, JPEGs of one size become rows of one (n, 3, H, W) tensor that collate hands on
    without a copy; in a batch of mixed sizes, formats, broken and oversized images, wherever they
    stand, every sample decodes (or is refused) exactly as on its own."""
    def pixels(fields):
        ext = next(e for e in decode.IMAGE_EXTS if e in fields)
        return np.asarray(Image.open(io.BytesIO(fields[ext])).convert("RGB"))

    cifar = samples[:6]
    decoded = data.decode_samples(cifar, "tensor")
    batch = data.collate(decoded)
    assert batch["image"].shape == (6, 3, 32, 32) and batch["image"].data_ptr() == decoded[0]["image"].data_ptr()
    assert all(np.array_equal(image.permute(1, 2, 0).numpy(), pixels(f)) for image, (_, f) in zip(batch["image"],
                                                                                                  cifar))
    odd = [("odd/small", {"jpg": encoded("JPEG", (8, 8)), "cls": b"1"}), ("odd/large", {"jpg": claiming(9000, 9000)}),
           ("odd/broken", {"jpg": b"\xff\xd8\xff\xe0 no more"}), ("odd/wide", {"jpg": encoded("JPEG", (64, 32))}),
           ("odd/png", {"png": encoded("PNG", (32, 32))})]
    for order in (cifar[:3] + odd + cifar[3:], odd + cifar, cifar[:1] + odd[3:4] + cifar[1:], odd[1:2] + cifar):
        for (key, fields), out in zip(order, data.decode_samples(order, "tensor")):
            (alone,) = data.decode_samples([(key, fields)], "tensor")  # one sample: no batch path
            if isinstance(alone, str):
                assert out == alone, key
            else:
                assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), pixels(fields)), key
