"""engine.py: which parameters weight decay reaches (without DeepSpeed), and LARS through the real
engine on spawned ranks against a per-parameter reference."""

from __future__ import annotations

import math

import pytest
import torch

from ssl_dist import config
from ssl_dist.engine import build_optimizer, decay_groups
from ssl_dist.model import build_image_text_model, build_model

TINY = "jobs/configs/clip-tiny.json"


def test_biases_norms_and_a_methods_scalars_do_not_decay():
    from pathlib import Path

    arch = str(Path(__file__).resolve().parents[1] / TINY)
    clip = build_image_text_model(arch, image_size=32, init_logit_scale=math.log(10), init_logit_bias=-10.0)
    names = {id(p): n for n, p in clip.named_parameters()}
    decayed, kept = ([names[id(p)] for p in g["params"]] for g in decay_groups(clip, 0.2))
    # open_clip's own trainer exempts the same ones (p.ndim < 2: also ViT's class embedding)
    assert {"logit_scale", "logit_bias", "clip.ln_final.weight", "clip.visual.class_embedding"} <= set(kept)
    assert "clip.visual.conv1.weight" in decayed and "clip.token_embedding.weight" in decayed
    assert not any("ln" in n.rsplit(".", 2)[-2] for n in decayed if "." in n)  # no LayerNorm gain decays
    assert len(decayed) + len(kept) == len(list(clip.parameters()))


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_a_step_without_gradient_shrinks_only_the_decayed_weights(name):
    cfg = config.load(None, [f"optim.name={name}", "optim.weight_decay=0.5", "optim.lr=0.1",
                             "model.arch=resnet18", "model.proj_hidden_dim=16", "model.proj_dim=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        if p.ndim >= 2:  # decoupled (AdamW) or L2 (SGD) decay alone: w <- w (1 - lr wd)
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.1 * 0.5), msg=n)
        else:
            assert torch.equal(p.detach(), before[n]), n


# ---- LARS through the real engine ---------------------------------------------------------

LARS_LR, LARS_WD, TRUST = 2.0, 0.1, 0.001  # the base lr at optim.base_batch; timm's trust coefficient


