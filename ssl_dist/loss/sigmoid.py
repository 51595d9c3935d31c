"""SigLIP's sigmoid loss with negatives passed around a ring of ranks: memory per rank is
local x local, whatever the number of ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ssl_dist.loss.gather import rank_and_world
from ssl_dist.loss.numerics import compute_dtype, log1p_sum, needs_grad, row_chunks, scalar_like, without_autocast

# SigLIP: logits above this are clamped before exp; softplus(l) = l there, to 1e-35 (fp32).
_SIGMOID_CLAMP = {torch.float32: 80.0, torch.float64: 700.0}
# A logit of an invalid slot: exp underflows to exactly 0 in fp32 and fp64 alike.
_MASKED = -1e4


def _ring_peers(group) -> tuple[int, int]:
    """Global ranks of the right (send to) and left (receive from) neighbours in `group`."""
    rank, world = rank_and_world(group)
    right, left = (rank + 1) % world, (rank - 1) % world
    if group is None or group is dist.group.WORLD:
        return right, left
    return dist.get_global_rank(group, right), dist.get_global_rank(group, left)


def _shift_right(t: torch.Tensor, group, tag: int = 0):
    """Start sending `t` to the right neighbour and receiving its like from the left one.

    Returns (works, received): wait on every work before reading `received` or reusing `t`.
    Blocks and gradients, in flight at once, have the same size: distinct tags keep them apart.
    """
    right, left = _ring_peers(group)
    received = torch.empty_like(t)
    ops = [dist.P2POp(dist.isend, t, right, group, tag), dist.P2POp(dist.irecv, received, left, group, tag)]
    return dist.batch_isend_irecv(ops), received


def _wait_all(works) -> None:
    for w in works:
        w.wait()


def _sigmoid_chunk(scaled, blk, bias, clamp, need_grad, diag0, work, masked=None):
    """Loss sum and d loss / d logits for one chunk of rows against one block of columns.

    Every logit l = <scaled_i, blk_j> + bias is scored as a negative, softplus(l), whose
    gradient is sigmoid(l); the caller adds the positives' correction. diag0: for the own
    block, the column of the chunk's first row (its positive), else None; the gradient
    there becomes sigmoid(l) - 1. work: three (>= rows, n) buffers, reused (no page faults).
    masked: None, or (row indices, column indices) of the chunk's invalid anchors and of the
    block's invalid columns, and the chunk's rows' validity as 0./1. (rows,): their logits are
    set to _MASKED, where softplus and sigmoid are exactly 0 (no loss, no gradient; no mask
    matrix is built), and only a valid row's positive gets its -1.
    Returns (loss sum, sigmoid matrix -- a view of work[0] -- or None).
    """
    rows = scaled.shape[0]
    e, tmp = work[0][:rows], work[1][:rows]
    torch.mm(scaled, blk.T, out=e)
    e.add_(bias)
    if masked is not None:
        e.index_fill_(0, masked[0], _MASKED).index_fill_(1, masked[1], _MASKED)
    excess = 0.0
    if clamp is not None:  # exp would overflow: softplus(l) = l (to 1e-35) above `clamp`
        excess = torch.clamp(e, min=clamp, out=tmp).sum() - clamp * tmp.numel()
        e.clamp_(max=clamp)
    e.exp_()
    loss = log1p_sum(e, tmp, work[2][:rows]) + excess  # sum of softplus(l) = log(1 + exp(l)); tmp = 1 + e
    if not need_grad:
        return loss, None
    p = e.div_(tmp)  # sigmoid(l) = exp(l) / (1 + exp(l)), in place
    if diag0 is not None:  # the own pairs, on the diagonal from (0, diag0); an invalid one has p = 0 there
        idx = torch.arange(rows, device=p.device)
        p[idx, diag0 + idx] -= 1.0 if masked is None else masked[2]
    return loss, p


class _SigLipRing(torch.autograd.Function):
    """sum over this rank's n anchors and all N columns of the SigLIP sigmoid loss.

    The other field's blocks go around the ring: at step k (k = 0..W-1) this rank holds the
    block of rank (rank - k) mod W. At step 0 (its own block) it keeps its share of the
    block's gradient; at step k >= 1 it adds its share to the gradient that the ranks of steps
    1..k-1 accumulated (received during this step's products) and passes the sum to the right,
    so that after step W-1 each block's gradient, summed over the other ranks, arrives at the
    rank that owns it: W-1 blocks and W-1 gradients on the wire, each hop overlapping the
    next step's products. A rank holds at most two blocks of (n, D), three gradients of
    (D, n), and three chunk-sized buffers. As in the other losses the gradient is computed in
    the forward pass; the backward only scales it.

    Per logit l with label y (+1 for the own pair, -1 otherwise): loss = softplus(-y l) =
    softplus(l) - [y=+1] l, and d loss / d l = sigmoid(l) - [y=+1].
    """

    @staticmethod
    @without_autocast
    def forward(ctx, a, b, scale, bias, valid, group, chunk_size, need_grad):
        _, world = rank_and_world(group)
        n = a.shape[0]
        bound = (scale.abs() + bias.abs()).item()  # |logit| <= scale + |bias| for unit vectors
        clamp = _SIGMOID_CLAMP[a.dtype] if bound > _SIGMOID_CLAMP[a.dtype] else None
        total = a.new_zeros(())
        grad_a = torch.zeros_like(a) if need_grad else None
        grad_bias = a.new_zeros(())
        blk = b.contiguous()
        keep = None if valid is None else valid.to(a.dtype)  # (n,) 0./1.: this rank's rows
        blk_keep = keep  # the validity of the columns in `blk`, which travels with it
        counted = a.new_zeros(())  # valid columns seen around the ring: the global count
        own_t = a.new_zeros(a.shape[1], n) if need_grad else None  # (D, n): gradient of the own block, transposed
        in_flight = None  # (works, received): the gradient of the block of the next step, on its way
        spans = row_chunks(n, chunk_size, n, a)
        work = a.new_empty(3, spans[0][1], n)  # reused by every chunk of every block
        for k in range(world):
            pending = _shift_right(blk, group) if k + 1 < world else None  # overlaps the products
            pending_keep = _shift_right(blk_keep, group, tag=2) if keep is not None and k + 1 < world else None
            masked_cols = None if keep is None else (blk_keep == 0).nonzero().flatten()
            if keep is not None:
                counted += blk_keep.sum()
            acc_t = (own_t if k == 0 else a.new_zeros(own_t.shape)) if need_grad else None  # blk's gradient, here
            for i0, i1 in spans:
                scaled = a[i0:i1] * scale
                masked = None if keep is None else ((keep[i0:i1] == 0).nonzero().flatten(), masked_cols, keep[i0:i1])
                loss, p = _sigmoid_chunk(scaled, blk, bias, clamp, need_grad, i0 if k == 0 else None, work, masked)
                total += loss
                if need_grad:
                    grad_bias += p.sum()
                    grad_a[i0:i1].addmm_(p, blk)
                    acc_t.addmm_(scaled.T, p)
                del p
            if need_grad and k >= 1:  # the gradient follows its block (to its owner, last)
                if in_flight is not None:  # the ranks before this one on the block's way
                    _wait_all(in_flight[0])
                    acc_t += in_flight[1]
                in_flight = _shift_right(acc_t, group, tag=1)
            if pending is not None:
                _wait_all(pending[0])
                blk = pending[1]
            if pending_keep is not None:
                _wait_all(pending_keep[0])
                blk_keep = pending_keep[1]
        if in_flight is not None:  # the own block's gradient from the other W - 1 ranks
            _wait_all(in_flight[0])
            own_t += in_flight[1]
        # positives: only in the own block, on its diagonal; softplus(-l) = softplus(l) - l
        pairs = (a * b).sum(dim=1)
        if keep is None:
            total -= pairs.sum() * scale + bias * n
            per_rank = a.new_tensor(float(n))
        else:
            total -= (pairs * keep).sum() * scale + bias * keep.sum()
            # valid anchors per rank, on average: the mean over ranks is the global mean over them
            per_rank = (counted / world).clamp_min(1.0)
        if need_grad:
            grad_scale = (grad_a * a).sum().reshape(scale.shape) / per_rank  # sum_ij dl_ij <a_i, b_j>
            grad_a.mul_(scale / per_rank)
            grad_b = own_t.T.contiguous().div_(per_rank)
            ctx.save_for_backward(grad_a, grad_b, grad_scale, grad_bias.reshape(bias.shape) / per_rank)
        return total / per_rank

    @staticmethod
    def backward(ctx, g):
        grad_a, grad_b, grad_scale, grad_bias = ctx.saved_tensors
        return grad_a * g, grad_b * g, grad_scale * g, grad_bias * g, None, None, None, None


def siglip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                valid: torch.Tensor | None = None, group=None, chunk_size: int | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of this rank; negatives travel around a ring of ranks.

    a, b: (n, D) embeddings of the two fields of this rank's n pairs (cosine similarity is
    used). Every rank of `group` calls it with the same n. logit_scale: learnable log of the
    logit scale (SigLIP's t', init log 10); logit_bias: learnable bias (init -10); both 0-dim
    or (1,) tensors ((1,) as DeepSpeed parameters, see clip_loss). Each (a_i, b_j), a_i one of
    this rank's rows and b_j any of the N rows of the global batch, is a binary problem
    (positive iff the same pair); returns the sum over j, mean over this rank's i, of
    -log sigmoid(label * (exp(logit_scale) <a_i, b_j> + logit_bias)).

    valid: (n,) bool, False for a slot holding the loader's copy of another pair (in place of
    a skipped one): it is neither an anchor nor a column anywhere, and the sum is divided by
    the valid pairs per rank on average (their count goes around the ring with the blocks),
    so that the mean over ranks is the loss of the global batch without them. None: all count.

    No rank ever holds the gathered batch: one neighbour's (n, D) block at a time comes by
    send/recv (with its gradient, which travels back to its owner the same way).
    chunk_size: rows per chunk of each (n x n) block (None: numerics.auto_chunk picks them from
    the sizes); peak memory of the loss ~ 3 x chunk x n x 4 B plus a few (n, D) blocks.
    (chunk_size is an addition to the issue's signature, keyword-only with a default, so the
    stated API is unchanged.)
    """
    dtype = compute_dtype(a, b)
    a = F.normalize(a.to(dtype), dim=1)
    b = F.normalize(b.to(dtype), dim=1)
    scale = scalar_like(logit_scale, a).exp()
    bias = scalar_like(logit_bias, a)
    need = needs_grad(a, b, scale, bias)
    if valid is not None:
        valid = valid.to(device=a.device, dtype=torch.bool)
    return _SigLipRing.apply(a, b, scale, bias, valid, group, chunk_size, need)
