"""launch.py without Ray running: what the driver decides before any worker starts."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_min_workers_makes_an_elastic_range_for_ray_train():
    import ray.train

    from ssl_dist import config, launch

    fixed = config.load(None, ["run.num_workers=3"])
    elastic = config.load(None, ["run.num_workers=3", "run.min_workers=1"])
    assert launch.worker_range(fixed) == 3 and launch.worker_range(elastic) == (1, 3)
    assert ray.train.ScalingConfig(num_workers=launch.worker_range(elastic)).elasticity_enabled
    with pytest.raises(config.ConfigError, match="run.min_workers=4"):
        config.load(None, ["run.num_workers=3", "run.min_workers=4"])


# ---- eval.every: what it scores can be scored, found out on the driver ----------------------


@pytest.fixture(scope="module")
def eval_sets(tmp_path_factory) -> dict:
    """A labeled set (with "classes") and the same images as shards made elsewhere (no classes)."""
    from ssl_dist import shards, synthetic

    root = tmp_path_factory.mktemp("eval-sets")
    synthetic.write_image_folder(root / "src", per_class=2, seed=1)
    shards.make_shards(str(root / "src"), str(root / "labeled"), samples_per_shard=8, workers=1)
    (root / "unnamed").mkdir()
    for tar in (root / "labeled").glob("*.tar"):
        (root / "unnamed" / tar.name).write_bytes(tar.read_bytes())
    shards.index_shards(str(root / "unnamed"), workers=1)
    (root / "bad-templates.txt").write_text("a photo of a cat\n")
    return {"labeled": str(root / "labeled"), "unnamed": str(root / "unnamed"),
            "templates": str(root / "bad-templates.txt")}


TINY = str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "clip-tiny.json")


@pytest.mark.parametrize("overrides,message", [
    (["method.name=simclr", "eval.test_url={labeled}"], r"scores kNN, which needs neighbours: set eval.train_url"),
    (["method.name=clip", f"model.clip_arch={TINY}", "eval.test_url={unnamed}"],
     r"zero-shot during training.*list no class names.*ImageFolder"),
    (["method.name=clip", f"model.clip_arch={TINY}", "eval.test_url={labeled}", "eval.templates={templates}"],
     r"templates file .*line 1: 'a photo of a cat' has no \{\}"),
])
def test_what_eval_every_cannot_score_is_one_clear_error_on_the_driver(eval_sets, overrides, message):
    from ssl_dist import config, launch

    cfg = config.load(None, ["eval.every=5", *(o.format(**eval_sets) for o in overrides)])
    with pytest.raises(launch.LaunchError, match=message):
        launch.check_eval_sets(cfg)


def test_zero_shot_during_training_needs_no_knn_sets(eval_sets):
    from ssl_dist import config, launch

    launch.check_eval_sets(config.load(None, ["eval.every=5", "method.name=clip", f"model.clip_arch={TINY}",
                                              f"eval.test_url={eval_sets['labeled']}"]))
    with pytest.raises(config.ConfigError, match="eval.every=5 needs labeled shards: set eval.test_url"):
        config.load(None, ["eval.every=5", "method.name=clip", f"model.clip_arch={TINY}"])
