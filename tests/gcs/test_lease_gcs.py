"""The run folder's lease on Google Cloud Storage (the real emulator).

GCS makes every change of the lease atomic with generation preconditions: create with
ifGenerationMatch=0, renew / take over / release with ifGenerationMatch=<the generation
read>. The emulator ignores preconditions: it overwrites whatever it is sent, so there a
second driver's create replaces a live lease instead of being refused (412), and neither a
refusal, a take-over nor a race can be observed. What is tested here is what the emulator
can show: the lease's life (create, renew, release) and, through a proxy that logs every
request, that each write asks GCS for its precondition. The race itself is tested against
local files and S3 (tests/test_lease.py), with the same `lease.acquire`.
"""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from data.throttle_proxy import ThrottleProxy

from ssl_dist import lease, storage


def read_lease(run_url: str, options: dict | None = None) -> dict | None:
    fs, path = storage.filesystem(storage.join(run_url, lease.LEASE), options)
    fs.invalidate_cache(path)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def test_the_lease_is_written_renewed_and_released(gcs_bucket):
    run_url = f"gs://{gcs_bucket}/runs/r1"
    first = lease.acquire(run_url, 60)
    held = read_lease(run_url)
    assert held["holder"]["attempt"] == first.attempt and held["expires"] == pytest.approx(time.time() + 60, abs=5)
    time.sleep(0.01)
    first.renew()
    assert read_lease(run_url)["expires"] > held["expires"]
    first.release()
    assert read_lease(run_url) is None
    lease.acquire(run_url, 60).release()  # free again


def test_every_write_of_the_lease_is_conditional_on_its_generation(gcs_bucket, gcs_endpoint):
    run_url = f"gs://{gcs_bucket}/runs/r2"
    with ThrottleProxy(gcs_endpoint) as proxy:  # throttles nothing: logs what reaches the store
        options = {**storage.storage_options(run_url), "endpoint_url": proxy.endpoint}
        held = lease.acquire(run_url, 60, options)
        created = read_lease(run_url, options)
        generation = storage.filesystem(storage.join(run_url, lease.LEASE), options)[0].info(
            f"{gcs_bucket}/runs/r2/{lease.LEASE}")["generation"]
        held.renew()
        held.release()
        writes = [(method, parse_qs(urlsplit(path).query)) for method, path, _ in proxy.log
                  if method in ("POST", "PUT", "DELETE") and lease.LEASE in (path + str(parse_qs(urlsplit(path).query)))]
    assert created["holder"]["attempt"] == held.attempt
    assert [method for method, _ in writes] == ["POST", "POST", "DELETE"]
    create, renew, release = (query.get("ifGenerationMatch") for _, query in writes)
    assert create == ["0"]  # only if there is no lease
    assert renew == [str(generation)]  # only if it is still the one this driver wrote
    assert release not in (None, ["0"], [str(generation)])  # the renewed one's generation
    assert read_lease(run_url) is None
