"""Evaluation of an encoder: features of labeled shards, then kNN top-1.

Reads checkpoints without Ray or a DeepSpeed engine: the fp32 weights are consolidated from
the ZeRO shards with DeepSpeed's own `zero_to_fp32`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ssl_dist import config as config_lib
from ssl_dist import data, storage
from ssl_dist.augment import EvalView
from ssl_dist.model import ContrastiveModel, build_model


class EvaluationError(RuntimeError):
    """A user-facing evaluation problem (no checkpoint there, unlabeled shards...)."""


def iter_labeled(url: str, *, image_size: int, batch_size: int = 256,
                 storage_options: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of the shards at `url` once, in manifest order: (images (B, 3, S, S), labels (B,))."""
    shards = data.ShardSet(url, storage_options if storage_options is not None else storage.storage_options(url))
    view = EvalView(image_size)
    images, labels = [], []
    for shard, count in enumerate(shards.counts.tolist()):
        for (_, _), (key, fields) in sorted(shards.read_runs([(shard, 0, count)]).items()):
            sample = view(data.decode_sample(key, fields))
            if sample["cls"] < 0:
                raise EvaluationError(f"sample {key!r} of {url} has no label (.cls): kNN needs labeled shards")
            images.append(sample["image"])
            labels.append(sample["cls"])
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels)
                images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def embed(model: ContrastiveModel, url: str, *, image_size: int, storage_options: dict | None = None,
          batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised encoder features (N, F) and labels (N,) of every sample at `url`."""
    model.eval()
    feats, labels = [], []
    for images, y in iter_labeled(url, image_size=image_size, batch_size=batch_size, storage_options=storage_options):
        feats.append(F.normalize(model.features(images), dim=1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
             test_labels: torch.Tensor, *, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> float:
    """Weighted kNN (cosine similarity, votes exp(sim / temperature), as in InstDisc/DINO).

    Features are (N, F) and (M, F), L2-normalised; labels (N,) and (M,). Returns top-1 in [0, 1].
    """
    k = min(k, len(train_feats))
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for lo in range(0, len(test_feats), chunk):
        sims = test_feats[lo:lo + chunk] @ train_feats.T                     # (m, N)
        top_sim, top_idx = sims.topk(k, dim=1)                               # (m, k)
        votes = torch.zeros(len(top_sim), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[lo:lo + chunk]).sum())
    return correct / len(test_feats)


def knn_accuracy(model: ContrastiveModel, train_url: str, test_url: str, *, image_size: int, k: int = 200,
                 storage_options: dict | None = None) -> float:
    """kNN top-1 of `model`'s encoder features: neighbours from `train_url`, queries from `test_url`."""
    train_f, train_y = embed(model, train_url, image_size=image_size, storage_options=storage_options)
    test_f, test_y = embed(model, test_url, image_size=image_size, storage_options=storage_options)
    return knn_top1(train_f, train_y, test_f, test_y, k=k)


# ---- checkpoints ----------------------------------------------------------------------------


def load_checkpoint_model(checkpoint_url: str, storage_options: dict | None = None) -> tuple[ContrastiveModel, object]:
    """(model with the checkpoint's fp32 weights, its config) from a checkpoint folder URL."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ssl_dist.checkpoint import META, TAG

    options = storage_options if storage_options is not None else storage.storage_options(checkpoint_url)
    fs, path = storage.filesystem(checkpoint_url, options)
    with storage.translate_errors(checkpoint_url):
        if not fs.exists(f"{path}/{META}"):
            raise EvaluationError(f"{checkpoint_url} is not a checkpoint (no {META}): pass a checkpoint-NNNNNNNN "
                                  f"folder of a run")
        with tempfile.TemporaryDirectory(prefix="ssl-dist-eval-") as tmp:
            fs.get(f"{path}/", tmp + "/", recursive=True)
            meta = json.loads((Path(tmp) / META).read_text())
            cfg = config_lib.from_dict(meta["config"])
            if cfg.train.zero_stage == 0:  # no ZeRO shards: the module's state is whole in rank 0's file
                state = torch.load(Path(tmp) / TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
            else:
                state = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=TAG)
    model = build_model(cfg.model)
    model.load_state_dict(state)
    return model, cfg


def evaluate_checkpoint(checkpoint_url: str, train_url: str, test_url: str, *, k: int = 200) -> dict:
    """kNN top-1 of a checkpoint's encoder and of the same encoder at random initialisation."""
    model, cfg = load_checkpoint_model(checkpoint_url)
    trained = knn_accuracy(model, train_url, test_url, image_size=cfg.data.image_size, k=k)
    torch.manual_seed(cfg.train.seed)
    random_init = knn_accuracy(build_model(cfg.model), train_url, test_url, image_size=cfg.data.image_size, k=k)
    return {"knn_top1": trained, "knn_top1_random_init": random_init}

