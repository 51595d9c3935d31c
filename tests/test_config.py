"""The typed config: defaults, YAML, `a.b=c` overrides, and one clear error per mistake."""

from pathlib import Path

import pytest

from ssl_dist import config
from ssl_dist.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_then_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\n  zero_stage: 3\ndata:\n  batch_size: 16\n")
    cfg = config.load(path, ["train.max_steps=9", "optim.lr=0.5", "data.train_url=s3://b/p", "run.use_gpu=true"])
    assert (cfg.train.max_steps, cfg.train.zero_stage, cfg.data.batch_size) == (9, 3, 16)
    assert cfg.optim.lr == 0.5 and isinstance(cfg.optim.lr, float)
    assert cfg.data.train_url == "s3://b/p" and cfg.run.use_gpu is True
    assert cfg.model.arch == config.Config().model.arch  # untouched keys keep their defaults


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError) as err:
        config.load(None, ["train.max_stepz=3"])
    assert "'train.max_stepz'" in str(err.value) and "train.max_steps" in str(err.value)
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        config.load(None, ["trian.max_steps=3"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  depth: 3\n")
    with pytest.raises(ConfigError, match=r"'model.depth' \(from .*bad.yaml\)"):
        config.load(path)


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=ten", "expected int"),
    ("train.max_steps=1.5", "expected int"),
    ("run.use_gpu=3", "expected bool"),
    ("model.arch=vgg", "allowed values are resnet18, resnet34, resnet50, or timm/<name>"),
    ("model.arch_kwargs={img_size: 32}", "model.arch=resnet18 takes none"),
    ("method.momentum=1.5", "must be between 0 and 1"),
    ("optim.base_batch=0", "must be at least 1"),
    ("train.zero_stage=4", "allowed values are 0, 1, 2, 3"),
    ("data.batch_size=0", "must be at least 1"),
    ("train=3", "is a section"),
    ("max_steps", "not of the form section.key=value"),
    ("method.name=byol", "allowed values are simclr, mocov3, rotnet, clip, siglip, or package.module:Class"),
    ("loss.name=nt_xent", "loss.name was removed: the method decides its loss"),
])
def test_wrong_values_are_one_clear_error(override, expected):
    with pytest.raises(ConfigError, match=expected):
        config.load(None, [override])


def test_floats_in_exponent_form_are_floats(tmp_path):
    # YAML 1.1 reads 1e-6 (no dot) as a string; a float key takes it as the number it names.
    (tmp_path / "c.yaml").write_text("optim:\n  weight_decay: 1e-6\n")
    assert config.load(tmp_path / "c.yaml", ["optim.lr=3e-4"]).optim.lr == 3e-4
    assert config.load(tmp_path / "c.yaml", []).optim.weight_decay == 1e-6
    with pytest.raises(ConfigError, match="expected float"):
        config.load(None, ["optim.lr=fast"])


def test_round_trip_through_dict_and_yaml():
    cfg = config.load(None, ["train.max_steps=5", "data.train_url=/x", "optim.weight_decay=1.0e-6"])
    args = ["train.max_steps=5", "data.train_url=/x", f"optim.weight_decay={cfg.optim.weight_decay}"]
    assert config.load(None, args) == cfg  # str(1e-06) back through the command line
    assert config.from_dict(config.to_dict(cfg)) == cfg
    import yaml

    assert config.from_dict(yaml.safe_load(config.dump_yaml(cfg))) == cfg


def test_every_field_is_documented():
    text = config.describe()
    for section in ("data", "model", "loss", "optim", "train", "run", "storage"):
        sub = getattr(config.Config(), section)
        docs = config.field_docs(type(sub))
        assert set(docs) == set(vars(sub)), f"undocumented fields in {section}"
        assert all(docs.values())
    assert "train.max_steps" in text


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    config.load(path)


def test_quickstart_yaml_is_the_embedded_default():
    from ssl_dist.quickstart import QUICKSTART

    shipped = config.load(ROOT / "jobs" / "configs" / "quickstart.yaml")
    assert shipped == config.merge(config.Config(), QUICKSTART, origin="test")


def test_quickstart_clip_default_names_the_towers_shipped_in_the_package():
    # jobs/ is not installed: the CLIP quickstart's open_clip config is package data
    from ssl_dist import model, quickstart

    cfg = quickstart.quickstart_config(ROOT, "/data/train", method="clip")
    assert cfg.method.name == "clip" and cfg.run.name == "quickstart-clip"
    arch = Path(cfg.model.clip_arch)
    assert arch.parent == Path(quickstart.__file__).resolve().parent / "configs" and arch.is_file()
    assert {"embed_dim", "vision_cfg", "text_cfg"} <= set(model.clip_model_config(str(arch)))


def test_a_saved_config_with_a_removed_key_still_loads():
    # Checkpoints written before loss.name went carry it in their saved config.
    saved = config.to_dict(config.Config())
    saved["loss"]["name"] = "nt_xent"
    assert config.from_dict(saved) == config.Config()


def test_builtin_method_names_are_the_methods_package():
    from ssl_dist import methods

    assert tuple(methods.BUILTIN) == config.BUILTIN_METHODS
    for name in methods.BUILTIN:
        assert methods.resolve(name).name == name


@pytest.mark.parametrize("uri", ["http://alice:s3cret-pass@mlflow.example.com:5000",
                                 "https://token@mlflow.example.com"])
def test_a_tracking_uri_with_credentials_is_refused_without_echoing_them(uri):
    # the config is written to the run folder and logged as the MLflow run's parameters
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_USERNAME") as err:
        config.load(None, [f"track.mlflow_uri={uri}"])
    assert "s3cret-pass" not in str(err.value) and "token@" not in str(err.value)
    assert config.load(None, ["track.mlflow_uri=https://mlflow.example.com:5000/"]).track.mlflow_uri
