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
