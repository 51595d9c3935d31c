"""method.name=mocov3 (`ssl_dist/methods/mocov3.py`): the momentum schedule, and the momentum
encoder through the real 2-rank DeepSpeed engine (gloo) at ZeRO 1, 2 and 3: after k steps it is
the EMA of the online parameters after each step, applied by hand here to the whole gathered
tensors, the same at every stage, and its update count travels in the module's state."""

from __future__ import annotations

import pytest
import torch
from ranks import join_group, spawn_ranks

from ssl_dist import config
from ssl_dist.methods import resolve
from ssl_dist.methods.mocov3 import momentum_at

WORLD, MICRO, STEPS, MAX_STEPS, BASE = 2, 4, 3, 4, 0.5
STAGES = (1, 2, 3)


def mocov3_cfg(*overrides: str) -> config.Config:
    return config.load(None, ["method.name=mocov3", "model.width=8", "model.proj_hidden_dim=32", "model.proj_dim=16",
                              "data.image_size=16", f"data.batch_size={MICRO}", f"method.momentum={BASE}",
                              f"train.max_steps={MAX_STEPS}", "optim.warmup_steps=0", "optim.lr=0.05", *overrides])


def test_momentum_rises_on_a_cosine_from_the_configured_value_to_one():
    assert momentum_at(0, 0.99, 100) == 0.99
    assert momentum_at(50, 0.99, 100) == pytest.approx(0.995)
    assert momentum_at(100, 0.99, 100) == 1.0 and momentum_at(120, 0.99, 100) == 1.0
    values = [momentum_at(s, 0.9, 10) for s in range(11)]
    assert values == sorted(values)


def test_the_module_holds_both_branches_and_the_momentum_copy_is_frozen():
    module = resolve("mocov3")(mocov3_cfg()).build_module()
    online = dict(module.encoder.named_parameters())
    momentum = dict(module.momentum.encoder.named_parameters())
    assert online.keys() == momentum.keys()
    assert all(torch.equal(online[n], momentum[n]) for n in online)  # starts as a copy
    assert all(p.requires_grad for p in module.predictor.parameters())
    assert not any(p.requires_grad for p in module.momentum.parameters())
    keys = module.state_dict().keys()
    assert "momentum_updates" in keys and any(k.startswith("momentum.head.") for k in keys)  # in every checkpoint
    q, k = module.eval()(torch.randn(3, 3, 16, 16))
    assert q.shape == k.shape == (3, 16) and q.requires_grad and not k.requires_grad


def batches_of(rank: int, step: int) -> list[dict]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return [{"view1": torch.randn(MICRO, 3, 16, 16, generator=g), "view2": torch.randn(MICRO, 3, 16, 16, generator=g)}]


