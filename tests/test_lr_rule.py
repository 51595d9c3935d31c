"""lr_rule.py: the learning rate that follows the global batch, and what a restart says about it."""

from __future__ import annotations

import math

import pytest

from ssl_dist import config
from ssl_dist.lr_rule import peak_lr, restart_note


def optim(*overrides):
    return config.load(None, [f"optim.{o}" for o in overrides]).optim


@pytest.mark.parametrize("rule, expected", [("none", 0.3), ("linear", 0.3 * 1024 / 256),
                                            ("sqrt", 0.3 * math.sqrt(1024 / 256))])
def test_the_peak_follows_the_global_batch_by_the_rule(rule, expected):
    assert peak_lr(optim("lr=0.3", f"lr_scaling={rule}", "base_batch=256"), 1024) == pytest.approx(expected)


def test_a_restart_on_another_global_batch_says_both_batches_and_both_peaks():
    cfg = optim("lr=0.1", "lr_scaling=linear", "base_batch=8")
    note = restart_note(cfg, old_batch=8, new_batch=6)
    assert "global batch 8 -> 6" in note and "peak lr 0.1 -> 0.075" in note and "optim.lr_scaling=linear" in note
    assert restart_note(cfg, old_batch=8, new_batch=8) is None  # the same batch: nothing to say
    assert restart_note(optim("lr_scaling=none"), old_batch=8, new_batch=6) is None  # no rule: the lr stays
