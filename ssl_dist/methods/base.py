"""The Method contract: what a batch becomes, which towers, which loss.

A method owns nothing of the loop. The worker loop (`train.py`), the optimizer step with or
without gradient caching (`step.py`), checkpoints, the data position and evaluation work for
every method unchanged; a new method is a new file under `ssl_dist/methods/` (one line in
`methods/__init__.py` gives it a name), or a class of the user's own named in the config as
`method.name=package.module:Class`.

The life of one micro-batch on one rank, and who calls what:

    loader worker:  decode.decode_sample -> method.sample_transform()(sample)    (per sample, CPU)
    training rank:  method.on_device(batch, epoch=, device=)                      (per batch)
                    outputs = method.forward(engine, batch)                       (tuple of tensors)
                    loss = method.loss(outputs, valid)                            (collective)
                    engine.backward / engine.step, then method.after_step(module)

Two rules make gradient caching (`train.accumulate` > 1) work for any method:

- `forward` returns every tensor the loss depends on that carries a gradient, including
  method state used by the loss (CLIP's learnable temperature is an output of the module's
  forward, not a parameter read inside `loss`); its outputs are (b, ...) per-sample tensors
  that concatenate along dim 0 over micro-batches, or (1,)/() tensors shared by all of them
  (a scale), which the step takes from the first micro-batch;
- `loss` is a function of those outputs and the valid-slot mask only, the same on every
  rank (it gathers negatives from every rank), returning this rank's share of the global
  mean, so that DeepSpeed's gradient averaging gives the gradient of the global-batch loss.

Method state that trains or must survive a restart (a momentum encoder, a temperature)
lives in the module `build_module` returns: the engine wraps it, ZeRO shards it and
checkpoints carry it.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Literal

import torch
from torch import nn


class Method:
    """Base class of every pretraining method. Subclasses set `name` and `fields` and
    implement `build_module`, `sample_transform`, `forward` and `loss`."""

    name: ClassVar[str] = ""
    fields: ClassVar[tuple[str, ...]] = ("image",)
    """Sample fields a batch needs from the shards: "image" (any image member), or a member
    extension such as "cls", "txt"; checked against the manifest before any worker starts."""
    image_format: ClassVar[Literal["pil", "tensor"]] = "pil"
    """How the loader hands decoded images to `sample_transform`: PIL images or uint8 (3, H, W)."""

    def __init__(self, cfg, *, rank: int = 0):
        """`cfg`: the run's typed `ssl_dist.config.Config`; `rank`: this training rank
        (seeds per-batch random draws). Every rank builds one; loader workers get pickled
        copies of `sample_transform()`, never the method itself."""
        self.cfg, self.rank = cfg, rank

    @classmethod
    def check(cls, cfg) -> None:
        """On the driver, before any worker starts (`launch.check_method`): raise MethodError
        (ssl_dist.methods) if the config cannot work for this method. Default: nothing."""

    def build_module(self) -> nn.Module:
        """The towers and the method's state, as one module for the engine to wrap. It must
        offer `features(images)`: (B, 3, H, W) -> (B, F) image features, which evaluation
        (kNN during training, `ssl-dist evaluate`, export) reads. Same seed on every rank."""
        raise NotImplementedError

    def sample_transform(self) -> Callable[[dict], dict]:
        """Per-sample transform run in the loader workers on a decoded sample dict
        (`decode.decode_sample`: "__key__", "image", "cls", "txt", ...); returns the sample's
        tensors (views, tokens). Must pickle (a class instance, not a closure)."""
        raise NotImplementedError

    def eval_view(self) -> Callable[[dict], dict]:
        """Per-sample transform of evaluation (kNN, zero-shot, retrieval): a decoded sample ->
        {"__key__", "image": float (3, S, S), "cls"}, resized and normalised as this method's
        training inputs are. Default: `augment.EvalView` at data.image_size."""
        from ssl_dist import augment

        return augment.EvalView(self.cfg.data.image_size)

    def tokenizer(self) -> Callable[[list[str]], torch.Tensor] | None:
        """Image-text methods: list of T captions -> long (T, context) tokens, for zero-shot
        during training (`eval.every`), which then needs `encode_text(tokens)` on the module.
        Default: None (an image-only method: kNN only)."""
        return None

    def on_device(self, batch: dict[str, Any], *, epoch: int, device: torch.device) -> dict[str, Any]:
        """Per-batch work on the training device before `forward` (e.g. views of a whole
        uint8 batch on the GPU); draws must depend only on (seed, epoch, batch, rank).
        Default: the batch as it came."""
        return batch

    def forward(self, engine, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """This rank's micro-batch through the towers: `engine` is the DeepSpeed engine
        (call it like the module: ZeRO-3 gathers parameters in its forward). Returns the
        outputs the loss needs (see the module docstring). Called with and without a graph."""
        raise NotImplementedError

    def loss(self, outputs: tuple[torch.Tensor, ...], valid: torch.Tensor | None) -> torch.Tensor:
        """Scalar loss of this rank from `forward`'s outputs (concatenated over micro-batches
        when gradient caching). `valid`: bool (b,) mask of slots holding real samples (False:
        a copy standing in for a skipped sample: neither anchor nor negative), or None.
        Collective: every rank calls it with equal shapes."""
        raise NotImplementedError

    def after_step(self, module: nn.Module) -> None:
        """After each optimizer step (e.g. a momentum encoder's update). Default: nothing."""
