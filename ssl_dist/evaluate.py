"""Evaluation of an encoder: features of labeled shards, then kNN top-1 and linear-probe top-1;
for image-text models also zero-shot top-1 and retrieval recall (the math in `zero_shot`).

Reads checkpoints without Ray or a DeepSpeed engine: the fp32 weights come from
`checkpoint.weights` (consolidated from the ZeRO shards with DeepSpeed's own `zero_to_fp32`
where needed). During training, `live_eval` scores the live model on small labeled sets.
"""

from __future__ import annotations

import sys
from typing import Iterator

import torch
import torch.nn.functional as F

from ssl_dist import data, storage
from ssl_dist.augment import EvalView
from ssl_dist.model import ContrastiveModel


class EvaluationError(RuntimeError):
    """A user-facing evaluation problem (no checkpoint there, unlabeled shards...)."""


def iter_labeled(url: str, *, image_size: int, batch_size: int = 256, storage_options: dict | None = None,
                 limit: int = 0, rank: int = 0, world: int = 1, view=None,
                 max_pixels: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of the shards at `url` once, in manifest order: (images (B, 3, S, S), labels (B,)).

    `limit`: only the first `limit` samples (0: all). `rank`/`world`: only samples number
    rank, rank + world, ... of those (the others are read, not decoded). `view`: the method's
    `eval_view()` (default: `EvalView(image_size)`, SimCLR's normalisation). `max_pixels`: the
    pixel limit of `decode` (data.max_pixels; None: its default); a sample over it, like any
    sample that does not decode, raises DataError.
    """
    from ssl_dist.decode import MAX_PIXELS

    pixels = MAX_PIXELS if max_pixels is None else max_pixels
    shards = data.ShardSet(url, storage_options if storage_options is not None else storage.storage_options(url))
    view = view or EvalView(image_size)
    images, labels = [], []
    position = 0
    for shard, count in enumerate(shards.counts.tolist()):
        if limit and position >= limit:
            break
        stop = min(count, limit - position) if limit else count
        for (_, index), (key, fields) in sorted(shards.read_runs([(shard, 0, stop)]).items()):
            if (position + index) % world != rank:
                continue
            sample = view(data.decode_sample(key, fields, max_pixels=pixels))
            if sample["cls"] < 0:
                raise EvaluationError(f"sample {key!r} of {url} has no label (.cls): kNN needs labeled shards")
            images.append(sample["image"])
            labels.append(sample["cls"])
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels)
                images, labels = [], []
        position += stop
    if images:
        yield torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def embed(model: ContrastiveModel, url: str, *, image_size: int, storage_options: dict | None = None,
          batch_size: int = 256, view=None, max_pixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised encoder features (N, F) and labels (N,) of every sample at `url`
    (`max_pixels`: the checkpoint's data.max_pixels; None: decode's default)."""
    model.eval()
    feats, labels = [], []
    for images, y in iter_labeled(url, image_size=image_size, batch_size=batch_size, storage_options=storage_options,
                                  view=view, max_pixels=max_pixels):
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


def linear_probe_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                      test_labels: torch.Tensor, *, C: float = 1.0, max_iter: int = 1000) -> float:
    """Top-1 of a multinomial logistic regression (scikit-learn) on frozen features.

    Features are standardised on the training set first; `C` is the inverse L2 strength.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(torch.unique(train_labels)) < 2:
        raise EvaluationError("a linear probe needs labeled samples of at least 2 classes in the training set")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    probe.fit(train_feats.float().numpy(), train_labels.numpy())
    return float((probe.predict(test_feats.float().numpy()) == test_labels.numpy()).mean())


def knn_accuracy(model: ContrastiveModel, train_url: str, test_url: str, *, image_size: int, k: int = 200,
                 storage_options: dict | None = None) -> float:
    """kNN top-1 of `model`'s encoder features: neighbours from `train_url`, queries from `test_url`."""
    train_f, train_y = embed(model, train_url, image_size=image_size, storage_options=storage_options)
    test_f, test_y = embed(model, test_url, image_size=image_size, storage_options=storage_options)
    return knn_top1(train_f, train_y, test_f, test_y, k=k)


# ---- checkpoints ----------------------------------------------------------------------------


def build_module(cfg) -> torch.nn.Module:
    """The randomly initialised module of `cfg`'s method (`Method.build_module`: SimCLR's
    ContrastiveModel, CLIP's towers, ...), the one the checkpoint's weights fit."""
    from ssl_dist import methods

    return methods.resolve(cfg.method.name)(cfg).build_module()


def eval_view(cfg):
    """The per-sample evaluation transform of `cfg`'s method (`Method.eval_view`): images
    normalised as the method trained on them (CLIP's are not SimCLR's)."""
    from ssl_dist import methods

    return methods.resolve(cfg.method.name)(cfg).eval_view()


def check_checkpoint(checkpoint_url: str, storage_options: dict | None = None, say=None):
    """The `checkpoint.inspect` record of the checkpoint folder at `checkpoint_url`: complete,
    every file's digest matching; EvaluationError otherwise (or for no checkpoint at all).
    What a user should know of it (checked by size only) goes to `say` (default: stderr)."""
    from ssl_dist import checkpoint

    options = storage_options if storage_options is not None else storage.storage_options(checkpoint_url)
    try:
        info = checkpoint.inspect(checkpoint_url, options)
    except checkpoint.IncompleteCheckpoint as err:
        raise EvaluationError(f"cannot evaluate an incomplete checkpoint: {err}; pass a complete "
                              f"checkpoint-NNNNNNNN folder (an earlier one of the run)") from None
    for note in info.notes:
        (say or (lambda line: print(f"ssl-dist: {line}", file=sys.stderr)))(note)
    return info


def load_checkpoint_model(checkpoint, storage_options: dict | None = None) -> tuple[ContrastiveModel, object]:
    """(model with the checkpoint's fp32 weights, its config) from a checkpoint folder URL
    (checked first: `check_checkpoint`) or the `inspect` record of one already checked."""
    from ssl_dist.checkpoint import CheckpointError, weights

    info = checkpoint if not isinstance(checkpoint, str) else check_checkpoint(checkpoint, storage_options)
    try:
        state, cfg = weights.fp32_state_dict(info, storage_options)
    except CheckpointError as err:  # a file that is more than weights, or that changed since it was checked
        raise EvaluationError(str(err)) from None
    model = build_module(cfg)
    model.load_state_dict(state)
    return model, cfg


def check_same_classes(train_url: str, test_url: str, storage_options: dict | None = None) -> None:
    """EvaluationError when the manifests of the train and test sets both list class names
    ("classes") and the lists differ: label i would then name another class in each set,
    and the score would be wrong without a sign. Sets without a list are not compared."""
    from ssl_dist.shards import read_manifest

    found = {}
    for url in (train_url, test_url):
        options = storage_options if storage_options is not None else storage.storage_options(url)
        found[url] = read_manifest(url, options).get("classes")
    train, test = found[train_url], found[test_url]
    if train is not None and test is not None and list(train) != list(test):
        only = sorted(set(train) ^ set(test))
        if only:
            detail = "in one only: " + ", ".join(map(repr, only[:10])) + (" ..." if len(only) > 10 else "")
        else:
            label = next(i for i, (a, b) in enumerate(zip(train, test)) if a != b)
            detail = (f"the same names in another order: label {label} is {train[label]!r} in one, "
                      f"{test[label]!r} in the other")
        raise EvaluationError(f"the train set {train_url} ({len(train)} classes) and the test set {test_url} "
                              f"({len(test)} classes) list other classes ({detail}): score a test set made with "
                              f"the train set's classes")


def evaluate_checkpoint(checkpoint_url: str, train_url: str, test_url: str, *, k: int = 200,
                        linear_probe: bool = True, probe_c: float = 1.0, probe_max_iter: int = 1000) -> dict:
    """kNN top-1 (and linear-probe top-1) of a checkpoint's encoder and of the same encoder at
    random initialisation: {"knn_top1", "knn_top1_random_init"[, "linear_top1", "linear_top1_random_init"]}.
    The sets' class lists are compared and the checkpoint checked (`check_checkpoint`) first."""
    check_same_classes(train_url, test_url)
    model, cfg = load_checkpoint_model(checkpoint_url)
    torch.manual_seed(cfg.train.seed)
    scores = {}
    view = eval_view(cfg)
    for suffix, encoder in (("", model), ("_random_init", build_module(cfg))):
        train_f, train_y = embed(encoder, train_url, image_size=cfg.data.image_size, view=view,
                                 max_pixels=cfg.data.max_pixels)
        test_f, test_y = embed(encoder, test_url, image_size=cfg.data.image_size, view=view,
                               max_pixels=cfg.data.max_pixels)
        scores[f"knn_top1{suffix}"] = knn_top1(train_f, train_y, test_f, test_y, k=k)
        if linear_probe:
            scores[f"linear_top1{suffix}"] = linear_probe_top1(train_f, train_y, test_f, test_y, C=probe_c,
                                                               max_iter=probe_max_iter)
    return scores


def require_text_tower(module: torch.nn.Module, cfg, checkpoint_url: str) -> None:
    """EvaluationError unless `module` has a text tower (`encode_text`), which zero-shot and
    retrieval need; SimCLR-like image-only models have none."""
    if not callable(getattr(module, "encode_text", None)):
        raise EvaluationError(f"{checkpoint_url} holds a method.name={cfg.method.name} model, which has no text "
                              f"tower: zero-shot and retrieval need an image-text model (method.name=clip or "
                              f"siglip); score this one with --train/--test (kNN, linear probe)")


def text_scores(module: torch.nn.Module, tokenizer, cfg, *, zero_shot_url: str = "", templates=None,
                retrieval_url: str = "", max_samples: int = 10000) -> dict:
    """Zero-shot top-1 on the labeled set at `zero_shot_url` ({"zero_shot_top1"}) and recall@1/5/10
    on the captioned set at `retrieval_url` ({"image_to_text_R@1", ...}) of one image-text
    module, each set read up to `max_samples` (0: all). Called by `evaluate_text_checkpoint`."""
    from ssl_dist import zero_shot  # zero_shot imports this module (iter_labeled, EvaluationError)

    module.eval()
    size, scores, view = cfg.data.image_size, {}, eval_view(cfg)
    with torch.no_grad():
        if zero_shot_url:
            names = zero_shot.class_names(zero_shot_url)
            classifier = zero_shot.zero_shot_classifier(module.encode_text, tokenizer, names,
                                                        templates or zero_shot.CIFAR10_TEMPLATES)
            feats, labels = zero_shot.embed_labeled(module.features, zero_shot_url, image_size=size, limit=max_samples,
                                                    view=view)
            scores["zero_shot_top1"] = zero_shot.zero_shot_top1(feats, labels, classifier)
        if retrieval_url:
            image_emb, text_emb = zero_shot.embed_captioned(module.features, module.encode_text, tokenizer,
                                                            retrieval_url, image_size=size, limit=max_samples,
                                                            view=view)
            scores.update(zero_shot.retrieval_recall(image_emb, text_emb))
    return scores


def evaluate_text_checkpoint(checkpoint_url: str, *, zero_shot_url: str = "", templates=None,
                             retrieval_url: str = "", max_samples: int = 10000) -> dict:
    """`text_scores` of a checkpoint's image-text model and of the same model at random
    initialisation (keys with "_random_init"). `templates`: None for CLIP's CIFAR-10 prompts.
    Raises EvaluationError for a model without a text tower, or a checkpoint that is
    incomplete or altered (`check_checkpoint`). Called by `ssl-dist evaluate`."""
    from ssl_dist import model as towers

    module, cfg = load_checkpoint_model(checkpoint_url)
    require_text_tower(module, cfg, checkpoint_url)
    tokenizer = towers.build_tokenizer(cfg.model.clip_arch)
    torch.manual_seed(cfg.train.seed)
    scores = {}
    for suffix, candidate in (("", module), ("_random_init", build_module(cfg))):
        found = text_scores(candidate, tokenizer, cfg, zero_shot_url=zero_shot_url, templates=templates,
                            retrieval_url=retrieval_url, max_samples=max_samples)
        scores.update({f"{key}{suffix}": value for key, value in found.items()})
    return scores
