"""Checkpoint folders: names, completeness, listing, clearing a run (no Ray, no engine)."""

from __future__ import annotations

import pytest
from checkpoint_fakes import fake_checkpoint

from ssl_dist import checkpoint


def test_incomplete_checkpoints_are_detected(tmp_path):
    for step in (4, 8, 12):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-00000008" / "parts" / "rank00001.json").unlink()        # a rank never uploaded
    (tmp_path / "checkpoint-00000012" / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"m")  # truncated
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="rank"):
        checkpoint.inspect(str(tmp_path / "checkpoint-00000008"))
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="holds 1 bytes, rank 0 wrote 20"):
        checkpoint.inspect(str(tmp_path / "checkpoint-00000012"))
    assert checkpoint.inspect(str(tmp_path / "checkpoint-00000004")).step == 4


def test_checkpoint_names_never_reuse_a_folder():
    taken = {"checkpoint-00000012"}
    assert checkpoint.checkpoint_name(12, taken) == "checkpoint-00000012.1"  # never onto the old one
    assert checkpoint.checkpoint_name(16, taken) == "checkpoint-00000016"
    assert checkpoint.name_key("checkpoint-00000012.1") > checkpoint.name_key("checkpoint-00000012")
    assert checkpoint.name_key("attempts") is None


def test_no_resume_clears_the_previous_run(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 4)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    (run / "metrics").mkdir()
    assert checkpoint.clear_run(str(run)) == 1
    assert list(run.iterdir()) == []
