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


# ---- image-text towers (CLIP, SigLIP): open_clip's model definitions -------------------------
# open_clip is imported inside these functions: the driver and the image-only methods never pay it.


def clip_model_config(arch: str, image_size: int | None = None) -> dict:
    """open_clip's model config for `arch`: a name of `open_clip.list_models()` or the path of a
    JSON file in its format ({"embed_dim", "vision_cfg", "text_cfg"}). With `image_size` the
    image tower is built at that size (open_clip's force_image_size). Raises ValueError naming
    some known models when `arch` is neither. Called on the driver (check) and on every rank."""
    import json
    from pathlib import Path

    import open_clip

    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise ValueError(f"model.clip_arch={arch!r}: no such JSON file")
        cfg = json.loads(Path(arch).read_text())
    else:
        cfg = open_clip.get_model_config(arch) if arch else None
    if not cfg or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
        names = open_clip.list_models()
        known = ", ".join(m for m in ("RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14") if m in names)
        raise ValueError(f"model.clip_arch={arch!r} is not an open_clip model config: use one of the "
                         f"{len(names)} names of open_clip.list_models() ({known}, ...) or the path of a JSON file with "
                         f"embed_dim, vision_cfg and text_cfg (e.g. jobs/configs/clip-tiny.json)")
    if image_size is not None:
        cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": image_size}
    return cfg


def build_tokenizer(arch: str):
    """open_clip's tokenizer for `arch` (list of str -> LongTensor (n, context_length), the
    context length of the model config); picklable, so loader workers get copies."""
    import open_clip

    if not arch.endswith(".json"):
        return open_clip.get_tokenizer(arch)
    text_cfg = clip_model_config(arch)["text_cfg"]
    return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77),
                                               **text_cfg.get("tokenizer_kwargs", {}))


class ImageTextModel(nn.Module):
    """Image and text towers of an open_clip model, with the learnable logit scale (and, for
    SigLIP, bias) as (1,) parameters: DeepSpeed 0.19 cannot broadcast open_clip's 0-dim ones,
    and as parameters of this module ZeRO shards them and checkpoints carry them.

    forward(images (b, 3, S, S), tokens (b, L) long) -> (image_emb (b, D), text_emb (b, D),
    logit_scale (1,)[, logit_bias (1,)]); embeddings not normalised (the losses normalise).
    Either input may be None (its embedding is then None): `features` and `encode_text` go
    through forward too, because ZeRO-3 gathers parameters in hooks around module forwards;
    open_clip's `encode_text` called outside any forward reads the CLIP module's own
    `positional_embedding` still partitioned (an empty tensor), and zero-shot evaluation
    during training failed there.
    """

    def __init__(self, clip: nn.Module, *, init_logit_scale: float, init_logit_bias: float | None = None):
        super().__init__()
        for name in ("logit_scale", "logit_bias"):  # replaced by (1,) parameters below
            if isinstance(getattr(clip, name, None), nn.Parameter):
                delattr(clip, name)
        self.clip = clip
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.full((1,), float(init_logit_bias)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, D): the image tower's output, what kNN evaluation reads."""
        return self(images, None)[0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D): the text tower's output (zero-shot, retrieval)."""
        return self(None, tokens)[1]

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        scales = (self.logit_scale,) if self.logit_bias is None else (self.logit_scale, self.logit_bias)
        image = None if images is None else self.clip.encode_image(images)
        text = None if tokens is None else self.clip.encode_text(tokens)
        return (image, text, *scales)


def build_image_text_model(arch: str, *, image_size: int, init_logit_scale: float,
                           init_logit_bias: float | None = None) -> ImageTextModel:
    """open_clip's CLIP (or CustomTextCLIP) for `arch` at `image_size`, randomly initialised
    (no pretrained weights), wrapped as an ImageTextModel. Same seed on every rank."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = clip_model_config(arch, image_size)
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    cfg.pop("init_logit_scale", None), cfg.pop("init_logit_bias", None)  # ours decide (the method's)
    return ImageTextModel(cls(**cfg), init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias)
