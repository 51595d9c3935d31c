"""The loop's optimizer step (`ssl_dist/step.py`) in a real 2-rank DeepSpeed engine (gloo):
gradient caching over k micro-batches gives the same update as one step over the whole batch,
for SimCLR and for a method whose loss reads a learnable scale (method state in the module)."""

from __future__ import annotations


import pytest
import torch
from ranks import join_group, spawn_ranks

from ssl_dist import config

MICRO, ACCUMULATE, WORLD = 4, 3, 2


def tiny_model() -> torch.nn.Module:
    # No BatchNorm: its batch statistics differ between a micro-batch and the whole batch,
    # which would make the two runs differ for a reason unrelated to the gradient.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 8))


def batches_of(rank: int) -> list[dict]:
    """This rank's ACCUMULATE micro-batches of MICRO two-view samples (fixed random data)."""
    g = torch.Generator().manual_seed(100 + rank)
    return [{"view1": torch.randn(MICRO, 3, 4, 4, generator=g), "view2": torch.randn(MICRO, 3, 4, 4, generator=g)}
            for _ in range(ACCUMULATE)]


def run_rank(rank: int, port: int, zero_stage: int, out: dict) -> None:
    import torch.distributed as dist

    from ssl_dist.engine import build_engine
    from ssl_dist.methods.simclr import SimCLR
    from ssl_dist.step import optimizer_step

    join_group(rank, port)
    micro = batches_of(rank)
    whole = [{k: torch.cat([b[k] for b in micro]) for k in ("view1", "view2")}]
    results = {}
    for name, accumulate, batches, batch_size in (("whole", 1, whole, MICRO * ACCUMULATE),
                                                  ("cached", ACCUMULATE, micro, MICRO)):
        cfg = config.load(None, [f"data.batch_size={batch_size}", f"train.accumulate={accumulate}",
                                 f"train.zero_stage={zero_stage}", "optim.name=sgd", "optim.lr=0.5",
                                 "optim.momentum=0", "optim.weight_decay=0", "optim.warmup_steps=0",
                                 "loss.temperature=0.5", "loss.chunk_size=5", "train.max_steps=10"])
        engine = build_engine(tiny_model(), cfg, WORLD)
        loss = optimizer_step(engine, SimCLR(cfg), batches)
        params = [p.detach().clone() for p in engine.module.parameters()]
        if zero_stage == 3:
            from deepspeed import zero

            with zero.GatheredParameters(list(engine.module.parameters())):
                params = [p.detach().clone() for p in engine.module.parameters()]
        results[name] = (float(loss), params)
    if rank == 0:
        out.update(results)
    dist.barrier()  # nobody tears its group down while a peer still communicates
    dist.destroy_process_group()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_gradient_caching_step_equals_whole_batch_step(zero_stage):
    results = spawn_ranks(run_rank, zero_stage)
    (loss_whole, p_whole), (loss_cached, p_cached) = results["whole"], results["cached"]
    assert loss_cached == pytest.approx(loss_whole, rel=1e-5)
    initial = list(tiny_model().parameters())
    for before, a, b in zip(initial, p_whole, p_cached):
        assert not torch.allclose(a, before.detach())  # the step moved the parameters...
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # ...and both ways the same


def run_precision(rank: int, port: int, out: dict) -> None:
    """One step of the real ResNet-18 (CIFAR stem) in fp32 and in bf16, world size 1."""
    import torch.distributed as dist

    from ssl_dist.engine import build_engine
    from ssl_dist.model import build_model
    from ssl_dist.methods.simclr import SimCLR
    from ssl_dist.step import optimizer_step

    join_group(0, port, world=1)
    g = torch.Generator().manual_seed(7)
    batch = {"view1": torch.rand(8, 3, 32, 32, generator=g), "view2": torch.rand(8, 3, 32, 32, generator=g)}
    for precision in ("fp32", "bf16"):
        cfg = config.load(None, ["data.batch_size=8", "model.cifar_stem=true", f"train.precision={precision}",
                                 "optim.name=sgd", "optim.warmup_steps=0", "train.max_steps=10"])
        torch.manual_seed(0)
        engine = build_engine(build_model(cfg.model), cfg, 1)
        bn = engine.module.encoder.bn1
        stats_before = bn.running_mean.detach().float().clone()
        loss = optimizer_step(engine, SimCLR(cfg), [dict(batch)])
        out[precision] = {"loss": float(loss), "stats_dtype": bn.running_mean.dtype,
                          "stats_moved": not torch.allclose(bn.running_mean.float(), stats_before)}
    dist.destroy_process_group()


