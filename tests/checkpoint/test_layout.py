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


@pytest.fixture(params=["local", "s3"])
def previous_run(request, tmp_path):
    """A run folder as a previous run left it (a checkpoint, Ray Train's files, metrics, records,
    config.yaml), plus what this project never writes (a user's notes and data) and the live
    driver's lease; local, or the same files in a moto bucket. Returns (run URL, {relative path: bytes})."""
    from ssl_dist import storage

    local = tmp_path / "made" / "run"
    fake_checkpoint(local, 4)
    for rel, data in {"checkpoint_manager_snapshot.json": b"{}", ".validate_storage_marker": b"",
                      "metrics/attempt-00000000-1.csv": b"step\n", "tensorboard/attempt-1/events": b"tb",
                      "attempts/attempt-00000000-1.json": b"{}", "config.yaml": b"run: {}\n",
                      "notes.txt": b"mine", "data/train.tar": b"tar", "lease.json": b"{}"}.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    if request.param == "local":
        return str(local), files
    url = f"s3://{request.getfixturevalue('bucket')}/runs/run"
    fs, path = storage.filesystem(url)
    for rel, data in files.items():
        fs.pipe_file(f"{path}/{rel}", data)
    return url, files


def tree(url: str) -> dict:
    """{relative path: bytes} of every file under `url` (local or S3)."""
    from ssl_dist import storage

    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    return {p[len(path) + 1:]: fs.cat_file(p) for p, info in fs.find(path, detail=True).items()
            if info["type"] != "directory"}


FOREIGN = {"notes.txt", "data/train.tar", "lease.json"}


def test_no_resume_moves_the_previous_run_aside_and_leaves_what_it_did_not_write(previous_run):
    # On the code before, --no-resume deleted every entry of the run folder (the user's notes
    # and data, the live driver's lease too) and there was no moving aside.
    run, files = previous_run
    cleared = checkpoint.move_run_aside(run, now=1764633600.0)  # 2025-12-02 00:00:00 UTC
    assert cleared.moved_to == f"{run}.previous-20251202T000000Z" and cleared.checkpoints == 1
    assert cleared.left == ["data", "notes.txt"]
    assert tree(run) == {rel: data for rel, data in files.items() if rel in FOREIGN}
    assert tree(cleared.moved_to) == {rel: data for rel, data in files.items() if rel not in FOREIGN}
    assert checkpoint.inspect(f"{cleared.moved_to}/checkpoint-00000004").step == 4  # usable where it went
    again = checkpoint.move_run_aside(run, now=1764633600.0)  # nothing of ours left: nothing moves
    assert again.moved_to is None and again.entries == []


def test_delete_previous_deletes_only_what_this_project_wrote(previous_run):
    run, files = previous_run
    cleared = checkpoint.clear_run(run)
    assert cleared.checkpoints == 1 and cleared.left == ["data", "notes.txt"] and cleared.moved_to is None
    assert set(cleared.entries) == {"checkpoint-00000004", "checkpoint_manager_snapshot.json",
                                    ".validate_storage_marker", "metrics", "tensorboard", "attempts", "config.yaml"}
    assert tree(run) == {rel: data for rel, data in files.items() if rel in FOREIGN}
