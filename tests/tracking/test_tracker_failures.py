"""A tracker that is down, refuses or is not installed never fails a run: one warning line
(or, for a missing client, one clear error before any worker starts), and the CSV stays
whole. Real MLflow clients against a closed port and against the real server; no Ray."""

from __future__ import annotations

import sys
import time

import pytest
from services import free_port

from ssl_dist import cli, config, metrics
from ssl_dist.tracking.mlflow_sink import MlflowSink
from ssl_dist.tracking.parent import open_run


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning:" in line]


def test_a_server_that_is_down_is_one_warning_on_the_driver_within_seconds(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = config.load(None, [f"track.mlflow_uri={uri}", f"run.storage_path={tmp_path}"])
    started = time.monotonic()
    tracked = open_run(cfg, run_url=str(tmp_path / "run"), attempt="a1", resume=None)
    assert time.monotonic() - started < 5  # MLflow's own defaults retry for minutes
    assert tracked.for_workers()["mlflow"] is None  # the workers do not even try
    tracked.finish()  # nothing to end: no error, no second warning
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert f"MLflow at {uri} failed" in lines[0] and "it is off for this run" in lines[0]
    assert "remain the record" in lines[0] and str(tmp_path / "run") in lines[0]


def test_a_server_lost_during_an_attempt_is_one_warning_and_the_csv_is_whole(tmp_path, capsys):
    run = str(tmp_path / "run")
    uri = f"http://127.0.0.1:{free_port()}"
    sink = MlflowSink(uri=uri, experiment_id="1", parent_run_id="0" * 32, driver_attempt="a1",
                      attempt="attempt-00000000-1", run_url=run)
    log = metrics.MetricsLog(run, start_step=0, max_steps=3, global_batch=8, tensorboard=False, sinks=[sink])
    started = time.monotonic()
    for step in (1, 2, 3):
        log.add(step=step, epoch=0, loss=1.0 / step, lr=0.1, samples_seen=8 * step)
        log.flush()
    log.close()
    assert time.monotonic() - started < 10
    assert [int(r["step"]) for r in metrics.read_history(run)[0]] == [1, 2, 3]
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and f"MLflow at {uri} failed" in lines[0] and "off for this attempt" in lines[0], lines


def test_a_server_that_refuses_the_attempt_run_is_one_warning(mlflow_server, tmp_path, capsys):
    run = str(tmp_path / "run")
    sink = MlflowSink(uri=mlflow_server, experiment_id="987654", parent_run_id="0" * 32, driver_attempt="a1",
                      attempt="attempt-00000000-1", run_url=run)  # no such experiment
    log = metrics.MetricsLog(run, start_step=0, max_steps=2, global_batch=8, tensorboard=False, sinks=[sink])
    log.add(step=1, epoch=0, loss=1.0, lr=0.1, samples_seen=8)
    log.close()
    assert len(metrics.read_history(run)[0]) == 1
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and f"MLflow at {mlflow_server} failed" in lines[0], lines


@pytest.mark.parametrize("package, key", [("mlflow", "track.mlflow_uri=http://127.0.0.1:5000"),
                                          ("wandb", "track.wandb_project=ssl")])
def test_a_missing_client_is_one_clear_error_before_any_worker_starts(cifar_shards_s3, tmp_path, capsys,
                                                                     monkeypatch, package, key):
    # A None entry in sys.modules is Python's own "not importable" (import raises ModuleNotFoundError)
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # must not be reached
    assert cli.main(["pretrain", f"data.train_url={cifar_shards_s3['train']}", f"run.storage_path={tmp_path}/runs",
                     key]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"pip install 'ssl-dist[{package}]'") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()  # nothing written
