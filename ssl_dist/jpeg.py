"""The JPEG decoders: libjpeg-turbo through simplejpeg where installed, else torchvision's op.

`jpeg_decoder()` is the one the stream uses (looked up and checked against PIL once per
process); `jpeg_size` reads a frame header's size without decoding, for the torchvision op,
which allocates whatever that header claims. What a good sample is stays in `decode`.
"""

from __future__ import annotations

import io
import warnings
from typing import Callable, NamedTuple

import numpy as np
import torch

# The frame header markers (SOF0-SOF15); C4 (DHT), C8 (JPG) and CC (DAC) are other segments.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

# The JPEG decoder, looked up once per process (False: not yet; None: none, PIL decodes
# everything). The only module state: the Loader looks it up before it starts loader workers,
# so forked workers inherit it instead of importing it again.
_jpeg_decoder: "JpegDecoder | None | bool" = False


class JpegDecoder(NamedTuple):
    """libjpeg-turbo, as the stream calls it (`jpeg_decoder`).

    `name`: "simplejpeg" or "torchvision". `size(data)`: (width, height) from the frame header,
    nothing decoded, None when it cannot be read. `decode(data)`: uint8 RGB (3, H, W) (with
    simplejpeg a view of an (H, W, 3) array); raises ValueError or RuntimeError when it does not
    decode. `decode_into(data, out)`: the same pixels written into the start of `out`, a writable
    uint8 array, returned as an (H, W, 3) view of it; ValueError, before anything is decoded, when
    `out` is too small for what the header declares (simplejpeg only, else None).
    """

    name: str
    size: Callable[[bytes], tuple[int, int] | None]
    decode: Callable[[bytes], torch.Tensor]
    decode_into: Callable[[bytes, np.ndarray], np.ndarray] | None


def jpeg_decoder() -> JpegDecoder | None:
    """The JPEG decoder of this process: simplejpeg's where installed (libjpeg-turbo through a thin
    Cython layer: half the CPU time of torchvision's op on a 32 x 32 JPEG, and it writes into a
    buffer the caller gives, so a batch is decoded in place), else torchvision's op, else None
    (PIL decodes everything). Both give PIL's pixels (libjpeg-turbo with the same settings); the
    choice is checked once against PIL on a tiny image, so a decoder that differs falls back
    instead of failing every sample. The result is cached per process.
    """
    global _jpeg_decoder
    if _jpeg_decoder is False:
        _jpeg_decoder = None
        for make in (simplejpeg_decoder, torchvision_decoder):
            try:
                decoder = make()
                if _gives_pil_pixels(decoder):
                    _jpeg_decoder = decoder
                    break
            except Exception:  # not installed, or no image ops: the next one, or PIL
                continue
    return _jpeg_decoder


def simplejpeg_decoder() -> JpegDecoder:
    """simplejpeg's libjpeg-turbo (ImportError where it is not installed)."""
    import simplejpeg

    def size(data: bytes) -> tuple[int, int] | None:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)  # libjpeg's own header reader
        except ValueError:
            return None
        return width, height

    def decode(data: bytes) -> torch.Tensor:
        return torch.from_numpy(simplejpeg.decode_jpeg(data, "RGB")).permute(2, 0, 1)

    def decode_into(data: bytes, out: np.ndarray) -> np.ndarray:
        return simplejpeg.decode_jpeg(data, "RGB", buffer=out)

    return JpegDecoder("simplejpeg", size, decode, decode_into)


def torchvision_decoder() -> JpegDecoder:
    """torchvision's op, called directly: `torchvision.io.decode_jpeg` (deprecated since 0.29 in favour
    of torchcodec, which this project does not ship) adds a warning and checks that cost as much as
    decoding a 32 x 32 JPEG. It allocates what the frame header claims, so `size` is `jpeg_size`."""
    from torchvision.io import ImageReadMode

    overload = torch.ops.image.decode_jpeg.default
    op = getattr(overload, "_op", overload)  # the C++ function itself, without the Python dispatch layer
    mode = ImageReadMode.RGB.value

    def decode(data: bytes) -> torch.Tensor:
        return op(torch.frombuffer(data, dtype=torch.uint8), mode, False)

    return JpegDecoder("torchvision", jpeg_size, decode, None)


def _gives_pil_pixels(decoder: JpegDecoder) -> bool:
    from PIL import Image

    probe = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 60)).save(probe, format="JPEG")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes once per process that the bytes are read-only
        decoded = decoder.decode(probe.getvalue())
    expected = np.asarray(Image.open(io.BytesIO(probe.getvalue())).convert("RGB"))
    return decoder.size(probe.getvalue()) == (8, 8) and np.array_equal(decoded.permute(1, 2, 0).numpy(), expected)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, read without decoding; None when `data` is no JPEG
    or has no frame header before its scan data.

    Walks the marker segments the way libjpeg reads them up to the first SOFn (the frame header
    it decodes: it refuses a second one): bytes between segments and 0xFF fill bytes are
    skipped, RSTn/TEM have no length, every other segment is skipped by its length. A JPEG
    this walk does not understand returns None and goes to PIL, which reads the size itself, so
    torchvision's decoder never sees a frame header that was not read here. A few microseconds.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, end = 2, len(data)
    while i < end:
        if data[i] != 0xFF:  # stray bytes before a marker (libjpeg warns and skips them)
            i = data.find(b"\xff", i)
            if i < 0:
                return None
        while i < end and data[i] == 0xFF:
            i += 1
        if i + 2 >= end:
            return None
        marker = data[i]
        i += 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue  # a stuffed 0xFF 0x00 (no marker), TEM, RSTn, SOI: no length follows
        if marker in (0xD9, 0xDA):
            return None  # end of image or scan data, and no frame header before it
        length = int.from_bytes(data[i:i + 2], "big")
        if marker in _SOF_MARKERS:
            if length < 8 or i + 7 > end:
                return None
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 3:i + 5], "big")
        i += max(length, 2)  # libjpeg skips length - 2 bytes after the length itself, none if less
    return None
