"""Run-folder audit records: the attempt log and the per-rank key logs."""

from __future__ import annotations

import json

from ssl_dist import records


def test_key_logs_read_back_oldest_attempt_first(tmp_path):
    run = str(tmp_path / "run")
    for attempt, start, ranks in ((200, 4, (1, 0)), (100, 0, (0,))):
        for rank in ranks:
            log = records.KeyLog(run, rank=rank, start_step=start, attempt_id=attempt)
            log.add(start + 1, 0, [{"__key__": [f"a{attempt}r{rank}", "x"]}, {"__key__": ["y"]}])
            log.flush()
    got = records.read_keys(run)
    assert [(g["attempt"], g["rank"], g["start_step"]) for g in got] == [(100, 0, 0), (200, 0, 4), (200, 1, 4)]
    assert got[1]["rows"] == [{"step": 5, "epoch": 0, "keys": ["a200r0", "x", "y"]}]
    assert records.read_keys(str(tmp_path / "none")) == []


def test_attempt_log_written_by_rank0_only(tmp_path):
    run = tmp_path / "run"
    for rank in (0, 1):
        log = records.AttemptLog(str(run), rank=rank, start_step=8, attempt_id=7, world_size=2, resumed_from="c",
                                 notes=["n"], timeline={"start": 1.0}, restore={"load_s": 0.5})
        log.step_done(9)
        log.step_done(10)
        log.checkpointed(12, "checkpoint-00000012", {"write_s": 0.1})
    (written,) = (run / "attempts").iterdir()
    assert written.name == "attempt-00000008-7.json"
    record = json.loads(written.read_text())
    assert {"first_step", "second_step"} <= set(record["timeline"])
    assert record["checkpoints"] == [{"step": 12, "name": "checkpoint-00000012", "write_s": 0.1}]
