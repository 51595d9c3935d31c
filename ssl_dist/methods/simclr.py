"""SimCLR (Chen et al., 2020): two augmented views of each image, NT-Xent over the global batch.

Views are made per sample in the loader workers (`data.augment=per_sample`, torchvision on
PIL images) or per batch on the training device (`data.augment=per_batch`: loader workers
only decode and resize; one random draw per image, seeded by (seed, epoch, batch, rank), so a
resumed run with the same layout augments every batch as the uninterrupted run did).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ssl_dist.data import sample_seed
from ssl_dist.loss import nt_xent
from ssl_dist.methods.base import Method


class SimCLR(Method):
    """Encoder + projection head; outputs (z1, z2), each (b, D) float32; NT-Xent with
    negatives from every rank (`loss.temperature`, `loss.chunk_size`)."""

    name = "simclr"
    fields = ("image",)

    def __init__(self, cfg, *, rank: int = 0):
        super().__init__(cfg, rank=rank)
        self.per_batch = cfg.data.augment == "per_batch"
        self.image_format = "tensor" if self.per_batch else "pil"
        self.batch_views: nn.Module | None = None  # made on the first batch, on its device

    # augment and model import torchvision (and through it torch._dynamo: seconds of CPU):
    # imported where used, so that the driver, which resolves the method, never pays it.

    def build_module(self) -> nn.Module:
        from ssl_dist import model

        return model.build_model(self.cfg.model)

    def sample_transform(self) -> Callable[[dict], dict]:
        from ssl_dist import augment

        size = self.cfg.data.image_size
        return augment.Decode(size) if self.per_batch else augment.TwoViews(size)

    def on_device(self, batch: dict[str, Any], *, epoch: int, device: torch.device) -> dict[str, Any]:
        """data.augment=per_batch: the uint8 (b, 3, S, S) "image" becomes "view1", "view2"."""
        if not self.per_batch:
            return batch
        if self.batch_views is None:
            from ssl_dist import augment

            self.batch_views = augment.BatchTwoViews(self.cfg.data.image_size).to(device)
        torch.manual_seed(sample_seed(self.cfg.data.seed, epoch, f"batch{batch['__batch__']}/rank{self.rank}"))
        images = batch.pop("image").to(device, non_blocking=True)
        batch["view1"], batch["view2"] = self.batch_views(images)
        return batch

    def forward(self, engine, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(z1, z2), each (b, D) float32: both views through the model in one pass, so that
        BatchNorm normalises them with the same statistics.

        The views are cast to the engine's parameter dtype (bf16 under train.precision=bf16);
        the embeddings come back as float32, because the loss's log-sum-exp over thousands of
        similarities loses too much in bf16.
        """
        param = next(engine.module.parameters())
        views = torch.cat([batch["view1"], batch["view2"]]).to(param.device, param.dtype)
        z1, z2 = engine(views).float().chunk(2)
        return z1, z2

    def loss(self, outputs: tuple[torch.Tensor, ...], valid: torch.Tensor | None) -> torch.Tensor:
        z1, z2 = outputs
        return nt_xent(z1, z2, self.cfg.loss.temperature, valid=valid,
                            chunk_size=self.cfg.loss.chunk_size or None)