class Small(torch.nn.Module):
    """Matrices, biases, a BatchNorm and a LayerNorm: every kind of parameter LARS treats apart."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.BatchNorm1d(16),
                                        torch.nn.Linear(16, 8), torch.nn.LayerNorm(8))

    def forward(self, x):
        return self.body(x)


def batch_of(rank: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + rank))


def loss_of(model, x):
    # a sum, not a mean: the norms' plain SGD steps are then well above the comparison's tolerance
    return (model(x) - 1.0).pow(2).sum()


def lars_reference(model: torch.nn.Module, world: int, lr: float) -> dict[str, torch.Tensor]:
    """One LARS step written out per parameter in fp64, on the gradient DeepSpeed averages over
    `world` ranks (each rank's BatchNorm sees its own batch): matrices decay and are adapted by
    trust ||w|| / (||g|| + wd ||w||); biases and norm weights take plain SGD steps."""
    import copy

    ref = copy.deepcopy(model).double()
    for rank in range(world):
        (loss_of(ref, batch_of(rank).double()) / world).backward()
    out = {}
    for name, p in ref.named_parameters():
        w, g = p.detach(), p.grad.detach()
        if p.ndim >= 2:
            trust = TRUST * w.norm() / (g.norm() + LARS_WD * w.norm() + 1e-8)
            update = (g + LARS_WD * w) * trust  # the first step: the momentum buffer is this update
        else:
            update = g
        out[name] = w - lr * update
    return out


def lars_step_on_ranks(rank: int, port: int, world: int, stage: int, out: dict) -> None:
    from ranks import join_group

    from ssl_dist.engine import build_engine

    join_group(rank, port, world=world)
    cfg = config.load(None, ["optim.name=lars", f"optim.lr={LARS_LR}", f"optim.weight_decay={LARS_WD}",
                             "optim.warmup_steps=0", "optim.lr_scaling=linear", "optim.base_batch=2",
                             f"train.zero_stage={stage}", "data.batch_size=4"])
    torch.manual_seed(0)
    model = Small()
    lr = LARS_LR * 4 * world / 2  # the linear rule: global batch 4 x world over base batch 2
    expected = lars_reference(model, world, lr)
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    engine = build_engine(model, cfg, world, micro_batch=4)
    assert engine.get_lr() == pytest.approx([lr] * len(engine.get_lr()))
    engine.backward(loss_of(engine.module, batch_of(rank)))
    engine.step()
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    else:
        after = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    errors = {n: float((after[n].double() - expected[n]).abs().max()) for n in expected}
    moved = {n: float((expected[n] - before[n]).abs().max()) for n in expected}
    out[rank] = errors, moved


@pytest.mark.parametrize("world, stage", [(1, 0), (2, 0), (2, 2), (2, 3)])
def test_lars_step_of_the_engine_matches_a_per_parameter_reference(world, stage):
    """Every parameter after one step of timm's LARS in the real engine equals the hand-written
    update: matrices adapted by their own norms (also where ZeRO hands the optimizer a slice of
    them), biases and norm weights neither decayed nor adapted."""
    from ranks import spawn_ranks

    out = spawn_ranks(lars_step_on_ranks, world, stage, world=world)
    for rank in range(world):
        errors, moved = out[rank]
        # Relative to each parameter's own step: fp32 gradients through the two norms differ from
        # fp64 by up to ~0.3% of a small step, while every mistake this catches moves a step by
        # tens of percent or more (decay on a bias adds lr x wd x b; a LARS ratio on a bias
        # rescales its step by 0.001 ||b|| / ||g||; an unadapted matrix steps lr x g in full)
        wrong = {n: (errors[n], moved[n]) for n in errors if not errors[n] < 0.01 * moved[n]}
        assert not wrong, wrong  # (error, step) of each parameter off by more than 1% of its step


# ---- the batch rule after a restart on another global batch --------------------------------


def restart_on_another_batch(rank: int, port: int, stage: int, folder: str, out: dict) -> None:
    """Two steps at micro-batch 4, a checkpoint, and an engine at micro-batch 6 restored from it:
    the rates that engine's optimizer holds before and after `follow_schedule`."""
    from ranks import join_group

    from ssl_dist.engine import build_engine, follow_schedule, lr_factor

    join_group(rank, port, world=1)
    overrides = ["optim.name=lars", "optim.lr=0.5", "optim.warmup_steps=0", "optim.lr_scaling=linear",
                 "optim.base_batch=4", "train.max_steps=10", f"train.zero_stage={stage}", "data.batch_size=4"]
    cfg = config.load(None, overrides)
    torch.manual_seed(0)
    engine = build_engine(Small(), cfg, 1, micro_batch=4)
    for _ in range(2):
        engine.backward(loss_of(engine.module, batch_of(0)))
        engine.step()
    saved = engine.get_lr()
    engine.save_checkpoint(folder, tag="t")
    torch.manual_seed(0)
    restarted = build_engine(Small(), cfg, 1, micro_batch=6)  # global batch 4 -> 6: scale 1 -> 1.5
    restarted.load_checkpoint(folder, tag="t", load_optimizer_states=True, load_lr_scheduler_states=True)
    loaded = restarted.get_lr()
    follow_schedule(restarted)
    out[rank] = {"saved": saved, "loaded": loaded, "followed": restarted.get_lr(),
                 "expected": 0.5 * 1.5 * lr_factor(2, warmup_steps=0, max_steps=10, schedule=cfg.optim.schedule)}


@pytest.mark.parametrize("stage", [0, 2])
def test_a_restart_on_another_global_batch_steps_at_its_own_scale_from_the_first_step(stage, tmp_path):
    """The restored optimizer holds the rate of the checkpoint's batch (its scheduler has not
    stepped yet); follow_schedule puts the new batch's rate there before the first step."""
    from ranks import spawn_ranks

    result = spawn_ranks(restart_on_another_batch, stage, str(tmp_path), world=1)[0]
    assert result["loaded"] == pytest.approx(result["saved"])  # what DeepSpeed restores: the old scale
    assert result["followed"] == pytest.approx([result["expected"]] * len(result["followed"]))
    assert result["expected"] == pytest.approx(1.5 * result["saved"][0])
