"""When a run checkpoints (the Checkpointer's schedule) and what each rank's part holds.

The schedule is tested without Ray: the pure decision, a fake clock, the collective on a
gloo group of one. What a part holds is written by a real DeepSpeed engine in a spawned
rank. Saving through Ray Train is covered end to end in the fault-tolerance tests.
"""

from __future__ import annotations

import json

import torch.distributed as dist

from ssl_dist import checkpoint, config


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def checkpointer(*overrides, clock=None, rank=0):
    cfg = config.load(None, ["train.max_steps=100", *overrides])
    return checkpoint.Checkpointer(cfg, rank=rank, world_size=1, group=None, taken=set(),
                                   batch=checkpoint.decide_batch(cfg, 1, None), clock=clock or FakeClock())


def test_due_every_k_steps_at_the_end_and_when_forced_or_late():
    every = checkpointer("train.checkpoint_every=25")
    assert [s for s in range(1, 101) if every.due(s)] == [25, 50, 75, 100]
    assert every.due(7, force=True) and every.due(7, late=True) and not every.due(7)
    never = checkpointer("train.checkpoint_every=0")
    assert [s for s in range(1, 101) if never.due(s)] == [100]  # the last step always


def test_late_by_the_clock_since_the_last_save():
    clock = FakeClock()
    timed = checkpointer("train.checkpoint_minutes=2", clock=clock)
    clock.now += 119
    assert not timed.late()
    clock.now += 1
    assert timed.late()
    untimed = checkpointer(clock=clock)  # train.checkpoint_minutes=0: never late
    clock.now += 10_000
    assert not untimed.late()


def test_decide_needs_no_collective_unless_the_timed_schedule_must_ask_rank0():
    # No process group here: a collective would raise.
    assert not dist.is_initialized()
    clock = FakeClock()
    untimed = checkpointer("train.checkpoint_every=10", clock=clock)
    clock.now += 10_000
    assert not untimed.decide(3) and untimed.decide(10) and untimed.decide(3, force=True)
    timed = checkpointer("train.checkpoint_every=10", "train.checkpoint_minutes=1", clock=clock)
    assert timed.decide(20) and timed.decide(100)  # due by the step count: rank 0 is not asked


def test_decide_by_rank0s_clock_through_the_group(group_of_one):
    clock = FakeClock()
    cfg = config.load(None, ["train.max_steps=100", "train.checkpoint_every=0", "train.checkpoint_minutes=1"])
    timed = checkpoint.Checkpointer(cfg, rank=0, world_size=1, group=group_of_one, taken=set(),
                                    batch=checkpoint.decide_batch(cfg, 1, None), clock=clock)
    assert not timed.decide(3)
    clock.now += 60
    assert timed.decide(4)


class FakeLoader:
    class layout:
        global_batch = 30

    def state_dict(self):
        return {"epoch": 1}


def save_with_a_real_engine(rank: int, port: int, folder: str, out: dict) -> None:
    """In a spawned rank of a gloo group of one: a real DeepSpeed ZeRO-2 engine saves its part."""
    import torch

    from ranks import join_group
    from ssl_dist.engine import build_engine

    join_group(rank, port, world=1)
    cfg = config.load(None, ["data.batch_size=16", "run.num_workers=2", "train.zero_stage=2", "optim.name=sgd"])
    engine = build_engine(torch.nn.Linear(4, 2), cfg, 1, micro_batch=10)
    plan = checkpoint.BatchPlan(global_batch=32, per_worker=10, note="rounded down")
    checkpoint.save(folder, engine=engine, loader=FakeLoader(), state=checkpoint.TrainState(8, 256), rank=0,
                    world_size=3, config=cfg, batch=plan, attempt="5f2c9e0d41a7b3c8")
    out["config"] = config.to_dict(cfg)
    dist.barrier()
    dist.destroy_process_group()


def test_save_records_the_plans_target_and_the_typed_config(tmp_path):
    from ranks import spawn_ranks

    folder = tmp_path / checkpoint.checkpoint_name(8)
    folder.mkdir()
    cfg = config.from_dict(spawn_ranks(save_with_a_real_engine, str(folder), world=1)["config"])
    meta = json.loads((folder / checkpoint.META).read_text())
    assert list(meta) == ["format", "step", "samples_seen", "world_size", "global_batch", "target_global_batch",
                          "zero_stage", "time", "attempt", "config"]
    assert meta["attempt"] == "5f2c9e0d41a7b3c8"  # the driver's attempt id (its lease of the run folder)
    assert (meta["step"], meta["samples_seen"], meta["world_size"]) == (8, 256, 3)
    assert (meta["global_batch"], meta["target_global_batch"], meta["zero_stage"]) == (30, 32, 2)
    assert config.from_dict(meta["config"]) == cfg and cfg.data.batch_size == 16  # as given, not the per-worker 10
    part = json.loads((folder / checkpoint.part_file(0)).read_text())
    written = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    assert {checkpoint.META, checkpoint.stream_file(0), checkpoint.rng_file(0), "latest"} <= set(part["files"])
    assert any(name.startswith(f"{checkpoint.TAG}/") and name.endswith("model_states.pt") for name in part["files"])
    assert {k: v for k, v in written.items() if k != checkpoint.part_file(0)} == part["files"]  # every file, its size
