"""Ranks and the autograd-aware gather that brings every rank's embeddings into each rank's loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank in `group`, size of `group`); (0, 1) when no process group is initialised.

    Any rank may call it; it communicates nothing.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather `x` (n, ...) from every rank into (W*n, ...), rank q's rows at [q*n, (q+1)*n).

    Every rank of `group` calls it with the same shape. Autograd-aware: the backward is a
    reduce-scatter with SUM, so the gradient that any rank's loss puts on rank q's rows
    reaches rank q, summed over ranks (that sum, divided by W by DeepSpeed's averaging, is
    the gradient of the mean loss). Identity with world size 1 or no process group.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return x
    return _AllGather.apply(x.contiguous(), group, world)


class _AllGather(torch.autograd.Function):
    """The all-gather of `gather`, and its backward, a reduce-scatter with SUM.

    A Function of its own rather than torch's functional collective (what open_clip uses,
    all_gather_single_autograd in torch 2.14): that one wraps its output in an
    AsyncCollectiveTensor and its backward in two more autograd nodes, 1.2 ms of CPU per
    step on gloo at (256, 256) floats against 0.8 ms for the two plain collectives, which is
    a third of a batch-256 loss's matrix products (benchmarks/loss.py).
    """

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((g.shape[0] // ctx.world, *g.shape[1:]))
        _reduce_scatter_single(out, g.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None, None


# torch 2.14 names them *_single and deprecates the *_tensor names it keeps for older torch
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class MaskedColumns(NamedTuple):
    """What `gather_masked` returns: the gathered rows and which of them count."""

    cols: torch.Tensor  # (W*m, F) every rank's rows, autograd-aware as `gather`
    keep: torch.Tensor  # (W*m,) bool: the rows that count
    bias: torch.Tensor  # (W*m,) cols' dtype: 0 for a row that counts, -inf for one left out
    per_rank: torch.Tensor  # 0-dim: rows that count per rank, on average (at least 1)


def gather_masked(x: torch.Tensor, keep: torch.Tensor, group=None) -> MaskedColumns:
    """All-gather `x` (m, F) and its (m,) bool mask `keep` from every rank in one collective.

    The mask rides along as one more column of the same gather, so a masked loss pays no
    second collective. Every rank of `group` calls it with the same shapes. `per_rank` is a
    tensor, not a Python number: no device-to-host wait per step.
    """
    _, world = rank_and_world(group)
    f = x.shape[1]
    both = gather(torch.cat([x, keep.to(x.dtype).unsqueeze(1)], dim=1), group)  # (W*m, F + 1)
    col_keep = both[:, f] > 0.5
    bias = torch.zeros(col_keep.shape, dtype=x.dtype, device=x.device).masked_fill_(~col_keep, float("-inf"))
    per_rank = col_keep.sum().to(x.dtype).div(world).clamp_min(1.0)
    return MaskedColumns(both[:, :f], col_keep, bias, per_rank)
