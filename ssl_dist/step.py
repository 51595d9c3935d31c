"""One optimizer step of any method: whole, or gradient-cached over `train.accumulate` micro-batches.

With one micro-batch the step is forward, loss, backward, update. With k > 1 it is gradient
caching (`gradcache.py`): the loss sees all k micro-batches of every rank as negatives, while
the towers hold the activations of one micro-batch at a time. Both go through the Method
contract only (`forward`, `loss`, `after_step`), so every method gets both.
"""

from __future__ import annotations

import torch

from ssl_dist.gradcache import embedding_grads, surrogate_loss
from ssl_dist.methods.base import Method
from ssl_dist.timing import PhaseTimer


def valid_mask(micro_batches: list[dict]) -> torch.Tensor | None:
    """bool (k * b,): False where the loader filled a slot with a copy of a skipped sample.
    The loader's batches always carry "__valid__"; hand-made ones may not (None)."""
    if all("__valid__" in b for b in micro_batches):
        return torch.cat([b["__valid__"] for b in micro_batches])
    return None


def optimizer_step(engine, method: Method, micro_batches: list[dict], timer: PhaseTimer | None = None) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns this rank's loss (detached, ()).

    Every rank calls it with the same number of micro-batches of the same size (the loss
    gathers from all). `timer` gets a mark after each phase.
    """
    timer = timer or PhaseTimer()
    valid = valid_mask(micro_batches)
    if len(micro_batches) == 1:
        outputs = method.forward(engine, micro_batches[0])
        timer.mark("forward")
        loss = method.loss(outputs, valid)
        timer.mark("loss")
        engine.backward(loss)
        timer.mark("backward")
        engine.step()
        method.after_step(engine.module)
        timer.mark("optimizer")
        return loss.detach()

    # ---- 1. every micro-batch through the towers without a graph
    with torch.no_grad():
        cached = [method.forward(engine, batch) for batch in micro_batches]
    timer.mark("forward")
    # ---- 2. loss over the whole accumulated batch; gradient w.r.t. the outputs only
    shared = [i for i, out in enumerate(cached[0]) if out.dim() == 0 or out.shape[0] != _rows(cached[0])]
    loss, grads = embedding_grads(lambda *whole: method.loss(_unshare(whole, shared, len(cached)), valid),
                                  [_share(outputs, shared) for outputs in cached])
    timer.mark("loss")
    # ---- 3. re-run each micro-batch with a graph and push its slice of that gradient in; the
    # loss is already the mean over the accumulated batch, so DeepSpeed must not divide by k
    for batch, grad in zip(micro_batches, grads):
        engine.backward(surrogate_loss(_share(method.forward(engine, batch), shared), grad), scale_wrt_gas=False)
        timer.mark("backward")  # the re-run forward is charged here: it exists for the backward
        engine.step()  # DeepSpeed averages over ranks and updates on the k-th micro-batch
        timer.mark("optimizer")
    method.after_step(engine.module)
    return loss


def _rows(outputs: tuple[torch.Tensor, ...]) -> int:
    """Samples in a micro-batch: the leading size of its first per-sample output."""
    return max(out.shape[0] for out in outputs if out.dim() > 0)


def _share(outputs: tuple[torch.Tensor, ...], shared: list[int]) -> tuple[torch.Tensor, ...]:
    """Outputs shared by all samples (a learnable scale, () or (1,)) as (1, ...) rows, so that
    gradient caching can treat every output as rows to concatenate and slice."""
    return tuple(out.reshape(1, *out.shape) if i in shared else out for i, out in enumerate(outputs))


def _unshare(whole: tuple[torch.Tensor, ...], shared: list[int], k: int) -> tuple[torch.Tensor, ...]:
    """Inverse of `_share` over k concatenated micro-batches: a shared output is the same in
    every micro-batch (same parameters), so its k rows are summed over in `embedding_grads`'
    cat; use the mean of the rows: the value is unchanged and each row gets 1/k of the gradient,
    which the k surrogate backwards add up to the whole."""
    return tuple(out.mean(0) if i in shared else out for i, out in enumerate(whole))
