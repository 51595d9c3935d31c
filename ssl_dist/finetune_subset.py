"""The labeled subset of a fine-tune: a class-stratified fraction of a labeled set, drawn by seed.

The semi-supervised protocol of SimCLR and VISSL: of each class, `fraction` × its sample
count, rounded down, samples drawn without replacement; the same (samples, fraction, seed)
always gives the same subset. Pure: samples in, subset out; no I/O (`finetune` lists the
samples of the shards and writes the subset to the run folder).

A class's samples are ordered by key before the seeded draw, so the subset depends on the
samples, not on the order of the shards; and the draw is a permutation of each class of
which the first k are kept, so for one seed the 1% subset lies inside the 10% one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# fraction × count is rounded down, but not below what float arithmetic lost: 0.29 × 100 is
# 28.999999999999996, and its subset should hold 29.
_ROUNDING_SLACK = 1e-9


class Sample(NamedTuple):
    """One labeled sample of a set: its key, its class, and where it lies (shard number in the
    manifest, position in that shard)."""

    key: str
    label: int
    shard: int
    index: int


class SubsetError(ValueError):
    """A fraction that gives no valid subset (outside (0, 1], or a class without a label)."""


def per_class_count(fraction: float, count: int) -> int:
    """Samples kept of a class of `count` samples: `fraction` × `count`, rounded down."""
    return math.floor(fraction * count + _ROUNDING_SLACK)


def smallest_fraction(counts: dict[int, int]) -> float:
    """The smallest fraction that gives every class of `counts` ({class: samples}) one label:
    1 / the rarest class's count."""
    return 1.0 / min(counts.values())


def check_fraction(fraction: float, counts: dict[int, int]) -> None:
    """SubsetError unless `fraction` lies in (0, 1] and gives every class of `counts` at least
    one sample; the message names the smallest fraction that does."""
    if not 0 < fraction <= 1:
        raise SubsetError(f"--label-fraction {fraction:g} is outside (0, 1]: pass e.g. 0.01, 0.1 or 1.0")
    starved = sorted(c for c, n in counts.items() if per_class_count(fraction, n) < 1)
    if starved:
        rarest = min(counts.values())
        raise SubsetError(f"--label-fraction {fraction:g} leaves {len(starved)} of the {len(counts)} classes "
                          f"(class {starved[0]}{', ...' if len(starved) > 1 else ''}) without a label (the rarest "
                          f"has {rarest} samples): pass at least {smallest_fraction(counts):.6g}")


def class_counts(samples: list[Sample]) -> dict[int, int]:
    """{class: number of samples} of `samples`."""
    labels, counts = np.unique(np.array([s.label for s in samples], dtype=np.int64), return_counts=True)
    return dict(zip(labels.tolist(), counts.tolist()))


def stratified_subset(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """`per_class_count(fraction, n)` samples of each class (of n), drawn by `seed`; returned in
    the order of `samples`. Raises SubsetError for a fraction `check_fraction` refuses."""
    counts = class_counts(samples)
    check_fraction(fraction, counts)
    by_class: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(position)
    kept: list[int] = []
    for label in sorted(by_class):
        positions = sorted(by_class[label], key=lambda p: (samples[p].key, p))
        # one generator per class, seeded by (seed, class): a class's draw does not depend on the others
        order = np.random.default_rng([seed, label, 0xF17E]).permutation(len(positions))
        kept.extend(positions[i] for i in order[:per_class_count(fraction, len(positions))].tolist())
    return [samples[p] for p in sorted(kept)]
