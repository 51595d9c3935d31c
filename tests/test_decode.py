"""decode.py, the one definition of a good sample: the stream's decoder against PIL on real
CIFAR JPEGs, and `sample_problems` (what `shards check` reports) against what the stream skips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from cifar import cifar_slice
from PIL import Image

from ssl_dist import data, decode, shards


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
