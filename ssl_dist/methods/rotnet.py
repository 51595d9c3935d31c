"""Rotation prediction (Gidaris et al., 2018, "Unsupervised Representation Learning by
Predicting Image Rotations"): every image is turned by 0, 90, 180 and 270 degrees and a 4-way
linear classifier on the encoder's features says which; cross-entropy. No negatives, so no
gather of embeddings: a cheap baseline for the contrastive methods.

All four rotations of every image go through the encoder in the same batch (4x the images
of `data.batch_size`), as the paper trains (it found that better than one random rotation
per image): the four classes are exactly balanced in every batch, BatchNorm normalises the
four turns of an image with the same statistics, and the rotations draw no random numbers,
so a resumed run rotates every batch as the uninterrupted run did. The price is 4 encoder
passes per image (SimCLR makes 2).

Before the rotations, a light augmentation (a random crop of the image padded by 4 pixels
by reflection, a horizontal flip): per sample in the loader workers (`data.augment=per_sample`,
draws seeded by (seed, epoch, sample key)), or per batch on the training device
(`data.augment=per_batch`, one draw per image seeded by (seed, epoch, batch, rank)).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssl_dist.data import sample_seed
from ssl_dist.loss import rank_and_world
from ssl_dist.methods.base import Method

TURNS = 4  # quarter turns 0, 1, 2, 3: the classes
PAD = 4  # pixels of reflection padding the random crop moves within


class RotNetModel(nn.Module):
    """Encoder + a linear 4-way rotation classifier. `forward` gives the classifier's logits;
    `features` the encoder output that evaluation and export read (`encoder`, `feature_dim`
    are named as in `model.ContrastiveModel`, which export reads)."""

    def __init__(self, encoder: nn.Module, feature_dim: int):
        super().__init__()
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.classifier = nn.Linear(feature_dim, TURNS)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, F) encoder features."""
        return self.encoder(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 4) rotation logits."""
        return self.classifier(self.encoder(images))


def rotate_all(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, C, H, W) square images -> ((4b, C, H, W), (4b,) long): each image followed by its
    turns; row 4i + r is torch.rot90(images[i], r, dims=(-2, -1)) (r quarter turns
    counter-clockwise) and its label is r."""
    turned = torch.stack([torch.rot90(images, r, dims=(-2, -1)) for r in range(TURNS)], dim=1)
    return turned.flatten(0, 1), quarter_turns(len(images), images.device)


def quarter_turns(b: int, device=None) -> torch.Tensor:
    """(4b,) long: the label of each row of `rotate_all`'s output, 0, 1, 2, 3, 0, 1, ..."""
    return torch.arange(TURNS, device=device).repeat(b)


