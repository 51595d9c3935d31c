"""timm's LARS where ZeRO hands the optimizer slices of each parameter.

ZeRO (stages 1-3, and DeepSpeed's bf16 optimizer at stage 0) flattens each param group and
gives each rank's optimizer only its slice: timm's Lars would take the norms of that slice,
not of the layer. With one decayed parameter per group (`param_groups(per_parameter=True)`),
`PartitionedLars` sums the slices' squared norms over the ranks (one all-reduce a step) and
sets each group's trust coefficient for the step so that timm's own update, computed from
the slice, applies the whole layer's trust ratio. The update itself stays timm's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from timm.optim import Lars


class PartitionedLars(Lars):
    """`timm.optim.Lars` over ZeRO partitions; every rank's `step` is collective (the
    ranks' optimizers step together, as ZeRO makes them). `group`: the data-parallel group
    the partitions are spread over (default: the world). LARC clipping (`trust_clip`) is
    not offered: timm clips the ratio it forces to 1 on an all-zero slice too."""

    def __init__(self, params, *, group=None, **kwargs):
        if kwargs.get("trust_clip"):
            raise ValueError("PartitionedLars does not clip trust ratios (trust_clip)")
        super().__init__(params, **kwargs)
        self.norm_group = group

    @torch.no_grad()
    def step(self, closure=None):
        # ZeRO-3 steps one group at a time, the others' params lists emptied meanwhile
        adapted = [g for g in self.param_groups
                   if g["params"] and (g["weight_decay"] != 0 or g["always_adapt"]) and g["params"][0].grad is not None]
        if not adapted:
            return super().step(closure)
        # [w², g²] of this rank's slice per group -> of the whole parameter
        # on the partitions' device: NCCL reduces no CPU tensor
        local = torch.stack([torch.stack([g["params"][0].double().pow(2).sum(),
                                          g["params"][0].grad.double().pow(2).sum()]) for g in adapted])
        whole = local.clone()
        dist.all_reduce(whole, group=self.norm_group)
        local, whole = local.cpu(), whole.cpu()
        saved = [(g["trust_coeff"], g["weight_decay"]) for g in adapted]
        for g, (w_loc, g_loc), (w_all, g_all) in zip(adapted, local.sqrt().tolist(), whole.sqrt().tolist()):
            self._match_whole_ratio(g, w_loc, g_loc, w_all, g_all)
        try:
            return super().step(closure)
        finally:
            for g, (trust_coeff, weight_decay) in zip(adapted, saved):
                g["trust_coeff"], g["weight_decay"] = trust_coeff, weight_decay

    @staticmethod
    def _match_whole_ratio(group: dict, w_loc: float, g_loc: float, w_all: float, g_all: float) -> None:
        """Make timm's ratio from the slice's norms (w_loc, g_loc) equal the layer's ratio."""
        wd, eps, coeff = group["weight_decay"], group["eps"], group["trust_coeff"]
        ratio = coeff * w_all / (g_all + wd * w_all + eps) if w_all > 0 and g_all > 0 else 1.0
        if w_loc > 0 and g_loc > 0:  # timm: coeff' w_loc / (g_loc + wd w_loc + eps) = ratio
            group["trust_coeff"] = ratio * (g_loc + wd * w_loc + eps) / w_loc
        elif w_loc > 0:  # a zero gradient slice: timm's ratio is 1 on wd w alone
            group["weight_decay"] = wd * ratio
        else:  # a zero weight slice: timm's ratio is 1 on the gradient alone
            group["params"][0].grad.mul_(ratio)
