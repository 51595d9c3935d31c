"""CLIP (Radford et al., 2021) and SigLIP (Zhai et al., 2023): image-text pairs, one image
tower and one text tower from open_clip's model definitions (`model.clip_arch`), a learnable
logit scale (and SigLIP's bias) in the engine's module, and a loss whose negatives are the
texts and images of every rank (`loss.clip_loss`, `loss.siglip_loss`).

Each image is randomly crop-resized (area 0.9-1, CLIP's light augmentation) and normalised
with open_clip's mean and std: in the loader workers (`data.augment=per_sample`: bicubic on
the PIL image, the crop open_clip's trainer makes), or on the training device for the whole
batch (`per_batch`: the loader workers only resize and centre crop; one bilinear draw per
image, seeded by (seed, epoch, batch, rank), so a resumed run crops every batch as the
uninterrupted one did). The caption (`KEY.txt`) is tokenized to the model's
context length in the loader workers either way. The image tower is built at `data.image_size`
(open_clip's force_image_size), so that training, kNN evaluation and export agree on it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ssl_dist.data import sample_seed
from ssl_dist.loss import clip_loss, siglip_loss
from ssl_dist.methods import MethodError
from ssl_dist.methods.base import Method


CROP_SCALE = (0.9, 1.0)  # area fraction of CLIP's random resized crop


class ImageText:
    """Loader-worker transform: decoded sample {"__key__", "image": PIL, "txt": str, ...} ->
    {"__key__", "image", "tokens": long (context_length,)}; "image" is float (3, S, S),
    cropped and normalised, or with `per_batch` uint8 (3, S, S), resized and centre-cropped
    (the crop is drawn on the device). A class holding open_clip's tokenizer and torchvision
    transforms, so that it pickles."""

    def __init__(self, arch: str, image_size: int, *, per_batch: bool = False):
        import open_clip
        from torchvision.transforms import v2

        from ssl_dist import model

        self.tokenizer = model.build_tokenizer(arch)
        if per_batch:
            self.augment = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size), v2.ToImage()])
        else:
            self.augment = v2.Compose([
                # bicubic, as open_clip's training crop: bilinear upsampling of a 0.9-1 area crop
                # blurs what the evaluation's uncropped images show sharp
                v2.RandomResizedCrop(image_size, scale=CROP_SCALE, interpolation=v2.InterpolationMode.BICUBIC,
                                     antialias=True),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
            ])

    def __call__(self, sample: dict) -> dict:
        return {"__key__": sample["__key__"], "image": self.augment(sample["image"]).as_subclass(torch.Tensor),
                "tokens": self.tokenizer([sample["txt"]])[0]}


class CLIP(Method):
    """Outputs (image_emb (b, D), text_emb (b, D), logit_scale (1,)), float32; symmetric
    InfoNCE over the global batch (`loss.chunk_size`). Init scale log(1/0.07), as CLIP's;
    clip_loss clamps it at log 100."""

    name = "clip"
    fields = ("image", "txt")
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None

    def __init__(self, cfg, *, rank: int = 0):
        super().__init__(cfg, rank=rank)
        self.per_batch = cfg.data.augment == "per_batch"
        self.batch_view: nn.Module | None = None  # made on the first batch, on its device
        self._tokenizer = None

    @classmethod
    def check(cls, cfg) -> None:
        """Driver-side: model.clip_arch names an open_clip config."""
        from ssl_dist import model

        try:
            model.clip_model_config(cfg.model.clip_arch)
        except ValueError as err:
            raise MethodError(f"method.name={cls.name}: {err}") from None

    def build_module(self) -> nn.Module:
        from ssl_dist import model

        return model.build_image_text_model(self.cfg.model.clip_arch, image_size=self.cfg.data.image_size,
                                            init_logit_scale=self.init_logit_scale,
                                            init_logit_bias=self.init_logit_bias)

    def sample_transform(self) -> Callable[[dict], dict]:
        return ImageText(self.cfg.model.clip_arch, self.cfg.data.image_size, per_batch=self.per_batch)

    def tokenizer(self) -> Callable[[list[str]], torch.Tensor]:
        from ssl_dist import model

        if self._tokenizer is None:  # built once: reading the BPE vocabulary takes a moment
            self._tokenizer = model.build_tokenizer(self.cfg.model.clip_arch)
        return self._tokenizer

    def eval_view(self) -> Callable[[dict], dict]:
        """Resize, centre crop and open_clip's mean and std: the inputs the towers trained on."""
        import open_clip

        from ssl_dist import augment

        return augment.EvalView(self.cfg.data.image_size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)

    def on_device(self, batch: dict[str, Any], *, epoch: int, device: torch.device) -> dict[str, Any]:
        """data.augment=per_batch: the uint8 (b, 3, S, S) "image" becomes its float crops (b, 3, S, S)."""
        if not self.per_batch:
            return batch
        if self.batch_view is None:
            import open_clip

            from ssl_dist import augment

            self.batch_view = augment.BatchOneView(self.cfg.data.image_size, CROP_SCALE, open_clip.OPENAI_DATASET_MEAN,
                                                   open_clip.OPENAI_DATASET_STD).to(device)
        torch.manual_seed(sample_seed(self.cfg.data.seed, epoch, f"batch{batch['__batch__']}/rank{self.rank}"))
        batch["image"] = self.batch_view(batch["image"].to(device, non_blocking=True))
        return batch

    def forward(self, engine, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """This rank's (b,) pairs through both towers. Images are cast to the engine's
        parameter dtype (bf16 under train.precision=bf16), tokens stay long; embeddings and
        scales come back float32 (the loss's log-sum-exp needs it). The scale (and bias) are
        outputs, not parameters read in `loss`, so gradient caching carries their gradient."""
        param = next(engine.module.parameters())
        images = batch["image"].to(param.device, param.dtype)
        # the columns up to the batch's last end-of-text token, cut while still on the loader's CPU
        tokens = engine.module.text_prefix(batch["tokens"]).to(param.device)
        return tuple(out.float() for out in engine(images, tokens))

    def loss(self, outputs: tuple[torch.Tensor, ...], valid: torch.Tensor | None) -> torch.Tensor:
        # valid: a skipped sample's stand-in copy is no anchor and no negative
        image, text, scale = outputs
        return clip_loss(image, text, scale, valid=valid, chunk_size=self.cfg.loss.chunk_size or None)


class SigLIP(CLIP):
    """As CLIP, plus a learnable bias: outputs (image_emb, text_emb, logit_scale (1,),
    logit_bias (1,)); pairwise sigmoid loss, negatives around a ring of ranks. Init scale
    log 10 and bias -10, the paper's."""

    name = "siglip"
    init_logit_scale = math.log(10.0)
    init_logit_bias = -10.0

    def loss(self, outputs: tuple[torch.Tensor, ...], valid: torch.Tensor | None) -> torch.Tensor:
        image, text, scale, bias = outputs
        return siglip_loss(image, text, scale, bias, valid=valid, chunk_size=self.cfg.loss.chunk_size or None)
