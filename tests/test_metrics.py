"""The rank-0 progress line (metrics.MetricsLog.progress_line): its ETA."""

import time

from ssl_dist.metrics import MetricsLog


def line(tmp_path, *, step: int, max_steps: int, samples_per_s: float, deadline: float | None = None) -> str:
    log = MetricsLog(str(tmp_path / "run"), start_step=0, max_steps=max_steps, global_batch=100,
                     tensorboard=False, deadline=deadline)
    return log.progress_line({"step": step, "epoch": 0, "loss": 1.0, "lr": 1e-3, "samples_per_s": samples_per_s})


def test_the_eta_counts_the_steps_left_at_the_current_rate(tmp_path):
    assert line(tmp_path, step=40, max_steps=100, samples_per_s=300.0).endswith("ETA 0:00:20")


def test_an_eta_over_a_day_shows_its_days(tmp_path):
    # 1,000,000 steps left at 1 step/s: 11 days 13:46:40 (time.strftime's %H wrapped it to 13:46:40)
    assert line(tmp_path, step=0, max_steps=1_000_000, samples_per_s=100.0).endswith("ETA 11d 13:46:40")


def test_a_time_budget_ends_the_run_before_its_steps_do(tmp_path):
    # train.max_minutes: the deadline comes first, 90 s from now, whatever the steps left
    text = line(tmp_path, step=0, max_steps=10_000_000, samples_per_s=100.0, deadline=time.monotonic() + 90)
    assert text.endswith(("ETA 0:01:30", "ETA 0:01:29"))
