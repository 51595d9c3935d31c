"""View generation for contrastive learning: SimCLR's recipe (crop, flip, colour jitter,
grey scale), one random draw per image, in one of two placements.

- per sample (`TwoViews`, torchvision.transforms.v2 on PIL images): runs in the data
  loader workers; about 3 ms of CPU per sample for two 32 px views here;
- per batch (`BatchTwoViews`, kornia.augmentation on a uint8 batch tensor, per-sample draws):
  the loader workers only decode (`Decode`), and the whole batch is augmented at once where
  the batch is, on the training device for a GPU run (about 4x less CPU per sample here
  even on one CPU thread).
"""

from __future__ import annotations

import math

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


def eval_transform(image_size: int, mean=MEAN, std=STD) -> v2.Compose:
    """Deterministic resize + normalise of one PIL image -> float tensor (3, image_size, image_size)."""
    return v2.Compose([
        v2.Resize(image_size, antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
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
    """Sample dict -> {"__key__", "image": normalised tensor, "cls"} for evaluation; `mean`
    and `std` are those the method trained with (`Method.eval_view`)."""

    def __init__(self, image_size: int, mean=MEAN, std=STD):
        self.transform = eval_transform(image_size, mean, std)

    def __call__(self, sample: dict) -> dict:
        return {"__key__": sample["__key__"], "image": self.transform(sample["image"]), "cls": sample.get("cls", -1)}


class Decode:
    """Sample dict -> {"__key__", "image": uint8 tensor (3, S, S)[, "cls"]}: decode and resize only,
    for augmentation on whole batches (`BatchTwoViews`)."""

    def __init__(self, image_size: int):
        self.resize = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), v2.ToImage()])

    def __call__(self, sample: dict) -> dict:
        out = {"__key__": sample["__key__"], "image": self.resize(sample["image"]).as_subclass(torch.Tensor)}
        if "cls" in sample:
            out["cls"] = sample["cls"]
        return out


def sample_crop_boxes(n: int, height: int, width: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                      device=None, attempts: int = 10) -> torch.Tensor:
    """(n, 4) crop boxes (x1, y1, x2, y2) in pixels, drawn as torchvision's RandomResizedCrop
    draws them: area fraction uniform in `scale`, log aspect ratio uniform in `ratio`, the
    first of `attempts` candidates that fits the image, else the whole image.

    Vectorised over the batch (all candidates drawn at once, from torch's global RNG).
    """
    area = height * width * torch.empty(n, attempts, device=device).uniform_(*scale)
    aspect = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (area * aspect).sqrt()
    h = (area / aspect).sqrt()
    fits = (w <= width) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # index of the first candidate that fits
    any_fits = fits.any(dim=1)
    w = torch.where(any_fits, w.gather(1, first).squeeze(1), torch.tensor(float(width), device=device))
    h = torch.where(any_fits, h.gather(1, first).squeeze(1), torch.tensor(float(height), device=device))
    x1 = torch.rand(n, device=device) * (width - w)
    y1 = torch.rand(n, device=device) * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


class BatchRandomResizedCrop(torch.nn.Module):
    """(B, C, H, W) float -> (B, C, S, S): a random resized crop per image, all in one
    `roi_align` call (bilinear, 2x2 samples per output pixel, which also smooths downscaling).

    kornia's RandomResizedCrop warps image by image: 37 ms for 1024 CIFAR images on an H200,
    a third of the whole training step; this is one kernel.
    """

    def __init__(self, size: int, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__()
        self.size, self.scale, self.ratio = size, scale, ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        n, _, height, width = x.shape
        boxes = sample_crop_boxes(n, height, width, self.scale, self.ratio, device=x.device)
        rois = torch.cat([torch.arange(n, device=x.device, dtype=x.dtype)[:, None], boxes.to(x.dtype)], dim=1)
        return roi_align(x, rois, output_size=self.size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


class BatchTwoViews(torch.nn.Module):
    """uint8 batch (B, 3, S, S) -> two normalised float views, each (B, 3, S, S), with an
    independent random draw per image and view (our batched crop, then kornia.augmentation).

    Runs wherever the batch is: on the GPU for a GPU run. Deterministic given torch's RNG
    state, which the caller seeds.
    """

    def __init__(self, image_size: int):
        super().__init__()
        import kornia.augmentation as K

        self.augment = torch.nn.Sequential(
            BatchRandomResizedCrop(image_size, scale=(0.2, 1.0)),
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float().div_(255)
        # One pass over both views: each op launches its kernels once for 2B images
        # instead of twice for B (kornia draws the parameters per image either way).
        return self.augment(torch.cat([x, x])).chunk(2)


class BatchOneView(torch.nn.Module):
    """uint8 batch (B, 3, S, S) -> one normalised float view (B, 3, S, S): a random resized
    crop per image (area fraction in `scale`), then `mean`/`std`; CLIP's light augmentation
    on whole batches. Deterministic given torch's RNG state, which the caller seeds."""

    def __init__(self, image_size: int, scale: tuple[float, float], mean, std):
        super().__init__()
        self.crop = BatchRandomResizedCrop(image_size, scale=scale)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.crop(images.float().div_(255)).sub_(self.mean).div_(self.std)
