"""A procedurally generated, labeled image set for the quickstart (no download needed).

Each class is a shape (circle, square, triangle, cross, ring, bar) drawn in a random colour,
size, position and rotation on a noisy background of another random colour. Learning to
tell them apart needs shape, not colour, which is what contrastive augmentation teaches,
so the kNN accuracy of a pretrained encoder clearly beats the same encoder at random
initialisation after a few minutes on a CPU.

The captioned variant (`draw_captioned`, `write_image_folder(captions=True)`, for CLIP)
draws each attribute from a small named set instead, so that a caption can say it and be
true of the image: "a large red circle in the top left" is a circle in one of 6 named
colours, of one of 2 size ranges, centred in one quadrant, on a noisy grey background
(grey, so that no shape colour is close to it).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("bar", "circle", "cross", "ring", "square", "triangle")

# Named colours of the captioned set: saturated, far apart and far from any grey.
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40),
           "purple": (150, 50, 200), "orange": (250, 140, 20)}
# Radius as a fraction of the image side; the gap between the ranges keeps "small" and
# "large" apart after JPEG and rasterisation.
SIZES = {"small": (0.14, 0.20), "large": (0.26, 0.32)}
# (vertical, horizontal) halves: 0 = top / left, 1 = bottom / right.
POSITIONS = {"top left": (0, 0), "top right": (0, 1), "bottom left": (1, 0), "bottom right": (1, 1)}
# The centre stays this fraction of the side away from the midlines, so its quadrant is plain.
MIDLINE_MARGIN = 0.08


def render(pixels: np.ndarray, shape: str, colour: tuple[int, int, int], radius: float, cx: float, cy: float,
           angle: float) -> Image.Image:
    """`shape` of `radius` centred at (cx, cy), rotated by `angle`, filled with `colour`, over
    the (S, S, 3) uint8 `pixels`. Every shape's centroid is (cx, cy)."""
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)

    def polygon(points):
        rotated = [(cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle))
                   for x, y in points]
        draw.polygon(rotated, fill=colour)

    r = radius
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    elif shape == "square":
        polygon([(-r, -r), (r, -r), (r, r), (-r, r)])
    elif shape == "triangle":
        polygon([(0, -r), (r * 0.87, r * 0.5), (-r * 0.87, r * 0.5)])
    elif shape == "cross":
        w = r / 3
        polygon([(-r, -w), (r, -w), (r, w), (-r, w)])
        polygon([(-w, -r), (w, -r), (w, r), (-w, r)])
    elif shape == "bar":
        polygon([(-r, -r / 4), (r, -r / 4), (r, r / 4), (-r, r / 4)])
    else:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(CLASSES)}")
    return image


def draw_shape(rng: np.random.Generator, shape: str, size: int = 32) -> Image.Image:
    """One size x size RGB image of `shape` with random colour, scale, position and rotation."""
    # The draws keep their order: a seed makes the same SimCLR quickstart set it always made.
    background = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (size, size, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    colour = tuple(int(c) for c in (background + rng.integers(80, 176, 3)) % 256)
    radius = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    angle = rng.uniform(0, 2 * math.pi)
    return render(pixels, shape, colour, radius, cx, cy, angle)


def caption(shape: str, colour: str, size_name: str, position: str) -> str:
    """The caption of a drawing, e.g. "a large red circle in the top left"."""
    return f"a {size_name} {colour} {shape} in the {position}"


def caption_templates() -> tuple[str, ...]:
    """Zero-shot prompts for the shape names: the captions' own grammar with `{}` for the shape,
    one for every colour, size and position. Their mean embedding (the CLIP recipe) is the
    shape with the other attributes averaged out; a lone "a photo of a {}." is a sentence
    unlike any caption the towers trained on."""
    return tuple(caption("{}", colour, size_name, position)
                 for colour in COLOURS for size_name in SIZES for position in POSITIONS)


def centre_in(rng: np.random.Generator, half: int, radius: float, size: int) -> float:
    """A centre coordinate in `half` (0: the lower coordinates) whose shape stays in the image
    (the radius from the edge) and whose centre stays clear of the midline."""
    margin = MIDLINE_MARGIN * size
    low, high = (radius, size / 2 - margin) if half == 0 else (size / 2 + margin, size - radius)
    return float(rng.uniform(low, max(low, high)))


def draw_captioned(rng: np.random.Generator, shape: str, size: int = 32) -> tuple[Image.Image, str]:
    """One size x size RGB image of `shape` and its caption, true of the image: a named colour
    (slightly jittered), a named size range, a centre in the named quadrant, random rotation."""
    colour_name = str(rng.choice(list(COLOURS)))
    size_name = str(rng.choice(list(SIZES)))
    position = str(rng.choice(list(POSITIONS)))
    grey = rng.integers(70, 190)
    background = grey + rng.integers(-10, 11, 3)
    pixels = np.clip(background + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[colour_name]) + rng.integers(-20, 21, 3), 0, 255))
    radius = rng.uniform(*SIZES[size_name]) * size
    row, column = POSITIONS[position]
    cx, cy = centre_in(rng, column, radius, size), centre_in(rng, row, radius, size)
    angle = rng.uniform(0, 2 * math.pi)
    return render(pixels, shape, colour, radius, cx, cy, angle), caption(shape, colour_name, size_name, position)


def write_image_folder(root: str | Path, *, per_class: int, seed: int, size: int = 32,
                       captions: bool = False) -> Path:
    """Write `per_class` JPEGs of each class into `root/<class>/<NNNNN>.jpg` (ImageFolder layout).

    `captions`: draw the captioned variant (`draw_captioned`) and write each caption as
    `<NNNNN>.txt` beside its image, the layout `ssl-dist shards make` reads as image-text pairs.
    The same `seed` writes the same files.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for shape in CLASSES:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if captions:
                image, text = draw_captioned(rng, shape, size)
                (folder / f"{i:05d}.txt").write_text(text + "\n", encoding="utf-8")
            else:
                image = draw_shape(rng, shape, size)
            image.save(folder / f"{i:05d}.jpg", quality=90)
    return root
