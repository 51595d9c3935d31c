"""Contrastive losses whose negatives come from every rank: NT-Xent, CLIP InfoNCE, SigLIP.

Contract (DESIGN.md, "Loss"): every rank of the process group calls the loss with its own
local (n, D) embeddings and gets back *its* scalar loss, the mean over its own anchors (with
nt_xent's validity mask: its share of the global mean over valid anchors, see there). The
other ranks' embeddings arrive through an autograd-aware collective whose backward sums the
gradients of all ranks into the rank that owns the embedding, so on rank r

    d loss_r / d z_r  (after the gather's backward)  ==  d (sum_q loss_q) / d z_r,

and once DeepSpeed (or DDP) averages parameter gradients over the W ranks the gradient is
that of mean_q loss_q: the loss one process would compute on the global batch of N = n x W
samples. A rank's loss is not the global loss, only the mean over ranks is: log that.

How the work is done. Each loss is a sum over a (local anchors x global columns) matrix of
logits. Because the loss is a scalar, its gradient with respect to everything is known up to
one factor (the incoming gradient) as soon as the forward pass has the logits: so the forward
pass computes loss *and* gradients chunk by chunk over anchor rows, frees each chunk, and the
backward only multiplies the kept (n, D)-sized gradients by that factor. This is the
"recompute in backward" scheme with the recomputation removed: the same O(chunk x 2N) peak
memory, and exactly the three matrix products the loss needs (logits, and the two gradient
products), never a fourth. chunk_size=None uses one chunk (all rows): one (2n x 2N) matrix.
The price: a forward under autograd that is never backpropagated did the gradient work for
nothing; evaluate under torch.no_grad(), which skips it.

Numerics. Inputs are L2-normalised, so every logit is bounded by the scale: when exp cannot
overflow or underflow in the compute dtype the row max is not needed; otherwise the usual
max subtraction is used (log-sum-exp). fp16/bf16 inputs are computed in fp32; fp64 stays fp64.
Without an initialised process group, or with a group of one, this is the single-process loss.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["nt_xent", "clip_loss", "siglip_loss", "gather", "rank_and_world"]

# CLIP clips the learnable temperature so that logits are never scaled by more than 100.
CLIP_MAX_LOGIT_SCALE = math.log(100.0)

# |logit| bound below which exp(logit) and exp(-logit) are normal numbers with room to sum
# millions of them: then log-sum-exp needs no row max, and SigLIP's exp needs no clamp.
_EXP_SAFE = {torch.float32: 40.0, torch.float64: 300.0}
# SigLIP: logits above this are clamped before exp; softplus(l) = l there, to 1e-35 (fp32).
_SIGMOID_CLAMP = {torch.float32: 80.0, torch.float64: 700.0}


# --------------------------------------------------------------------------------------------
# process group
# --------------------------------------------------------------------------------------------


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
    # torch's functional collective (what open_clip uses). In torch 2.14 all_gather_single
    # carries autograd itself, its backward being reduce_scatter_tensor(SUM), which gloo on
    # CPU supports too; all_gather_tensor_autograd and torch.distributed.nn's all_gather are
    # deprecated there. tests/test_loss.py checks that the backward sums over ranks.
    from torch.distributed import _functional_collectives as fc

    gather_fn = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather_fn(x.contiguous(), 0, group if group is not None else dist.group.WORLD)
    # An AsyncCollectiveTensor: wait now, so the Functions below get a plain tensor.
    wait = getattr(out, "wait", None)
    return wait() if callable(wait) else out


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (the exactness tests); fp32, bf16 and fp16 are computed in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _scalar(x, like: torch.Tensor) -> torch.Tensor:
    """A float, 0-dim or (1,) tensor as a 0-dim tensor of like's dtype and device (keeps autograd)."""
    if not torch.is_tensor(x):  # as_tensor(float) would round through fp32 first
        return torch.tensor(float(x), dtype=like.dtype, device=like.device)
    return x.to(dtype=like.dtype, device=like.device).reshape(())


