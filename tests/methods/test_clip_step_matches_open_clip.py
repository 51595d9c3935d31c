"""ssl_dist's CLIP training step equals open_clip's own trainer's step.

Two spawned gloo ranks start from the same weights and take the same STEPS optimizer steps on
the same per-rank batches, once as ssl_dist does (method.name=clip, the real DeepSpeed engine
at ZeRO-2, torch's AdamW, the linear warm-up) and once as `open_clip_train` does (open_clip's
CLIP in DistributedDataParallel, `ClipLoss(local_loss=True, gather_with_grad=True)`, AdamW over
its trainer's two parameter groups, its `const_lr` warm-up and the logit-scale clamp after each
step). Every parameter of both towers and the logit scale must agree: benchmarks/clip.py
compares the two trainers' zero-shot accuracy at the same wall-clock budget, and a gap there
is then the data pipeline's or throughput's, not the step's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from ranks import join_group, spawn_ranks

from ssl_dist import config
from ssl_dist.methods import resolve

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "clip-tiny.json"
WORLD, BATCH, STEPS, LR, WD, WARMUP = 2, 8, 3, 1e-3, 0.1, 2
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def batches_of(rank: int, tokenizer) -> list[dict]:
    """This rank's STEPS batches of BATCH (image, caption tokens) pairs; captions of 3 to 5
    words, so each batch's text runs to its own longest one."""
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(STEPS):
        names = [CLASSES[int(i)] for i in torch.randint(0, 10, (BATCH,), generator=g)]
        captions = [f"a {'blurry ' * int(k)}photo of a {name}." for name, k in
                    zip(names, torch.randint(0, 3, (BATCH,), generator=g))]
        out.append({"image": torch.randn(BATCH, 3, 32, 32, generator=g), "tokens": tokenizer(captions)})
    return out


def ours(rank: int, batches: list[dict]) -> tuple[dict, dict]:
    """(initial state of the module, its parameters after STEPS steps of ssl_dist's loop step)."""
    from ssl_dist.engine import build_engine
    from ssl_dist.step import optimizer_step

    cfg = config.load(None, ["method.name=clip", f"model.clip_arch={TINY}", f"data.batch_size={BATCH}",
                             f"run.num_workers={WORLD}", "train.zero_stage=2", "train.max_steps=10",
                             "optim.name=adamw", f"optim.lr={LR}", f"optim.weight_decay={WD}",
                             f"optim.warmup_steps={WARMUP}", "optim.schedule=constant"])
    method = resolve("clip")(cfg, rank=rank)
    torch.manual_seed(0)  # the same initial weights on every rank, as the loop's seed gives
    module = method.build_module()
    initial = {name: t.detach().clone() for name, t in module.state_dict().items()}
    engine = build_engine(module, cfg, WORLD)
    for batch in batches:
        optimizer_step(engine, method, [batch])
    return initial, {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def theirs(rank: int, initial: dict, batches: list[dict]) -> dict:
    """open_clip_train's step (main.py's optimizer, train.py's train_one_epoch) from `initial`."""
    import open_clip
    from open_clip.loss import ClipLoss
    from open_clip_train.scheduler import const_lr
    from torch.nn.parallel import DistributedDataParallel

    open_clip.add_model_config(str(TINY))
    model = open_clip.create_model(TINY.stem)
    state = {name[len("clip."):]: t for name, t in initial.items() if name.startswith("clip.")}
    model.load_state_dict({**state, "logit_scale": initial["logit_scale"].reshape(())})
    ddp = DistributedDataParallel(model)
    # open_clip_train/main.py's parameter groups, verbatim
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD}],
                                  lr=LR, betas=(0.9, 0.999), eps=1e-8)
    scheduler = const_lr(optimizer, LR, WARMUP, STEPS)
    loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=WORLD)
    for step, batch in enumerate(batches):  # open_clip_train/train.py's train_one_epoch, fp32
        scheduler(step)
        optimizer.zero_grad()
        image, text, scale = ddp(batch["image"], batch["tokens"])
        loss(image, text, scale).backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def run_rank(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from ssl_dist.model import build_tokenizer

    join_group(rank, port, world=WORLD)
    batches = batches_of(rank, build_tokenizer(str(TINY)))
    initial, mine = ours(rank, batches)
    other = theirs(rank, initial, batches)
    if rank == 0:
        out["initial"], out["ours"], out["theirs"] = initial, mine, other
    dist.barrier()
    dist.destroy_process_group()


def key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """Mask of the key third of an attention's in_proj_bias. q . (k + c) shifts every logit
    of a query by the same q . c, which softmax ignores: the gradient there is 0 in exact
    arithmetic, rounding noise of ~1e-10 in float, and AdamW divides it by its own root mean
    square, turning noise into steps of up to lr. Both trainers do that, each with its noise."""
    mask = torch.zeros_like(t, dtype=torch.bool)
    if name.endswith("attn.in_proj_bias"):
        third = t.shape[0] // 3
        mask[third:2 * third] = True
    return mask


def test_three_adamw_steps_of_ssl_dist_equal_open_clip_trainers_steps():
    got = spawn_ranks(run_rank, world=WORLD)
    initial, mine, other = got["initial"], got["ours"], got["theirs"]
    assert {f"clip.{name}" for name in other if name != "logit_scale"} | {"logit_scale"} == set(mine)
    for name, theirs_value in other.items():
        key = name if name == "logit_scale" else f"clip.{name}"
        ours_value = mine[key].reshape(theirs_value.shape)
        assert not torch.equal(ours_value, initial[key].reshape(theirs_value.shape)), f"{name} did not move"
        keep = ~key_bias(name, theirs_value)
        diff = (ours_value - theirs_value).abs()[keep]
        off = diff > 1e-6 + 1e-5 * theirs_value.abs()[keep]
        # A wrong lr, warm-up, decay or gradient moves nearly every element by ~1e-5 to 1e-3;
        # a few elements whose gradient is itself near rounding noise (AdamW normalises it)
        # may differ, by far less than one step of lr.
        assert int(off.sum()) <= max(2, off.numel() // 5000), f"{name}: {int(off.sum())} of {off.numel()} differ"
        assert float(diff.max()) < LR / 20, f"{name}: {float(diff.max()):.2e}"
