"""Decisions shared by ranks, on a gloo group of one process (no Ray)."""

from __future__ import annotations


from ssl_dist import collective


def test_rank0_decides_and_failure_travels(group_of_one):
    assert collective.rank0_says(True, group_of_one) is True and collective.rank0_says(False, group_of_one) is False
    error = ValueError("checkpoint of another model")
    assert str(collective.broadcast(error, group_of_one)) == str(error)
    assert collective.broadcast({"step": 4}) == {"step": 4}  # the default group
    assert collective.all_ok(True, group_of_one) and not collective.all_ok(False, group_of_one)
