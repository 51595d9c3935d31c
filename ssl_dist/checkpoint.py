"""Checkpoints: DeepSpeed shards + every rank's stream state + step + RNG + resolved config.

Layout of one checkpoint folder (the merge of every rank's local folder, done by Ray Train
when it persists the checkpoint into `storage_path`):

    deepspeed/            engine.save_checkpoint(..., tag="deepspeed"): model and ZeRO shards
    latest                written by DeepSpeed, names the tag
    stream-rank00000.json one per rank: Loader.state_dict()
    rng-rank00000.pt      one per rank: torch / numpy / python RNG states
    meta.json             rank 0: step, samples seen, world size, resolved config
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

TAG = "deepspeed"
META = "meta.json"


@dataclass
class TrainState:
    """Where the run is: optimizer steps done and samples consumed (global)."""

    step: int = 0
    samples_seen: int = 0


def stream_file(rank: int) -> str:
    return f"stream-rank{rank:05d}.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank:05d}.pt"


def save(directory: str | Path, *, engine, loader, state: TrainState, rank: int, world_size: int,
         config: dict) -> None:
    """Write this rank's part of a checkpoint into the local `directory`. Every rank calls it
    (DeepSpeed's save is collective)."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=TAG)
    (directory / stream_file(rank)).write_text(json.dumps(loader.state_dict()))
    torch.save(rng_state(), directory / rng_file(rank))
    if rank == 0:
        meta = {"step": state.step, "samples_seen": state.samples_seen, "world_size": world_size, "config": config}
        (directory / META).write_text(json.dumps(meta, indent=1))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def restore(directory: str | Path, *, engine, loader, rank: int, world_size: int) -> TrainState:
    """Load a checkpoint folder (every rank's files present) into this rank's engine and
    loader. Every rank calls it."""
    directory = Path(directory)
    meta = json.loads((directory / META).read_text())
    if meta["world_size"] != world_size:
        raise CheckpointError(f"checkpoint written by {meta['world_size']} workers cannot be loaded by "
                              f"{world_size}: resume with run.num_workers={meta['world_size']}")
    load_path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{TAG}")
    states = [json.loads((directory / stream_file(r)).read_text()) for r in range(meta["world_size"])]
    loader.load_state_dict(states)
    rng_path = directory / rng_file(rank)
    if rng_path.exists():
        set_rng_state(torch.load(rng_path, weights_only=True))
    return TrainState(step=meta["step"], samples_seen=meta["samples_seen"])


def rng_state() -> dict:
    """RNG states as tensors and ints only, so that loading needs no unpickling of objects."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss": py_gauss}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))


def save_and_report(metrics: dict, *, engine, loader, state: TrainState, rank: int, world_size: int,
                    config: dict) -> None:
    """Save this rank's part into a temporary folder and hand it to Ray Train, which merges
    every rank's part into `storage_path/<run>/checkpoint-<step>`. Every rank calls it."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="ssl-dist-ckpt-") as tmp:
        save(tmp, engine=engine, loader=loader, state=state, rank=rank, world_size=world_size, config=config)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{state.step:08d}")


def restore_from_ray(checkpoint, *, engine, loader, rank: int, world_size: int) -> TrainState:
    """`restore` from the `ray.train.Checkpoint` Ray Train handed back after a restart."""
    with checkpoint.as_directory() as directory:
        return restore(directory, engine=engine, loader=loader, rank=rank, world_size=world_size)


def is_checkpoint_dir(path: str) -> bool:
    return os.path.basename(path.rstrip("/")).startswith("checkpoint-")
