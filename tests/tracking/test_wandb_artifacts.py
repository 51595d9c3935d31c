"""The driver's W&B artifacts run, without Ray: at a run's end, a short W&B run in the run's
group holds curves.png and the exported encoder as one artifact; offline, its folder is
copied into the run folder. Real wandb clients (offline mode, or online with nothing to
reach); the run folder is a tmp folder with a curves.png and no checkpoint (export fails
with ExportError: the artifact holds the curves only)."""

from __future__ import annotations

import time
from pathlib import Path

from services import free_port
from wandb_offline import artifact_records, run_record, wandb_records

from ssl_dist import config
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
