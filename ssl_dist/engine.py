"""DeepSpeed engine from the typed config: ZeRO stage, precision, optimizer, LR schedule.

The optimizer is a plain torch optimizer handed to DeepSpeed (DeepSpeed's fused ones need
a GPU); ZeRO partitions its state all the same.
"""

from __future__ import annotations

import math

import torch


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


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: matrices and kernels decay by `weight_decay`; biases, norm gains
    and a method's scalars (CLIP's logit scale, SigLIP's bias: every tensor of fewer than 2
    dims) do not, as in SimCLR's and CLIP's recipes. Decay on a log temperature would pull
    it to 0 (a scale of 1) all run long; on a norm's gain it fights the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]  # ZeRO flattens each group: none empty


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over `model`'s parameters (`decay_groups`)."""
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
    """
    from datetime import timedelta

    import deepspeed

    from ssl_dist.collective import bound_every_group

    deepspeed.init_distributed(dist_backend="nccl" if cfg.run.use_gpu else "gloo",
                               timeout=timedelta(seconds=cfg.run.collective_timeout_s))
    optimizer = build_optimizer(model, cfg.optim)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731 (DeepSpeed calls it with its optimizer)
        opt, lambda step: lr_factor(step, warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.train.max_steps,
                                    schedule=cfg.optim.schedule))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg, world_size, micro_batch))
    # DeepSpeed reduces gradients on a copy of the world group that it makes with torch's
    # default timeout (30 minutes under gloo), not the one the default group was given.
    bound_every_group(cfg.run.collective_timeout_s)
    return engine