def _needs_grad(*tensors: torch.Tensor) -> bool:
    # Inside Function.forward, ctx.needs_input_grad ignores torch.no_grad(): decide out here.
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _without_autocast(forward):
    """Run a Function's forward with autocast off: its products stay in the inputs' fp32/fp64."""

    @functools.wraps(forward)
    def wrapper(ctx, a, *args):
        with torch.autocast(a.device.type, enabled=False):
            return forward(ctx, a, *args)

    return wrapper


def _chunks(n: int, chunk_size: int | None):
    step = n if chunk_size is None else max(1, int(chunk_size))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


# --------------------------------------------------------------------------------------------
# sum over anchor rows of log-sum-exp over columns, with its gradient computed in the forward
# --------------------------------------------------------------------------------------------


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
    chunks = _chunks(a.shape[0], chunk_size)
    # One workspace for every chunk: a fresh large tensor per chunk would be a fresh mmap,
    # and its page faults cost as much as the exp.
    work = a.new_empty(chunks[0][1], cols.shape[0])
    for i0, i1 in chunks:
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
    in [-scale, scale]: below _EXP_SAFE no row max is needed. The gradient is computed here,
    in the forward pass (the output is a scalar, so it is known up to the incoming factor):
    no (rows x M) matrix outlives its chunk and nothing is recomputed; the gradient of cols
    is assembled whole, with no autograd slicing.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, cols, scale, offsets, self_cols, chunk_size, need_grad, mask, *anchors):
        use_max = scale.item() > _EXP_SAFE[cols.dtype]
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
    need = _needs_grad(cols, scale, *anchors)
    return _SumRowLogSumExp.apply(cols, scale, tuple(offsets), tuple(self_cols), chunk_size, need, mask, *anchors)


# --------------------------------------------------------------------------------------------
# NT-Xent (SimCLR)
# --------------------------------------------------------------------------------------------


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

    chunk_size: anchor rows per chunk; None computes all 2n rows at once. The loss's peak
    memory is about chunk_size x 2N x 4 bytes (fp32), plus a few (2N, D) matrices.
    """
    dtype = _compute_dtype(z1, z2)
    rank, world = rank_and_world(group)
    n, d = z1.shape
    z1 = F.normalize(z1.to(dtype), dim=1)
    z2 = F.normalize(z2.to(dtype), dim=1)
    anchors = torch.cat([z1, z2])  # (2n, D); rank q's block of the gather is [z1_q; z2_q]
    inv_t = _scalar(1.0 / temperature, z1)
    self_cols = [rank * 2 * n]  # anchor i's own column is its global row, rank * 2n + i
    # the positive pair lives on this rank: its logit needs nothing gathered
    pos = (z1 * z2).sum(dim=1) * inv_t  # (n,)
    if valid is None:
        cols = gather(anchors, group)  # (2N, D)
        lse = _sum_row_lse(cols, inv_t, [anchors], offsets=[0], self_cols=self_cols, chunk_size=chunk_size)
        return (lse - 2 * pos.sum()) / (2 * n)

    keep = torch.cat([valid, valid]).to(device=z1.device, dtype=torch.bool)  # (2n,): both views of a sample
    # The mask rides along as one more column of the same gather: (2N, D + 1)
    cols = gather(torch.cat([anchors, keep.to(dtype).unsqueeze(1)], dim=1), group)
    col_keep = cols[:, d] > 0.5
    col_bias = torch.zeros(col_keep.shape, dtype=dtype, device=cols.device).masked_fill_(~col_keep, float("-inf"))
    lse = _sum_row_lse(cols, inv_t, [anchors], offsets=[0], self_cols=self_cols, chunk_size=chunk_size,
                       mask=([keep], col_bias))
    # 2 x (valid samples per rank, on average): the mean over ranks is then the global mean
    # over valid anchors. A tensor, not a Python number: no device-to-host wait per step.
    per_rank = col_keep.sum().to(dtype).div(world).clamp_min(1.0)
    return (lse - 2 * torch.where(keep[:n], pos, 0.0).sum()) / per_rank  # where(): no host sync


# --------------------------------------------------------------------------------------------
# CLIP: symmetric InfoNCE over paired inputs
# --------------------------------------------------------------------------------------------


def clip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, *, chunk_size: int | None = None,
              group=None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss of this rank, with negatives from every rank of `group`.

    a, b: (n, D) embeddings of the two fields of this rank's n pairs (image/text, ...);
    cosine similarity is used. Every rank calls it with the same n. logit_scale: the learnable
    log of the inverse temperature, as CLIP stores it (init log(1/0.07)), a 0-dim or (1,)
    tensor (as a DeepSpeed parameter use (1,): DeepSpeed 0.19 cannot broadcast 0-dim
    parameters); the logits are scaled by exp(min(logit_scale, log 100)), CLIP's clipping,
    done here so no caller can forget it. Each of this rank's n a-rows is classified among
    the N b-rows of the global batch and vice versa; returns (mean_i CE(a_i) + mean_i
    CE(b_i)) / 2 over this rank's n pairs.

    chunk_size: anchor rows per chunk (None: all n at once); peak memory ~ chunk x N x 4 B.
    """
    dtype = _compute_dtype(a, b)
    n, d = a.shape
    a = F.normalize(a.to(dtype), dim=1)
    b = F.normalize(b.to(dtype), dim=1)
    both = gather(torch.cat([a, b], dim=1), group)  # one collective for both fields: (N, 2D)
    scale = _scalar(logit_scale, a).clamp(max=CLIP_MAX_LOGIT_SCALE).exp()
    # a-rows against the b half of the gathered pairs, b-rows against the a half
    lse = _sum_row_lse(both, scale, [a, b], offsets=[d, 0], self_cols=[None, None], chunk_size=chunk_size)
    pos = (a * b).sum() * scale  # local row i's label is global column rank * n + i
    return (lse - 2 * pos) / (2 * n)


