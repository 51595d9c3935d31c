"""fp32 weights of a checkpoint without an engine, never unpickling objects."""

from __future__ import annotations

import ast
import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from checkpoint_fakes import rewrite

from ssl_dist import checkpoint, config
from ssl_dist.checkpoint import weights
from ssl_dist.model import build_model

PACKAGE = Path(checkpoint.__file__).parent


class Exploit:
    """Unpickling this runs code (writes a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def model_checkpoint(folder: Path, module_state, *overrides) -> str:
    """A complete one-rank checkpoint (no engine): meta.json, the model file, the stream state
    and the part list with sizes and digests (`rewrite` puts each file's into it)."""
    cfg = config.load(None, ["model.proj_hidden_dim=32", "model.proj_dim=8", *overrides])
    (folder / checkpoint.TAG).mkdir(parents=True)
    (folder / checkpoint.PARTS).mkdir()
    (folder / checkpoint.part_file(0)).write_text(json.dumps({"rank": 0, "step": 1, "files": {}, "sha256": {}}))
    meta = {"format": checkpoint.FORMAT, "step": 1, "samples_seen": 1, "world_size": 1, "config": config.to_dict(cfg)}
    rewrite(folder, checkpoint.META, json.dumps(meta).encode())
    rewrite(folder, checkpoint.stream_file(0), b"{}")
    buffer = io.BytesIO()
    torch.save({"module": module_state}, buffer)
    rewrite(folder, f"{checkpoint.TAG}/mp_rank_00_model_states.pt", buffer.getvalue())
    return str(folder)


def test_whole_module_weights_and_the_checkpoints_config(tmp_path):
    model = build_model(config.load(None, ["model.proj_hidden_dim=32", "model.proj_dim=8"]).model)
    state, cfg = weights.fp32_state_dict(model_checkpoint(tmp_path / "c", model.state_dict(), "train.zero_stage=1"))
    assert cfg.train.zero_stage == 1 and cfg.model.proj_dim == 8
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_model_file_with_objects_is_refused_and_not_unpickled(tmp_path):
    marker = tmp_path / "pwned.txt"
    bad = model_checkpoint(tmp_path / "bad", {"w": Exploit(marker)}, "train.zero_stage=2")
    with pytest.raises(checkpoint.CheckpointError, match="refusing to unpickle"):
        weights.fp32_state_dict(bad)
    assert not marker.exists() and pickle.dumps(Exploit(marker))


def test_a_folder_without_meta_is_no_checkpoint(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="is not a checkpoint"):
        weights.fp32_state_dict(str(tmp_path))


def test_every_torch_load_of_the_package_states_how_much_it_unpickles():
    """Each torch.load says weights_only explicitly, and it is True (DeepSpeed's own loads:
    tests/test_security.py and test_safe_load.py)."""
    calls = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                flag = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                calls.append((path.name, node.lineno, flag))
    assert calls and all(flag in ("True", "False") for _, _, flag in calls), calls
    assert [name for name, _, flag in calls if flag == "False"] == [], calls
