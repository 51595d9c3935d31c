"""Zero-shot classification and image–text retrieval of an image–text model (CLIP, SigLIP).

Pure torch: the scoring functions take embeddings, or callables that make them
(`features(images)` -> (B, D) image embeddings, `encode_text(tokens)` -> (B, D) text
embeddings, `tokenizer(list[str])` -> token tensor), so they work for any two-tower model
and are tested without a checkpoint. The readers go through `ssl_dist.data` (the same
`ShardSet` and `decode.decode_sample` as training). `evaluate.evaluate_text_checkpoint`
builds the model of a checkpoint and calls these; `ssl-dist evaluate --zero-shot/--retrieval`
calls that.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ssl_dist import data, storage
from ssl_dist.evaluate import EvaluationError, iter_labeled

# The 18 CIFAR-10 prompts of CLIP (Radford et al., 2021), as listed in openai/CLIP's
# data/prompts.md. open_clip's zero_shot_metadata ships only ImageNet's templates, so they
# are written down here.
CIFAR10_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
)


def read_templates(path: str, storage_options: dict | None = None) -> tuple[str, ...]:
    """Prompt templates from a text file (local path or URL): one a line, each with `{}` where
    the class name goes; blank lines are skipped. Called by `ssl-dist evaluate --templates`.

    Raises EvaluationError naming the file and the first line without `{}`, or an empty file.
    """
    fs, root = storage.filesystem(path, storage_options)
    try:
        with fs.open(root, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, UnicodeDecodeError) as err:
        raise EvaluationError(f"templates file {path}: cannot be read as UTF-8 text ({err})") from None
    templates = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if "{}" not in line:
            raise EvaluationError(f"templates file {path}, line {number}: {line!r} has no {{}} for the class name "
                                  f"(write one template a line, e.g. 'a photo of a {{}}.')")
        templates.append(line.strip())
    if not templates:
        raise EvaluationError(f"templates file {path} holds no template (one a line, each with {{}})")
    return tuple(templates)


def fill(template: str, name: str) -> str:
    """`template` with its `{}` replaced by `name`; replace, not str.format, so that other
    braces in a user's template are kept as written."""
    return template.replace("{}", name)


