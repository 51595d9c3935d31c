"""Restoring: the parts that need no engine (RNG state; which files a rank downloads)."""

from __future__ import annotations

import random

import numpy as np
import torch

from ssl_dist import checkpoint
from ssl_dist.checkpoint.restore import _deepspeed_files_for  # (checkpoint.restore is the function)


def draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_round_trips_through_a_tensors_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = draws()
    draws()
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_a_rank_on_the_same_world_size_downloads_only_its_own_shard():
    parts = [{"deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt": 1, "deepspeed/mp_rank_00_model_states.pt": 1,
              "stream-rank00000.json": 1},
             {"deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt": 1, "stream-rank00001.json": 1}]
    info = checkpoint.CheckpointInfo(url="file:///x/checkpoint-00000004", meta={"step": 4, "world_size": 2},
                                     parts=parts)
    assert _deepspeed_files_for(info, 1) == ["deepspeed/mp_rank_00_model_states.pt",
                                             "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_download_writes_nothing_outside_its_folder(tmp_path):
    """What restore's download does with a name that goes up out of the checkpoint (the
    reproduction wrote `escaped.txt` beside the rank's temp folder, from the run folder)."""
    import fsspec
    import pytest

    from ssl_dist.checkpoint.restore import download

    source = tmp_path / "store" / "run" / "checkpoint-00000004"
    source.mkdir(parents=True)
    (tmp_path / "store" / "run" / "escaped.txt").write_text("a file of the run folder, not of the checkpoint")
    local = tmp_path / "restore" / "own"
    local.mkdir(parents=True)
    for name in ("../escaped.txt", "deepspeed/../../escaped.txt", str(tmp_path / "restore" / "escaped.txt")):
        with pytest.raises(checkpoint.CheckpointError, match="names a file outside its checkpoint folder"):
            download(fsspec.filesystem("file"), str(source), [name], str(local))
    assert [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "restore").rglob("*")] == ["restore/own"]


def test_download_checks_each_files_digest(tmp_path):
    import fsspec
    import pytest
    from checkpoint_fakes import sha256

    from ssl_dist.checkpoint.restore import download

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.pt").write_bytes(b"swapped after the check")
    with pytest.raises(checkpoint.CheckpointError, match="a.pt does not match the sha256"):
        download(fsspec.filesystem("file"), str(tmp_path / "src"), ["a.pt"], str(tmp_path / "dst"),
                  digests={"a.pt": sha256(b"what was checked")})