def test_bf16_step_with_batchnorm_matches_fp32():
    # DeepSpeed >= 0.19 casts parameters but not buffers to bf16: without our buffer_dtype the
    # BatchNorm layers of every ResNet failed at the first bf16 step.
    results = spawn_ranks(run_precision, world=1)
    fp32, bf16 = results["fp32"], results["bf16"]
    assert bf16["stats_dtype"] == torch.bfloat16 and bf16["stats_moved"] and fp32["stats_moved"]
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)


def run_clipping(rank: int, port: int, out: dict) -> None:
    """One SGD step (lr 1, no momentum or decay) of a 2-rank ZeRO-2 engine per optim.grad_clip."""
    import torch.distributed as dist

    from ssl_dist.engine import build_engine
    from ssl_dist.methods.simclr import SimCLR
    from ssl_dist.step import optimizer_step

    join_group(rank, port)
    batch = {k: torch.cat([b[k] for b in batches_of(rank)]) for k in ("view1", "view2")}
    for clip in ("default", 0.5):
        overrides = [] if clip == "default" else [f"optim.grad_clip={clip}"]
        cfg = config.load(None, [f"data.batch_size={MICRO * ACCUMULATE}", "train.zero_stage=2", "optim.name=sgd",
                                 "optim.lr=1", "optim.momentum=0", "optim.weight_decay=0", "optim.warmup_steps=0",
                                 "optim.schedule=constant", "train.max_steps=10", *overrides])
        model = tiny_model()
        before = [p.detach().clone() for p in model.parameters()]
        engine = build_engine(model, cfg, WORLD)
        optimizer_step(engine, SimCLR(cfg), [batch])
        update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, engine.module.parameters())])
        if rank == 0:
            out[str(clip)] = update
    dist.barrier()
    dist.destroy_process_group()


def test_gradient_is_clipped_only_when_the_config_says_so():
    # DeepSpeed >= 0.19 clips the gradient norm to 1.0 unless its config says otherwise; the
    # engine must not, by default, since a plain torch optimizer (and every published recipe) does not.
    results = spawn_ranks(run_clipping)
    unclipped, clipped = results["default"], results["0.5"]
    assert unclipped.norm() > 2.0  # the global-batch gradient itself (lr 1): well above 1.0
    torch.testing.assert_close(clipped, unclipped * 0.5 / unclipped.norm(), rtol=1e-4, atol=1e-7)


