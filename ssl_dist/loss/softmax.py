"""NT-Xent (SimCLR) and CLIP's symmetric InfoNCE, with negatives from every rank.

How the work is done. Each loss is a sum over a (local anchors x global columns) matrix of
logits. Because the loss is a scalar, its gradient with respect to everything is known up to
one factor (the incoming gradient) as soon as the forward pass has the logits: so the forward
pass computes loss *and* gradients chunk by chunk over anchor rows, frees each chunk, and the
backward only multiplies the kept (n, D)-sized gradients by that factor. This is the
"recompute in backward" scheme with the recomputation removed: the same O(chunk x 2N) peak
memory, and exactly the three matrix products the loss needs (logits, and the two gradient
products), never a fourth. chunk_size=None picks the chunk from the sizes (numerics.auto_chunk);
a chunk_size of at least the rows computes one (2n x 2N) matrix.
The price: a forward under autograd that is never backpropagated did the gradient work for
nothing; evaluate under torch.no_grad(), which skips it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl_dist.loss.gather import gather, gather_masked, rank_and_world
from ssl_dist.loss.numerics import EXP_SAFE, compute_dtype, needs_grad, row_chunks, scalar_like, without_autocast

# CLIP clips the learnable temperature so that logits are never scaled by more than 100.
CLIP_MAX_LOGIT_SCALE = math.log(100.0)


# ---- sum over anchor rows of log-sum-exp over columns, with its gradient computed in the forward


def _row_lse_pass(a, cols, scale, self_col, chunk_size, use_max, grad_cols_t, row_keep=None, col_bias=None):
    """sum_i log sum_j exp(scale <a_i, cols_j>) over anchor rows in chunks, and its gradients.

    a (m, D), cols (M, D) (may be a strided view); self_col: column of anchor 0, whose own
    column (self_col + i for anchor i) is left out; None: no self-exclusion. grad_cols_t:
    (D, M) buffer that d/dcols (transposed) is added to, or None for no gradients. Returns
    (total, grad_a (m, D) or None). With p_ij = softmax_j: d/da_i = scale sum_j p_ij c_j,
    d/dc_j = scale sum_i p_ij a_i. Masking (both None: none): row_keep (m,) bool, the rows
    that count (the others add nothing and get zero gradients); col_bias (M,), 0 for a
    column that counts and -inf for one left out of every row's sum.
    """
    need_grad = grad_cols_t is not None
    total = a.new_zeros(())
    grad_a = torch.empty_like(a) if need_grad else None
    spans = row_chunks(a.shape[0], chunk_size, cols.shape[0], a)
    # One workspace for every chunk: a fresh large tensor per chunk would be a fresh mmap,
    # and its page faults cost as much as the exp.
    work = a.new_empty(spans[0][1], cols.shape[0])
    for i0, i1 in spans:
        scaled = a[i0:i1] * scale
        e = torch.mm(scaled, cols.T, out=work[: i1 - i0])  # the chunk's logits (rows x M)
        if col_bias is not None:
            e.add_(col_bias)
        if self_col is not None:
            rows = torch.arange(i1 - i0, device=e.device)
            e[rows, self_col + i0 + rows] = float("-inf")
        keep = None if row_keep is None else row_keep[i0:i1]
        if use_max:
            shift = e.amax(dim=1, keepdim=True)
            if keep is not None:  # a left-out row may have no column at all: shift -inf
                shift = torch.where(keep.unsqueeze(1), shift, 0.0)
            e.sub_(shift)
            total += shift.sum()
        e.exp_()
        rowsum = e.sum(dim=1)
        if keep is not None:  # where(), not a product: a left-out row's log may be -inf
            total += torch.where(keep, rowsum.log(), 0.0).sum()
        else:
            total += rowsum.log().sum()
        if need_grad:
            # p = e / rowsum is never formed: 1/rowsum is folded into the (rows, D) factors
            inv = rowsum.reciprocal() if keep is None else torch.where(keep, rowsum.reciprocal(), 0.0)
            inv = inv.unsqueeze(1)
            grad_a[i0:i1] = (e @ cols).mul_(inv * scale)
            grad_cols_t.addmm_((scaled * inv).T, e)  # (D, rows) @ (rows, M): the faster layout
    return total, grad_a


class _SumRowLogSumExp(torch.autograd.Function):
    """sum over anchor sets k, rows i of log sum_j exp(scale <anchors_k_i, cols_j[f_k : f_k + D]>).

    All of one loss's log-sum-exp terms in one Function. cols (M, F): the gathered columns, of
    which anchor set k sees the features [f_k, f_k + D) (CLIP gathers both fields in one
    (N, 2D) tensor: a-anchors see its b half and b-anchors its a half); self_cols[k]: column
    of set k's anchor 0 for self-exclusion, or None. Inputs are L2-normalised, so logits lie
    in [-scale, scale]: below EXP_SAFE no row max is needed. The gradient is computed here,
    in the forward pass (the output is a scalar, so it is known up to the incoming factor):
    no (rows x M) matrix outlives its chunk and nothing is recomputed; the gradient of cols
    is assembled whole, with no autograd slicing.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, cols, scale, offsets, self_cols, chunk_size, need_grad, mask, *anchors):
        use_max = scale.item() > EXP_SAFE[cols.dtype]
        total = cols.new_zeros(())
        grads = []
        grad_cols_t = cols.new_zeros(cols.shape[1], cols.shape[0]) if need_grad else None  # (F, M)
        row_keeps, col_bias = mask if mask is not None else ([None] * len(anchors), None)
        for a, f0, self_col, row_keep in zip(anchors, offsets, self_cols, row_keeps):
            d = a.shape[1]
            part, grad_a = _row_lse_pass(a, cols[:, f0 : f0 + d], scale, self_col, chunk_size, use_max,
                                         grad_cols_t[f0 : f0 + d] if need_grad else None, row_keep, col_bias)
            total += part
            if need_grad:
                grads.append(grad_a)
        if need_grad:
            # d/dscale = sum_ij p_ij <a_i, c_j> = sum_i <grad_a_i, a_i> / scale
            grad_scale = sum((g * a).sum() for g, a in zip(grads, anchors)) / scale
            ctx.save_for_backward(grad_cols_t.T.contiguous(), grad_scale.reshape(scale.shape), *grads)
        return total

    @staticmethod
    def backward(ctx, g):
        grad_cols, grad_scale, *grads = ctx.saved_tensors
        return (grad_cols * g, grad_scale * g, None, None, None, None, None, *(x * g for x in grads))


