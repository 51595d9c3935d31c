"""A checkpoint counts only when every file its parts list matches its sha256, and every name
stays inside its folder (`checkpoint.inspect`); resume then falls back to an earlier one."""

from __future__ import annotations

import hashlib
import json

import pytest
from checkpoint_fakes import fake_checkpoint

from ssl_dist import checkpoint


def flip_a_byte(path) -> None:
    """A same-size bit flip in the middle of a file (what a bad disk or a partial overwrite leaves)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ---- digests --------------------------------------------------------------------------------


def test_a_same_size_bit_flip_makes_a_real_checkpoint_incomplete_and_resume_takes_the_previous_one(copy_run):
    run = copy_run("zero1")
    model = run / "checkpoint-00000002" / checkpoint.TAG / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    flip_a_byte(model)
    assert model.stat().st_size == size
    with pytest.raises(checkpoint.IncompleteCheckpoint, match="does not match the sha256 rank 0 wrote"):
        checkpoint.inspect(str(run / "checkpoint-00000002"))
    resume = checkpoint.find_resume(str(run), handed="checkpoint-00000002")
    assert resume.info.step == 1
    assert any("checkpoint checkpoint-00000002 is incomplete" in n and "sha256" in n and "falling back" in n
               for n in resume.notes), resume.notes
    assert checkpoint.newest_complete(str(run)).step == 1


def test_every_part_lists_the_sha256_of_each_file_it_lists(real_checkpoints):
    folder = real_checkpoints / "zero3-bf16" / "checkpoint-00000001"
    for rank in (0, 1):
        part = json.loads((folder / checkpoint.part_file(rank)).read_text())
        assert part["sha256"].keys() == part["files"].keys() and part["files"]
        for rel, digest in part["sha256"].items():
            assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest
    assert checkpoint.inspect(str(folder)).notes == []


def test_a_checkpoint_written_before_digests_stays_loadable_by_size_and_says_so(tmp_path):
    old = checkpoint.inspect(fake_checkpoint(tmp_path, 4, digests=False))
    assert old.step == 4
    assert old.notes == [f"{old.url} was written before checkpoints carried digests: its files are checked by "
                         f"size only"]
    assert checkpoint.find_resume(str(tmp_path)).notes == old.notes  # what resume prints
    folder = tmp_path / "checkpoint-00000004"
    flip_a_byte(folder / checkpoint.TAG / "mp_rank_00_model_states.pt")
    assert checkpoint.inspect(str(folder)).step == 4  # (nothing to compare a same-size change with)


# ---- containment ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.pt", "deepspeed/../../outside.pt", "/tmp/outside.pt",
                                  "deepspeed\\..\\..\\outside.pt", "deepspeed//x.pt", "./meta.json", ""])
def test_a_part_naming_a_file_outside_its_checkpoint_is_refused(tmp_path, name):
    folder = tmp_path / "checkpoint-00000004"
    fake_checkpoint(tmp_path, 4, world=1)
    part_path = folder / checkpoint.part_file(0)
    part = json.loads(part_path.read_text())
    part["files"][name] = 1
    part["sha256"][name] = "0" * 64
    part_path.write_text(json.dumps(part))
    with pytest.raises(checkpoint.CheckpointError, match="names a file outside its checkpoint folder"):
        checkpoint.inspect(str(folder))


def test_s3_keys_with_dot_dot_in_a_checkpoint_are_refused(bucket, tmp_path):
    """The reproduction: a key of the checkpoint folder that goes up out of it, in the listing
    and in the part list, as someone with write access to the bucket can make it (on the code
    before, inspect accepted the checkpoint and restore wrote the file outside its folder)."""
    import boto3

    local = tmp_path / "local"
    fake_checkpoint(local, 4, world=1)
    folder = local / "checkpoint-00000004"
    evil = "deepspeed/../../../escaped.txt"
    part = json.loads((folder / checkpoint.part_file(0)).read_text())
    part["files"][evil] = 5
    part["sha256"][evil] = hashlib.sha256(b"pwned").hexdigest()
    (folder / checkpoint.part_file(0)).write_text(json.dumps(part))
    s3 = boto3.client("s3")
    for path in folder.rglob("*"):
        if path.is_file():
            s3.put_object(Bucket=bucket, Key=f"run/checkpoint-00000004/{path.relative_to(folder).as_posix()}",
                          Body=path.read_bytes())
    s3.put_object(Bucket=bucket, Key=f"run/checkpoint-00000004/{evil}", Body=b"pwned")
    with pytest.raises(checkpoint.CheckpointError, match="names a file outside its checkpoint folder"):
        checkpoint.inspect(f"s3://{bucket}/run/checkpoint-00000004")
    resume = checkpoint.find_resume(f"s3://{bucket}/run")
    assert resume.info is None and "names a file outside its checkpoint folder" in resume.notes[0]
