"""Evaluation of the live model during training (`eval.every`): kNN top-1 on small labeled
sets, and for image-text methods zero-shot top-1 on the labeled test set.

Every rank calls these functions, and every rank runs the same number of forward passes of
each tower: under ZeRO-3 a forward pass gathers parameters from every rank, so a rank that
stopped early would leave the others waiting. Each rank embeds every world-th sample of the
first `eval.max_samples`; rank 0 gathers the features and scores them.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ssl_dist import data, storage
from ssl_dist.evaluate import iter_labeled, knn_top1
from ssl_dist.zero_shot import CIFAR10_TEMPLATES, class_names, read_templates, zero_shot_classifier, zero_shot_top1


def eval_storage_options(cfg, loop_config: dict) -> dict:
    """fsspec options for the eval sets on a worker: the driver's data options when they live
    in the same kind of store as the training data, else made here from `cfg.storage`."""
    url = cfg.eval.test_url
    if url.split("://")[0] == cfg.data.train_url.split("://")[0] and "://" in url:
        return loop_config["data_options"]
    return storage.options_from_config(url, cfg.storage)


def eval_templates(eval_cfg, storage_options: dict | None = None) -> tuple[str, ...]:
    """The prompt templates of zero-shot during training: eval.templates' file, or CLIP's CIFAR-10 ones."""
    return read_templates(eval_cfg.templates, storage_options) if eval_cfg.templates else CIFAR10_TEMPLATES


@torch.no_grad()
def _embed_share(module, url: str, *, image_size: int, limit: int, rank: int, world: int,
                 batch_size: int, storage_options: dict | None, view=None,
                 max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the L2-normalised features (n, F) and labels (n,) of the first
    `limit` samples at `url`. Every rank runs the same number of forward passes (padding
    with a blank batch), see the module docstring."""
    param = next(module.parameters())
    total = data.ShardSet(url, storage_options).total
    count = min(total, limit) if limit else total
    passes = math.ceil(math.ceil(count / world) / batch_size)
    feats, labels = [], []
    for images, y in iter_labeled(url, image_size=image_size, batch_size=batch_size, storage_options=storage_options,
                                  limit=count, rank=rank, world=world, view=view, max_pixels=max_pixels):
        feats.append(F.normalize(module.features(images.to(param.device, param.dtype)).float(), dim=1).cpu())
        labels.append(y)
    for _ in range(passes - len(feats)):
        module.features(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    width = feats[0].shape[1] if feats else 0
    return (torch.cat(feats) if feats else torch.zeros(0, width)), (torch.cat(labels) if labels else
                                                                      torch.zeros(0, dtype=torch.long))


def _gather_on_rank0(shares: dict, rank: int, world: int) -> dict | None:
    """{name: (features, labels)} of every rank, concatenated, on rank 0; None elsewhere."""
    import torch.distributed as dist

    gathered = [shares]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, shares)
    if rank != 0:
        return None
    return {name: (torch.cat([g[name][0] for g in gathered]), torch.cat([g[name][1] for g in gathered]))
            for name in shares}


def knn_during_training(module, eval_cfg, *, image_size: int, rank: int, world: int,
                        storage_options: dict | None = None, batch_size: int = 256, view=None,
                        max_pixels: int | None = None) -> float | None:
    """kNN top-1 of the live model's image features (`module.features`) on `eval_cfg`'s
    train_url (neighbours) and test_url (queries); every rank calls it. Returns the score on
    rank 0, None on the others. The module is put back in training mode."""
    module.eval()
    try:
        shares = {name: _embed_share(module, url, image_size=image_size, limit=eval_cfg.max_samples, rank=rank,
                                     world=world, batch_size=batch_size, storage_options=storage_options, view=view,
                                     max_pixels=max_pixels)
                  for name, url in (("train", eval_cfg.train_url), ("test", eval_cfg.test_url))}
    finally:
        module.train()
    merged = _gather_on_rank0(shares, rank, world)
    return None if merged is None else knn_top1(*merged["train"], *merged["test"], k=eval_cfg.k)


def zero_shot_during_training(module, eval_cfg, tokenizer: Callable, templates: Sequence[str], *, image_size: int,
                              rank: int, world: int, storage_options: dict | None = None, batch_size: int = 256,
                              view=None, max_pixels: int | None = None) -> float | None:
    """Zero-shot top-1 of the live image-text model (`module.features`, `module.encode_text`)
    on `eval_cfg.test_url`, classes named by its manifest, prompts from `templates`; every
    rank calls it. Every rank builds the (D, C) classifier (the same text forwards on every
    rank, as ZeRO-3 needs; C x templates prompts is small) and embeds its share of the
    images. Returns the score on rank 0, None on the others; the module is put back in training mode."""
    module.eval()
    try:
        names = class_names(eval_cfg.test_url, storage_options)
        encode = lambda tokens: module.encode_text(tokens.to(next(module.parameters()).device))  # noqa: E731
        with torch.no_grad():
            classifier = zero_shot_classifier(encode, tokenizer, names, templates).cpu()
        shares = {"test": _embed_share(module, eval_cfg.test_url, image_size=image_size, limit=eval_cfg.max_samples,
                                       rank=rank, world=world, batch_size=batch_size,
                                       storage_options=storage_options, view=view, max_pixels=max_pixels)}
    finally:
        module.train()
    merged = _gather_on_rank0(shares, rank, world)
    return None if merged is None else zero_shot_top1(*merged["test"], classifier)
