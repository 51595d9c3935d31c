"""View generation for contrastive learning (torchvision.transforms.v2, one random draw per image).

Runs in the data loader workers: each decoded sample dict becomes two independently
augmented views of its image (SimCLR's recipe: crop, flip, colour jitter, grey scale).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

# Channel statistics of CIFAR-10; close enough for natural images of any source.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def simclr_augment(image_size: int) -> v2.Compose:
    """SimCLR augmentation of one PIL image -> float tensor (3, image_size, image_size)."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def eval_transform(image_size: int) -> v2.Compose:
    """Deterministic resize + normalise of one PIL image -> float tensor (3, image_size, image_size)."""
    return v2.Compose([
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


class TwoViews:
    """Sample dict -> {"__key__", "view1", "view2"[, "cls"]}: two augmentations of one image.

    A class (not a closure) so that it pickles into DataLoader worker processes.
    """

    def __init__(self, image_size: int):
        self.augment = simclr_augment(image_size)

    def __call__(self, sample: dict) -> dict:
        out = {"__key__": sample["__key__"], "view1": self.augment(sample["image"]),
               "view2": self.augment(sample["image"])}
        if "cls" in sample:
            out["cls"] = sample["cls"]
        return out


class EvalView:
    """Sample dict -> {"__key__", "image": normalised tensor, "cls"} for evaluation."""

    def __init__(self, image_size: int):
        self.transform = eval_transform(image_size)

    def __call__(self, sample: dict) -> dict:
        return {"__key__": sample["__key__"], "image": self.transform(sample["image"]), "cls": sample.get("cls", -1)}
