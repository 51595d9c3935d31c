"""Sweep parameters: the `section.key=dist(args)` grammar, one clear message per bad input
(before Ray starts), and trial values of the key's own type."""

from __future__ import annotations

import pytest

from ssl_dist import config, sweep_space
from ssl_dist.config import ConfigError

BASE = config.load(None, [])


def test_each_distribution_parses_to_values_of_the_keys_type():
    params = sweep_space.parse_params([
        "optim.lr=loguniform(1e-4,1e-2)", "loss.temperature = choice(0.1, 0.2, 0.5)",
        "optim.warmup_steps=randint(0,20)", "optim.weight_decay=uniform(0,1e-4)",
        "optim.name=grid(adamw,sgd)", "model.cifar_stem=choice(true,false)"], BASE)
    assert [(p.key, p.dist, p.values) for p in params] == [
        ("optim.lr", "loguniform", (1e-4, 1e-2)), ("loss.temperature", "choice", (0.1, 0.2, 0.5)),
        ("optim.warmup_steps", "randint", (0, 20)), ("optim.weight_decay", "uniform", (0.0, 1e-4)),
        ("optim.name", "grid", ("adamw", "sgd")), ("model.cifar_stem", "choice", (True, False))]
    # YAML 1.1 reads 1e-1 (no dot) as text: the float key still gets the number
    assert sweep_space.parse_param("loss.temperature=choice(1e-1,1)", BASE).values == (0.1, 1.0)


def test_values_tune_draws_become_config_values_of_the_keys_type():
    params = sweep_space.parse_params([
        "optim.lr=loguniform(1e-4,1e-2)", "optim.warmup_steps=randint(0,20)", "loss.temperature=choice(0.1,0.5)",
        "optim.momentum=uniform(0.5,0.99)", "optim.name=choice(adamw,sgd)", "model.cifar_stem=choice(true,false)"],
        BASE)
    space = sweep_space.search_space(params)
    for draw in range(20):
        sampled = {key: domain.sample() for key, domain in space.items()}
        cfg = sweep_space.apply(BASE, sampled, run_name=f"trial-{draw}")
        assert type(cfg.optim.lr) is float and 1e-4 <= cfg.optim.lr <= 1e-2
        assert type(cfg.optim.momentum) is float and 0.5 <= cfg.optim.momentum <= 0.99
        assert type(cfg.optim.warmup_steps) is int and 0 <= cfg.optim.warmup_steps < 20
        assert type(cfg.loss.temperature) is float and cfg.loss.temperature in (0.1, 0.5)
        assert cfg.optim.name in ("adamw", "sgd") and type(cfg.model.cifar_stem) is bool
        assert cfg.run.name == f"trial-{draw}"
        assert config.from_dict(config.to_dict(cfg)) == cfg  # what the trial writes to its run folder reads back
        assert "optim.lr=" in sweep_space.describe(sampled)


def test_grid_keeps_the_order_given():
    space = sweep_space.search_space(sweep_space.parse_params(["optim.lr=grid(1e-3,10,2e-3)"], BASE))
    assert space["optim.lr"] == {"grid_search": [1e-3, 10.0, 2e-3]}


