"""No checkpoint load unpickles objects: DeepSpeed's real files load with weights only and
the allow-list; a file that carries code is refused, with one message, on resume (the same
number of workers), resharding (another number), evaluation and export, whatever meta.json
claims, and the code never runs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from checkpoint_fakes import REAL, StreamStub, real_engine, rewrite

from ssl_dist import checkpoint

REFUSED = "holds objects that loading would have to unpickle"
MODEL = f"{checkpoint.TAG}/mp_rank_00_model_states.pt"


class Exploit:
    """Unpickling this runs code: it writes the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def tamper(folder: Path, rel: str, marker: Path) -> None:
    """Put an Exploit into the torch file `rel` of a checkpoint, beside what it held; the
    part lists are rewritten to match (a complete checkpoint, as a tamperer leaves it)."""
    assert pickle.dumps(Exploit(marker))  # a real exploit: plain pickle would run it
    state = torch.load(folder / rel, weights_only=False)
    state["payload"] = Exploit(marker)
    torch.save(state, folder / rel)
    rewrite(folder, rel, (folder / rel).read_bytes())


def test_deepspeed_files_hold_only_tensors_and_the_allow_listed_types(real_checkpoints):
    from ssl_dist.checkpoint import safe_load

    allowed = {f"{t.__module__}.{t.__qualname__}" for t in safe_load.deepspeed_types()}
    found = set()
    for path in sorted(real_checkpoints.glob(f"*/*/{checkpoint.TAG}/*.pt")):
        found |= set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert found == allowed  # each type of the list is needed, and nothing else is


def restore_same_world(rank: int, port: int, run: str, out: dict) -> None:
    """2 ranks: restore the clean zero1 checkpoint, then the tampered one."""
    import torch.distributed as dist

    from ranks import join_group

    join_group(rank, port, world=2)
    for name in ("checkpoint-00000001", "checkpoint-00000002"):
        info = checkpoint.inspect(f"{run}/{name}")
        engine = real_engine("zero1", 2)
        try:
            state, _ = checkpoint.restore(info, engine=engine, loader=StreamStub(), rank=rank, world_size=2)
            out[name, rank] = state.step
        except checkpoint.CheckpointError as err:
            out[name, rank] = str(err)
    dist.barrier()
    dist.destroy_process_group()


def test_resume_refuses_a_pickle_with_code(copy_run, tmp_path):
    from ranks import spawn_ranks

    run = copy_run("zero1")
    marker = tmp_path / "resume-pwned.txt"
    tamper(run / "checkpoint-00000002", MODEL, marker)
    out = spawn_ranks(restore_same_world, str(run), world=2)
    assert not marker.exists(), out
    assert out["checkpoint-00000001", 0] == out["checkpoint-00000001", 1] == 1  # a real one restores
    for rank in (0, 1):
        assert REFUSED in str(out["checkpoint-00000002", rank]), out
        assert str(run / "checkpoint-00000002") in out["checkpoint-00000002", rank]


def restore_on_one_worker(rank: int, port: int, run: str, universal: str, out: dict) -> None:
    """1 rank: reshard the clean zero1 checkpoint of 2 ranks, then the tampered one; then
    `load_universal` of a converted folder whose model file was tampered afterwards."""
    import torch.distributed as dist

    from ranks import join_group
    from ssl_dist.checkpoint.restore import load_universal

    join_group(rank, port, world=1)
    for name in ("checkpoint-00000001", "checkpoint-00000002"):
        try:
            state, timings = checkpoint.restore(checkpoint.inspect(f"{run}/{name}"), engine=real_engine("zero1", 1),
                                                loader=StreamStub(), rank=0, world_size=1)
            out[name] = (state.step, timings["convert_s"] > 0)
        except checkpoint.CheckpointError as err:
            out[name] = str(err)
    try:
        load_universal(real_engine("zero1", 1), universal)
        out["universal"] = "loaded"
    except checkpoint.CheckpointError as err:
        out["universal"] = str(err)
    dist.destroy_process_group()


def test_resharding_refuses_a_pickle_with_code(copy_run, tmp_path):
    from ranks import spawn_ranks
    from ssl_dist.checkpoint.restore import to_universal

    run = copy_run("zero1")
    convert_marker, load_marker = tmp_path / "convert-pwned.txt", tmp_path / "load-universal-pwned.txt"
    universal = tmp_path / "universal"
    to_universal(run / "checkpoint-00000001" / checkpoint.TAG, universal / checkpoint.TAG)
    tamper(run / "checkpoint-00000002", MODEL, convert_marker)
    state = torch.load(universal / MODEL, weights_only=True)
    torch.save({**state, "payload": Exploit(load_marker)}, universal / MODEL)
    out = spawn_ranks(restore_on_one_worker, str(run), str(universal), world=1)
    assert not convert_marker.exists() and not load_marker.exists(), out
    assert out["checkpoint-00000001"] == (1, True)  # resharded through the universal checkpoint
    assert REFUSED in str(out["checkpoint-00000002"]), out
    assert REFUSED in str(out["universal"]), out


@pytest.mark.parametrize("claim", [{}, {"precision": "bf16"}, {"zero_stage": 3},
                                   {"zero_stage": 3, "precision": "bf16"}])
def test_evaluate_and_export_refuse_a_pickle_with_code_whatever_meta_claims(copy_run, tmp_path, claim):
    from ssl_dist import evaluate, export

    folder = copy_run("zero1") / "checkpoint-00000002"
    meta = json.loads((folder / checkpoint.META).read_text())
    meta["config"]["train"].update(claim)
    meta["zero_stage"] = meta["config"]["train"]["zero_stage"]
    rewrite(folder, checkpoint.META, json.dumps(meta).encode())
    marker = tmp_path / "pwned.txt"
    tamper(folder, MODEL, marker)
    for shard in folder.glob(f"{checkpoint.TAG}/*optim_states.pt"):
        tamper(folder, shard.relative_to(folder).as_posix(), marker)
    for call in (lambda: evaluate.load_checkpoint_model(str(folder)),
                 lambda: export.export_encoder(str(folder), str(tmp_path / "out"))):
        try:
            call()
        except (evaluate.EvaluationError, export.ExportError) as err:
            assert REFUSED in str(err) and str(folder) in str(err)
        else:
            raise AssertionError("loaded")
        finally:
            assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(REAL))
def test_evaluate_reads_the_fp32_weights_of_every_kind_of_real_checkpoint(real_checkpoints, name):
    from ssl_dist import evaluate

    model, cfg = evaluate.load_checkpoint_model(str(real_checkpoints / name / "checkpoint-00000002"))
    assert cfg.train.zero_stage == int(REAL[name][0][-1])
    assert all(v.dtype in (torch.float32, torch.int64) for v in model.state_dict().values())
