"""The run folder's lease (ssl_dist/lease.py): one driver at a time, locally and on S3 (moto's
server over HTTP), with drivers racing from threads of this process."""

from __future__ import annotations

import json
import threading
import time

import pytest

from ssl_dist import lease, storage


@pytest.fixture(params=["local", "s3"])
def run_url(request, tmp_path):
    """A run folder URL: a local folder, or a prefix in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "runs" / "r1")
    return f"s3://{request.getfixturevalue('bucket')}/runs/r1"


def read_lease(run_url: str) -> dict | None:
    fs, path = storage.filesystem(storage.join(run_url, lease.LEASE))
    fs.invalidate_cache(path)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def race(n: int, fn) -> tuple[list, list]:
    """`fn()` from n threads released at once: (results, LeaseHeld errors)."""
    won, refused, start = [], [], threading.Barrier(n)

    def one():
        start.wait()
        try:
            won.append(fn())
        except lease.LeaseHeld as err:
            refused.append(err)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return won, refused


def test_a_second_driver_is_refused_naming_the_holder_and_its_expiry(run_url):
    first = lease.acquire(run_url, 60)
    held = read_lease(run_url)
    assert held["holder"]["attempt"] == first.attempt and held["expires"] == pytest.approx(time.time() + 60, abs=5)
    with pytest.raises(lease.LeaseHeld) as err:
        lease.acquire(run_url, 60)
    message = str(err.value)
    assert f"run folder {run_url} is in use by another driver" in message
    assert f"attempt {first.attempt}" in message and f"pid {held['holder']['pid']}" in message
    assert "UTC (in 60 s)" in message or "UTC (in 59 s)" in message
    assert read_lease(run_url)["holder"]["attempt"] == first.attempt  # the refused one changed nothing
    first.release()
    assert read_lease(run_url) is None
    lease.acquire(run_url, 60).release()  # free again


def test_of_drivers_racing_for_a_free_run_folder_one_wins(run_url):
    won, refused = race(6, lambda: lease.acquire(run_url, 60))
    assert len(won) == 1 and len(refused) == 5
    assert read_lease(run_url)["holder"]["attempt"] == won[0].attempt


def test_a_stale_lease_is_taken_over_only_after_it_expires_and_by_one_driver(run_url):
    now = time.time()
    old = lease.acquire(run_url, 30, clock=lambda: now - 100)  # a driver that died 70 s ago
    with pytest.raises(lease.LeaseHeld, match=r"\(in 10 s\)"):
        lease.acquire(run_url, 30, clock=lambda: now - 80)  # 10 s before it expired: still live
    won, refused = race(6, lambda: lease.acquire(run_url, 30))
    assert len(won) == 1 and len(refused) == 5
    assert all(f"attempt {won[0].attempt}" in str(e) for e in refused)  # they name the winner
    assert won[0].taken_over["holder"]["attempt"] == old.attempt
    # The old driver, back from the dead, can neither renew nor release the new lease.
    with pytest.raises(lease.LeaseConflict):
        old.renew()
    old.release()
    assert read_lease(run_url)["holder"]["attempt"] == won[0].attempt


def test_the_lease_is_renewed_while_the_run_lives_and_released_at_its_end(run_url):
    said = []
    held = lease.acquire(run_url, 0.8)
    with held.keep(say=said.append):
        first = read_lease(run_url)["expires"]
        time.sleep(1.2)  # past the first expiry: only the renewals keep it live
        assert read_lease(run_url)["expires"] > first
        with pytest.raises(lease.LeaseHeld):
            lease.acquire(run_url, 0.8)
    assert read_lease(run_url) is None and said == []


def test_a_lease_whose_driver_died_on_this_host_is_taken_over_at_once(run_url, tmp_path):
    # A driver killed here (the e2e "killed driver" test, a closed terminal) never releases its
    # lease: the same command run again must not wait run.lease_s for it to expire.
    import subprocess
    import sys

    died = subprocess.run([sys.executable, "-c", (
        "import os, sys; from ssl_dist import lease; "
        f"held = lease.acquire({run_url!r}, 600); print(held.attempt); sys.stdout.flush(); os._exit(0)")],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ})
    assert died.returncode == 0, died.stderr
    assert read_lease(run_url)["holder"]["attempt"] == died.stdout.strip()
    taken = lease.acquire(run_url, 60)
    assert taken.taken_over["holder"]["attempt"] == died.stdout.strip()
    taken.release()

    # A live holder (this process) on another host name keeps it: only a dead local pid frees it.
    first = lease.acquire(run_url, 600)
    record = read_lease(run_url)
    assert not lease.holder_is_gone(record)
    assert not lease.holder_is_gone({"holder": {**record["holder"], "host": "another-host", "pid": 2**22 + 1}})
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(run_url, 60)
    first.release()
