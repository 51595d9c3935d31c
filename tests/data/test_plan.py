"""The epoch plan's pure math (data/plan.py): no shards, no I/O.

Every position of a plan is served exactly once over ranks x loader workers x windows, and
a resume into another layout owes exactly the positions no consumed batch delivered.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ssl_dist.data import Layout, Plan, replan, runs_of, worker_slice


def layout(world: int, workers: int, batch: int, window: int) -> Layout:
    return Layout(world_size=world, num_workers=workers, batch_size=batch, window_batches=window)


def batches_of(plan: Plan, lay: Layout) -> dict[tuple[int, int], np.ndarray]:
    """(global batch, rank) -> the sequence positions of that rank's part of the batch."""
    out = {}
    windows = -(-plan.num_batches(lay) // lay.window_batches)
    for w, rank, worker in itertools.product(range(windows), range(lay.world_size), range(lay.num_workers)):
        mine, indices = worker_slice(plan, lay, w, rank, worker)
        assert all(j % lay.num_workers == worker for j in mine) and len(indices) == len(mine) * lay.batch_size
        for t, j in enumerate(mine):
            out[(j, rank)] = plan.at(indices[t * lay.batch_size:(t + 1) * lay.batch_size])
    return out


@pytest.mark.parametrize("world, workers, batch, window", [(1, 1, 7, 3), (3, 2, 5, 4), (2, 3, 4, 1)])
def test_every_position_is_served_once(world, workers, batch, window):
    plan, lay = Plan(epoch=0, total=203), layout(world, workers, batch, window)
    served = batches_of(plan, lay)
    assert set(served) == set(itertools.product(range(plan.num_batches(lay)), range(world)))
    positions = np.concatenate(list(served.values()))
    assert len(positions) == len(set(positions.tolist())) == 203 - plan.dropped(lay)
    assert plan.dropped(lay) < batch * world


@pytest.mark.parametrize("before, after, consumed", [
    ((2, 2, 5, 4), (3, 1, 5, 2), 3), ((3, 1, 5, 2), (1, 2, 7, 5), 7), ((1, 1, 4, 3), (2, 2, 3, 2), 0)])
def test_replan_owes_exactly_what_was_not_delivered(before, after, consumed):
    plan, old, new = Plan(epoch=1, total=200), layout(*before), layout(*after)
    delivered = [p for (j, _), pos in batches_of(plan, old).items() if j < consumed for p in pos.tolist()]
    rest = replan(plan, old, consumed)
    assert len(rest) == 200 - len(delivered) and rest.epoch == 1
    later = [p for pos in batches_of(rest, new).values() for p in pos.tolist()]
    assert len(set(delivered + later)) == len(delivered) + len(later) == 200 - rest.dropped(new)


def test_runs_of_groups_consecutive_samples_of_a_shard():
    order, starts = np.array([2, 0, 1]), np.array([0, 10, 15, 30])  # shard 2 holds 10, shard 0 5, shard 1 15
    assert runs_of(np.array([11, 3, 4, 12, 5, 29, 9, 10]), order, starts) == [
        (2, 3, 6), (2, 9, 10), (0, 0, 3), (1, 14, 15)]
    assert runs_of(np.array([], dtype=np.int64), order, starts) == []
