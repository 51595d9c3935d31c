"""Evaluation during training (`ssl_dist/live_eval.py`): every rank of a real 2-rank ZeRO-3
DeepSpeed engine (gloo, spawned processes) embeds its share, rank 0 scores; the score equals
the same initial model's in one process. kNN of a ResNet, and zero-shot of a tiny open_clip
model (classes from the manifest, CLIP's CIFAR-10 templates or a file of the user's own)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ranks import join_group, spawn_ranks

from ssl_dist import config, evaluate, live_eval, shards, synthetic, zero_shot
from ssl_dist.methods import resolve

WORLD = 2
RESNET = ["model.arch=resnet18", "model.cifar_stem=false", "model.proj_hidden_dim=32", "model.proj_dim=8"]
TINY = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "clip-tiny.json")
CLIP = ["method.name=clip", f"model.clip_arch={TINY}"]
# 25: ranks embed 13 and 12 samples, in batches of 4 (a rank runs a padding pass)
EVAL = ["train.zero_stage=3", "data.batch_size=4", "eval.every=1", "eval.k=5", "eval.max_samples=25"]


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("live-eval")
    for split, seed in (("train", 1), ("test", 2)):
        synthetic.write_image_folder(root / f"{split}-src", per_class=5, seed=seed)
        shards.make_shards(str(root / f"{split}-src"), str(root / split), samples_per_shard=8, workers=1)
    (root / "templates.txt").write_text("a {} shape\n\na drawing of a {}\n")
    return {"train": str(root / "train"), "test": str(root / "test"), "templates": str(root / "templates.txt")}


def eval_rank(rank: int, port: int, urls: dict, out: dict) -> None:
    """Both scores on this rank, from engines built with seed 0 (as the loop builds them)."""
    from ssl_dist.engine import build_engine

    join_group(rank, port, WORLD)
    knn_cfg = config.load(None, [*RESNET, *EVAL, f"eval.train_url={urls['train']}", f"eval.test_url={urls['test']}"])
    zs_cfg = config.load(None, [*CLIP, *EVAL, f"eval.test_url={urls['test']}", f"eval.templates={urls['templates']}"])
    scores = {}
    for name, cfg in (("knn", knn_cfg), ("zero_shot", zs_cfg)):
        method = resolve(cfg.method.name)(cfg, rank=rank)
        torch.manual_seed(0)
        engine = build_engine(method.build_module(), cfg, WORLD)
        common = dict(image_size=32, rank=rank, world=WORLD, storage_options={}, batch_size=4,
                      view=method.eval_view())
        if name == "knn":
            scores[name] = live_eval.knn_during_training(engine.module, cfg.eval, **common)
        else:
            templates = live_eval.eval_templates(cfg.eval)
            scores[name] = live_eval.zero_shot_during_training(engine.module, cfg.eval, method.tokenizer(),
                                                               templates, **common)
        assert engine.module.training  # put back in training mode
    if rank == 0:
        out.update(scores)
    else:
        assert scores == {"knn": None, "zero_shot": None}
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def zero3_scores(labeled) -> dict:
    return spawn_ranks(eval_rank, labeled, world=WORLD)


def initial_module(overrides: list[str]):
    cfg = config.load(None, overrides)
    method = resolve(cfg.method.name)(cfg)
    torch.manual_seed(0)
    return method, method.build_module().eval()


def test_knn_during_training_on_zero3_ranks_equals_one_process(labeled, zero3_scores):
    method, model = initial_module(RESNET)

    def features(url):
        feats, labels = [], []
        with torch.no_grad():
            for images, y in evaluate.iter_labeled(url, image_size=32, limit=25, view=method.eval_view()):
                feats.append(F.normalize(model.features(images), dim=1))
                labels.append(y)
        return torch.cat(feats), torch.cat(labels)

    expected = evaluate.knn_top1(*features(labeled["train"]), *features(labeled["test"]), k=5)
    assert zero3_scores["knn"] == pytest.approx(expected)


def test_zero_shot_during_training_on_zero3_ranks_equals_one_process(labeled, zero3_scores):
    method, model = initial_module(CLIP)
    names = zero_shot.class_names(labeled["test"])
    assert names == sorted(names) and len(names) >= 3  # the synthetic shapes' folders
    templates = ("a {} shape", "a drawing of a {}")  # the file's lines, blank one skipped
    assert live_eval.eval_templates(config.load(None, [f"eval.templates={labeled['templates']}"]).eval) == templates
    with torch.no_grad():
        classifier = zero_shot.zero_shot_classifier(model.encode_text, method.tokenizer(), names, templates)
    feats, labels = zero_shot.embed_labeled(model.features, labeled["test"], image_size=32, limit=25,
                                            view=method.eval_view())
    assert len(labels) == 25
    assert zero3_scores["zero_shot"] == pytest.approx(zero_shot.zero_shot_top1(feats, labels, classifier))


def test_default_templates_are_clips_cifar10_ones():
    assert live_eval.eval_templates(config.load(None, []).eval) == zero_shot.CIFAR10_TEMPLATES


def test_evaluation_during_training_and_of_a_checkpoint_decode_under_the_runs_pixel_limit(labeled):
    # The run's data.max_pixels, not decode's default, bounds what evaluation decodes: with a
    # limit below the 32 x 32 images, every sample is over it and the evaluation stops.
    from ssl_dist.decode import DataError

    method, model = initial_module(RESNET)
    eval_cfg = config.load(None, EVAL + [f"eval.train_url={labeled['train']}", f"eval.test_url={labeled['test']}"]).eval
    common = dict(image_size=32, rank=0, world=1, batch_size=4, view=method.eval_view())
    assert live_eval.knn_during_training(model, eval_cfg, **common, max_pixels=32 * 32) is not None
    with pytest.raises(DataError, match="max_pixels"):
        live_eval.knn_during_training(model, eval_cfg, **common, max_pixels=32 * 32 - 1)
    with pytest.raises(DataError, match="max_pixels"):
        evaluate.embed(model, labeled["test"], image_size=32, view=method.eval_view(), max_pixels=100)