def _sum_row_lse(cols, scale, anchors, *, offsets, self_cols, chunk_size=None, mask=None):
    """Autograd entry to _SumRowLogSumExp (see there); anchors, offsets, self_cols per set.

    mask: None, or (row_keeps, col_bias): per anchor set a (m,) bool of the rows that count,
    and a (M,) bias, 0 for a column that counts and -inf for one left out (see _row_lse_pass).
    """
    need = needs_grad(cols, scale, *anchors)
    return _SumRowLogSumExp.apply(cols, scale, tuple(offsets), tuple(self_cols), chunk_size, need, mask, *anchors)


# NT-Xent (SimCLR)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, valid: torch.Tensor | None = None,
            chunk_size: int | None = None, group=None) -> torch.Tensor:
    """NT-Xent (SimCLR) loss of this rank, with negatives from every rank of `group`.

    z1, z2: (n, D) embeddings of the two views of this rank's n samples (any float dtype;
    cosine similarity is used, so they need not be normalised). Every rank of `group` calls
    it with the same n. The global batch has 2N views (N = n x W); each of this rank's 2n
    views is an anchor whose positive is the other view of its sample and whose negatives are
    the other 2N - 2 views (itself excluded). Returns the mean over this rank's 2n anchors of
    -log softmax(positive) at temperature `temperature`: a scalar, fp32 (fp64 for fp64 input).

    valid: (n,) bool, False for a slot that holds no sample of its own (the loader's copy in
    place of a skipped one, `batch["__valid__"]`): such a sample is neither an anchor nor a
    negative anywhere, and the loss is then the one of the global batch without it (a rank
    returns its sum over valid anchors divided by 2 x (valid samples of all ranks) / W, so
    that the mean over ranks is the global mean). None: every slot is valid. Every rank of
    `group` passes a mask, or none does (the mask travels with the gather).

    chunk_size: anchor rows per chunk (None: numerics.auto_chunk picks them from the sizes;
    2n or more: all rows at once). The loss's peak
    memory is about chunk_size x 2N x 4 bytes (fp32), plus a few (2N, D) matrices.
    """
    dtype = compute_dtype(z1, z2)
    rank, _ = rank_and_world(group)
    n, d = z1.shape
    z1 = F.normalize(z1.to(dtype), dim=1)
    z2 = F.normalize(z2.to(dtype), dim=1)
    anchors = torch.cat([z1, z2])  # (2n, D); rank q's block of the gather is [z1_q; z2_q]
    inv_t = scalar_like(1.0 / temperature, z1)
    self_cols = [rank * 2 * n]  # anchor i's own column is its global row, rank * 2n + i
    # the positive pair lives on this rank: its logit needs nothing gathered
    pos = (z1 * z2).sum(dim=1) * inv_t  # (n,)
    if valid is None:
        cols = gather(anchors, group)  # (2N, D)
        lse = _sum_row_lse(cols, inv_t, [anchors], offsets=[0], self_cols=self_cols, chunk_size=chunk_size)
        return (lse - 2 * pos.sum()) / (2 * n)

    keep = torch.cat([valid, valid]).to(device=z1.device, dtype=torch.bool)  # (2n,): both views of a sample
    cols = gather_masked(anchors, keep, group)  # (2N, D), and which of the 2N views count
    lse = _sum_row_lse(cols.cols, inv_t, [anchors], offsets=[0], self_cols=self_cols, chunk_size=chunk_size,
                       mask=([keep], cols.bias))
    # 2 x (valid samples per rank, on average) = valid views per rank: the mean over ranks is
    # then the global mean over valid anchors
    return (lse - 2 * torch.where(keep[:n], pos, 0.0).sum()) / cols.per_rank  # where(): no host sync


