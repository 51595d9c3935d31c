"""MoCo v3 (Chen, Xie and He, 2021): a query from the online branch, a key from a momentum copy.

Two views of each image (as SimCLR's, per sample or per batch); the online encoder +
projector + predictor gives queries, the momentum encoder + projector (an EMA of the online
ones, no gradient) gives keys, and the loss is the symmetric InfoNCE of each view's queries
against the other view's keys of every rank (`loss.moco_infonce`).

The momentum branch lives in the module the engine wraps (requires_grad=False: outside the
optimizer), so ZeRO shards it and every checkpoint carries it, together with the count of EMA
updates done, which sets the momentum schedule: a resumed run continues where it stopped.
Under ZeRO-3 the EMA works on each rank's own partition of each parameter (`ds_tensor`), as
the optimizer does; no parameter is gathered for it.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import nn

from ssl_dist.loss import moco_infonce
from ssl_dist.methods.simclr import SimCLR


def momentum_at(update: int, base: float, max_steps: int) -> float:
    """The EMA momentum of the update after step `update` (0-based): `base` at 0, raised on a
    half cosine to 1 at `max_steps` (MoCo v3's schedule, per step rather than per epoch)."""
    progress = min(1.0, update / max(1, max_steps))
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


class MoCoV3Model(nn.Module):
    """Online encoder, projector (`head`) and predictor; their momentum copies; the count of EMA
    updates. `encoder` and `features` are what evaluation and export read, as on SimCLR's model."""

    def __init__(self, online: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder, self.head, self.feature_dim = online.encoder, online.head, online.feature_dim
        self.predictor = predictor
        self.momentum = copy.deepcopy(online).requires_grad_(False)  # .encoder, .head: starts equal
        # (1,), not (): DeepSpeed broadcasts module state at start-up; a long buffer is never cast to bf16
        self.register_buffer("momentum_updates", torch.zeros(1, dtype=torch.long))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F) features of the online encoder."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (queries (B, D), keys (B, D)); the keys without a graph."""
        queries = self.predictor(self.head(self.encoder(images)))
        with torch.no_grad():
            keys = self.momentum(images)
        return queries, keys

    def online_parameters(self):
        """The online encoder's and projector's parameters, in the order of `momentum.parameters()`."""
        return itertools.chain(self.encoder.parameters(), self.head.parameters())


@torch.no_grad()
def ema_update(model: MoCoV3Model, momentum: float) -> None:
    """momentum params <- m x momentum params + (1 - m) x online params, on every rank.

    Under ZeRO-3 each rank updates its own partition (`ds_tensor`, which the next forward
    gathers from); a parameter ZeRO-3 keeps whole on every rank (a small, "persistent" one,
    re-gathered by the optimizer after each step) is also updated whole, so that its gathered
    copy is not a step behind. Without ZeRO-3 the parameters are whole on every rank.
    """
    for target, source in zip(model.momentum.parameters(), model.online_parameters(), strict=True):
        if hasattr(target, "ds_tensor"):
            target.ds_tensor.mul_(momentum).add_(source.ds_tensor, alpha=1.0 - momentum)
        if target.data.numel() and target.data.shape == source.data.shape:  # whole here (0 when partitioned)
            target.data.mul_(momentum).add_(source.data, alpha=1.0 - momentum)


class MoCoV3(SimCLR):
    """SimCLR's two views; outputs (q1, q2, k1, k2), each (b, D) float32; the symmetric InfoNCE at
    `loss.temperature` with keys from every rank; after each optimizer step the EMA at
    `method.momentum` on its cosine schedule to 1 at `train.max_steps`."""

    name = "mocov3"
    fields = ("image",)

    def build_module(self) -> nn.Module:
        from ssl_dist import model

        online = model.build_model(self.cfg.model)
        dim = self.cfg.model.proj_dim
        return MoCoV3Model(online, model.ProjectionHead(dim, self.cfg.model.proj_hidden_dim, dim))

    def forward(self, engine, batch) -> tuple[torch.Tensor, ...]:
        """(q1, q2, k1, k2), each (b, D) float32: both views through both branches in one pass
        (the keys without a graph); float32 as SimCLR's, for the loss's log-sum-exp."""
        param = next(engine.module.parameters())
        views = torch.cat([batch["view1"], batch["view2"]]).to(param.device, param.dtype)
        queries, keys = engine(views)
        q1, q2 = queries.float().chunk(2)
        k1, k2 = keys.float().chunk(2)
        return q1, q2, k1, k2

    def loss(self, outputs: tuple[torch.Tensor, ...], valid: torch.Tensor | None) -> torch.Tensor:
        q1, q2, k1, k2 = outputs
        return moco_infonce(q1, q2, k1, k2, self.cfg.loss.temperature, valid=valid,
                            chunk_size=self.cfg.loss.chunk_size or None)

    def after_step(self, module: nn.Module) -> None:
        """The EMA of this optimizer step (every rank; `module` is the engine's). The update
        count is module state: restored with the checkpoint, the schedule continues."""
        update = int(module.momentum_updates)
        ema_update(module, momentum_at(update, self.cfg.method.momentum, self.cfg.train.max_steps))
        module.momentum_updates += 1
