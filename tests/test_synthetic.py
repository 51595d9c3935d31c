"""The synthetic shapes (ssl_dist/synthetic.py): the captioned variant's captions are true of
the image they are drawn with, read back from the pixels alone, and a seed fixes every file."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from ssl_dist import synthetic

SIZE = 32


def shape_pixels(image: Image.Image) -> np.ndarray:
    """(S, S) mask of the pixels that are not background: far from the image's median colour
    (the shapes cover less than half the image, and the background is one noisy grey)."""
    pixels = np.asarray(image, dtype=float)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    return np.linalg.norm(pixels - background, axis=-1) > 60


def nearest_colour(image: Image.Image, mask: np.ndarray) -> str:
    mean = np.asarray(image, dtype=float)[mask].mean(0)
    return min(synthetic.COLOURS, key=lambda name: np.linalg.norm(mean - synthetic.COLOURS[name]))


def quadrant(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    vertical = "top" if rows.mean() < SIZE / 2 - 0.5 else "bottom"
    horizontal = "left" if cols.mean() < SIZE / 2 - 0.5 else "right"
    return f"{vertical} {horizontal}"


def drawings(per_shape: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(shape, *synthetic.draw_captioned(rng, shape, SIZE)) for shape in synthetic.CLASSES
            for _ in range(per_shape)]


def parse(caption: str) -> dict:
    """"a large red circle in the top left" -> {"size", "colour", "shape", "position"}."""
    words = caption.split()
    assert words[0] == "a" and words[4:6] == ["in", "the"], caption
    return {"size": words[1], "colour": words[2], "shape": words[3], "position": " ".join(words[6:])}


@pytest.mark.parametrize("shape", synthetic.CLASSES)
def test_caption_names_the_drawn_shape_colour_and_quadrant(shape):
    rng = np.random.default_rng(7)
    seen = {"colour": set(), "position": set(), "size": set()}
    for _ in range(40):
        image, caption = synthetic.draw_captioned(rng, shape, SIZE)
        named = parse(caption)
        mask = shape_pixels(image)
        assert named["shape"] == shape
        assert nearest_colour(image, mask) == named["colour"], caption
        assert quadrant(mask) == named["position"], caption
        for key in seen:
            seen[key].add(named[key])
    # the attributes vary: every size and position, most colours, within 40 drawings
    assert seen["size"] == set(synthetic.SIZES) and seen["position"] == set(synthetic.POSITIONS)
    assert len(seen["colour"]) >= 5


def test_large_shapes_cover_more_pixels_than_small_ones_of_the_same_shape():
    areas = {}
    for shape, image, caption in drawings():
        areas.setdefault((shape, parse(caption)["size"]), []).append(int(shape_pixels(image).sum()))
    for shape in synthetic.CLASSES:
        assert min(areas[shape, "large"]) > max(areas[shape, "small"]), (shape, areas[shape, "small"],
                                                                         areas[shape, "large"])


def test_captioned_folder_is_image_folder_with_a_caption_beside_each_image_and_seeded(tmp_path):
    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    first = synthetic.write_image_folder(tmp_path / "a", per_class=3, seed=5, captions=True)
    again = synthetic.write_image_folder(tmp_path / "b", per_class=3, seed=5, captions=True)
    other = synthetic.write_image_folder(tmp_path / "c", per_class=3, seed=6, captions=True)
    assert digest(first) == digest(again) and digest(first) != digest(other)
    assert sorted(p.name for p in first.iterdir()) == sorted(synthetic.CLASSES)
    for jpg in first.rglob("*.jpg"):
        text = jpg.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert parse(text)["shape"] == jpg.parent.name  # the class folder is the shape the caption names
    # the JPEG on disk still tells the caption's colour and quadrant
    jpg = first / "circle" / "00000.jpg"
    named = parse(jpg.with_suffix(".txt").read_text(encoding="utf-8"))
    image = Image.open(jpg).convert("RGB")
    mask = shape_pixels(image)
    assert nearest_colour(image, mask) == named["colour"] and quadrant(mask) == named["position"]


def test_caption_templates_are_the_caption_grammar_with_a_slot_for_the_shape():
    templates = synthetic.caption_templates()
    assert len(templates) == len(synthetic.COLOURS) * len(synthetic.SIZES) * len(synthetic.POSITIONS)
    assert all(t.count("{}") == 1 for t in templates)
    assert "a large red {} in the top left" in templates
    _, _, caption = drawings(per_shape=1)[0]
    named = parse(caption)
    assert caption == synthetic.caption(named["shape"], named["colour"], named["size"], named["position"])
    assert caption.replace(named["shape"], "{}") in templates


def test_uncaptioned_folder_has_no_captions(tmp_path):
    root = synthetic.write_image_folder(tmp_path, per_class=2, seed=1)
    assert len(list(root.rglob("*.jpg"))) == 2 * len(synthetic.CLASSES) and not list(root.rglob("*.txt"))
