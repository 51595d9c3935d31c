"""Where a (re)started run resumes, and with which batch (no Ray, no engine)."""

from __future__ import annotations

import json

import pytest
from checkpoint_fakes import fake_checkpoint, rewrite

from ssl_dist import checkpoint


def test_incomplete_checkpoints_are_skipped(tmp_path):
    for step in (4, 8, 12, 16):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-00000008" / "parts" / "rank00001.json").unlink()        # a rank never uploaded
    (tmp_path / "checkpoint-00000012" / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"m")  # truncated
    (tmp_path / "checkpoint-00000016" / checkpoint.META).unlink()                     # rank 0 never uploaded

    # Ray Train hands back step 12 (registered, then corrupted): fall back to 4, say so; 16 never
    # counted (newer than anything registered) and goes; 8 and 12 may be registered and stay.
    resume = checkpoint.find_resume(str(tmp_path), handed="checkpoint-00000012")
    assert resume.info.step == 4
    assert any("checkpoint-00000012 is incomplete" in n and "falling back" in n for n in resume.notes)
    assert resume.stale == ["checkpoint-00000016"]
    assert checkpoint.checkpoint_name(12, resume.taken) == "checkpoint-00000012.1"  # never onto the old one
    assert checkpoint.checkpoint_name(16, resume.taken) == "checkpoint-00000016"

    # No Ray Train snapshot (a run folder from elsewhere): the newest complete one, anything newer goes.
    resume = checkpoint.find_resume(str(tmp_path))
    assert resume.info.step == 4 and resume.stale == ["checkpoint-00000008", "checkpoint-00000012",
                                                       "checkpoint-00000016"]
    assert checkpoint.newest_complete(str(tmp_path)).step == 4


def test_global_batch_on_other_worker_counts():
    assert checkpoint.worker_batch(32, 1, 16, "round_down") == (32, None)
    assert checkpoint.worker_batch(32, 4, 16, "error") == (8, None)
    batch, note = checkpoint.worker_batch(32, 3, 16, "round_down")
    assert batch == 10 and "a global batch of 30" in note
    batch, note = checkpoint.worker_batch(32, 3, 16, "keep_per_worker")
    assert batch == 16 and "a global batch of 48" in note
    with pytest.raises(checkpoint.CheckpointError, match="does not divide among 3 workers"):
        checkpoint.worker_batch(32, 3, 16, "error")


def test_a_checkpoint_of_another_model_or_an_unsplittable_batch_is_refused_before_any_worker_starts(tmp_path):
    from ssl_dist import config, launch

    base = ["run.storage_path=" + str(tmp_path), "run.name=run", "train.zero_stage=1"]
    saved = config.load(None, [*base, "model.arch=resnet34"])
    fake_checkpoint(tmp_path / "run", 4, config=config.to_dict(saved))
    said = []
    with pytest.raises(checkpoint.CheckpointError, match="model.arch: 'resnet34' there, 'resnet18' here"):
        launch.prepare_resume(config.load(None, base), None, {}, say=said.append)
    with pytest.raises(checkpoint.CheckpointError, match="does not divide among 3 workers"):
        launch.prepare_resume(config.load(None, [*base, "model.arch=resnet34", "run.num_workers=3",
                                                 "train.indivisible_batch=error"]), True, {}, say=said.append)
    launch.prepare_resume(config.load(None, [*base, "model.arch=resnet34"]), True, {}, say=said.append)
    assert said == [f"{tmp_path}/run holds checkpoints up to step 4: the run resumes from its newest complete one "
                    f"(--no-resume starts it over)"]


