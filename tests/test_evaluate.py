"""`evaluate` (and `export`) check a checkpoint before they load it: complete, every file's
digest matching; `evaluate` scores only train and test sets with the same class list."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from cifar import cifar_slice

from ssl_dist import checkpoint, config, evaluate, export
from ssl_dist.cli import main
from ssl_dist.model import build_model
from ssl_dist.shards import make_shards

SMALL = ("model.proj_hidden_dim=32", "model.proj_dim=8", "model.width=8")


def model_checkpoint(folder: Path, module_state, *overrides: str) -> str:
    """A complete one-rank checkpoint of a ZeRO-1 run as `checkpoint.save` writes it (meta.json,
    the model file, the stream state, the part list with each file's size and sha256), no engine."""
    cfg = config.load(None, ["train.zero_stage=1", *SMALL, *overrides])
    (folder / checkpoint.TAG).mkdir(parents=True)
    meta = {"format": checkpoint.FORMAT, "step": 1, "samples_seen": 1, "world_size": 1, "zero_stage": 1,
            "config": config.to_dict(cfg)}
    (folder / checkpoint.META).write_text(json.dumps(meta))
    (folder / checkpoint.stream_file(0)).write_text("{}")
    torch.save({"module": module_state}, folder / checkpoint.TAG / "mp_rank_00_model_states.pt")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    part = {"rank": 0, "step": 1, "files": {p.relative_to(folder).as_posix(): p.stat().st_size for p in files},
            "sha256": {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
    (folder / checkpoint.PARTS).mkdir()
    (folder / checkpoint.part_file(0)).write_text(json.dumps(part))
    return str(folder)


@pytest.fixture(scope="module")
def cifar_sets(tmp_path_factory):
    """{"train": 2 images of each of the 10 classes, "test": 1 of each, "fewer": 1 of each but
    "cat"}: shards with "classes" in their index.json."""
    root = tmp_path_factory.mktemp("eval-sets")
    sets = {}
    for name, per_class, split in (("train", 2, "train"), ("test", 1, "test"), ("fewer", 1, "test")):
        source = cifar_slice(root / f"{name}-src", per_class=per_class, split=split)
        if name == "fewer":
            shutil.rmtree(source / "cat")
        make_shards(str(source), str(root / name), samples_per_shard=50, workers=1)
        sets[name] = str(root / name)
    return sets


@pytest.fixture
def good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(config.load(None, list(SMALL)).model)
    return Path(model_checkpoint(tmp_path / "checkpoint-00000001", model.state_dict()))


def test_evaluate_and_export_refuse_an_incomplete_checkpoint(good_checkpoint, cifar_sets, tmp_path):
    part = good_checkpoint / checkpoint.part_file(0)
    saved = part.read_bytes()
    part.unlink()  # the rank's upload never finished
    for call in (lambda: evaluate.evaluate_checkpoint(str(good_checkpoint), cifar_sets["train"], cifar_sets["test"],
                                                      linear_probe=False),
                 lambda: evaluate.load_checkpoint_model(str(good_checkpoint))):
        with pytest.raises(evaluate.EvaluationError, match="lacks the part of rank"):
            call()
    with pytest.raises(export.ExportError, match="lacks the part of rank"):
        export.export_encoder(str(good_checkpoint), str(tmp_path / "out"))
    part.write_bytes(saved)
    assert evaluate.load_checkpoint_model(str(good_checkpoint))[1].model.width == 8


def test_evaluate_and_export_refuse_a_checkpoint_whose_digest_differs(good_checkpoint, cifar_sets, tmp_path,
                                                                       capsys):
    model = good_checkpoint / checkpoint.TAG / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01  # one bit of a weight, same size
    model.write_bytes(bytes(data))
    expected = "does not match the sha256 rank 0 wrote"
    with pytest.raises(evaluate.EvaluationError, match=expected):
        evaluate.evaluate_checkpoint(str(good_checkpoint), cifar_sets["train"], cifar_sets["test"],
                                     linear_probe=False)
    with pytest.raises(evaluate.EvaluationError, match=expected):
        evaluate.evaluate_text_checkpoint(str(good_checkpoint), zero_shot_url=cifar_sets["test"])
    with pytest.raises(export.ExportError, match=expected):
        export.export_encoder(str(good_checkpoint), str(tmp_path / "out"))
    assert main(["export", str(good_checkpoint), str(tmp_path / "out")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_train_and_test_sets_with_other_class_lists(good_checkpoint, cifar_sets, capsys):
    with pytest.raises(evaluate.EvaluationError) as refused:
        evaluate.evaluate_checkpoint(str(good_checkpoint), cifar_sets["train"], cifar_sets["fewer"],
                                     linear_probe=False)
    message = str(refused.value)
    assert cifar_sets["train"] in message and cifar_sets["fewer"] in message
    assert "'cat'" in message  # the difference, named
    assert main(["evaluate", str(good_checkpoint), "--train", cifar_sets["train"], "--test", cifar_sets["fewer"]]) == 2
    assert capsys.readouterr().err == f"ssl-dist: error: {message}\n"
    scores = evaluate.evaluate_checkpoint(str(good_checkpoint), cifar_sets["train"], cifar_sets["test"],
                                          linear_probe=False, k=5)
    assert 0 <= scores["knn_top1"] <= 1
