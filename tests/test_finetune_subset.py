"""The fine-tune's labeled subset: stratified, drawn by seed, refused when it cannot be."""

from __future__ import annotations

import pytest

from ssl_dist.finetune_subset import (Sample, SubsetError, check_fraction, class_counts, per_class_count,
                                      smallest_fraction, stratified_subset)


def labeled_set(sizes: dict[int, int], shards: int = 3) -> list[Sample]:
    """Samples of classes of the given sizes, interleaved over `shards` shards as a made set is."""
    samples = [(f"{label:02d}-{i:05d}", label) for label, n in sizes.items() for i in range(n)]
    samples.sort(key=lambda s: hash(s[0]) % 9973)  # a mixed order, not grouped by class
    return [Sample(key, label, p % shards, p // shards) for p, (key, label) in enumerate(samples)]


SIZES = {0: 500, 1: 731, 2: 120, 3: 1000, 4: 257}


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.29, 0.5, 1.0])
def test_per_class_counts_are_within_one_of_the_fraction(fraction):
    subset = stratified_subset(labeled_set(SIZES), fraction, seed=0)
    counts = class_counts(subset)
    for label, n in SIZES.items():
        assert abs(counts[label] - fraction * n) < 1, (label, counts[label], fraction * n)
    assert len({s.key for s in subset}) == len(subset)  # no sample twice


def test_fraction_one_keeps_every_sample_and_rounding_does_not_lose_one():
    samples = labeled_set(SIZES)
    assert stratified_subset(samples, 1.0, seed=3) == samples
    assert per_class_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floats


def test_same_seed_same_subset_whatever_the_order_other_seed_another():
    samples = labeled_set(SIZES)
    first = stratified_subset(samples, 0.1, seed=7)
    assert stratified_subset(list(reversed(samples)), 0.1, seed=7) == list(reversed(first))
    assert {s.key for s in stratified_subset(samples, 0.1, seed=8)} != {s.key for s in first}


def test_smaller_fraction_lies_inside_the_larger_for_one_seed():
    samples = labeled_set(SIZES)
    small = {s.key for s in stratified_subset(samples, 0.01, seed=1)}
    large = {s.key for s in stratified_subset(samples, 0.1, seed=1)}
    assert small < large


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(SubsetError, match=r"outside \(0, 1\]"):
        check_fraction(fraction, {0: 10})


def test_fraction_too_small_for_a_class_names_the_smallest_that_works():
    counts = class_counts(labeled_set(SIZES))
    assert smallest_fraction(counts) == 1 / 120
    with pytest.raises(SubsetError, match=r"1 of the 5 classes \(class 2\).*120 samples.*at least 0.00833333"):
        stratified_subset(labeled_set(SIZES), 0.008, seed=0)
    assert class_counts(stratified_subset(labeled_set(SIZES), smallest_fraction(counts), seed=0))[2] == 1