@torch.no_grad()
def zero_shot_classifier(encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable,
                         class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(D, C) classifier of the CLIP recipe: for each class, the L2-normalised mean of the
    L2-normalised text embeddings of its prompts (every template filled with its name).

    `encode_text(tokens)` -> (T, D); `tokenizer(list of T str)` -> tokens.
    """
    columns = []
    for name in class_names:
        emb = F.normalize(encode_text(tokenizer([fill(t, name) for t in templates])).float(), dim=-1)  # (T, D)
        columns.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(columns, dim=1)


def zero_shot_top1(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> float:
    """Top-1 in [0, 1] of (N, D) image embeddings against the (D, C) classifier; labels (N,).
    (Normalising the images does not change the argmax; it keeps the logits cosines.)"""
    logits = F.normalize(image_features.float(), dim=-1) @ classifier  # (N, C)
    return int((logits.argmax(1) == labels).sum()) / len(labels)


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10), *,
                     chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways on a paired set (image i goes with text i), cosine similarity.

    `image_emb`, `text_emb`: (N, D). Returns {"image_to_text_R@k": ..., "text_to_image_R@k": ...}
    for each k in `ks`, each in [0, 1]. The rank of the true match is the number of
    candidates scoring strictly higher (a tie counts in the match's favour). Rows are
    scored `chunk` at a time, so memory is chunk x N, never N x N.
    """
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    scores = {}
    for name, queries, keys in (("image_to_text", image_emb, text_emb), ("text_to_image", text_emb, image_emb)):
        ranks = []
        for lo in range(0, len(queries), chunk):
            sims = queries[lo:lo + chunk] @ keys.T                                   # (m, N)
            true = sims[torch.arange(len(sims)), torch.arange(lo, lo + len(sims))]  # (m,)
            ranks.append((sims > true[:, None]).sum(1))
        ranks = torch.cat(ranks)
        for k in ks:
            scores[f"{name}_R@{k}"] = int((ranks < k).sum()) / len(ranks)
    return scores


# ---- readers --------------------------------------------------------------------------------


def class_names(url: str, storage_options: dict | None = None) -> list[str]:
    """The class names of a labeled set, from its manifest's "classes" (index 0 first);
    underscores become spaces ("pickup_truck" -> "pickup truck"), as prompts are sentences.
    Raises EvaluationError when the manifest has none."""
    shards = data.ShardSet(url, storage_options if storage_options is not None else storage.storage_options(url))
    names = shards.manifest.get("classes") or []
    if not names:
        raise EvaluationError(f"the shards at {url} list no class names (their index.json has no \"classes\"): "
                              f"zero-shot classification needs them; make the shards from an ImageFolder (one folder "
                              f"per class, named by the class) with 'ssl-dist shards make SRC DEST'")
    return [str(name).replace("_", " ") for name in names]


@torch.no_grad()
def embed_labeled(features: Callable[[torch.Tensor], torch.Tensor], url: str, *, image_size: int, limit: int = 0,
                  batch_size: int = 256, storage_options: dict | None = None,
                  view=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) image embeddings `features(images)` and (N,) labels of the first `limit` samples
    (0: all) at `url`, in manifest order (`evaluate.iter_labeled`)."""
    feats, labels = [], []
    for images, y in iter_labeled(url, image_size=image_size, batch_size=batch_size,
                                  storage_options=storage_options, limit=limit, view=view):
        feats.append(features(images).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def iter_captioned(url: str, *, image_size: int, limit: int = 0, batch_size: int = 256,
                   storage_options: dict | None = None, view=None) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """The first `limit` (0: all) (image, caption) pairs at `url` in manifest order, in batches:
    (images (B, 3, S, S) as `augment.EvalView` makes them, B captions). A sample without
    a `.txt` is an EvaluationError naming it (retrieval needs every pair)."""
    from ssl_dist.augment import EvalView  # imports torchvision: only when reading images

    shards = data.ShardSet(url, storage_options if storage_options is not None else storage.storage_options(url))
    view = view or EvalView(image_size)  # the method's eval_view(), else SimCLR's normalisation
    images, captions, position = [], [], 0
    for shard, count in enumerate(shards.counts.tolist()):
        if limit and position >= limit:
            break
        stop = min(count, limit - position) if limit else count
        for _, (key, fields) in sorted(shards.read_runs([(shard, 0, stop)]).items()):
            sample = data.decode_sample(key, fields)
            if not isinstance(sample.get("txt"), str):
                raise EvaluationError(f"sample {key!r} of {url} has no caption (.txt): retrieval needs "
                                      f"image-text shards (KEY.jpg + KEY.txt)")
            images.append(view(sample)["image"])
            captions.append(sample["txt"])
            if len(images) == batch_size:
                yield torch.stack(images), captions
                images, captions = [], []
        position += stop
    if images:
        yield torch.stack(images), captions


@torch.no_grad()
def embed_captioned(features: Callable[[torch.Tensor], torch.Tensor],
                    encode_text: Callable[[torch.Tensor], torch.Tensor], tokenizer: Callable, url: str, *,
                    image_size: int, limit: int = 0, batch_size: int = 256,
                    storage_options: dict | None = None, view=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) image embeddings and (N, D) caption embeddings of the pairs at `url` (row i of
    both is pair i), for `retrieval_recall`. `view`: the method's `eval_view()`."""
    image_emb, text_emb = [], []
    for images, captions in iter_captioned(url, image_size=image_size, limit=limit, batch_size=batch_size,
                                           storage_options=storage_options, view=view):
        image_emb.append(features(images).float())
        text_emb.append(encode_text(tokenizer(captions)).float())
    return torch.cat(image_emb), torch.cat(text_emb)
