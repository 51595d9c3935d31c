"""Encoder (torchvision ResNet or any timm model) + projection head: images (B, 3, H, W) -> embeddings (B, D)."""

from __future__ import annotations

import torch
from torch import nn

from ssl_dist import text_prefix

# model.arch=timm/<name>: a timm model by its name in timm.list_models()
TIMM_PREFIX = "timm/"

# torchvision and timm are imported where used: the driver imports this module for `check_arch`
# and must not pay either (seconds of CPU) for a ResNet run.


def build_encoder(arch: str, *, cifar_stem: bool = True, stem_stride: int = 1, width: int = 64,
                  arch_kwargs: dict | None = None) -> tuple[nn.Module, int]:
    """An encoder without its classifier; returns (encoder, feature width F).

    The encoder maps (B, 3, H, W) images to (B, F) features. `arch` is a torchvision ResNet
    (resnet18/34/50) or timm/<name>: timm's model of that name, randomly initialised, with
    `arch_kwargs` (e.g. img_size=32, patch_size=4 for a ViT on 32 px images) and no classifier
    (num_classes=0: its pooled features, a ViT's class token). The ResNet options are only
    the ResNets': a timm model's own kwargs say its stem and width, so `cifar_stem` is
    ignored for it (`check_arch` refuses a `width` or `stem_stride` set with one).

    ResNets: with `cifar_stem`, the 7x7/2 convolution and max-pool become one 3x3
    convolution of stride `stem_stride`, the usual change for 32 px images (otherwise a 32 px
    image is 1x1 after the stem and the encoder learns little). `width` != 64 rebuilds the
    four stages with `width`, 2x, 4x and 8x channels; module names stay torchvision's, so its
    state dicts keep their keys.
    """
    if arch.startswith(TIMM_PREFIX):
        return build_timm_encoder(arch.removeprefix(TIMM_PREFIX), arch_kwargs or {})
    import torchvision

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


def build_timm_encoder(name: str, arch_kwargs: dict) -> tuple[nn.Module, int]:
    """timm's model `name` with `arch_kwargs`, no pretrained weights and no classifier; returns
    (encoder, F). What the export's spec says to call to rebuild it."""
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=0, **arch_kwargs)
    return net, timm_feature_dim(net)


def timm_feature_dim(net: nn.Module) -> int:
    """The width of a classifier-less timm model's output: its pre-logits width where a head
    layer follows the pooling (timm's head_hidden_size: MobileNetV3's conv head, 576 -> 1024
    in mobilenetv3_small_100), else its num_features."""
    return getattr(net, "head_hidden_size", None) or net.num_features


def _rebuild_stages(net, width: int) -> None:
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
                 proj_hidden_dim: int = 512, proj_dim: int = 128, arch_kwargs: dict | None = None):
        super().__init__()
        self.encoder, feature_dim = build_encoder(arch, cifar_stem=cifar_stem, stem_stride=stem_stride, width=width,
                                                  arch_kwargs=arch_kwargs)
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
                            proj_dim=model_cfg.proj_dim, arch_kwargs=model_cfg.arch_kwargs)


def encoder_of(model_cfg) -> tuple[nn.Module, int]:
    """(encoder, F) described by a `config.ModelConfig`: `build_encoder` with all its options
    (for a method that builds encoders of its own, e.g. a momentum encoder)."""
    return build_encoder(model_cfg.arch, cifar_stem=model_cfg.cifar_stem, stem_stride=model_cfg.stem_stride,
                         width=model_cfg.width, arch_kwargs=model_cfg.arch_kwargs)


