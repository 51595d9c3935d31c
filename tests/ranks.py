"""Ranks of a real gloo process group in spawned processes, for tests of collective code
(the DeepSpeed engine, the losses) without Ray: `spawn_ranks(fn, ...)` runs
fn(rank, port, *args, out) in each process, and fn calls `join_group(rank, port)` first.
"""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp
from services import free_port


def join_group(rank: int, port: int, world: int = 2) -> None:
    """This spawned process as rank `rank` of a gloo group of `world` (DeepSpeed reads the env)."""
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def spawn_ranks(fn, *args, world: int = 2) -> dict:
    """Run fn(rank, port, *args, out) in `world` spawned processes; returns what they put in out."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_run_then_leave, args=(fn, free_port(), *args, out), nprocs=world, join=True)
        return dict(out)


def _run_then_leave(rank: int, fn, *args) -> None:
    """fn(rank, *args), then the process ends at once with status 0 (fn raised: the error goes to
    mp.spawn as usual). Left to the interpreter's teardown, a C++ thread of torch was at times
    destroyed while joinable ("terminate called without an active exception", SIGABRT), failing
    a test whose ranks had all finished (2 CI runs in ~20; not reproduced locally)."""
    import sys

    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def save_checkpoint_as_ray_train(folder, *, rank: int, world: int, scratch, **save_args) -> None:
    """Every rank of the group: `checkpoint.save` into a folder of its own under `scratch`,
    then rank 0 merges them into `folder`, as Ray Train's upload does. A rank's part list is
    every file in its folder: in one folder shared by the ranks, rank 0 listed rank 1's RNG
    file while it was still being written (0 bytes; CI failed on it)."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist

    from ssl_dist import checkpoint

    def own(r: int) -> Path:  # e.g. scratch/zero2-checkpoint-00000002-rank1
        return Path(scratch) / f"{Path(folder).parent.name}-{Path(folder).name}-rank{r}"

    own(rank).mkdir(parents=True)
    checkpoint.save(own(rank), rank=rank, world_size=world, **save_args)
    dist.barrier()
    if rank == 0:
        for r in range(world):
            shutil.copytree(own(r), folder, dirs_exist_ok=True)
    dist.barrier()