def run_rank(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.zero import GatheredParameters

    from ssl_dist.engine import build_engine
    from ssl_dist.step import optimizer_step

    join_group(rank, port, WORLD)
    for stage in STAGES:
        cfg = mocov3_cfg(f"train.zero_stage={stage}")
        method = resolve("mocov3")(cfg, rank=rank)
        torch.manual_seed(0)  # as the loop: same initial weights on every rank
        engine = build_engine(method.build_module(), cfg, WORLD)
        module = engine.module
        online, momentum = list(module.online_parameters()), list(module.momentum.parameters())
        with GatheredParameters(momentum):
            expected = [p.detach().clone() for p in momentum]  # the EMA by hand, on whole tensors
        for step in range(STEPS):
            optimizer_step(engine, method, batches_of(rank, step))
            m = momentum_at(step, BASE, MAX_STEPS)
            with GatheredParameters(online):
                expected = [e * m + p.detach() * (1 - m) for e, p in zip(expected, online)]
        with GatheredParameters(online + momentum):
            if rank == 0:
                out[stage] = {"online": [p.detach().clone() for p in online],
                              "momentum": [p.detach().clone() for p in momentum], "expected": expected,
                              "updates": int(module.momentum_updates),
                              "names": [n for n, _ in module.momentum.named_parameters()]}
        dist.barrier()
    dist.barrier()  # nobody tears its group down while a peer still communicates
    dist.destroy_process_group()


def test_momentum_parameters_after_k_steps_are_the_ema_of_the_online_ones_at_zero_1_2_and_3():
    results = spawn_ranks(run_rank, world=WORLD)
    reference = results[STAGES[0]]
    for stage in STAGES:
        got = results[stage]
        assert got["updates"] == STEPS, stage
        moved = 0
        for name, mom, want, onl, ref in zip(got["names"], got["momentum"], got["expected"], got["online"],
                                             reference["momentum"]):
            torch.testing.assert_close(mom, want, rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {name}: not the EMA")
            torch.testing.assert_close(mom, ref, rtol=1e-5, atol=1e-6, msg=f"ZeRO-{stage} {name}: not ZeRO-1's")
            moved += not torch.allclose(mom, onl)
        assert moved > len(got["names"]) // 2, f"ZeRO-{stage}: the momentum encoder is the online one"


# ---- another number of workers: the momentum encoder survives DeepSpeed's universal checkpoint


def save_two_rank_checkpoints(rank: int, port: int, root: str, out: dict) -> None:
    """ZeRO-1 and ZeRO-3 engines of 2 ranks, STEPS steps each, saved as the checkpointer saves them."""
    import torch.distributed as dist
    from deepspeed.runtime.zero import GatheredParameters

    from ssl_dist.checkpoint.layout import TAG
    from ssl_dist.engine import build_engine
    from ssl_dist.step import optimizer_step

    join_group(rank, port, WORLD)
    for stage in (1, 3):
        cfg = mocov3_cfg(f"train.zero_stage={stage}")
        method = resolve("mocov3")(cfg, rank=rank)
        torch.manual_seed(0)
        engine = build_engine(method.build_module(), cfg, WORLD)
        for step in range(STEPS):
            optimizer_step(engine, method, batches_of(rank, step))
        engine.save_checkpoint(f"{root}/z{stage}", tag=TAG)
        with GatheredParameters(list(engine.module.parameters())):
            if rank == 0:
                out[stage] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        dist.barrier()
    dist.destroy_process_group()


def load_on_one_rank(rank: int, port: int, root: str, out: dict) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.zero import GatheredParameters

    from ssl_dist.checkpoint.layout import TAG
    from ssl_dist.checkpoint.restore import load_universal, to_universal
    from ssl_dist.engine import build_engine

    join_group(rank, port, 1)
    for stage in (1, 3):
        cfg = mocov3_cfg(f"train.zero_stage={stage}", f"data.batch_size={MICRO * WORLD}")
        torch.manual_seed(1)  # other initial weights: what is right afterwards was loaded
        engine = build_engine(resolve("mocov3")(cfg).build_module(), cfg, 1)
        to_universal(f"{root}/z{stage}/{TAG}", f"{root}/u{stage}/{TAG}")
        load_universal(engine, f"{root}/u{stage}")
        with GatheredParameters(list(engine.module.parameters())):
            out[stage] = ({n: p.detach().clone() for n, p in engine.module.named_parameters()},
                          int(engine.module.momentum_updates))
    dist.destroy_process_group()


def test_a_two_worker_checkpoint_resharded_for_one_keeps_the_momentum_encoder(tmp_path):
    saved = spawn_ranks(save_two_rank_checkpoints, str(tmp_path), world=WORLD)
    loaded = spawn_ranks(load_on_one_rank, str(tmp_path), world=1)
    for stage in (1, 3):
        params, updates = loaded[stage]
        assert updates == STEPS, f"ZeRO-{stage}: the momentum schedule restarted"
        assert params.keys() == saved[stage].keys()
        for name, want in saved[stage].items():
            torch.testing.assert_close(params[name], want, rtol=0, atol=0, msg=f"ZeRO-{stage} {name}: not restored")
