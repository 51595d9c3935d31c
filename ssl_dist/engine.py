"""DeepSpeed engine from the typed config: ZeRO stage, precision, optimizer, LR schedule and
the batch-scaling rule (lr_rule.py).

The optimizer is a plain torch optimizer handed to DeepSpeed (DeepSpeed's fused ones need
a GPU); ZeRO partitions its state all the same.
"""

from __future__ import annotations

import math

import torch

from ssl_dist.lr_rule import lr_scale
from ssl_dist.param_groups import decay_groups, param_groups  # noqa: F401 (decay_groups: engine's name too)


def deepspeed_config(cfg, world_size: int, micro_batch: int | None = None) -> dict:
    """The DeepSpeed JSON config for a `config.Config` run on `world_size` ranks of
    `micro_batch` samples each (default data.batch_size; a resumed run on another number of
    workers passes the per-worker batch of its `checkpoint.BatchPlan`)."""
    micro_batch = micro_batch or cfg.data.batch_size
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "train_batch_size": micro_batch * world_size * cfg.train.accumulate,
        "gradient_accumulation_steps": cfg.train.accumulate,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        # Our optimizers are torch's own: DeepSpeed only vouches for its fused ones.
        "zero_allow_untested_optimizer": True,
        # Always explicit: DeepSpeed >= 0.19 clips the gradient norm to 1.0 when the key is
        # absent, which silently shrank every SGD step of a run whose norm is larger.
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10**9,  # progress is ours; DeepSpeed's own log would repeat it per rank
        "wall_clock_breakdown": False,
    }
    if cfg.train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # DeepSpeed >= 0.19 casts only parameters and keeps buffers fp32, but BatchNorm wants
        # its running statistics in the dtype of its weight: cast them too, as module.bfloat16()
        # did in earlier releases.
        ds["data_types"] = {"buffer_dtype": "bf16"}
    return ds


def build_optimizer(model: torch.nn.Module, optim_cfg, *, partitioned: bool = False) -> torch.optim.Optimizer:
    """AdamW, SGD with momentum, or timm's LARS (SGD momentum with layer-wise trust ratios)
    over `model`'s parameters, biases and norm weights neither decayed nor adapted
    (`param_groups`). `partitioned`: the engine hands the optimizer slices of each group
    (ZeRO, or DeepSpeed's bf16 optimizer), so LARS takes one group per matrix and the
    norms of the whole layer (`lars.PartitionedLars`); its `step` is then collective."""
    if optim_cfg.name == "lars":
        from timm.optim import Lars

        from ssl_dist.lars import PartitionedLars

        groups = param_groups(model, optim_cfg.weight_decay, lars=True, per_parameter=partitioned)
        return (PartitionedLars if partitioned else Lars)(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum)
    groups = decay_groups(model, optim_cfg.weight_decay)
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr)
    return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum)


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str = "cosine") -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine decay to 0 at `max_steps` (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_engine(model: torch.nn.Module, cfg, world_size: int, micro_batch: int | None = None):
    """Wrap `model` in a DeepSpeed engine; every rank calls this (it is collective).

    The process group must already exist (Ray Train made it); DeepSpeed adopts it.
    Returns the engine; its optimizer, LR scheduler and ZeRO partitions come with it and
    are saved/restored by `ssl_dist.checkpoint`. Every collective of the engine's groups
    fails after run.collective_timeout_s.

    The schedule's peak is optim.lr scaled by optim.lr_scaling at this engine's global batch
    (micro_batch x world_size x train.accumulate). The scale lives in the schedule's factor,
    not in its base lrs (optim.lr, which a checkpoint's scheduler state carries): restored
    after a restart on another global batch, the schedule follows the new one once
    `follow_schedule` has put the restored optimizer's lr in line.
    """
    from datetime import timedelta

    import deepspeed

    from ssl_dist.collective import bound_every_group

    deepspeed.init_distributed(dist_backend="nccl" if cfg.run.use_gpu else "gloo",
                               timeout=timedelta(seconds=cfg.run.collective_timeout_s))
    partitioned = cfg.train.zero_stage > 0 or cfg.train.precision == "bf16"  # DeepSpeed flattens the groups
    optimizer = build_optimizer(model, cfg.optim, partitioned=partitioned)
    global_batch = (micro_batch or cfg.data.batch_size) * world_size * cfg.train.accumulate
    scale = lr_scale(cfg.optim.lr_scaling, global_batch, cfg.optim.base_batch)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731 (DeepSpeed calls it with its optimizer)
        opt, lambda step: scale * lr_factor(step, warmup_steps=cfg.optim.warmup_steps,
                                            max_steps=cfg.train.max_steps, schedule=cfg.optim.schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg, world_size, micro_batch))
    # DeepSpeed reduces gradients on a copy of the world group that it makes with torch's
    # default timeout (30 minutes under gloo), not the one the default group was given.
    bound_every_group(cfg.run.collective_timeout_s)
    return engine


def follow_schedule(engine) -> list[float]:
    """After a restore, every rank: set the optimizer's learning rates to what this engine's
    schedule gives at the restored step, and return them.

    A checkpoint's optimizer state carries the lr its own schedule had set for the next step;
    the schedule's base lrs and step come back with it, but its factor (warm-up, decay and the
    optim.lr_scaling scale) is this engine's, and LambdaLR applies it only at its next step,
    after the first optimizer step of the restart. Without this, that first step would still
    run at the old global batch's scale. Where nothing changed it sets what was there.
    """
    scheduler = engine.lr_scheduler
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    return rates
