"""Decisions shared by ranks, on a gloo group of one process (no Ray)."""

from __future__ import annotations


from ssl_dist import collective


def test_rank0_decides_and_failure_travels(group_of_one):
    assert collective.rank0_says(True, group_of_one) is True and collective.rank0_says(False, group_of_one) is False
    error = ValueError("checkpoint of another model")
    assert str(collective.broadcast(error, group_of_one)) == str(error)
    assert collective.broadcast({"step": 4}) == {"step": 4}  # the default group
    assert collective.all_ok(True, group_of_one) and not collective.all_ok(False, group_of_one)


# ---- two real gloo ranks in processes: a failure on one rank ends both, a lost rank times out


def fail_on_one_rank(rank: int, port: int, out: dict) -> None:
    """Rank 1 hits a deterministic error at a decision point (its loader past the skip limit
    at its 3rd batch; a config check); rank 0 has nothing wrong. Both must raise rank 1's error."""
    import time

    import torch.distributed as dist
    from ranks import join_group

    from ssl_dist import collective, config, failures

    join_group(rank, port)
    control = collective.control_group(30)

    def batches():
        for i in range(5):
            if rank == 1 and i == 2:
                raise failures.TooMuchBadData(f"too much bad data: rank {rank} skipped 16 samples")
            yield i

    seen, started = [], time.monotonic()
    try:
        for i in collective.iterate_together(batches(), control):
            seen.append(i)
    except failures.TooMuchBadData as err:
        out[f"loop{rank}"] = (str(err), seen, time.monotonic() - started)

    def check():  # a check of the config on the workers, e.g. the batch against this many workers
        if rank == 1:
            raise config.ConfigError("train.indivisible_batch=error: 32 does not divide among 3 workers")
        return "checked"

    try:
        collective.together(check, control)
    except Exception as err:  # noqa: BLE001
        out[f"restore{rank}"] = (type(err).__name__, str(err))
    def collateral():  # rank 0 gave up waiting for rank 1 (a timeout), whose data is the cause
        if rank == 0:
            raise RuntimeError("[gloo] Timed out waiting 3000ms for recv operation to complete")
        raise failures.TooMuchBadData("too much bad data in s3://bucket/shards")

    try:
        collective.together(collateral, control)
    except Exception as err:  # noqa: BLE001
        out[f"cause{rank}"] = (type(err).__name__, str(err))
    # no rank is out of step after a failure: the next decision still lines up
    out[f"after{rank}"] = collective.all_ok(True, control)
    out[f"ended{rank}"] = list(collective.iterate_together(range(3), control))
    dist.barrier()
    dist.destroy_process_group()


def test_a_rank_that_fails_at_a_decision_point_makes_every_rank_raise_its_error():
    from ranks import spawn_ranks

    out = spawn_ranks(fail_on_one_rank)
    message = "too much bad data: rank 1 skipped 16 samples"
    for rank in (0, 1):
        text, seen, waited = out[f"loop{rank}"]
        assert text == message and seen == [0, 1] and waited < 10  # not the group's 30 s timeout
        assert out[f"restore{rank}"] == ("ConfigError", "train.indivisible_batch=error: 32 does not divide "
                                                        "among 3 workers")
        assert out[f"cause{rank}"] == ("TooMuchBadData", "too much bad data in s3://bucket/shards")
        assert out[f"after{rank}"] is True and out[f"ended{rank}"] == [0, 1, 2]


def never_arrives(rank: int, port: int, out: dict) -> None:
    """Rank 1 builds the engine and then hangs (never reaches the next collective); rank 0's
    collectives on the control group and on DeepSpeed's own group must give up after the
    configured 3 s, not torch's 30 minutes."""
    import time

    import torch
    import torch.distributed as dist
    from ranks import join_group

    from ssl_dist import collective, config
    from ssl_dist.engine import build_engine

    join_group(rank, port)
    cfg = config.load(None, ["run.collective_timeout_s=3", "data.batch_size=2", "train.zero_stage=2"])
    control = collective.control_group(cfg.run.collective_timeout_s)
    engine = build_engine(torch.nn.Linear(4, 2), cfg, 2)
    if rank == 1:
        time.sleep(12)  # hung; then it leaves (its closed sockets would end rank 0's wait too)
        return
    from deepspeed.utils import groups

    assert engine.zero_optimization_stage() == 2
    # the control group, then the group DeepSpeed reduces gradients on (its copy of the world)
    for name, call in (("control", lambda: collective.all_ok(True, control)),
                       ("deepspeed", lambda: dist.all_reduce(torch.ones(1), group=groups._get_data_parallel_group()))):
        started = time.monotonic()
        try:
            call()
            out[name] = ("returned", time.monotonic() - started)
        except RuntimeError as err:
            out[name] = (str(err)[:200], time.monotonic() - started)


def test_the_collective_timeout_bounds_a_rank_that_never_arrives():
    from ranks import spawn_ranks

    out = spawn_ranks(never_arrives)
    for name in ("control", "deepspeed"):
        message, waited = out[name]
        assert "timed out" in message.lower() or "timeout" in message.lower(), (name, message)
        assert 2.5 < waited < 8, (name, waited)
