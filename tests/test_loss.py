"""Exactness of the distributed contrastive losses and of gradient caching.

Every distributed check compares against a straightforward single-process fp64 computation on
the concatenated global batch (full similarity matrices, F.cross_entropy / logsigmoid), written
here independently of ssl_dist.loss. Ranks are real processes (spawned, gloo on 127.0.0.1);
one spawn per world size runs every loss variant, to keep the suite fast on two cores.
"""

from __future__ import annotations

import datetime
import faulthandler
import math
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from memory import HAS_PEAK_RSS, peak_rss, reset_peak_rss
from ssl_dist import loss as L
from ssl_dist.gradcache import embedding_grads, surrogate_loss

REL_TOL = 1e-9  # fp64; the issue asks for 1e-6, the implementation is at ~1e-15
N_LOCAL = 6  # samples per rank
DIM = 5
IN_DIM = 7
CHUNK = 4  # does not divide 2n = 12 nor n = 6: ragged last chunk
MICRO = 2  # gradient caching: 3 micro-batches of 2 per rank
TAU = 0.2


# ---------------------------------------------------------------------------------------------
# references: per-sample losses of the global batch, fp64, full matrices
# ---------------------------------------------------------------------------------------------


def ref_nt_xent(z1, z2, params, tau=TAU):
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    s = z @ z.T / tau
    s = s.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    per_anchor = F.cross_entropy(s, labels, reduction="none")
    return (per_anchor[:n] + per_anchor[n:]) / 2


def ref_clip(a, b, params):
    (logit_scale,) = params
    scale = logit_scale.clamp(max=math.log(100)).exp()
    s = scale * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(s, labels, reduction="none") + F.cross_entropy(s.T, labels, reduction="none")) / 2


def ref_siglip(a, b, params):
    logit_scale, logit_bias = params
    logits = logit_scale.exp() * F.normalize(a, dim=1) @ F.normalize(b, dim=1).T + logit_bias
    labels = 2 * torch.eye(a.shape[0], dtype=a.dtype) - 1
    return -F.logsigmoid(labels * logits).sum(dim=1)


def ours(name, a, b, params, chunk, group=None, tau=TAU):
    if name == "nt_xent":
        return L.nt_xent(a, b, tau, chunk_size=chunk, group=group)
    if name == "clip":
        return L.clip_loss(a, b, params[0], chunk_size=chunk, group=group)
    return L.siglip_loss(a, b, params[0], params[1], chunk_size=chunk, group=group)


REFS = {"nt_xent": ref_nt_xent, "clip": ref_clip, "siglip": ref_siglip}
INIT_PARAMS = {"nt_xent": (), "clip": (math.log(1 / 0.07),), "siglip": (math.log(10.0), -10.0)}
# At SigLIP's initial bias of -10 every gradient is tiny; a milder point tests the maths better.
TEST_PARAMS = {"nt_xent": (), "clip": (1.7,), "siglip": (1.2, -2.0)}


def make_params(name):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in TEST_PARAMS[name]]


def rel_err(got, ref):
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


class Checker:
    """Collects every mismatch, so one failing run reports all of them."""

    def __init__(self, where, tol=REL_TOL):
        self.where, self.failures, self.tol = where, [], tol

    def __call__(self, what, got, ref):
        err = rel_err(got.detach().to(torch.float64), ref.detach().to(torch.float64))
        if not err <= self.tol:
            self.failures.append(f"{self.where} {what}: relative error {err:.3g}")

    def done(self):
        assert not self.failures, "\n".join(self.failures)


