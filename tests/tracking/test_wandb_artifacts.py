"""The driver's W&B artifacts run, without Ray: at a run's end, a short W&B run in the run's
group holds curves.png and the exported encoder as one artifact; offline, its folder is
copied into the run folder. Real wandb clients (offline mode, or online with nothing to
reach); the run folder is a tmp folder with a curves.png and no checkpoint (export fails
with ExportError: the artifact holds the curves only)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from services import free_port
from wandb_offline import artifact_records, run_record, wandb_records

from ssl_dist import config
from ssl_dist.tracking import wandb_sink
from ssl_dist.tracking.parent import open_run

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))  # any bytes: what matters is that they arrive whole


def tracked_run(tmp_path: Path, say):
    run = tmp_path / "runs" / "unit"
    run.mkdir(parents=True)
    (run / "curves.png").write_bytes(PNG)
    cfg = config.load(None, ["track.wandb_project=ssl-dist-unit", f"run.storage_path={tmp_path / 'runs'}",
                             "run.name=unit"])
    return run, open_run(cfg, run_url=str(run), attempt="a1", resume=None, say=say)


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning:" in line]


def test_an_offline_artifacts_run_holds_the_curves_and_is_copied_into_the_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # wandb stages an artifact's files there
    said = []
    run, tracked = tracked_run(tmp_path, said.append)
    tracked.finish(say=said.append)  # no checkpoint in the run folder: no encoder to export

    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1 and "exporting the encoder" in lines[0] and "ExportError" in lines[0], lines
    folders = sorted((run / "wandb").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("offline-run-")
    records = wandb_records(folders[0])
    record = run_record(records)
    assert record["display_name"] == "unit-artifacts" and record["job_type"] == "artifacts"
    assert record["run_group"] == "unit" and record["project"] == "ssl-dist-unit"
    (artifact,) = artifact_records(records)
    files = artifact["manifest"]["contents"]
    assert [f["path"] for f in files] == ["curves.png"] and artifact["type"] == "curves"
    # what `wandb sync` of that folder uploads, from this machine: the curves as they were
    assert Path(files[0]["local_path"]).read_bytes() == PNG
    assert any("wandb sync" in line and str(folders[0]) in line for line in said), said


def pause_wandb_service_at_finish(monkeypatch, seconds: float) -> None:
    """When a run tells wandb's service (wandb-core, a child of this process) to close its
    file (`inform_finish`, the last thing run.finish() does, without waiting), stop the service
    for `seconds` first: what a loaded machine can do to it, made sure."""
    import psutil
    from wandb.sdk.lib.service.service_connection import ServiceConnection

    inform_finish = ServiceConnection.inform_finish

    def pause_then_inform(connection, *args, **kwargs):
        services = [p for p in psutil.Process().children(recursive=True) if "wandb-core" in p.name()]
        for service in services:
            service.suspend()
        threading.Timer(seconds, lambda: [service.resume() for service in services]).start()
        return inform_finish(connection, *args, **kwargs)

    monkeypatch.setattr(ServiceConnection, "inform_finish", pause_then_inform)


def test_the_offline_copy_is_whole_when_wandb_closes_its_file_late(tmp_path, monkeypatch):
    # run.finish() tells wandb's service to close the run's file and returns; until the service
    # has closed it, the file may hold its 7-byte header only (wandb writes it out every
    # x_transaction_log_flush_interval and at its close). With that interval at 10 minutes and
    # the service paused as finish() returns, a copy taken at once holds no record.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setitem(wandb_sink.SETTINGS, "x_transaction_log_flush_interval", 600.0)
    pause_wandb_service_at_finish(monkeypatch, seconds=1.0)
    for attempt in range(2):
        run, tracked = tracked_run(tmp_path / str(attempt), lambda line: None)
        tracked.finish(say=lambda line: None)
        (folder,) = (run / "wandb").iterdir()
        record = run_record(wandb_records(folder))
        assert record["display_name"] == "unit-artifacts", (attempt, record)


def test_a_wandb_that_cannot_start_is_one_warning_and_the_run_folder_is_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # online with no key: wandb refuses to start
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no saved settings of this machine
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")  # and nothing would answer
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    run, tracked = tracked_run(tmp_path, print)
    started = time.monotonic()
    tracked.finish()
    assert time.monotonic() - started < 60
    lines = [line for line in warnings_in(capsys.readouterr().err) if "exporting the encoder" not in line]
    assert len(lines) == 1 and "W&B project ssl-dist-unit failed" in lines[0], lines
    assert sorted(p.name for p in run.iterdir()) == ["curves.png"]


def test_an_attempts_offline_copy_is_whole_when_wandb_closes_its_file_late(tmp_path, monkeypatch):
    # the same for rank 0's run of an attempt (WandbSink.close), whose rows must all arrive
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(wandb_sink.SETTINGS, "x_transaction_log_flush_interval", 600.0)
    pause_wandb_service_at_finish(monkeypatch, seconds=1.0)
    run = tmp_path / "runs" / "unit"
    sink = wandb_sink.WandbSink(project="ssl-dist-unit", entity="", group="unit", mode="offline", driver_attempt="a1",
                                cfg=config.load(None, []), attempt="attempt-1", run_url=str(run), storage_options={},
                                say=lambda line: None)
    sink.log(3, {"loss": 2.5})
    sink.close()
    (folder,) = (run / "wandb").iterdir()
    records = wandb_records(folder)
    assert run_record(records)["display_name"] == "attempt-1"
    rows = [r["history"] for r in records if r["type"] == "history"]
    assert len(rows) == 1 and "2.5" in json.dumps(rows[0]), rows