def rotation_loss(logits: torch.Tensor, valid: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """Cross-entropy of this rank's rotation logits: its share of the global-batch mean.

    logits: (n, 4, 4), logits[i, r] the classifier's output for image i turned r times (rows
    of `rotate_all` reshaped). valid: (n,) bool, False for a slot that holds the loader's copy
    of a skipped sample (none of its 4 turns counts), or None. Returns this rank's sum over its
    valid images' turns divided by 4 x (valid images of all ranks) / W, so that the mean over
    the W ranks of `group`, which DeepSpeed's gradient averaging takes, is the mean over the
    global batch. Every rank calls it (with a mask, the valid count is summed over ranks).
    """
    n = logits.shape[0]
    ce = F.cross_entropy(logits.reshape(n * TURNS, TURNS), quarter_turns(n, logits.device), reduction="none")
    if valid is None:
        return ce.mean()  # every rank has n images: the local mean is already its share
    keep = valid.to(device=logits.device, dtype=torch.bool)
    count = keep.sum().to(ce.dtype)
    _, world = rank_and_world(group)
    if world > 1:  # a count, not a gradient path: a plain all-reduce
        dist.all_reduce(count, group=group)
    per_rank = (TURNS * count / world).clamp_min(1.0)
    # where(), not indexing: no host sync, and an invalid slot gets an exactly zero gradient
    return torch.where(keep.repeat_interleave(TURNS), ce, 0.0).sum() / per_rank


class LightAugment:
    """Sample dict (PIL "image") -> {"__key__", "image": normalised float (3, S, S)[, "cls"]}:
    resize, a random crop of the image reflection-padded by 4 pixels, a horizontal flip.
    A class (not a closure) so that it pickles into DataLoader worker processes."""

    def __init__(self, image_size: int):
        from torchvision.transforms import v2

        from ssl_dist import augment

        self.transform = v2.Compose([
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.RandomCrop(image_size, padding=PAD, padding_mode="reflect"),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(augment.MEAN, augment.STD),
        ])

    def __call__(self, sample: dict) -> dict:
        out = {"__key__": sample["__key__"], "image": self.transform(sample["image"])}
        if "cls" in sample:
            out["cls"] = sample["cls"]
        return out


def batch_light_augment(images: torch.Tensor) -> torch.Tensor:
    """uint8 (b, 3, S, S) -> normalised float (b, 3, S, S): `LightAugment`'s crop and flip with
    one draw per image from torch's global RNG (the caller seeds it), as one gather."""
    from ssl_dist import augment

    b, _, size, _ = images.shape
    x = images.float().div(255)
    mean = torch.tensor(augment.MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(augment.STD, device=x.device).view(1, 3, 1, 1)
    padded = F.pad((x - mean) / std, (PAD, PAD, PAD, PAD), mode="reflect")  # (b, 3, S + 8, S + 8)
    offsets = torch.randint(0, 2 * PAD + 1, (b, 2), device=x.device)
    flip = torch.rand(b, device=x.device) < 0.5
    steps = torch.arange(size, device=x.device)
    rows = offsets[:, :1] + steps  # (b, S)
    cols = offsets[:, 1:] + torch.where(flip[:, None], size - 1 - steps, steps)
    batch_index = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(3, device=x.device)[None, :, None, None]
    return padded[batch_index, channel, rows[:, None, :, None], cols[:, None, None, :]]


class RotNet(Method):
    """Encoder + linear rotation classifier; outputs (logits,), (b, 4, 4) float32, the four
    turns of each image; cross-entropy over the global batch, invalid slots left out."""

    name = "rotnet"
    fields = ("image",)

    def __init__(self, cfg, *, rank: int = 0):
        super().__init__(cfg, rank=rank)
        self.per_batch = cfg.data.augment == "per_batch"
        self.image_format = "tensor" if self.per_batch else "pil"

    def build_module(self) -> nn.Module:
        from ssl_dist import model

        # The encoder as every image method builds it (model.arch: a ResNet or timm/<name>);
        # built first, so the same seed gives SimCLR's initial encoder.
        encoder, feature_dim = model.encoder_of(self.cfg.model)
        return RotNetModel(encoder, feature_dim)

    def sample_transform(self) -> Callable[[dict], dict]:
        from ssl_dist import augment

        size = self.cfg.data.image_size
        return augment.Decode(size) if self.per_batch else LightAugment(size)

    def on_device(self, batch: dict[str, Any], *, epoch: int, device: torch.device) -> dict[str, Any]:
        """The (b, 3, S, S) "image" (uint8 with data.augment=per_batch, augmented here first)
        becomes "rotated" (4b, 3, S, S) on `device` and "rotation" (4b,) long, its labels."""
        images = batch.pop("image").to(device, non_blocking=True)
        if self.per_batch:
            torch.manual_seed(sample_seed(self.cfg.data.seed, epoch, f"batch{batch['__batch__']}/rank{self.rank}"))
            images = batch_light_augment(images)
        batch["rotated"], batch["rotation"] = rotate_all(images)
        return batch

    def forward(self, engine, batch: dict[str, Any]) -> tuple[torch.Tensor]:
        """(logits,): (b, 4, 4) float32, logits[i, r] for image i turned r times; all 4b images
        in one pass (cast to the engine's parameter dtype, bf16 under train.precision=bf16)."""
        param = next(engine.module.parameters())
        rotated = batch["rotated"].to(param.device, param.dtype)
        logits = engine(rotated).float()
        return (logits.reshape(-1, TURNS, TURNS),)

    def loss(self, outputs: tuple[torch.Tensor, ...], valid: torch.Tensor | None) -> torch.Tensor:
        (logits,) = outputs
        return rotation_loss(logits, valid)
