"""Decisions that every rank must take alike: rank 0 decides (or every rank reports), all follow.

A rank that decides alone (its own clock, its own failure) and acts on it leaves the others
waiting in the next collective forever; these helpers carry the decision to every rank.
Every rank of `group` calls each of them at the same point. `group` is a gloo group
(`control_group`) so that CPU objects travel whatever the training backend; None is the
default group. torch.distributed only: no Ray.

A rank that fails (a deterministic error: `failures`) must not simply raise either: the others
would wait for it in their next collective until its timeout. `together` and
`iterate_together` carry the failing rank's error to every rank, which all raise it. What
bounds a rank that never arrives at all (hung, or gone without closing its sockets) is the
groups' timeout: `control_group` and `bound_every_group` set it (run.collective_timeout_s).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from ssl_dist import failures


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


# ---- timeouts -----------------------------------------------------------------------------


def control_group(timeout_s: float):
    """A gloo group of every rank for the decisions of this module, whose collectives fail after
    `timeout_s` (run.collective_timeout_s) instead of torch's 30 minutes. Every rank calls it once."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def bound_every_group(timeout_s: float) -> None:
    """Every process group this process belongs to fails a collective after `timeout_s`: also the
    groups a library made with torch's defaults (DeepSpeed's copy of the world group, which
    carries every gradient reduce: 30 minutes under gloo, 10 under NCCL). Every rank calls it
    after the library's set-up (`engine.build_engine`); it is local (no collective)."""
    timeout = timedelta(seconds=timeout_s)
    # torch's own `dist.breakpoint` walks the same registry to lengthen every group's timeout.
    for group in list(dist.distributed_c10d._pg_map):
        if dist.get_rank(group) >= 0:  # -1: a group of other ranks
            dist.set_timeout(timeout, group)


# ---- failures that end every rank together -------------------------------------------------

_END = object()


def together(step: Callable[[], object], group=None):
    """`step()` on every rank: its value when it returned on every rank; else the error of the
    lowest rank where it raised (a fatal error first: `_agree`), raised on every rank (that
    rank's own error there, a copy elsewhere). `step` must hold no collective that a failing rank would skip. One small
    all-reduce (and, after a failure, one broadcast)."""
    try:
        value, error = step(), None
    except Exception as err:  # noqa: BLE001 (raised on every rank below)
        value, error = None, err
    first, _, _ = _agree(error, False, group)
    if first is not None:
        _raise_on_every_rank(error, first, group)
    return value


def iterate_together(items: Iterable, group=None) -> Iterator:
    """This rank's `items` (e.g. its batches), one agreement per item: an error raised while any
    rank takes its next item is raised on every rank (as in `together`), and the iteration ends
    on every rank at once. Every rank's `items` must have as many items (the stream's contract);
    one that ends early is an error on every rank, not a wait. One small all-reduce per item."""
    iterator = iter(items)
    while True:
        try:
            item, error = next(iterator, _END), None
        except Exception as err:  # noqa: BLE001 (raised on every rank below)
            item, error = None, err
        first, any_ended, all_ended = _agree(error, item is _END, group)
        if first is not None:
            _raise_on_every_rank(error, first, group)
        if all_ended:
            return
        if any_ended:
            raise RuntimeError("the ranks' iterations ended at different items (one rank ran out of batches "
                               "before the others): every rank stops")
        yield item


def _agree(error: BaseException | None, ended: bool, group) -> tuple[int | None, bool, bool]:
    """(the rank whose error every rank raises, or None; some rank ended; every rank ended), on
    every rank. The error is the lowest rank's fatal one (`failures.is_fatal`) if any rank has
    one, else the lowest rank's: a rank's deterministic error is the cause, and a peer's
    collateral error (a collective that timed out waiting for it) must not hide it."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    order = 2 * world if error is None else rank if failures.fatal_cause(error) is not None else world + rank
    flags = torch.tensor([order, 0 if ended else 1, 1 if ended else 0], dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=group)
    first, none_ended, all_ended = flags.tolist()
    return (first % world if first < 2 * world else None), not none_ended, bool(all_ended)


def _raise_on_every_rank(error: BaseException | None, first: int, group) -> None:
    """Rank `first`'s error raised on every rank: its own there, a copy (chained to the rank's own
    error, if it had one) on the others."""
    mine = dist.get_rank(group) == first
    box = [_portable(error) if mine else None]
    dist.broadcast_object_list(box, group=group, group_src=first)
    if mine:
        raise error
    raise box[0] from error


def _portable(error: BaseException) -> BaseException:
    """`error`, or a RuntimeError of its type and message when it would not unpickle on the
    other ranks (an exception whose __init__ takes other arguments than its message)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")