# CLIP: symmetric InfoNCE over paired inputs


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, *, valid: torch.Tensor | None = None,
              chunk_size: int | None = None, group=None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss of this rank, with negatives from every rank of `group`.

    a, b: (n, D) embeddings of the two fields of this rank's n pairs (image/text, ...);
    cosine similarity is used. Every rank calls it with the same n. logit_scale: the learnable
    log of the inverse temperature, as CLIP stores it (init log(1/0.07)), a 0-dim or (1,)
    tensor (as a DeepSpeed parameter use (1,): DeepSpeed 0.19 cannot broadcast 0-dim
    parameters); the logits are scaled by exp(min(logit_scale, log 100)), CLIP's clipping,
    done here so no caller can forget it. Each of this rank's n a-rows is classified among
    the N b-rows of the global batch and vice versa; returns (mean_i CE(a_i) + mean_i
    CE(b_i)) / 2 over this rank's n pairs.

    valid: (n,) bool, False for a slot holding the loader's copy of another pair (in place of
    a skipped sample): it is no anchor and no negative, and the loss is that of the global
    batch without it (as nt_xent's `valid`); None: every slot counts. Every rank passes a
    mask, or none does.

    chunk_size: anchor rows per chunk (None: numerics.auto_chunk picks them from the sizes);
    peak memory ~ chunk x N x 4 B.
    """
    dtype = compute_dtype(a, b)
    n, d = a.shape
    a = F.normalize(a.to(dtype), dim=1)
    b = F.normalize(b.to(dtype), dim=1)
    scale = scalar_like(logit_scale, a).clamp(max=CLIP_MAX_LOGIT_SCALE).exp()
    if valid is None:
        both = gather(torch.cat([a, b], dim=1), group)  # one collective for both fields: (N, 2D)
        # a-rows against the b half of the gathered pairs, b-rows against the a half
        lse = _sum_row_lse(both, scale, [a, b], offsets=[d, 0], self_cols=[None, None], chunk_size=chunk_size)
        pos = (a * b).sum() * scale  # local row i's label is global column rank * n + i
        return (lse - 2 * pos) / (2 * n)

    keep = valid.to(device=a.device, dtype=torch.bool)
    both = gather_masked(torch.cat([a, b], dim=1), keep, group)  # (N, 2D), and which pairs count
    lse = _sum_row_lse(both.cols, scale, [a, b], offsets=[d, 0], self_cols=[None, None], chunk_size=chunk_size,
                       mask=([keep, keep], both.bias))
    pos = torch.where(keep, (a * b).sum(dim=1), 0.0).sum() * scale  # where(): no host sync
    return (lse - 2 * pos) / (2 * both.per_rank)  # per_rank: valid pairs per rank, on average
