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
