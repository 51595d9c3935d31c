"""The one definition of a good sample: used by the stream, `shards check` and evaluation alike.

A raw sample is a key and its members `{ext: bytes}` (as `shards.parse_samples` returns it).
It is good when:

- it has an image member (the first of `IMAGE_EXTS` it holds; others stay bytes), whose
  header declares at most `max_pixels` pixels (width x height, read before anything is
  decoded: `data.max_pixels`, default `MAX_PIXELS`), and that image decodes to RGB;
- its `.cls`, if any, is an integer (ASCII digits, surrounding whitespace allowed);
- its `.json`, if any, parses, and its `.txt`, if any, is UTF-8 text.

Decoded, it is `{"__key__", "image", "image_bytes", "cls": int, "json": parsed, "txt": str,
other members as bytes}`. Images come as PIL RGB images (image_format="pil", what
torchvision's PIL transforms take) or as uint8 (3, H, W) tensors (image_format="tensor").
JPEGs are decoded by libjpeg-turbo (`jpeg.jpeg_decoder`: simplejpeg, else torchvision's op), which
gives PIL's pixels at a third to a sixth of its cost; other formats, and JPEGs it rejects, by
PIL. A decoder allocates whatever the frame header claims (a 631-byte JPEG claiming 20000 x
20000 pixels took 1.2 GB), so the size is read from the header first (libjpeg's reader through
simplejpeg, or `jpeg_size`; PIL's `Image.open`, which reads only the header, for PIL) and a
larger image is refused before any decoder sees it.

`decode_samples` is what the loader workers run on every sample; as tensors, JPEGs of one size
are decoded in place into one (n, 3, H, W) batch whose rows the samples' images are, so the
stream's collate has nothing to copy. `sample_problems` says,
with exactly the same decoding, why one sample would be skipped (for `shards check`, which
also knows the manifest's classes). Importing this module starts nothing: no Ray, no
DeepSpeed, no I/O.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch

from ssl_dist.jpeg import jpeg_decoder

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")  # the image members a sample may hold, in preference order
JPEG_EXTS = ("jpg", "jpeg")
IMAGE_FORMATS = ("pil", "tensor")
MAX_PIXELS = 67_108_864  # 8192 x 8192: the default of data.max_pixels


class DataError(RuntimeError):
    """A user-facing data problem (missing manifest, empty dataset, corrupt shard, a bad sample...).

    Defined here, at the bottom of the data flow, so that a sample that does not decode is one
    of them; `ssl_dist.data` re-exports it as `data.DataError`.
    """


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than the limit; raised before it is decoded."""

    def __init__(self, size: tuple[int, int], max_pixels: int):
        self.size, self.max_pixels = size, max_pixels
        super().__init__(f"image is {size[0]} x {size[1]} pixels, more than data.max_pixels={max_pixels}: shrink "
                         f"it or raise data.max_pixels")


class DecodeError(DataError, ValueError):
    """One raw sample is not a good sample.

    `problem` is what follows the sample's key, as `sample_problems` reports it (".jpg: image
    does not decode (...)", ".cls: b'x' is not an integer class index", ": no image member ...").
    str() is the stream's message for a skipped sample, which keeps its wording of before
    ("KEY.jpg: image does not decode (...)", "KEY: .cls b'x' is not an integer class index").
    """

    def __init__(self, key: str, member: str, reason: str, *, field: bool = False):
        self.key, self.member, self.reason = key, member, reason
        super().__init__(f"{key}: {member} {reason}" if field else f"{key}{member}: {reason}")

    @property
    def problem(self) -> str:
        return f"{self.member}: {self.reason}"



