"""ssl_dist.quiet drops exactly the third-party lines it names, at the logger or warning that
makes them, and nothing beside them (the end-to-end check is tests/e2e/test_quickstart_output.py)."""

from __future__ import annotations

import logging
import warnings

import pytest

from ssl_dist import quiet

CONTEXT = quiet._ray_train_context_logger()  # Ray Train names that logger by its file


@pytest.fixture(autouse=True)
def not_in_a_ray_worker(monkeypatch):
    """RAY_ADDRESS set: `install` never names a cluster in this process (were Ray connected in it)."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")


@pytest.fixture
def heard():
    """{logger name: messages that reached it}, with the loggers' filters put back afterwards."""
    names = [*quiet.LOG_LINES, *quiet.LOCAL_LOG_LINES]
    loggers = {name: logging.getLogger(name or None) for name in names}
    saved = {name: (list(lg.filters), lg.level, lg.propagate) for name, lg in loggers.items()}
    got: dict[str, list[str]] = {name: [] for name in names}

    class Keep(logging.Handler):
        def __init__(self, name):
            super().__init__(logging.DEBUG)
            self.key = name

        def emit(self, record):
            got[self.key].append(record.getMessage())

    handlers = {name: Keep(name) for name in names}
    for name, lg in loggers.items():
        lg.addHandler(handlers[name])
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
    yield loggers, got
    for name, lg in loggers.items():
        lg.removeHandler(handlers[name])
        filters, level, propagate = saved[name]
        lg.filters[:] = filters
        lg.setLevel(level)
        lg.propagate = propagate


def test_the_known_lines_are_dropped_and_their_neighbours_kept(heard):
    loggers, got = heard
    quiet.install()
    quiet.install()  # idempotent: one filter per logger
    assert all(sum(isinstance(f, quiet.DropLines) for f in loggers[name].filters) == 1 for name in quiet.LOG_LINES)

    loggers["DeepSpeed"].warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were "
                                 "unable to detect it.")
    loggers["DeepSpeed"].warning("Setting accelerator to cuda (from DS_ACCELERATOR)")
    loggers["torch.utils.cpp_extension"].warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
    loggers["torch.utils.cpp_extension"].warning("Error checking compiler version for c++")
    loggers[""].info("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    loggers[""].error("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully, then failed")
    loggers[""].error("Traceback (most recent call last): a worker's own error")
    storage = "ray.train.v2._internal.execution.storage"
    loggers[storage].info("Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/ck)")
    loggers[storage].warning("Checkpoint upload is slow")
    loggers[CONTEXT].info("Reporting training result 2: TrainingReport(checkpoint=None, metrics={}) from rank 1")
    loggers[CONTEXT].error("Reporting training result failed")
    loggers["ray.train.v2._internal.execution.scaling_policy.scaling_policy"].info("Requesting resources: {} * 2")

    assert got["DeepSpeed"] == ["Setting accelerator to cuda (from DS_ACCELERATOR)"]
    assert got["torch.utils.cpp_extension"] == ["Error checking compiler version for c++"]
    assert got[""] == ["DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully, then failed",
                       "Traceback (most recent call last): a worker's own error"]
    assert got[storage] == ["Checkpoint upload is slow"]
    assert got[CONTEXT] == ["Reporting training result failed"]
    # Ray Train's start-up lines go only in a local Ray's processes
    assert got["ray.train.v2._internal.execution.scaling_policy.scaling_policy"] == ["Requesting resources: {} * 2"]


def test_a_local_ray_also_drops_ray_trains_start_up_lines(heard):
    loggers, got = heard
    quiet.install_local()
    group = "ray.train.v2._internal.execution.worker_group.worker_group"
    loggers[group].info("Started training worker group of size 2: \n- (ip=1.2.3.4, pid=5) world_rank=0")
    loggers[group].info("Attempting to start training worker group of size 2 with the following resources: x")
    loggers[group].warning("Retrying the launch of the training worker group")
    loggers["ray.train.torch.config"].info("Setting up process group for: env:// [rank=0, world_size=2]")
    assert got[group] == ["Retrying the launch of the training worker group"]
    assert got["ray.train.torch.config"] == []


def test_only_the_known_warning_is_ignored():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", UserWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated.", FutureWarning)
    assert [(w.category, str(w.message)) for w in caught] == [
        (UserWarning, "`torch.distributed.all_gather_into_tensor` is deprecated."),
        (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated.")]


def test_runtime_env_installs_the_filters_in_every_process_of_the_job():
    local, remote = quiet.runtime_env(local=True), quiet.runtime_env(local=False)
    assert local == {"worker_process_setup_hook": "ssl_dist.quiet.install_local",
                     "env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}}
    assert remote == {"worker_process_setup_hook": "ssl_dist.quiet.install"}  # a cluster keeps its watcher
