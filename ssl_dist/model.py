"""Encoder (torchvision ResNet) + projection head: images (B, 3, H, W) -> embeddings (B, D)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def build_encoder(arch: str, *, cifar_stem: bool) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier; returns (encoder, feature width).

    The encoder maps (B, 3, H, W) images to (B, F) features. With `cifar_stem`, the 7x7/2
    convolution and max-pool become one 3x3/1 convolution, the usual change for 32 px images
    (otherwise a 32 px image is 1x1 after the stem and the encoder learns little).
    """
    net = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


class ProjectionHead(nn.Module):
    """SimCLR's MLP: (B, F) features -> (B, D) embeddings."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveModel(nn.Module):
    """Encoder + head. `forward` gives embeddings for the loss; `features` the encoder output
    used by evaluation and export."""

    def __init__(self, arch: str = "resnet18", *, cifar_stem: bool = True, proj_hidden_dim: int = 512,
                 proj_dim: int = 128):
        super().__init__()
        self.encoder, width = build_encoder(arch, cifar_stem=cifar_stem)
        self.head = ProjectionHead(width, proj_hidden_dim, proj_dim)
        self.feature_dim = width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F) encoder features."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) projections (not normalised; the loss normalises)."""
        return self.head(self.encoder(images))


def build_model(model_cfg) -> ContrastiveModel:
    """The model described by a `config.ModelConfig`."""
    return ContrastiveModel(model_cfg.arch, cifar_stem=model_cfg.cifar_stem, proj_hidden_dim=model_cfg.proj_hidden_dim,
                            proj_dim=model_cfg.proj_dim)
