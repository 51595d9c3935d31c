"""Checkpoint folders for the checkpoint tests: fakes with the real layout (tiny files, no
engine), real ones written by DeepSpeed engines in spawned ranks, and the edits a tamperer
or a bad disk makes to either."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ssl_dist import checkpoint


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fake_checkpoint(root: Path, step: int, world: int = 2, *, suffix: str = "", config: dict | None = None,
                    digests: bool = True) -> str:
    """A checkpoint folder with the real layout (tiny files) as `save` writes it; `digests`:
    False for one written before part lists carried a sha256 of each file."""
    folder = root / (checkpoint.checkpoint_name(step) + suffix)
    for rank in range(world):
        files = {f"deepspeed/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": b"o" * (10 + rank),
                 checkpoint.stream_file(rank): b"{}"}
        if rank == 0:
            meta = {"format": checkpoint.FORMAT, "step": step, "samples_seen": 32 * step, "world_size": world,
                    "global_batch": 32, "target_global_batch": 32, "zero_stage": 1, "config": config or {}}
            files["deepspeed/mp_rank_00_model_states.pt"] = b"m" * 20
            files[checkpoint.META] = json.dumps(meta).encode()
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        part = {"rank": rank, "step": step, "files": {rel: len(data) for rel, data in files.items()}}
        if digests:
            part["sha256"] = {rel: sha256(data) for rel, data in files.items()}
        (folder / checkpoint.part_file(rank)).parent.mkdir(exist_ok=True)
        (folder / checkpoint.part_file(rank)).write_text(json.dumps(part))
    return str(folder)


def rewrite(folder: Path, rel: str, data: bytes) -> None:
    """Write `data` as the file `rel` of a checkpoint folder and its new size and digest into
    every part list that lists it (rank 0's if none does yet): the checkpoint stays complete,
    as a tamperer with write access to the storage would leave it."""
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(data)
    parts = sorted((folder / checkpoint.PARTS).glob("*.json"))
    listing = [p for p in parts if rel in json.loads(p.read_text())["files"]] or parts[:1]
    for part_path in listing:
        part = json.loads(part_path.read_text())
        part["files"][rel] = len(data)
        if "sha256" in part:
            part["sha256"][rel] = sha256(data)
        part_path.write_text(json.dumps(part))


class StreamStub:
    """What `checkpoint.save` and `checkpoint.restore` use of a loader."""

    class layout:
        global_batch = 8

    def state_dict(self):
        return {"epoch": 0}

    def load_state_dict(self, states):
        self.states = states


# The engines the real checkpoints are written by: a tiny SimCLR model (BatchNorm buffers
# included), on 2 ranks, in the ZeRO stages and precisions whose files differ.
REAL = {"zero0": ("train.zero_stage=0",), "zero1": ("train.zero_stage=1",),
        "zero2-bf16": ("train.zero_stage=2", "train.precision=bf16"),
        "zero3-bf16": ("train.zero_stage=3", "train.precision=bf16")}
SMALL = ("model.proj_hidden_dim=32", "model.proj_dim=8", "model.width=8", "data.batch_size=4", "optim.name=adamw")


def real_config(name: str):
    from ssl_dist import config

    return config.load(None, [*SMALL, *REAL[name]])


def real_engine(name: str, world: int):
    """A DeepSpeed engine of REAL[name] on this rank (every rank calls it)."""
    import torch

    from ssl_dist import methods
    from ssl_dist.engine import build_engine

    cfg = real_config(name)
    torch.manual_seed(0)
    return build_engine(methods.resolve(cfg.method.name)(cfg).build_module(), cfg, world, micro_batch=4)


def save_real_checkpoints(rank: int, port: int, root: str, out: dict) -> None:
    """In each of 2 spawned ranks: every engine of REAL takes an optimizer step and saves
    `root/<name>/checkpoint-00000001`, then another step and `checkpoint-00000002`."""
    import torch
    import torch.distributed as dist

    from ranks import join_group, save_checkpoint_as_ray_train

    join_group(rank, port, world=2)
    for name in REAL:
        cfg = real_config(name)
        engine = real_engine(name, 2)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        for step in (1, 2):
            images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(10 * step + rank))
            engine.backward(engine.module.features(images.to(dtype)).float().pow(2).mean())
            engine.step()
            save_checkpoint_as_ray_train(Path(root) / name / checkpoint.checkpoint_name(step), rank=rank, world=2,
                                         scratch=Path(root) / "ranks", engine=engine, loader=StreamStub(),
                                         state=checkpoint.TrainState(step, 8 * step), config=cfg,
                                         batch=checkpoint.BatchPlan(global_batch=8, per_worker=4, note=None))
    if rank == 0:
        shutil.rmtree(Path(root) / "ranks")
    dist.destroy_process_group()
