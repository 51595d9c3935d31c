"""MoCo v3's InfoNCE (`ssl_dist.loss.moco_infonce`) with keys gathered from every rank equals the
global-batch loss and gradient: fp64, against a full-matrix F.cross_entropy reference written
here, without a process group and on 1-4 spawned gloo ranks (one spawn per world size runs
every variant), with and without invalid slots. The keys get no gradient."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import join_group, spawn_ranks

from ssl_dist import loss as L

N_LOCAL, DIM, TAU = 6, 5, 0.2
CHUNK = 4  # does not divide n = 6: a ragged last chunk
TOL = dict(rtol=1e-9, atol=1e-12)


def reference(q1, q2, k1, k2, tau=TAU):
    """Per-sample loss of one process on the whole batch: (CE(q1 vs k2) + CE(q2 vs k1)) / 2."""
    q1, q2, k1, k2 = (F.normalize(x, dim=1) for x in (q1, q2, k1, k2))
    labels = torch.arange(q1.shape[0])
    return (F.cross_entropy(q1 @ k2.T / tau, labels, reduction="none")
            + F.cross_entropy(q2 @ k1.T / tau, labels, reduction="none")) / 2


def global_batch(world, seed=0):
    g = torch.Generator().manual_seed(seed + world)
    return [torch.randn(world * N_LOCAL, DIM, dtype=torch.float64, generator=g) for _ in range(4)]


@pytest.mark.parametrize("chunk", [None, 1, CHUNK])
@pytest.mark.parametrize("tau", [TAU, 0.005])  # 0.005: logits up to 200, the row-max path
def test_without_process_group_matches_reference_and_keys_get_no_gradient(chunk, tau):
    q1, q2, k1, k2 = (x.requires_grad_() for x in global_batch(1))
    got = L.moco_infonce(q1, q2, k1, k2, tau, chunk_size=chunk)
    got_q1, got_q2 = torch.autograd.grad(got, [q1, q2])
    assert torch.autograd.grad(got, [k1, k2], allow_unused=True) == (None, None)
    ref_q1, ref_q2 = (x.detach().clone().requires_grad_() for x in (q1, q2))
    ref = reference(ref_q1, ref_q2, k1.detach(), k2.detach(), tau).mean()
    want_q1, want_q2 = torch.autograd.grad(ref, [ref_q1, ref_q2])
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(got_q1, want_q1, **TOL)
    torch.testing.assert_close(got_q2, want_q2, **TOL)


def check_rank(rank, world, valid_all, chunk) -> list[str]:
    """This rank's loss and query gradients against the global batch (without its invalid slots)."""
    q1_all, q2_all, k1_all, k2_all = global_batch(world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    q1, q2 = (x[rows].clone().requires_grad_() for x in (q1_all, q2_all))
    valid = None if valid_all is None else valid_all[rows]
    loss = L.moco_infonce(q1, q2, k1_all[rows], k2_all[rows], TAU, valid=valid, chunk_size=chunk)
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    mean /= world

    keep = torch.ones(world * N_LOCAL, dtype=torch.bool) if valid_all is None else valid_all
    ref_q1, ref_q2 = (x[keep].clone().requires_grad_() for x in (q1_all, q2_all))
    ref = reference(ref_q1, ref_q2, k1_all[keep], k2_all[keep]).mean()
    want_q1, want_q2 = (torch.zeros_like(q1_all) for _ in range(2))
    want_q1[keep], want_q2[keep] = torch.autograd.grad(ref, [ref_q1, ref_q2])
    failures = []
    # after DeepSpeed's averaging (1/W) a rank's query gradient is the global-batch one
    for what, got, want in (("mean loss over ranks", mean, ref), ("grad q1", q1.grad / world, want_q1[rows]),
                            ("grad q2", q2.grad / world, want_q2[rows])):
        try:
            torch.testing.assert_close(got, want, **TOL)
        except AssertionError as err:
            failures.append(f"world={world} rank={rank} chunk={chunk} masked={valid_all is not None} {what}: {err}")
    if valid_all is None:  # unmasked: each rank's own loss is the mean over its own samples
        if not torch.allclose(loss.detach(), reference(q1_all, q2_all, k1_all, k2_all)[rows].mean(), **TOL):
            failures.append(f"world={world} rank={rank} chunk={chunk}: rank loss")
    return failures


def run_rank(rank, port, world, out):
    join_group(rank, port, world)
    valid_all = torch.ones(world * N_LOCAL, dtype=torch.bool)
    valid_all[[i for i in (1, 4, 12, 23) if i < world * N_LOCAL]] = False  # ranks 0-3 lose 2, 0, 1, 1 slots
    failures = []
    for chunk in (None, CHUNK):
        for mask in (None, valid_all):
            failures += check_rank(rank, world, mask, chunk)
    out[rank] = failures
    dist.barrier()  # nobody tears its group down while a peer still communicates
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_gathered_keys_give_the_global_batch_loss_and_gradient(world):
    results = spawn_ranks(run_rank, world, world=world)
    assert sorted(results) == list(range(world))
    failures = [f for rank in sorted(results) for f in results[rank]]
    assert not failures, "\n".join(failures)
