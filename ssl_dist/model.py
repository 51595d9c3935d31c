"""Encoder (torchvision ResNet) + projection head: images (B, 3, H, W) -> embeddings (B, D)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def build_encoder(arch: str, *, cifar_stem: bool, stem_stride: int = 1, width: int = 64) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier; returns (encoder, feature width).

    The encoder maps (B, 3, H, W) images to (B, F) features. With `cifar_stem`, the 7x7/2
    convolution and max-pool become one 3x3 convolution of stride `stem_stride`, the usual
    change for 32 px images (otherwise a 32 px image is 1x1 after the stem and the encoder
    learns little). `width` != 64 rebuilds the four stages with `width`, 2x, 4x and 8x
    channels; module names stay torchvision's, so its state dicts keep their keys.
    """
    net = getattr(torchvision.models, arch)(weights=None)
    if width != 64:
        _rebuild_stages(net, width)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def _rebuild_stages(net: torchvision.models.ResNet, width: int) -> None:
    """Stem and stages of `net` at `width` base channels instead of 64, initialised as torchvision does."""
    from torchvision.models.resnet import conv1x1

    block = type(net.layer1[0])  # BasicBlock (resnet18/34) or Bottleneck (resnet50)
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    channels = width
    for index, planes in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
        old = getattr(net, f"layer{index}")
        stride = 1 if index == 1 else 2
        out = planes * block.expansion
        downsample = nn.Sequential(conv1x1(channels, out, stride), nn.BatchNorm2d(out)) \
            if stride != 1 or channels != out else None
        blocks = [block(channels, planes, stride, downsample)] + [block(out, planes) for _ in range(len(old) - 1)]
        setattr(net, f"layer{index}", nn.Sequential(*blocks))
        channels = out
    net.fc = nn.Linear(channels, net.fc.out_features)  # only its in_features is read: the feature width
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


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

    def __init__(self, arch: str = "resnet18", *, cifar_stem: bool = True, stem_stride: int = 1, width: int = 64,
                 proj_hidden_dim: int = 512, proj_dim: int = 128):
        super().__init__()
        self.encoder, feature_dim = build_encoder(arch, cifar_stem=cifar_stem, stem_stride=stem_stride, width=width)
        self.head = ProjectionHead(feature_dim, proj_hidden_dim, proj_dim)
        self.feature_dim = feature_dim

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F) encoder features."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) projections (not normalised; the loss normalises)."""
        return self.head(self.encoder(images))


def build_model(model_cfg) -> ContrastiveModel:
    """The model described by a `config.ModelConfig`."""
    return ContrastiveModel(model_cfg.arch, cifar_stem=model_cfg.cifar_stem, stem_stride=model_cfg.stem_stride,
                            width=model_cfg.width, proj_hidden_dim=model_cfg.proj_hidden_dim,
                            proj_dim=model_cfg.proj_dim)
