"""MoCo v3's symmetric InfoNCE: each view's query against the other view's keys of every rank.

The keys come from a momentum encoder and carry no gradient: they are gathered from every
rank as plain tensors (the gather's backward never runs), and the loss's gradient flows into
the queries only. The log-sum-exp over the gathered keys is softmax.py's (chunked, gradient
computed in the forward), so memory and numerics are those of NT-Xent and CLIP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_dist.loss.gather import gather, gather_masked
from ssl_dist.loss.numerics import compute_dtype, scalar_like
from ssl_dist.loss.softmax import _sum_row_lse


def moco_infonce(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, temperature: float, *,
                 valid: torch.Tensor | None = None, chunk_size: int | None = None, group=None) -> torch.Tensor:
    """MoCo v3's loss of this rank, with keys from every rank of `group`.

    q1, q2: (n, D) queries (online encoder + projector + predictor) of the two views of this
    rank's n samples; k1, k2: (n, D) keys of the same views from the momentum encoder (any
    gradient they carry is cut here). Cosine similarity is used. Every rank calls it with the
    same n. Query i of view 1 is classified among the N = n x W keys of view 2 of the global
    batch (its positive: its own sample's key) and query i of view 2 among the keys of view
    1, at temperature `temperature`; returns (mean_i CE(q1_i) + mean_i CE(q2_i)) / 2 over
    this rank's n samples, fp32 (fp64 for fp64 input). (MoCo v3's code scales its sum of the
    two terms by 2 x temperature; this is the plain mean, comparable with the other losses.)

    valid: (n,) bool, False for a slot holding the loader's copy of another sample: it is no
    query and no key anywhere, and the loss is that of the global batch without it (as
    nt_xent's `valid`). None: every slot counts. Every rank passes a mask, or none does.

    chunk_size: query rows per chunk (None: numerics.auto_chunk picks them from the sizes);
    peak memory ~ chunk x N x 4 B.
    """
    dtype = compute_dtype(q1, q2, k1, k2)
    n, d = q1.shape
    q1, q2 = F.normalize(q1.to(dtype), dim=1), F.normalize(q2.to(dtype), dim=1)
    k1, k2 = (F.normalize(k.detach().to(dtype), dim=1) for k in (k1, k2))
    inv_t = scalar_like(1.0 / temperature, q1)
    # positives live on this rank: query i of one view against key i of the other
    pos = ((q1 * k2).sum(dim=1) + (q2 * k1).sum(dim=1)) * inv_t  # (n,)
    if valid is None:
        keys = gather(torch.cat([k1, k2], dim=1), group)  # one collective for both views: (N, 2D)
        # view-1 queries against the k2 half of the gathered keys, view-2 queries against the k1 half
        lse = _sum_row_lse(keys, inv_t, [q1, q2], offsets=[d, 0], self_cols=[None, None], chunk_size=chunk_size)
        return (lse - pos.sum()) / (2 * n)

    keep = valid.to(device=q1.device, dtype=torch.bool)
    keys = gather_masked(torch.cat([k1, k2], dim=1), keep, group)  # (N, 2D), and which samples count
    lse = _sum_row_lse(keys.cols, inv_t, [q1, q2], offsets=[d, 0], self_cols=[None, None], chunk_size=chunk_size,
                       mask=([keep, keep], keys.bias))
    # per_rank: valid samples per rank, on average; where(): no host sync
    return (lse - torch.where(keep, pos, 0.0).sum()) / (2 * keys.per_rank)