def test_batch_plan_keeps_the_runs_global_batch_on_any_worker_count(tmp_path):
    from ssl_dist import config

    cfg = config.load(None, ["data.batch_size=16", "run.num_workers=2"])
    assert checkpoint.decide_batch(cfg, 2, None) == checkpoint.BatchPlan(global_batch=32, per_worker=16, note=None)
    assert checkpoint.decide_batch(cfg, 4, None) == checkpoint.BatchPlan(32, 8, None)  # an elastic start on 4

    # A checkpoint's target wins over this config's batch_size x num_workers.
    info = checkpoint.inspect(fake_checkpoint(tmp_path, 4))  # target_global_batch 32
    bigger = config.load(None, ["data.batch_size=64", "run.num_workers=1"])
    assert checkpoint.decide_batch(bigger, 1, info) == checkpoint.BatchPlan(32, 32, None)
    plan = checkpoint.decide_batch(bigger, 3, info)  # round_down, the default
    assert (plan.global_batch, plan.per_worker) == (32, 10) and "a global batch of 30" in plan.note
    keep = config.load(None, ["data.batch_size=16", "train.indivisible_batch=keep_per_worker"])
    plan = checkpoint.decide_batch(keep, 3, info)
    assert (plan.global_batch, plan.per_worker) == (32, 16) and "a global batch of 48" in plan.note
    strict = config.load(None, ["data.batch_size=16", "train.indivisible_batch=error"])
    with pytest.raises(checkpoint.CheckpointError, match="global batch of 32 does not divide among 3 workers"):
        checkpoint.decide_batch(strict, 3, info)


def test_batch_plan_of_a_checkpoint_older_than_its_target_record(tmp_path):
    from ssl_dist import config

    saved = config.to_dict(config.load(None, ["data.batch_size=8", "run.num_workers=3"]))
    folder = fake_checkpoint(tmp_path, 4, config=saved)
    meta = json.loads((tmp_path / "checkpoint-00000004" / checkpoint.META).read_text())
    del meta["target_global_batch"]
    rewrite(tmp_path / "checkpoint-00000004", checkpoint.META, json.dumps(meta).encode())  # its size and digest too
    plan = checkpoint.decide_batch(config.load(None, []), 2, checkpoint.inspect(folder))
    assert plan == checkpoint.BatchPlan(global_batch=24, per_worker=12, note=None)  # 8 x 3, as it ran


def test_resume_moves_aside_what_it_does_not_use_and_deletes_no_checkpoint(tmp_path, group_of_one):
    # On the code before, both folders below were deleted: checkpoint-8, complete but newer than
    # Ray Train's registered checkpoint-4, and (second run folder) every folder when Ray's
    # snapshot was gone and none was complete.
    import ray.train

    from ssl_dist import config

    cfg = config.load(None, ["train.zero_stage=1"])
    run = tmp_path / "run"
    for step in (4, 8, 12):
        fake_checkpoint(run, step, config=config.to_dict(cfg))
    (run / "checkpoint-00000012" / checkpoint.META).unlink()  # rank 0 never uploaded
    handed = ray.train.Checkpoint(path=str(run / "checkpoint-00000004"))
    resume = checkpoint.agree_on_resume(str(run), {}, handed, cfg, rank=0, local_rank=0, group=group_of_one)
    assert resume.info.step == 4 and checkpoint.list_checkpoints(str(run)) == ["checkpoint-00000004"]
    aside = sorted(p.name for p in (run / checkpoint.SET_ASIDE).iterdir())
    assert [name.rsplit("-", 1)[0] for name in aside] == ["checkpoint-00000008", "checkpoint-00000012"]
    assert checkpoint.inspect(str(run / checkpoint.SET_ASIDE / aside[0])).step == 8  # complete, usable by hand
    note = [n for n in resume.notes if "aside" in n]
    assert len(note) == 1 and "nothing deleted" in note[0] and f"checkpoint-00000008 -> {run}/set-aside/" in note[0]

    lost = tmp_path / "lost-snapshot"
    for step in (4, 8):
        fake_checkpoint(lost, step, config=config.to_dict(cfg))
        (lost / checkpoint.checkpoint_name(step) / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"m")
    resume = checkpoint.agree_on_resume(str(lost), {}, None, cfg, rank=0, local_rank=0, group=group_of_one)
    assert resume.info is None and checkpoint.list_checkpoints(str(lost)) == []
    assert len(list((lost / checkpoint.SET_ASIDE).iterdir())) == 2
