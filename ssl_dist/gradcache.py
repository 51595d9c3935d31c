"""Gradient caching: a contrastive loss over k accumulated micro-batches, at one micro-batch's memory.

With plain gradient accumulation, each micro-batch's anchors only see that micro-batch's
negatives (m x W per anchor). Gradient caching (Gao et al., 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup") makes the loss see all m x k x W of them
while the encoder still holds the activations of a single micro-batch:

  1. embed every micro-batch without an autograd graph (`torch.no_grad()`);
  2. `embedding_grads`: concatenate the embeddings, compute the loss over the whole
     accumulated batch (negatives gathered from every rank inside the loss) and its gradient
     with respect to the embeddings only -- cheap, no encoder in the graph;
  3. re-run each micro-batch *with* a graph and backpropagate its slice of that gradient,
     i.e. the backward of `surrogate_loss(z, g) = sum <z, g>`; parameter gradients accumulate
     over the k micro-batches to exactly the gradient of the whole-batch loss.

Recipe for the worker loop, with DeepSpeed (`gradient_accumulation_steps = k` in its config)::

    with torch.no_grad():
        cached = [(model(x1), model(x2)) for x1, x2 in micro_batches]       # step 1
    loss, grads = embedding_grads(                                          # step 2, all ranks
        lambda z1, z2: nt_xent(z1, z2, tau, chunk_size=c), cached)
    for (x1, x2), g in zip(micro_batches, grads):                           # step 3
        engine.backward(surrogate_loss((model(x1), model(x2)), g), scale_wrt_gas=False)
        engine.step()            # DeepSpeed averages over ranks and updates on the k-th call

`scale_wrt_gas=False` because the loss in step 2 is already the mean over the accumulated
batch: DeepSpeed must not divide it by k again. Step 3 must reproduce step 1's embeddings:
replay the random state if the encoder draws random numbers (dropout, stochastic depth), e.g.
save `torch.get_rng_state()` before each micro-batch in step 1 and restore it in step 3.
BatchNorm sees the same micro-batches twice (same batch statistics, so the same outputs; its
running averages move twice per step).

Parameters used inside the loss (CLIP's or SigLIP's learnable logit scale and bias): pass
them as `params=`; their gradients come back separately, so that the loop can add them to one
micro-batch's surrogate (`surrogate_loss((*z, logit_scale), (*g, g_scale))`) and they too go
through the engine's backward and gradient averaging exactly once.

Imports only torch; every rank of the loss's process group calls `embedding_grads` together
(the loss gathers negatives), the re-run in step 3 is local.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["embedding_grads", "surrogate_loss"]


def _as_tuple(x) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _leaf(z: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 embeddings become fp32 leaves: the whole-batch loss and the cached gradient
    # stay in fp32 (the loss computes in fp32 anyway); the surrogate casts back.
    dtype = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
    return z.detach().to(dtype).requires_grad_(True)


def embedding_grads(
    loss_fn: Callable[..., torch.Tensor],
    embeddings: Sequence,
    *,
    params: Sequence[torch.Tensor] | None = None,
):
    """Loss over all micro-batches together, and its gradient w.r.t. each micro-batch's embeddings.

    loss_fn: called once as `loss_fn(*fields)`, each field the concatenation over micro-batches
    (dim 0) of that field, e.g. `lambda z1, z2: nt_xent(z1, z2, 0.1)`; returns this rank's
    scalar loss. embeddings: one entry per micro-batch, each an (m_j, D) tensor or a tuple of
    them (one per field, e.g. the two views), computed without a graph (they are detached
    here anyway). params: tensors used inside `loss_fn` that need a gradient (a learnable
    logit scale); their `.grad` is not touched.

    Returns `(loss, grads)`: the detached scalar loss and a list with the same structure as
    `embeddings` (a tensor, or a tuple of tensors, per micro-batch) holding d loss / d
    embedding in fp32 (fp64 for fp64 embeddings). When `params` is given (even empty),
    returns `(loss, grads, param_grads)`, param_grads a tuple aligned with `params`.

    Every rank of the loss's process group calls it at the same time, with the same number
    of micro-batches of the same sizes.
    """
    per_batch = [_as_tuple(e) for e in embeddings]
    leaves = [tuple(_leaf(z) for z in fields) for fields in per_batch]
    n_fields = len(leaves[0])
    if any(len(f) != n_fields for f in leaves):
        raise ValueError("every micro-batch must have the same number of embedding fields")
    whole = [torch.cat([fields[i] for fields in leaves]) for i in range(n_fields)]
    extra = tuple(params) if params is not None else ()
    with torch.enable_grad():
        loss = loss_fn(*whole)
        flat_leaves = [z for fields in leaves for z in fields]
        flat_grads = torch.autograd.grad(loss, flat_leaves + list(extra), allow_unused=True)
    flat_grads = [torch.zeros_like(t) if g is None else g for t, g in zip(flat_leaves + list(extra), flat_grads)]
    grads, i = [], 0
    for e, fields in zip(embeddings, leaves):
        g = tuple(flat_grads[i : i + len(fields)])
        i += len(fields)
        grads.append(g if isinstance(e, (tuple, list)) else g[0])
    if params is not None:
        return loss.detach(), grads, tuple(flat_grads[len(flat_leaves) :])
    return loss.detach(), grads


def surrogate_loss(outputs, grads) -> torch.Tensor:
    """Scalar whose backward sends `grads` into the graph that produced `outputs`.

    outputs: a tensor or a tuple of tensors (the re-run micro-batch's embeddings, with a
    graph, plus any loss parameters); grads: the same structure, from `embedding_grads`.
    Returns sum_i <outputs_i, grads_i> (fp32 or fp64); its value means nothing, its gradient
    w.r.t. any parameter p is sum_i J_i(p)^T grads_i. Call `.backward()` on it, or
    `engine.backward(..., scale_wrt_gas=False)` with DeepSpeed. Local: no communication.
    """
    outs, gs = _as_tuple(outputs), _as_tuple(grads)
    if len(outs) != len(gs):
        raise ValueError(f"{len(outs)} outputs but {len(gs)} gradients")
    total = None
    for z, g in zip(outs, gs):
        if z.shape != g.shape:
            raise ValueError(f"output of shape {tuple(z.shape)} but gradient of shape {tuple(g.shape)}")
        term = (z.to(g.dtype) * g.detach()).sum()
        total = term if total is None else total + term
    return total
