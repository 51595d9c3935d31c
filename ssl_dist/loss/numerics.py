"""Numerics. Inputs are L2-normalised, so every logit is bounded by the scale: when exp cannot
overflow or underflow in the compute dtype the row max is not needed; otherwise the usual
max subtraction is used (log-sum-exp). fp16/bf16 inputs are computed in fp32; fp64 stays fp64.
Without an initialised process group, or with a group of one, this is the single-process loss."""

from __future__ import annotations

import functools

import torch

# |logit| bound below which exp(logit) and exp(-logit) are normal numbers with room to sum
# millions of them: then log-sum-exp needs no row max, and SigLIP's exp needs no clamp.
EXP_SAFE = {torch.float32: 40.0, torch.float64: 300.0}


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (the exactness tests); fp32, bf16 and fp16 are computed in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def scalar_like(x, like: torch.Tensor) -> torch.Tensor:
    """A float, 0-dim or (1,) tensor as a 0-dim tensor of like's dtype and device (keeps autograd)."""
    if not torch.is_tensor(x):  # as_tensor(float) would round through fp32 first
        return torch.tensor(float(x), dtype=like.dtype, device=like.device)
    return x.to(dtype=like.dtype, device=like.device).reshape(())


def needs_grad(*tensors: torch.Tensor) -> bool:
    # Inside Function.forward, ctx.needs_input_grad ignores torch.no_grad(): decide out here.
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def without_autocast(forward):
    """Run a Function's forward with autocast off: its products stay in the inputs' fp32/fp64."""

    @functools.wraps(forward)
    def wrapper(ctx, a, *args):
        with torch.autocast(a.device.type, enabled=False):
            return forward(ctx, a, *args)

    return wrapper


def log1p_sum(e: torch.Tensor, u: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sum(log1p(e)) of e >= 0 (any shape), to ~1 ulp per element; leaves 1 + e (rounded) in `u`.

    u, scratch: buffers of e's shape, overwritten. Why not torch.log1p: on CPU it is scalar
    code, 13x the time of the vectorised log, and SigLIP takes one per logit. log(u) alone,
    u = 1 + e rounded, is off by that rounding (100% for e below 2^-24); with d = (u - 1) - e,
    computed exactly, log(1 + e) = log(u - d) = log(u) - d / u to O((d / u)^2). Any rank.
    """
    torch.add(e, 1.0, out=u)
    correction = torch.sub(u, 1.0, out=scratch).sub_(e).div_(u).sum()
    return torch.log(u, out=scratch).sum() - correction


# Bytes of one (chunk x columns) logits buffer that chunk_size=None aims for. On CPU: the
# elementwise passes over the buffer (exp, log, sums) are memory-bound once it leaves the
# caches, and near 6 MiB (this machine: 2 MiB L2 a core, 32 MiB L3) the losses run within a
# few % of their best chunk at 4,096 to 8,192 columns, against 10-20% slower whole
# (benchmarks/loss.py). On an accelerator chunking only bounds memory: 1 GiB.
AUTO_CHUNK_BYTES = {"cpu": 6 * 2**20}
AUTO_CHUNK_BYTES_ACCELERATOR = 2**30
# ... but never fewer rows than this: every chunk also adds a rank-`rows` update into the
# (D x M) gradient of the columns, which a thin chunk pays for in memory traffic (NT-Xent at
# 4,096 a rank, W = 2, 16,384 columns: 96-row chunks 1.30x the floor, 1,024-row ones 1.20x).
AUTO_CHUNK_MIN_ROWS = 256


def auto_chunk(rows: int, cols: int, itemsize: int, device_type: str) -> int:
    """Rows per chunk of a (rows x cols) logits matrix when the caller gave chunk_size=None.

    All rows when the matrix fits AUTO_CHUNK_BYTES for `device_type` ("cpu", "cuda", ...),
    else the rows that fit it, a multiple of 32, and at least AUTO_CHUNK_MIN_ROWS (or all
    rows, if fewer). Pure arithmetic: any rank, and the scaling model (ssl_dist/scaling.py)
    calls it too.
    """
    budget = AUTO_CHUNK_BYTES.get(device_type, AUTO_CHUNK_BYTES_ACCELERATOR)
    fit = budget // max(1, cols * itemsize)
    return rows if fit >= rows else min(rows, max(AUTO_CHUNK_MIN_ROWS, fit // 32 * 32))


def row_chunks(n: int, chunk_size: int | None, cols: int, like: torch.Tensor):
    """(start, end) of each chunk of n rows against `cols` columns; chunk_size None: auto_chunk."""
    step = auto_chunk(n, cols, like.element_size(), like.device.type) if chunk_size is None else max(1, int(chunk_size))
    return [(i, min(i + step, n)) for i in range(0, n, step)]
