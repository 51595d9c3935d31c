"""Decisions that every rank must take alike: rank 0 decides (or every rank reports), all follow.

A rank that decides alone (its own clock, its own failure) and acts on it leaves the others
waiting in the next collective forever; these helpers carry the decision to every rank.
Every rank of `group` calls each of them at the same point. `group` is a gloo group
(`dist.new_group(backend="gloo")`) so that CPU objects travel whatever the training backend;
None is the default group. torch.distributed only: no Ray.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank0_says(flag: bool, group=None) -> bool:
    """Rank 0's `flag` on every rank (for decisions taken by one clock, e.g. timed checkpoints)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.broadcast(value, src=0, group=group)
    return bool(value.item())


def broadcast(value, group=None):
    """Rank 0's `value` (any picklable object, an exception included) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def all_ok(ok: bool, group=None) -> bool:
    """True on every rank when `ok` is true on every rank (a barrier that carries failure)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