def run_masking(rank: int, port: int, out: dict) -> None:
    """SGD updates (lr 1) of a batch with one invalid slot per rank, and of the batch without it."""
    import torch.distributed as dist

    from ssl_dist.engine import build_engine
    from ssl_dist.methods.simclr import SimCLR
    from ssl_dist.step import optimizer_step

    join_group(rank, port)
    whole = {k: torch.cat([b[k] for b in batches_of(rank)]) for k in ("view1", "view2")}
    bad = 5 if rank == 0 else 9  # in another micro-batch on each rank
    masked = {k: v.clone() for k, v in whole.items()}
    for k in masked:  # what the loader does: the slot holds a copy of a good sample
        masked[k][bad] = whole[k][0]
    masked["__valid__"] = torch.ones(MICRO * ACCUMULATE, dtype=torch.bool)
    masked["__valid__"][bad] = False
    kept = torch.arange(MICRO * ACCUMULATE) != bad
    removed = {k: v[kept] for k, v in whole.items()}

    def micro(batch):
        """ACCUMULATE micro-batches of MICRO consecutive slots; the one that lost a slot has one fewer."""
        full = len(batch["view1"]) == MICRO * ACCUMULATE
        sizes = [MICRO - (not full and i == bad // MICRO) for i in range(ACCUMULATE)]
        parts = {k: torch.split(v, sizes) for k, v in batch.items()}
        return [{k: parts[k][i] for k in batch} for i in range(ACCUMULATE)]

    for accumulate in (1, ACCUMULATE):
        for name, batch in (("masked", masked), ("removed", removed)):
            cfg = config.load(None, [f"data.batch_size={MICRO * ACCUMULATE // accumulate}",
                                     f"train.accumulate={accumulate}", "train.zero_stage=2", "optim.name=sgd",
                                     "optim.lr=1", "optim.momentum=0", "optim.weight_decay=0",
                                     "optim.warmup_steps=0", "optim.schedule=constant", "train.max_steps=10"])
            model = tiny_model()
            before = [p.detach().clone() for p in model.parameters()]
            engine = build_engine(model, cfg, WORLD)
            optimizer_step(engine, SimCLR(cfg), [batch] if accumulate == 1 else micro(batch))
            if rank == 0:
                out[f"{name}{accumulate}"] = [b - p.detach() for b, p in zip(before, engine.module.parameters())]
    dist.barrier()
    dist.destroy_process_group()


def test_invalid_slot_gives_the_update_of_the_batch_without_it():
    # A skipped sample's slot holds a copy of a good one (so that every rank's batch keeps its
    # size); the step must be the one of the batch without that slot, not count the copy twice.
    results = spawn_ranks(run_masking)
    for accumulate in (1, ACCUMULATE):
        for got, want in zip(results[f"masked{accumulate}"], results[f"removed{accumulate}"]):
            assert want.abs().max() > 1e-4
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


class ScaledModel(torch.nn.Module):
    """tiny_model plus method state: CLIP's learnable log inverse temperature, shape (1,)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_model()
        self.logit_scale = torch.nn.Parameter(torch.full((1,), 2.0))

    def forward(self, views):
        return self.net(views), self.logit_scale


def scaled_method():
    """A method whose loss reads its module's learnable scale through forward's outputs, as
    CLIP and SigLIP will: gradient caching must send the scale's gradient through the engine."""
    from ssl_dist.loss import clip_loss
    from ssl_dist.methods import Method

    class Scaled(Method):
        def forward(self, engine, batch):
            z, scale = engine(torch.cat([batch["view1"], batch["view2"]]))
            z1, z2 = z.chunk(2)
            return z1, z2, scale

        def loss(self, outputs, valid):
            z1, z2, scale = outputs
            return clip_loss(z1, z2, scale)

    return Scaled


def run_scaled(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from ssl_dist.engine import build_engine
    from ssl_dist.step import optimizer_step

    join_group(rank, port)
    micro = batches_of(rank)
    whole = [{k: torch.cat([b[k] for b in micro]) for k in ("view1", "view2")}]
    for name, accumulate, batches, batch_size in (("whole", 1, whole, MICRO * ACCUMULATE),
                                                  ("cached", ACCUMULATE, micro, MICRO)):
        cfg = config.load(None, [f"data.batch_size={batch_size}", f"train.accumulate={accumulate}",
                                 "train.zero_stage=2", "optim.name=sgd", "optim.lr=0.5", "optim.momentum=0",
                                 "optim.weight_decay=0", "optim.warmup_steps=0", "train.max_steps=10"])
        engine = build_engine(ScaledModel(), cfg, WORLD)
        loss = optimizer_step(engine, scaled_method()(cfg), batches)
        if rank == 0:
            out[name] = (float(loss), {n: p.detach().clone() for n, p in engine.module.named_parameters()})
    dist.barrier()
    dist.destroy_process_group()


def test_gradient_caching_carries_the_gradient_of_method_state():
    results = spawn_ranks(run_scaled)
    (loss_whole, p_whole), (loss_cached, p_cached) = results["whole"], results["cached"]
    assert loss_cached == pytest.approx(loss_whole, rel=1e-5)
    assert abs(float(p_whole["logit_scale"]) - 2.0) > 1e-3  # the step moved the scale...
    for name, a in p_whole.items():
        torch.testing.assert_close(p_cached[name], a, rtol=1e-5, atol=1e-6)  # ...and each parameter the same both ways
