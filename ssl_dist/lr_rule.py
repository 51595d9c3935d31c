"""The learning rate that follows the global batch (optim.lr_scaling): pure arithmetic, any process.

The global batch here is the batch of one optimizer step: per-worker batch x workers x
train.accumulate (gradient caching makes accumulated micro-batches one batch). A restart on
another number of workers that changes it (train.indivisible_batch) applies the rule again.
"""

from __future__ import annotations

import math


def lr_scale(rule: str, global_batch: int, base_batch: int) -> float:
    """The factor on optim.lr: 1 (none), global / base (linear) or its square root (sqrt)."""
    if rule == "none":
        return 1.0
    ratio = global_batch / base_batch
    return ratio if rule == "linear" else math.sqrt(ratio)


def peak_lr(optim_cfg, global_batch: int) -> float:
    """The learning rate after warm-up at `global_batch` samples per optimizer step."""
    return optim_cfg.lr * lr_scale(optim_cfg.lr_scaling, global_batch, optim_cfg.base_batch)


def restart_note(optim_cfg, *, old_batch: int, new_batch: int) -> str | None:
    """What a restart's log says when the rule moves the peak (None when nothing changed)."""
    old, new = peak_lr(optim_cfg, old_batch), peak_lr(optim_cfg, new_batch)
    if old_batch == new_batch or old == new:
        return None
    return (f"global batch {old_batch} -> {new_batch}: optim.lr_scaling={optim_cfg.lr_scaling} moves the "
            f"peak lr {old:.6g} -> {new:.6g}")
