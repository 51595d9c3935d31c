"""Which parameters weight decay and LARS's adaptation reach: a module -> optimizer param groups.

Pure (no DeepSpeed, no process group). Matrices and kernels (every tensor of 2 or more dims)
decay and, under LARS, take a layer-wise trust ratio; biases, norm gains and a method's
scalars (CLIP's logit scale, SigLIP's bias, ViT's class token: fewer than 2 dims) do
neither, as in SimCLR's, BYOL's and CLIP's recipes. Decay on a log temperature would pull it
to 0 all run long; on a norm's gain it fights the normalisation; a LARS ratio on a bias is
the ratio of two tiny norms and makes its step erratic.
"""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, *, lars: bool = False,
                 per_parameter: bool = False) -> list[dict]:
    """The trainable parameters of `model` in groups, decayed ones first, none empty (ZeRO
    flattens each group into one tensor).

    AdamW / SGD: [decayed, kept], the layout of every checkpoint since decay was split.
    `lars`: the groups carry timm's per-group switch: `always_adapt` on the decayed ones (so a
    matrix is adapted even at weight_decay 0), off with weight_decay 0 on the kept ones (timm's
    Lars then adapts nothing there). `per_parameter`: each decayed parameter in a group of its
    own, for an optimizer that sees a flattened slice of each group (ZeRO; see lars.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decayed, kept = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    chunks = [[p] for p in decayed] if per_parameter else [decayed]
    groups = [{"params": chunk, "weight_decay": weight_decay} for chunk in chunks]
    groups.append({"params": kept, "weight_decay": 0.0})
    if lars:
        for group in groups:
            group["always_adapt"] = group["params"] is not kept
    return [group for group in groups if group["params"]]


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's and SGD's two groups (`param_groups` without LARS)."""
    return param_groups(model, weight_decay)