# --------------------------------------------------------------------------------------------
# SigLIP: sigmoid loss, negatives passed around a ring
# --------------------------------------------------------------------------------------------


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


def _sigmoid_chunk(scaled, blk, bias, clamp, need_grad, diag0, work):
    """Loss sum and d loss / d logits for one chunk of rows against one block of columns.

    Every logit l = <scaled_i, blk_j> + bias is scored as a negative, softplus(l), whose
    gradient is sigmoid(l); the caller adds the positives' correction. diag0: for the own
    block, the column of the chunk's first row (its positive), else None; the gradient
    there becomes sigmoid(l) - 1. work: two (>= rows, n) buffers, reused (no page faults).
    Returns (loss sum, sigmoid matrix -- a view of work[0] -- or None).
    """
    rows = scaled.shape[0]
    e, tmp = work[0][:rows], work[1][:rows]
    torch.mm(scaled, blk.T, out=e)
    e.add_(bias)
    excess = 0.0
    if clamp is not None:  # exp would overflow: softplus(l) = l (to 1e-35) above `clamp`
        excess = torch.clamp(e, min=clamp, out=tmp).sum() - clamp * tmp.numel()
        e.clamp_(max=clamp)
    e.exp_()
    loss = torch.log1p(e, out=tmp).sum() + excess  # softplus(l) = log(1 + exp(l))
    if not need_grad:
        return loss, None
    torch.add(e, 1.0, out=tmp)
    p = e.div_(tmp)  # sigmoid(l) = exp(l) / (1 + exp(l)), in place
    if diag0 is not None:
        idx = torch.arange(rows, device=p.device)
        p[idx, diag0 + idx] -= 1.0
    return loss, p


