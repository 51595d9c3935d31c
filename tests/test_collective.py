"""Decisions shared by ranks, on a gloo group of one process (no Ray)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from ssl_dist import collective


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield dist.new_group(backend="gloo")
    dist.destroy_process_group()


def test_rank0_decides_and_failure_travels(group):
    assert collective.rank0_says(True, group) is True and collective.rank0_says(False, group) is False
    error = ValueError("checkpoint of another model")
    assert str(collective.broadcast(error, group)) == str(error)
    assert collective.broadcast({"step": 4}) == {"step": 4}  # the default group
    assert collective.all_ok(True, group) and not collective.all_ok(False, group)