def decode_image(data: bytes, ext: str, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """An encoded image -> uint8 RGB tensor (3, H, W); raises (any exception) if it does not decode,
    ImageTooLarge, before decoding, if its header declares more than `max_pixels` pixels.

    JPEGs go through libjpeg-turbo (`jpeg.jpeg_decoder`: the pixels PIL gives, at a third to a sixth of
    its cost), but only those whose frame header it read; other formats, and JPEGs that decoder
    rejects, through PIL, whose `Image.open` reads the header (the size) and nothing more.
    """
    decoder = jpeg_decoder() if ext in JPEG_EXTS else None
    size = decoder.size(data) if decoder is not None else None
    if size is not None:
        check_pixels(size, max_pixels)
        try:
            return decoder.decode(data)
        except (RuntimeError, ValueError):
            pass  # PIL decides
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        check_pixels(image.size, max_pixels)  # what load() will allocate; nothing is decoded yet
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Raise ImageTooLarge when an image of `size` (width, height) has more than `max_pixels` pixels."""
    if size[0] * size[1] > max_pixels:
        raise ImageTooLarge(size, max_pixels)



def to_pil(image: torch.Tensor):
    """uint8 (3, H, W) tensor -> PIL RGB image."""
    from PIL import Image

    array = image.permute(1, 2, 0).contiguous().numpy()
    return Image.frombuffer("RGB", (array.shape[1], array.shape[0]), array, "raw", "RGB", 0, 1)


def image_member(key: str, fields: dict[str, bytes]) -> str:
    """The extension of the member that is the sample's image: the first of IMAGE_EXTS it holds. Raises
    DecodeError when it holds none."""
    ext = _image_ext(fields)
    if ext is None:
        raise DecodeError(key, "", f"no image member ({'/'.join(IMAGE_EXTS)}), only "
                                   f"{', '.join(sorted(fields)) or 'none'}")
    return ext


def _image_ext(fields: dict[str, bytes]) -> str | None:
    if "jpg" in fields:  # the common case, without a generator
        return "jpg"
    return next((e for e in IMAGE_EXTS if e in fields), None)


def _image(key: str, data: bytes, ext: str, max_pixels: int) -> torch.Tensor:
    """The image member decoded, uint8 (3, H, W); DecodeError if it is too large or does not decode."""
    try:
        return decode_image(data, ext, max_pixels)
    except ImageTooLarge as exc:
        raise DecodeError(key, f".{ext}", str(exc)) from None
    except Exception as exc:  # PIL raises many types for a broken file
        raise DecodeError(key, f".{ext}", f"image does not decode ({type(exc).__name__}: "
                                          f"{str(exc).split(' <_io.')[0]})") from None


def field_value(key: str, ext: str, value: bytes) -> Any:
    """A member other than the image, decoded: `.cls` -> int, `.json` -> parsed, `.txt` -> str (UTF-8),
    anything else stays bytes. Raises DecodeError when it does not decode."""
    if ext == "cls":
        try:
            return int(value)  # ASCII digits, surrounding whitespace allowed
        except ValueError:
            raise DecodeError(key, ".cls", f"{value[:20]!r} is not an integer class index", field=True) from None
    if ext == "json":
        try:
            return json.loads(value)
        except ValueError as exc:
            raise DecodeError(key, ".json", f"does not parse ({exc})", field=True) from None
    if ext == "txt":
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(key, ".txt", f"is not UTF-8 text ({exc.reason} at byte {exc.start})",
                              field=True) from None
    return value


def _decode(key: str, fields: dict[str, bytes], pil: bool, max_pixels: int,
            image: torch.Tensor | None = None) -> dict[str, Any]:
    """One sample decoded; `image`: its image, already decoded (by `_decode_jpegs`)."""
    ext = image_member(key, fields)
    data = fields[ext]
    if image is None:
        image = _image(key, data, ext, max_pixels)
    sample = {"__key__": key, "image": to_pil(image) if pil else image, "image_bytes": data}
    for name, value in fields.items():
        if name != ext:
            sample[name] = field_value(key, name, value)
    return sample


def decode_samples(samples: list[tuple[str, dict[str, bytes]]], image_format: str = "pil",
                   max_pixels: int = MAX_PIXELS) -> list:
    """Decode raw samples (runs in the loader workers, and wherever a sample is decoded); each entry
    becomes a sample dict (see `decode_sample`) or a string saying why it cannot be decoded
    ("KEY.jpg: image does not decode (...)", "KEY.jpg: image is W x H pixels, more than
    data.max_pixels=..."). With image_format="tensor", the images of JPEGs of one size are the
    rows, in order, of one (n, 3, H, W) tensor (`_decode_jpegs`)."""
    pil = image_format == "pil"
    decoded = {} if pil else _decode_jpegs(samples, max_pixels)
    out: list = []
    for number, (key, fields) in enumerate(samples):
        try:
            out.append(_decode(key, fields, pil, max_pixels, decoded.get(number)))
        except DecodeError as exc:
            out.append(str(exc))
    return out


def _decode_jpegs(samples: list[tuple[str, dict[str, bytes]]], max_pixels: int) -> dict[int, torch.Tensor]:
    """{sample number: its image, uint8 (3, H, W)} for the samples whose image is a JPEG of the first
    one's size, when the decoder writes into buffers: decoded into one (n, H, W, 3) array, made
    (n, 3, H, W) by one copy, so the images are rows of one tensor.

    Only the first JPEG's header is read (and checked against `max_pixels`): the decoder reads
    each image's header itself and refuses one larger than its row of the array before decoding
    anything, and a smaller one shows in the shape it returns, after which the rest of the batch
    (images of mixed sizes) goes sample by sample. Those, and JPEGs that do not decode, are left
    to `_decode`, which reads every header and gives the reasons.
    """
    decoder = jpeg_decoder()
    if decoder is None or decoder.decode_into is None or len(samples) < 2:
        return {}
    numbers, datas = [], []
    for number, (_, fields) in enumerate(samples):
        ext = _image_ext(fields)
        if ext in JPEG_EXTS:
            numbers.append(number)
            datas.append(fields[ext])
    size = decoder.size(datas[0]) if len(datas) > 1 else None
    if size is None or size[0] * size[1] > max_pixels:
        return {}
    width, height = size
    pixels = np.empty((len(datas), height, width, 3), dtype=np.uint8)
    good = []
    for row, data in enumerate(datas):
        try:
            shape = decoder.decode_into(data, pixels[row]).shape
        except (RuntimeError, ValueError):
            continue  # larger than the first, or it does not decode: _decode says which
        if shape != (height, width, 3):
            break  # images of several sizes: the rest of the batch goes sample by sample
        good.append(row)
    # numpy's transposing copy takes half the time of torch's for these small inner dimensions
    rows = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).unbind(0)
    return {numbers[row]: rows[row] for row in good}


def decode_sample(key: str, fields: dict[str, bytes], image_format: str = "pil",
                  max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """{ext: bytes} -> {"__key__", "image": PIL.Image (RGB) or, with image_format="tensor", a uint8
    (3, H, W) tensor, "image_bytes": the encoded image, "cls": int, "json": parsed, "txt": str, other
    fields as bytes}. Raises DecodeError (a DataError) if it cannot be decoded or its image has more
    than `max_pixels` pixels."""
    return _decode(key, fields, image_format == "pil", max_pixels)


def sample_problems(key: str, fields: dict[str, bytes], num_classes: int | None = None,
                    max_pixels: int = MAX_PIXELS) -> list[str]:
    """The problems of one raw sample, each a string that follows its key; [] for a good sample.

    The same decoding as the stream: a sample with a problem here is one the stream skips,
    and the other way round, except for what only the manifest knows: with `num_classes`
    (the manifest lists classes), a `.cls` outside 0..num_classes-1 and a missing `.cls` are
    problems too. Unlike the stream, which stops at a sample's first problem, every member
    is looked at.
    """
    problems = []
    try:
        ext = image_member(key, fields)
        _image(key, fields[ext], ext, max_pixels)
    except DecodeError as exc:
        ext = None if not exc.member else exc.member[1:]
        problems.append(exc.problem)
    label = None
    for name, value in fields.items():
        if name == ext:
            continue
        try:
            decoded = field_value(key, name, value)
        except DecodeError as exc:
            problems.append(exc.problem)
        else:
            label = decoded if name == "cls" else label
    if num_classes is not None:
        if "cls" not in fields:
            problems.append(": no .cls member although the manifest lists classes")
        elif label is not None and not 0 <= label < num_classes:
            problems.append(f".cls: class {label} outside the manifest's {num_classes} classes")
    return problems