@pytest.mark.parametrize("param, expected", [
    # the form, and the distribution's name
    ("optim.lr", r"not of the form section.key=dist\(args\)"),
    ("optim.lr=0.01", r"not of the form section.key=dist\(args\).*a fixed value is an override"),
    ("optim.lr=normal(0,1)", r"unknown distribution 'normal'; allowed: uniform\(low,high\), loguniform\(low,high\), "
                             r"randint\(low,high\).*choice\(a,b,...\), grid\(a,b,...\)"),
    ("optim.lr=choice()", "an empty value"),
    ("optim.lr=uniform(1e-3,)", "an empty value"),
    # an unknown key: the config's own message, with the allowed keys
    ("optim.lrr=uniform(0,1)", r"unknown config key 'optim.lrr' \(from --param optim.lrr=uniform\(0,1\)\); "
                               r"allowed keys here: optim.name, optim.lr"),
    ("optimizer.lr=choice(1,2)", "unknown config key 'optimizer'"),
    ("optim=choice(1,2)", "config key 'optim' .* is a section"),
    # ranges
    ("optim.lr=uniform(1e-2,1e-4)", r"low \(1e-2\) must be below high \(1e-4\)"),
    ("optim.lr=uniform(1e-3,1e-3)", "must be below high"),
    ("optim.lr=loguniform(0,1e-2)", "loguniform needs 0 < low"),
    ("optim.lr=loguniform(-1,1)", "loguniform needs 0 < low"),
    ("optim.lr=uniform(a,0.1)", "'a' is not a number"),
    ("optim.lr=uniform(0.1,inf)", "'inf' is not a finite number"),
    ("optim.lr=uniform(0.1)", "uniform takes two numbers, low and high"),
    ("optim.lr=uniform(0.1,0.2,0.3)", "uniform takes two numbers"),
    ("optim.warmup_steps=randint(0,2.5)", "'2.5' is not a whole number"),
    ("loss.temperature=uniform(-0.1,0.5)", r"loss.temperature=-0.1: must be positive"),
    ("data.max_skip_fraction=uniform(0.1,2)", "must be between 0 and 1"),
    ("train.zero_stage=randint(0,5)", "allowed values are 0, 1, 2, 3"),  # 4 is drawn, 5 is not
    # a distribution that does not fit the key's type
    ("optim.warmup_steps=uniform(0,10)", r"optim.warmup_steps is a whole-number key, and uniform draws real numbers: "
                                         r"use randint\(low,high\) or choice"),
    ("optim.lr=randint(1,3)", r"optim.lr is a real-number key, and randint draws whole numbers: use uniform"),
    ("optim.name=uniform(0,1)", r"optim.name is a key with a set of allowed values.*use choice\(a,b,...\)"),
    ("model.cifar_stem=randint(0,2)", r"a true/false key.*use choice"),
    # a value of the wrong type, or not allowed, in a list
    ("optim.lr=choice(a,b)", r"config key 'optim.lr' = 'a' \(from --param optim.lr=choice\(a,b\)\) has the wrong "
                             r"type: expected float"),
    ("train.accumulate=grid(1,2.5)", "expected int"),
    ("optim.name=choice(adamw,lamb)", "allowed values are 'adamw', 'sgd'"),
    ("loss.temperature=choice(0.1,0)", "must be positive"),
    # what every trial shares
    ("run.num_workers=choice(1,2)", "run.num_workers is the same for every trial of a sweep"),
    ("eval.k=choice(10,20)", "eval.k is the same for every trial"),
    ("train.max_steps=choice(10,20)", "train.max_steps is the same for every trial"),
])
def test_a_bad_parameter_is_one_clear_config_error(param, expected):
    with pytest.raises(ConfigError, match=expected):
        sweep_space.parse_params([param], BASE)


def test_no_parameter_or_one_key_twice_is_refused():
    with pytest.raises(ConfigError, match="at least one --param"):
        sweep_space.parse_params([], BASE)
    with pytest.raises(ConfigError, match="--param optim.lr is given twice"):
        sweep_space.parse_params(["optim.lr=uniform(0.1,0.2)", "optim.lr=choice(0.1)"], BASE)


# ---- `ssl-dist sweep`: a bad parameter or metric is one line and exit 2, before Ray starts -----
# (RAY_ADDRESS names a port where nothing listens: a check made after connecting would fail otherwise)

EVAL = ["eval.every=2", "eval.test_url=s3://shards/test", "train.max_steps=6"]


@pytest.mark.parametrize("args, expected", [
    (["--param", "optim.lrr=uniform(0,1)"], "unknown config key 'optim.lrr'"),
    (["--param", "optim.lr=uniform(1e-2,1e-4)"], "must be below high"),
    (["--param", "optim.lr=gauss(1,2)"], "unknown distribution 'gauss'"),
    (["--param", "optim.lr=choice(0.1)", "--metric", "accuracy"], "--metric accuracy: .* allowed: knn_top1, "
                                                                   "zero_shot_top1"),
    (["--param", "optim.lr=choice(0.1)", "eval.every=0"], r"periodic evaluation, which is off \(eval.every=0\)"),
    (["--param", "optim.lr=choice(0.1)"], "--metric knn_top1 is not scored by this config's evaluation .*set "
                                          "eval.train_url"),
    (["--param", "optim.lr=choice(0.1)", "--metric", "zero_shot_top1", "eval.train_url=s3://shards/train"],
     "zero-shot needs an image-text method"),
    (["--param", "optim.lr=choice(0.1)", "--grace-evals", "3", "eval.train_url=s3://shards/train"],
     r"--grace-evals 3 x eval.every=2 is step 6, not before train.max_steps=6"),
    (["--param", "optim.lr=choice(0.1)", "--name", "../up", "eval.train_url=s3://shards/train"],
     "run.name='../up': a run name is one folder"),
    (["--param", "optim.lr=choice(0.1)", "--name", "n" * 112, "eval.train_url=s3://shards/train"],
     "at most 111 characters"),
])
def test_sweep_refuses_bad_input_with_one_line_before_ray_starts(monkeypatch, capsys, tmp_path, args, expected):
    from ssl_dist import cli

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    eval_every = [] if any(a.startswith("eval.every") for a in args) else EVAL[:1]
    assert cli.main(["sweep", *args, *eval_every, *EVAL[1:], f"run.storage_path={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssl-dist: error: ") and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(expected, err), err
    assert not (tmp_path / "runs").exists()  # nothing written
