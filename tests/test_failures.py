"""Which worker errors end a run without Ray Train's retries (`ssl_dist/failures.py`), as the
run's controller callback judges them, and the driver-side settings that bound a hang."""

from __future__ import annotations

import pytest

from ssl_dist import config, failures, launch, storage
from ssl_dist.checkpoint.layout import CheckpointError, IncompleteCheckpoint


def test_only_errors_a_restart_cannot_fix_end_the_run_at_once():
    callback = launch.stop_on_fatal()
    bad_data = failures.TooMuchBadData("too much bad data in s3://b/shards: rank 1 skipped 16 samples")
    # the failing rank's error, beside a peer's collateral one: the run ends with the cause
    with pytest.raises(failures.TooMuchBadData) as ended:
        callback.after_exception(None, {0: RuntimeError("[gloo] Timed out waiting 300000ms"), 1: bad_data})
    assert ended.value is bad_data
    for fatal in (config.ConfigError("data.batch_size=0: must be positive"),
                  CheckpointError("s3://b/run/checkpoint-00000008 holds another model: use its model settings")):
        with pytest.raises(type(fatal)):
            callback.after_exception(None, {0: RuntimeError("Connection closed by peer"), 1: fatal})
    # what a restart can fix is left to Ray Train's retries (run.max_failures)
    for retryable in (storage.StorageError("cannot reach the object store at http://s3: check the endpoint"),
                      IncompleteCheckpoint("zero_pp_rank_1 missing"), RuntimeError("Connection closed by peer")):
        assert callback.after_exception(None, {0: retryable}) is None
    # a fatal error wrapped by another (as Ray or a caller wraps it) is still found
    try:
        try:
            raise bad_data
        except failures.TooMuchBadData as err:
            raise RuntimeError("training step failed") from err
    except RuntimeError as wrapped:
        assert failures.fatal_cause(wrapped) is bad_data


def test_the_trainer_bounds_every_collective_and_stops_on_fatal_errors(tmp_path):
    cfg = config.load(None, [f"run.storage_path={tmp_path}/runs", "run.name=bounded", "run.collective_timeout_s=7.5",
                             f"data.train_url={tmp_path}/shards"])
    trainer = launch.build_trainer(cfg, data_options={}, storage_options={})
    assert trainer.backend_config.timeout_s == 8  # whole seconds, never less than configured
    assert [type(c).__name__ for c in trainer.run_config.callbacks] == ["StopOnFatal"]


def test_the_driver_prints_the_workers_message_through_rays_controller_error():
    from ray.train import ControllerError

    from ssl_dist import cli

    bad_data = failures.TooMuchBadData("too much bad data in s3://b/shards: rank 1 skipped 16 samples")
    assert cli.user_error_message(ControllerError(bad_data)) == str(bad_data)  # what fit() raises