def check_arch(cfg) -> None:
    """ConfigError, before any worker starts, for a timm encoder that no worker could build:
    a name timm does not know (naming the closest ones), kwargs its model does not take,
    images of data.image_size it cannot read, or the ResNet-only model.width / stem_stride
    set with it. Called on the driver (launch.preflight); nothing to check for a ResNet.

    The model is built and run on the meta device (shapes only: no memory, no compute), so
    a ViT-H costs the driver what a tiny one does. A failure that only the meta device
    causes (an op without a meta kernel, a `.item()`) says nothing about the config and is
    let through: the workers build the real model.
    """
    from ssl_dist.config import ConfigError

    arch, kwargs = cfg.model.arch, cfg.model.arch_kwargs
    if not arch.startswith(TIMM_PREFIX):
        return
    for key, default in (("width", 64), ("stem_stride", 1)):
        if getattr(cfg.model, key) != default:
            raise ConfigError(f"model.{key}={getattr(cfg.model, key)} is an option of the ResNet encoders, and "
                              f"model.arch={arch} is a timm model: remove it, and size the model through "
                              f"model.arch_kwargs (e.g. embed_dim, depth, patch_size for a ViT)")
    import timm

    name = arch.removeprefix(TIMM_PREFIX)
    if not timm.is_model(name):
        raise ConfigError(f"model.arch={arch}: timm has no model {name!r}; {_closest_timm_names(name)}")
    shown = f"model.arch={arch} with model.arch_kwargs={kwargs}" if kwargs else f"model.arch={arch}"
    try:
        with torch.device("meta"):
            net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:  # what timm raises for kwargs it cannot use
        raise ConfigError(f"{shown}: timm cannot build it ({err}): fix model.arch_kwargs") from None
    except (RuntimeError, NotImplementedError):
        return
    size = cfg.data.image_size
    try:
        with torch.device("meta"), torch.no_grad():
            net.eval()(torch.empty(2, 3, size, size))  # eval: a BatchNorm's batch checks are not the config's
    except (ValueError, AssertionError) as err:  # timm's own checks of the input (a ViT's img_size)
        raise ConfigError(f"{shown} cannot read data.image_size={size} px images ({err}): build it for them, "
                          f"e.g. model.arch_kwargs={{img_size: {size}}} for a ViT") from None
    except (RuntimeError, NotImplementedError):
        return


def _closest_timm_names(name: str) -> str:
    """The part of a message that says which timm names `name` may have meant."""
    import difflib

    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name.split(".")[0], names, n=5)
    if close:
        return "the closest are " + ", ".join(TIMM_PREFIX + n for n in close)
    return (f"see timm.list_models() ({len(names)} names, e.g. timm/vit_small_patch16_224, timm/resnet50, "
            f"timm/convnext_tiny)")


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
        return self(None, self.text_prefix(tokens))[1]

    def text_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L'): the first L' <= L columns, all that a causal text tower's
        output depends on (`text_prefix.py`); all L for other towers. Any rank; call it on the
        loader's CPU tokens (it reads them), then move the prefix to the device."""
        causal = text_prefix.causal_text(self.clip)
        return tokens if causal is None else text_prefix.shortest_prefix(causal, tokens)

    def forward(self, images: torch.Tensor | None, tokens: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """`tokens` (b, L): the whole context, or a prefix from `text_prefix`."""
        scales = (self.logit_scale,) if self.logit_bias is None else (self.logit_scale, self.logit_bias)
        image = None if images is None else self.clip.encode_image(images)
        text = None if tokens is None else self._encode_text(tokens)
        return (image, text, *scales)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        causal = text_prefix.causal_text(self.clip)
        if causal is None or tokens.shape[1] == causal.tower.context_length:
            return self.clip.encode_text(tokens)  # the whole context: open_clip's own path
        return text_prefix.encode(causal, tokens)


def build_image_text_model(arch: str, *, image_size: int, init_logit_scale: float,
                           init_logit_bias: float | None = None) -> ImageTextModel:
    """open_clip's CLIP (or CustomTextCLIP) for `arch` at `image_size`, randomly initialised
    (no pretrained weights), wrapped as an ImageTextModel. Same seed on every rank."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = clip_model_config(arch, image_size)
    cls = CustomTextCLIP if cfg.pop("custom_text", False) else CLIP
    cfg.pop("init_logit_scale", None), cfg.pop("init_logit_bias", None)  # ours decide (the method's)
    return ImageTextModel(cls(**cfg), init_logit_scale=init_logit_scale, init_logit_bias=init_logit_bias)
