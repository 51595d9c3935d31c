"""Watching and evaluating a run, without a cluster: the progress line and bar, the metrics CSV
and TensorBoard files, the curves' PNG, the linear probe (evaluation during training: test_live_eval)."""

from __future__ import annotations

import io
import time

import pytest
import torch

from ssl_dist import evaluate, metrics, plots


def write_run(run_url: str, steps: range, *, knn_every: int = 0, start: int = 0) -> metrics.MetricsLog:
    log = metrics.MetricsLog(run_url, start_step=start, max_steps=steps[-1], global_batch=32)
    for step in steps:
        log.add(step=step, epoch=0, loss=5.0 - 0.1 * step, lr=1e-3, samples_seen=32 * step)
        if knn_every and step % knn_every == 0:
            log.add_eval(step, knn_top1=step / (10 * knn_every))
        log.flush()
    return log


def test_progress_line_parses_back_through_rays_prefix():
    log = metrics.MetricsLog("/tmp/unused", start_step=0, max_steps=100, global_batch=32)
    row = {"step": 40, "epoch": 1, "loss": 4.1234, "lr": 1e-3, "samples_per_s": 312.4}
    line = f"(RayTrainWorker pid=7, ip=127.0.0.3) [ssl-dist] {log.progress_line(row)}"
    assert metrics.parse_progress_line(line) == {**row, "max_steps": 100}
    assert metrics.parse_progress_line("kNN top-1 at step 6: 0.2") is None


def test_metrics_csv_and_tensorboard_hold_every_step_and_eval(tmp_path):
    run = str(tmp_path / "run")
    write_run(run, range(1, 7), knn_every=3).close()
    write_run(run, range(5, 9), start=4).close()  # a restart from step 4: a second attempt
    first, second = metrics.read_history(run)
    assert [int(r["step"]) for r in first] == [1, 2, 3, 4, 5, 6]
    assert [r["knn_top1"] for r in first] == ["", "", "0.1", "", "", "0.2"]
    assert [int(r["step"]) for r in second] == [5, 6, 7, 8]
    assert [int(r["step"]) for r in metrics.read_latest_attempt(run)] == [5, 6, 7, 8]
    files = metrics.read_tensorboard(run)
    assert len(files) == 2 and not list(tmp_path.glob("ssl-dist-tb-*"))
    by_start = sorted(files.values(), key=lambda f: f["train/loss"][0][0])
    assert [s for s, _ in by_start[0]["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert by_start[0]["eval/knn_top1"] == [(3, pytest.approx(0.1)), (6, pytest.approx(0.2))]
    assert [s for s, _ in by_start[1]["train/samples_per_s"]] == [5, 6, 7, 8]


def test_eval_at_a_step_that_was_not_logged_is_a_row_of_its_own(tmp_path):
    log = metrics.MetricsLog(str(tmp_path), start_step=0, max_steps=10, global_batch=8, tensorboard=False)
    log.add(step=2, epoch=0, loss=1.0, lr=0.1, samples_seen=16)
    log.add_eval(3, knn_top1=0.5)
    log.flush()
    (rows,) = metrics.read_history(str(tmp_path))
    assert [(r["step"], r["loss"], r["knn_top1"]) for r in rows] == [("2", "1.0", ""), ("3", "", "0.5")]


def test_watch_run_moves_a_bar_from_the_csv(tmp_path):
    run, out = str(tmp_path / "run"), io.StringIO()
    with metrics.watch_run(run, None, max_steps=12, interval=0.05, enabled=True, file=out):
        log = metrics.MetricsLog(run, start_step=0, max_steps=12, global_batch=32)
        for step in range(1, 13):
            log.add(step=step, epoch=0, loss=3.0, lr=1e-3, samples_seen=32 * step)
            log.flush()
            time.sleep(0.02)
    text = out.getvalue()
    assert "12/12" in text and "loss=3.0000" in text and "samples/s=" in text


def test_curves_png_holds_the_steps_of_every_attempt(tmp_path):
    run = str(tmp_path / "run")
    assert plots.write_curves(run) is None  # nothing to draw yet
    write_run(run, range(1, 7), knn_every=3).close()
    write_run(run, range(5, 9), start=4).close()
    url = plots.write_curves(run)
    png = open(url, "rb").read()
    assert png.startswith(b"\x89PNG")
    assert plots.read_summary(png) == {"steps": [1, 2, 3, 4, 5, 6, 5, 6, 7, 8], "knn_steps": [3, 6], "attempts": 2}


def test_linear_probe_and_knn_on_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5

    def sample(n):
        y = torch.arange(n) % 4
        return torch.nn.functional.normalize(centers[y] + torch.randn(n, 16, generator=g), dim=1), y

    (tf, ty), (qf, qy) = sample(200), sample(80)
    assert evaluate.linear_probe_top1(tf, ty, qf, qy) >= 0.95
    assert evaluate.knn_top1(tf, ty, qf, qy, k=20) >= 0.95
    with pytest.raises(evaluate.EvaluationError, match="at least 2 classes"):
        evaluate.linear_probe_top1(tf, torch.zeros_like(ty), qf, qy)
