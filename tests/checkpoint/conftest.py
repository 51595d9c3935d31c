"""Real checkpoints for the checkpoint tests, written once per session (see checkpoint_fakes)."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def real_checkpoints(tmp_path_factory):
    """The folder holding `<name>/checkpoint-0000000{1,2}` of every engine of checkpoint_fakes.REAL,
    written by DeepSpeed on 2 ranks. Read-only: a test that edits one copies it (`copy_run`)."""
    from checkpoint_fakes import save_real_checkpoints
    from ranks import spawn_ranks

    root = tmp_path_factory.mktemp("real-checkpoints")
    spawn_ranks(save_real_checkpoints, str(root), world=2)
    return root


@pytest.fixture
def copy_run(real_checkpoints, tmp_path):
    """copy_run(name) -> a copy of the run folder of REAL[name] (both checkpoints) to edit."""
    def copy(name: str):
        return shutil.copytree(real_checkpoints / name, tmp_path / name)
    return copy
