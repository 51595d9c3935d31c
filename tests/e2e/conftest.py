"""Heavy fixtures of the end-to-end runs: a real two-node Ray cluster on this machine.

The light, session-wide ones (moto's S3 server, a bucket, the local Ray head `ray_address`,
CIFAR-10 shards in S3) are in ../conftest.py; the helpers both use are modules beside it
(services.py, cifar.py, runs.py).
"""

from __future__ import annotations

import os
import sys

import pytest
from services import LocalCluster


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory, s3_endpoint):
    """A Ray cluster of two nodes on this machine (head 127.0.0.2, worker 127.0.0.3), 1 CPU
    each, so that 2 training workers of 1 CPU land on different nodes.

    The nodes get the S3 endpoint and test credentials from their own environment, as a
    cluster gets them from an instance role: nothing is sent with a job. Token auth is off
    (RAY_AUTH_MODE=disabled, set explicitly). Node failure is detected in a few seconds.
    """
    root = tmp_path_factory.mktemp("rc")  # short: Ray's socket paths live under it; logs kept after the tests
    # A job's `python` must be this venv's, as a cluster's is its image's. Only `python` is put
    # first on PATH, not the venv's bin: its `ninja` (1.13) hashes build commands differently
    # from the system's, and DeepSpeed's CPU op would be rebuilt whenever the two alternate.
    shims = root / "bin"
    shims.mkdir()
    for name in ("python", "python3"):
        (shims / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (shims / name).chmod(0o755)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}",
           "GLOO_SOCKET_IFNAME": "lo",  # collectives over loopback only
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3",
           # a worker group that cannot be placed (a lost node not yet declared dead) is given
           # up in 30 s instead of 60, then sized again from the nodes that are alive
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
    cluster = LocalCluster(root, env)
    # Ray's own processes that look for "the" cluster (Ray Train's placement-group cleaner uses
    # the state API without an address) must find this one among the machine's Ray instances.
    env["RAY_ADDRESS"] = cluster.gcs_address
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node(num_cpus=1)
        cluster.wait_for_jobs_api()
        yield cluster
    finally:
        cluster.stop()