class _SigLipRing(torch.autograd.Function):
    """sum over this rank's n anchors and all N columns of the SigLIP sigmoid loss.

    The other field's blocks go around the ring: at step k (k = 0..W-1) this rank holds the
    block of rank (rank - k) mod W together with that block's gradient accumulated by the
    ranks it has visited. It adds its own share, and passes both to the right; after W steps
    each block's gradient, summed over every rank, is back at the rank that owns it. The
    next block is received while the current one is being used, so a rank holds at most
    two blocks of (n, D), their gradients, and one chunk of logits. As in the other losses
    the gradient is computed in the forward pass; the backward only scales it.

    Per logit l with label y (+1 for the own pair, -1 otherwise): loss = softplus(-y l) =
    softplus(l) - [y=+1] l, and d loss / d l = sigmoid(l) - [y=+1].
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, a, b, scale, bias, group, chunk_size, need_grad):
        _, world = rank_and_world(group)
        n = a.shape[0]
        bound = (scale.abs() + bias.abs()).item()  # |logit| <= scale + |bias| for unit vectors
        clamp = _SIGMOID_CLAMP[a.dtype] if bound > _SIGMOID_CLAMP[a.dtype] else None
        total = a.new_zeros(())
        grad_a = torch.zeros_like(a) if need_grad else None
        grad_bias = a.new_zeros(())
        blk = b.contiguous()
        acc_t = a.new_zeros(a.shape[1], n) if need_grad else None  # (D, n): gradient of blk, transposed
        chunks = _chunks(n, chunk_size)
        work = a.new_empty(2, chunks[0][1], n)  # reused by every chunk of every block
        for k in range(world):
            pending = _shift_right(blk, group) if k + 1 < world else None  # overlaps the products
            for i0, i1 in chunks:
                scaled = a[i0:i1] * scale
                loss, p = _sigmoid_chunk(scaled, blk, bias, clamp, need_grad, i0 if k == 0 else None, work)
                total += loss
                if need_grad:
                    grad_bias += p.sum()
                    grad_a[i0:i1].addmm_(p, blk)
                    acc_t.addmm_(scaled.T, p)
                del p
            if world > 1 and need_grad:  # the gradient follows its block (to its owner, last)
                works, acc_t = _shift_right(acc_t, group, tag=1)
                _wait_all(works)
            if pending is not None:
                _wait_all(pending[0])
                blk = pending[1]
        # positives: only in the own block, on its diagonal; softplus(-l) = softplus(l) - l
        total -= ((a * b).sum() * scale + bias * n)
        if need_grad:
            grad_scale = (grad_a * a).sum().reshape(scale.shape)  # sum_ij dl_ij <a_i, b_j>
            grad_a.mul_(scale)
            ctx.save_for_backward(grad_a, acc_t.T.contiguous(), grad_scale, grad_bias.reshape(bias.shape))
        return total

    @staticmethod
    def backward(ctx, g):
        grad_a, grad_b, grad_scale, grad_bias = ctx.saved_tensors
        return grad_a * g, grad_b * g, grad_scale * g, grad_bias * g, None, None, None


def siglip_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor, *,
                group=None, chunk_size: int | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of this rank; negatives travel around a ring of ranks.

    a, b: (n, D) embeddings of the two fields of this rank's n pairs (cosine similarity is
    used). Every rank of `group` calls it with the same n. logit_scale: learnable log of the
    logit scale (SigLIP's t', init log 10); logit_bias: learnable bias (init -10); both 0-dim
    or (1,) tensors ((1,) as DeepSpeed parameters, see clip_loss). Each (a_i, b_j), a_i one of
    this rank's rows and b_j any of the N rows of the global batch, is a binary problem
    (positive iff the same pair); returns the sum over j, mean over this rank's i, of
    -log sigmoid(label * (exp(logit_scale) <a_i, b_j> + logit_bias)).

    No rank ever holds the gathered batch: one neighbour's (n, D) block at a time comes by
    send/recv (with its gradient, which travels back to its owner the same way).
    chunk_size: rows per chunk of each (n x n) block (None: the whole block); peak memory of
    the loss ~ 2 x chunk x n x 4 B plus a few (n, D) blocks. (chunk_size is an addition to
    the issue's signature, keyword-only with a default, so the stated API is unchanged.)
    """
    dtype = _compute_dtype(a, b)
    a = F.normalize(a.to(dtype), dim=1)
    b = F.normalize(b.to(dtype), dim=1)
    scale = _scalar(logit_scale, a).exp()
    bias = _scalar(logit_bias, a)
    need = _needs_grad(a, b, scale, bias)
    return _SigLipRing.apply(a, b, scale, bias, group, chunk_size, need) / a.shape[0]