# ---------------------------------------------------------------------------------------------
# single process, no process group
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nt_xent", "clip", "siglip"])
@pytest.mark.parametrize("chunk", [None, 1, CHUNK, 100])
def test_without_process_group_matches_reference(name, chunk):
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(N_LOCAL, DIM, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(N_LOCAL, DIM, dtype=torch.float64, generator=g, requires_grad=True)
    params = make_params(name)
    got = ours(name, a, b, params, chunk)
    got_grads = torch.autograd.grad(got, [a, b, *params])
    ref = REFS[name](a, b, params).mean()
    ref_grads = torch.autograd.grad(ref, [a, b, *params])
    check = Checker(f"{name} chunk={chunk}")
    check("loss", got, ref)
    for i, (x, y) in enumerate(zip(got_grads, ref_grads)):
        check(f"grad {i}", x, y)
    check.done()


@pytest.mark.parametrize("chunk", [None, 1, CHUNK])
@pytest.mark.parametrize("tau", [TAU, 0.01])  # 0.01: logits up to 100, the row-max path
def test_nt_xent_with_invalid_slots_is_the_loss_without_them(chunk, tau):
    # A slot the loader filled with a copy of another sample (valid False) is no anchor and
    # no negative: loss and gradients are those of the batch without it; its gradient is 0.
    g = torch.Generator().manual_seed(3)
    a = torch.randn(N_LOCAL, DIM, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(N_LOCAL, DIM, dtype=torch.float64, generator=g, requires_grad=True)
    valid = torch.tensor([True, False, True, True, False, True])
    got = L.nt_xent(a, b, tau, valid=valid, chunk_size=chunk)
    got_a, got_b = torch.autograd.grad(got, [a, b])
    ref_a, ref_b = (x.detach()[valid].clone().requires_grad_() for x in (a, b))
    ref = ref_nt_xent(ref_a, ref_b, [], tau).mean()
    want_a, want_b = torch.autograd.grad(ref, [ref_a, ref_b])
    check = Checker(f"masked nt_xent chunk={chunk} tau={tau}")
    check("loss", got, ref)
    check("grad a", got_a[valid], want_a)
    check("grad b", got_b[valid], want_b)
    check.done()
    assert got_a[~valid].abs().max() == 0 and got_b[~valid].abs().max() == 0
    all_valid = L.nt_xent(a, b, tau, valid=torch.ones(N_LOCAL, dtype=torch.bool), chunk_size=chunk)
    torch.testing.assert_close(all_valid, L.nt_xent(a, b, tau, chunk_size=chunk), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["nt_xent", "clip", "siglip"])
def test_bf16_inputs_are_computed_in_fp32(name):
    g = torch.Generator().manual_seed(2)
    a32, b32 = torch.randn(2, 64, 16, generator=g)
    a = a32.bfloat16().requires_grad_()
    b = b32.bfloat16().requires_grad_()
    params = [p.float() for p in make_params(name)]
    got = ours(name, a, b, params, 16)
    got.backward()
    assert got.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    # fp64 on the same (bf16-rounded) values: only fp32 rounding separates them
    ref = ours(name, a.double(), b.double(), [p.double() for p in params], None)
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    # a caller's autocast does not reach inside: values and gradients stay fp32
    x = a.detach().float().requires_grad_()
    plain = torch.autograd.grad(ours(name, x, b.float(), params, 16), x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = ours(name, x, b.float(), params, 16)
    assert in_autocast.dtype == torch.float32
    assert abs(in_autocast.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert rel_err(torch.autograd.grad(in_autocast, x)[0], plain) <= 1e-5


# Large scales take the other numerical paths: row-max log-sum-exp (scale above 40 in fp32,
# 300 in fp64) and SigLIP's clamp before exp (scale + |bias| above 80 in fp32, 700 in fp64).
EXTREME = [("nt_xent", 1e-3, ()), ("clip", None, (math.log(100),)), ("siglip", None, (7.0, -20.0)),
           ("siglip", None, (math.log(120), -15.0))]


@pytest.mark.parametrize("name,tau,values", EXTREME)
def test_extreme_logits_fp64_exact_and_fp32_finite(name, tau, values):
    kw = {"tau": tau} if tau is not None else {}
    g = torch.Generator().manual_seed(3)
    a = torch.randn(N_LOCAL, DIM, dtype=torch.float64, generator=g)
    b = torch.randn(N_LOCAL, DIM, dtype=torch.float64, generator=g)  # losses O(scale), not ~0
    for dtype, tol in ((torch.float64, REL_TOL), (torch.float32, 1e-3)):
        for chunk in (None, CHUNK):
            x, y = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
            params = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in values]
            got = ours(name, x, y, params, chunk, **kw)
            got_grads = torch.autograd.grad(got, [x, y, *params])
            rx, ry = a.clone().requires_grad_(), b.clone().requires_grad_()
            rparams = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
            ref = REFS[name](rx, ry, rparams, **kw).mean()
            ref_grads = torch.autograd.grad(ref, [rx, ry, *rparams])
            check = Checker(f"{name} {dtype} chunk={chunk}", tol)
            check("loss", got, ref)
            for i, (u, v) in enumerate(zip(got_grads, ref_grads)):
                assert torch.isfinite(u).all()
                check(f"grad {i}", u, v)
            check.done()


@pytest.mark.parametrize("chunk", [None, 16])
def test_no_similarity_matrix_is_kept_for_backward(chunk):
    """Autograd keeps only (2N, D)-sized tensors: gradients are computed in the forward pass."""
    n, d = 256, 8
    z1 = torch.randn(n, d, requires_grad=True)
    z2 = torch.randn(n, d, requires_grad=True)
    largest = []

    def pack(t):
        largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = L.nt_xent(z1, z2, 0.1, chunk_size=chunk)
    loss.backward()
    assert max(largest) <= 2 * n * d, max(largest)  # (2N, D) at most; (2n x 2N) would be 4 n^2


@pytest.mark.skipif(not HAS_PEAK_RSS, reason="needs Linux /proc")
def test_peak_memory_scales_with_chunk_not_batch():
    """2n = 4096 anchors x 4096 columns: 64 MiB unchunked; a 128-row chunk is 2 MiB."""
    torch.manual_seed(0)
    z1 = torch.randn(2048, 32, requires_grad=True)
    z2 = torch.randn(2048, 32, requires_grad=True)
    peaks = {}
    for chunk in (128, 4096, None, 128):  # the first run warms up; 4096: every row at once
        z1.grad = z2.grad = None
        base = reset_peak_rss()
        L.nt_xent(z1, z2, 0.1, chunk_size=chunk).backward()
        peaks[chunk] = (peak_rss() - base) / 2**20
    assert peaks[128] < 16, peaks  # 2 MiB of logits plus (N, D) vectors and their gradients
    assert peaks[4096] > 48, peaks  # the measurement sees a full matrix when there is one
    assert peaks[None] < 20, peaks  # the automatic chunk: 6 MiB of logits (numerics.auto_chunk)


def test_the_automatic_chunk_is_whole_when_small_and_bounded_when_large():
    from ssl_dist.loss.numerics import AUTO_CHUNK_BYTES, AUTO_CHUNK_MIN_ROWS, auto_chunk

    assert auto_chunk(512, 1024, 4, "cpu") == 512  # 2 MiB: whole
    rows = auto_chunk(8192, 4096, 4, "cpu")  # 128 MiB whole
    assert rows % 32 == 0 and rows * 4096 * 4 <= AUTO_CHUNK_BYTES["cpu"] < (rows + 32) * 4096 * 4
    assert auto_chunk(8192, 16384, 4, "cpu") == AUTO_CHUNK_MIN_ROWS  # 96 rows would fit: too thin
    assert auto_chunk(100, 10**7, 4, "cpu") == 100  # fewer rows than the minimum: all of them
    assert auto_chunk(4096, 8192, 4, "cuda") == 4096  # 128 MiB: whole on a GPU
    assert auto_chunk(65536, 2**20, 4, "cuda") == 256  # 256 GiB whole: 1 GiB chunks


def test_no_grad_skips_gradient_work_and_gives_same_value():
    torch.manual_seed(0)
    a, b = torch.randn(2, 32, 8, dtype=torch.float64)
    for name in REFS:
        params = make_params(name)
        with torch.no_grad():
            value = ours(name, a, b, params, 5)
        assert not value.requires_grad
        assert abs(value.item() - REFS[name](a, b, params).mean().item()) < 1e-12


@pytest.mark.parametrize("lo, hi", [(-90.0, -20.0), (-20.0, 0.0), (0.0, 80.0)])
def test_softplus_sum_is_accurate_where_log_of_1_plus_e_is_not(lo, hi):
    """SigLIP's sum of log1p(exp(l)) in fp32, against fp64 log1p, from e = exp(-90) to exp(80).

    Below e = 2^-24, 1 + e rounds to 1 and log(1 + e) is 0: the correction must carry it all.
    """
    from ssl_dist.loss.numerics import log1p_sum

    e = torch.linspace(lo, hi, 10_001).exp()  # fp32
    want = torch.log1p(e.double()).sum().item()
    u, scratch = torch.empty_like(e), torch.empty_like(e)
    got = log1p_sum(e, u, scratch).item()
    assert abs(got - want) <= 1e-6 * want, (got, want)
    assert torch.equal(u, e + 1)  # left for the caller's sigmoid, e / (1 + e)
    per_element = torch.stack([log1p_sum(x, torch.empty(1), torch.empty(1)) for x in e[::97].split(1)])
    rel = (per_element.double() - torch.log1p(e[::97].double())).abs() / torch.log1p(e[::97].double())
    assert rel.max() < 3e-7, rel.max()  # ~2 ulps of fp32
    if hi <= -20:  # where the naive formula fails, so this test would catch it
        assert torch.log(1 + e).sum().item() < 0.5 * want


def test_gradcache_api():
    z = [torch.randn(3, 4), torch.randn(2, 4)]
    loss, grads = embedding_grads(lambda x: (x**2).sum(), z)  # one field, tensors not tuples
    assert loss.item() == pytest.approx(sum((t**2).sum().item() for t in z))
    assert [g.shape for g in grads] == [(3, 4), (2, 4)] and torch.allclose(grads[1], 2 * z[1])
    w = torch.tensor(2.0, requires_grad=True)
    loss, grads, (gw,) = embedding_grads(lambda x: w * x.sum(), z, params=[w])
    assert gw.item() == pytest.approx(sum(t.sum().item() for t in z)) and w.grad is None
    with pytest.raises(ValueError, match="shape"):
        surrogate_loss(torch.zeros(3, 4), torch.zeros(4, 3))


# ---------------------------------------------------------------------------------------------
# multi-process: every loss x chunking x gradient caching, world sizes 1..4
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_at_once() -> None:
    """End a spawned rank that passed with exit status 0 now, skipping the interpreter's teardown:
    there, after the group was destroyed and with no Python frame left, a C++ thread was at
    times destroyed while joinable ("terminate called without an active exception", SIGABRT),
    failing a rank whose checks had all passed (2 CI runs in ~20; not reproduced locally)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def init_gloo(rank, world, port):
    faulthandler.enable()  # a C++ abort in a spawned rank then shows its Python stack in the log
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def tower(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN_DIM, 8), torch.nn.Tanh(), torch.nn.Linear(8, DIM)).double()


def global_embeddings(world):
    g = torch.Generator().manual_seed(10 + world)
    return (torch.randn(world * N_LOCAL, DIM, dtype=torch.float64, generator=g),
            torch.randn(world * N_LOCAL, DIM, dtype=torch.float64, generator=g))


def global_inputs(world):
    g = torch.Generator().manual_seed(20 + world)
    return (torch.randn(world * N_LOCAL, IN_DIM, dtype=torch.float64, generator=g),
            torch.randn(world * N_LOCAL, IN_DIM, dtype=torch.float64, generator=g))


def towers_for(name):
    # SimCLR shares one encoder between the views; CLIP/SigLIP have one tower per field.
    ta = tower(0)
    return (ta, ta) if name == "nt_xent" else (ta, tower(1))


def mean_over_ranks(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def check_gather(check, rank, world):
    x = torch.full((2, 3), float(rank + 1), dtype=torch.float64, requires_grad=True)
    y = L.gather(x)
    check("gather forward", y, torch.arange(1, world + 1, dtype=torch.float64).repeat_interleave(2)[:, None].expand(-1, 3))
    w = torch.arange(y.numel(), dtype=torch.float64).view_as(y)
    (y * w).sum().backward()
    check("gather backward sums over ranks", x.grad, world * w[2 * rank : 2 * rank + 2])


def check_direct(check, name, chunk, rank, world):
    """Loss and input gradients of every rank against the global-batch reference."""
    za_all, zb_all = global_embeddings(world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    za = za_all[rows].clone().requires_grad_()
    zb = zb_all[rows].clone().requires_grad_()
    params = make_params(name)
    loss = ours(name, za, zb, params, chunk)
    loss.backward()

    ref_a, ref_b = za_all.clone().requires_grad_(), zb_all.clone().requires_grad_()
    ref_params = make_params(name)
    per_sample = REFS[name](ref_a, ref_b, ref_params)
    ref_grads = torch.autograd.grad(per_sample.mean(), [ref_a, ref_b, *ref_params])

    check("rank loss", loss, per_sample[rows].mean())
    check("mean loss over ranks", mean_over_ranks(loss), per_sample.mean())
    # After DeepSpeed's averaging (1/W), a rank's input gradient is the global-batch one.
    check("grad a", za.grad / world, ref_grads[0][rows])
    check("grad b", zb.grad / world, ref_grads[1][rows])
    for i, p in enumerate(params):
        check(f"grad param {i}", mean_over_ranks(p.grad), ref_grads[2 + i])


def check_masked(check, name, chunk, rank, world):
    """nt_xent, clip or siglip with invalid slots (a different number on each rank) against the global
    batch without them: the mean over ranks, and each rank's input (and scale) gradients after the 1/W."""
    za_all, zb_all = global_embeddings(world)
    valid_all = torch.ones(world * N_LOCAL, dtype=torch.bool)
    valid_all[[i for i in (1, 4, 12, 23) if i < world * N_LOCAL]] = False  # ranks 0-3 lose 2, 0, 1, 1 slots
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    za = za_all[rows].clone().requires_grad_()
    zb = zb_all[rows].clone().requires_grad_()
    params, ref_params = make_params(name), make_params(name)
    if name == "nt_xent":
        loss = L.nt_xent(za, zb, TAU, valid=valid_all[rows], chunk_size=chunk)
    elif name == "clip":
        loss = L.clip_loss(za, zb, params[0], valid=valid_all[rows], chunk_size=chunk)
    else:
        loss = L.siglip_loss(za, zb, *params, valid=valid_all[rows], chunk_size=chunk)
    loss.backward()

    ref_a, ref_b = za_all[valid_all].clone().requires_grad_(), zb_all[valid_all].clone().requires_grad_()
    ref = REFS[name](ref_a, ref_b, ref_params).mean()
    want_a, want_b = (torch.zeros_like(za_all) for _ in range(2))
    want_a[valid_all], want_b[valid_all], *want_params = torch.autograd.grad(ref, [ref_a, ref_b, *ref_params])
    check(f"masked {name} mean loss over ranks", mean_over_ranks(loss), ref)
    check(f"masked {name} grad a", za.grad / world, want_a[rows])
    check(f"masked {name} grad b", zb.grad / world, want_b[rows])
    for p, want in zip(params, want_params):
        check(f"masked {name} grad scale", mean_over_ranks(p.grad), want)


def check_gradcache(check, name, chunk, rank, world):
    """Model parameter gradients with gradient caching against the global-batch reference."""
    xa_all, xb_all = global_inputs(world)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    ta, tb = towers_for(name)
    params = make_params(name)
    micro = [(xa_all[rows][i : i + MICRO], xb_all[rows][i : i + MICRO]) for i in range(0, N_LOCAL, MICRO)]

    with torch.no_grad():
        cached = [(ta(xa), tb(xb)) for xa, xb in micro]
    loss, grads, param_grads = embedding_grads(lambda a, b: ours(name, a, b, params, chunk), cached, params=params)
    for i, ((xa, xb), g) in enumerate(zip(micro, grads)):
        outs, gs = (ta(xa), tb(xb)), g
        if i == 0:  # the loss's own parameters enter exactly once
            outs, gs = (*outs, *params), (*g, *param_grads)
        surrogate_loss(outs, gs).backward()

    model_params = list(dict.fromkeys([*ta.parameters(), *tb.parameters()]))
    ref_ta, ref_tb = towers_for(name)
    ref_params = make_params(name)
    per_sample = REFS[name](ref_ta(xa_all), ref_tb(xb_all), ref_params)
    ref_model_params = list(dict.fromkeys([*ref_ta.parameters(), *ref_tb.parameters()]))
    ref_grads = torch.autograd.grad(per_sample.mean(), ref_model_params + ref_params)

    check("gradcache rank loss", loss, per_sample[rows].mean())
    for i, (p, ref) in enumerate(zip(model_params + params, ref_grads)):
        check(f"gradcache grad param {i}", mean_over_ranks(p.grad), ref)


def distributed_worker(rank, world, port):
    init_gloo(rank, world, port)
    try:
        failures = []
        c = Checker(f"world={world} rank={rank}")
        check_gather(c, rank, world)
        failures += c.failures
        for name in ("nt_xent", "clip", "siglip"):
            for chunk in (None, CHUNK):
                c = Checker(f"world={world} rank={rank} masked {name} chunk={chunk}")
                check_masked(c, name, chunk, rank, world)
                failures += c.failures
        for name in ("nt_xent", "clip", "siglip"):
            for chunk in (None, CHUNK):
                c = Checker(f"world={world} rank={rank} {name} chunk={chunk}")
                check_direct(c, name, chunk, rank, world)
                check_gradcache(c, name, chunk, rank, world)
                failures += c.failures
        # Every rank is done with every collective before any rank tears its group down: one
        # CI run saw a rank abort ("terminate called without an active exception") at the end.
        dist.barrier()
        assert not failures, "\n".join(failures)
    finally:
        dist.destroy_process_group()
    leave_at_once()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_losses_equal_global_batch(world):
    mp.spawn(distributed_worker, args=(world, free_port()), nprocs=world, join=True)


# ---------------------------------------------------------------------------------------------
# DeepSpeed: the gradient after the engine's averaging is the global-batch gradient
# ---------------------------------------------------------------------------------------------


DEEPSPEED_TOL = 1e-5  # DeepSpeed reduces fp32 (not fp64) gradients; a wrong 1/W would be ~0.5


class TwoTower(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.a, self.b = towers_for(name)
        # shape (1,), not (): DeepSpeed 0.19.8 broadcasts parameters with p.data.view(torch.uint8),
        # which raises for 0-dim tensors wider than a byte.
        self.logit_scale = torch.nn.Parameter(torch.tensor([TEST_PARAMS["clip"][0]], dtype=torch.float64))

    def forward(self, xa, xb):
        return self.a(xa), self.b(xb)


def engine_loss(name, model, a, b):
    if name == "nt_xent":
        return L.nt_xent(a, b, TAU)
    return L.clip_loss(a, b, model.logit_scale)


def deepspeed_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    faulthandler.enable()
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    try:
        xa_all, xb_all = global_inputs(world)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        failures = []
        for name, stage, cached in [("nt_xent", 0, False), ("clip", 1, True), ("clip", 0, False), ("nt_xent", 1, True)]:
            model = TwoTower(name).float()
            gas = N_LOCAL // MICRO if cached else 1
            config = {"train_micro_batch_size_per_gpu": MICRO if cached else N_LOCAL,
                      "gradient_accumulation_steps": gas,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      # DeepSpeed 0.19 clips the gradient norm to 1.0 unless told otherwise
                      "gradient_clipping": 0.0, "steps_per_print": 10**9}
            engine, *_ = deepspeed.initialize(model=model, config=config,
                                              optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
            before = [p.detach().clone() for p in engine.module.parameters()]
            xa, xb = xa_all[rows].float(), xb_all[rows].float()
            if not cached:
                a, b = engine(xa, xb)
                engine.backward(engine_loss(name, engine.module, a, b))
                engine.step()
            else:
                micro = [(xa[i : i + MICRO], xb[i : i + MICRO]) for i in range(0, N_LOCAL, MICRO)]
                with torch.no_grad():
                    cached_z = [engine(*m) for m in micro]
                # The loss's own parameter (CLIP's logit scale; unused by NT-Xent, zero gradient)
                # joins the first micro-batch's surrogate, so it goes through the engine once.
                scale = engine.module.logit_scale
                _, grads, (g_scale,) = embedding_grads(lambda a, b: engine_loss(name, engine.module, a, b),
                                                       cached_z, params=[scale])
                for i, (m, g) in enumerate(zip(micro, grads)):
                    outs, gs = engine(*m), g
                    if i == 0:
                        outs, gs = (*outs, scale), (*g, g_scale)
                    # the cached loss is already the mean over the accumulated batch
                    engine.backward(surrogate_loss(outs, gs), scale_wrt_gas=False)
                    engine.step()
            # SGD, lr 1, no momentum: the update is minus the averaged gradient.
            updates = [b0 - p.detach() for b0, p in zip(before, engine.module.parameters())]

            ref_model = TwoTower(name).float().double()  # the same fp32 weights, in fp64
            a, b = ref_model(xa_all.float().double(), xb_all.float().double())
            per_sample = REFS[name](a, b, [] if name == "nt_xent" else [ref_model.logit_scale])
            ref_grads = torch.autograd.grad(per_sample.mean(), list(ref_model.parameters()), allow_unused=True)
            c = Checker(f"deepspeed {name} zero={stage} gradcache={cached} rank={rank}", DEEPSPEED_TOL)
            for i, (u, g) in enumerate(zip(updates, ref_grads)):
                c(f"update of param {i}", u, torch.zeros_like(u) if g is None else g)
            failures += c.failures
        dist.barrier()  # as in distributed_worker: nobody tears down while a peer communicates
        assert not failures, "\n".join(failures)
    finally:
        dist.destroy_process_group()
    leave_at_once()


def test_deepspeed_engine_gradient_equals_global_batch():
    pytest.importorskip("deepspeed")
    mp.spawn(deepspeed_worker, args=(2, free_port()), nprocs=2, join=True)
