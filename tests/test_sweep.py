"""The sweep's report, from Tune's own results: each trial's row (values, steps, score, status:
finished, stopped early by ASHA, failed with its one-line message), and which trial is best.
No cluster: the results are the objects Tune hands back (`ray.tune.Result`), a failed trial's
error the RayTaskError Ray wraps it in. The search itself runs in e2e/test_sweep_trials.py."""

from __future__ import annotations

from ray.exceptions import RayTaskError
from ray.tune import Result

from ssl_dist import cli, config, sweep
from ssl_dist.launch import LaunchError


def tune_result(trial_id: str, lr: float, step: int | None = None, score: float | None = None, error=None) -> Result:
    metrics = {"trial_id": trial_id, "config": {"optim.lr": lr}}
    if step is not None:
        metrics.update(step=step, knn_top1=score)
    return Result(metrics=metrics, checkpoint=None, error=error, path=f"/tune/{trial_id}")


def test_rows_say_finished_stopped_or_failed_with_the_trials_own_message_and_the_best_is_a_finished_one(tmp_path):
    cfg = config.load(None, [f"run.storage_path={tmp_path}", "train.max_steps=6"])
    # what Tune holds for a trial whose run refused to start: the LaunchError inside Ray's wrapper
    refused = LaunchError("s3://b/train holds 200 samples, fewer than one global batch (4096 x 2 workers): lower "
                          "data.batch_size")
    wrapped = RayTaskError("ImplicitFunc.train", "Traceback (most recent call last):\n  ...", refused) \
        .as_instanceof_cause()
    results = [tune_result("a_00000", 1e-3, 6, 0.23), tune_result("a_00001", 1e6, 2, 0.40),
               tune_result("a_00002", 2e-3, 6, 0.31), tune_result("a_00003", 5e-3, error=wrapped)]
    trials = [sweep.trial_of(r, cfg, "lr", "knn_top1", {"a_00001"}, {}, cli.user_error_message) for r in results]

    assert [(t.trial_id, t.status, t.step, t.score) for t in trials] == [
        ("a_00000", "finished", 6, 0.23), ("a_00001", "stopped early (ASHA)", 2, 0.40),
        ("a_00002", "finished", 6, 0.31), ("a_00003", "failed", None, None)]
    assert trials[3].error == str(refused)  # one line: Ray's traceback stays in the log
    assert trials[0].run_url == f"{tmp_path}/lr-a_00000"
    # a stopped trial's score is from fewer steps: the best is the best of those that finished
    assert sweep.best_trial(trials, "max").trial_id == "a_00002"
    assert sweep.best_trial(trials[1:2] + trials[3:], "max").trial_id == "a_00001"  # else the best stopped one
    assert sweep.best_trial(trials[3:], "max") is None

    lines = sweep.table(trials, "knn_top1").splitlines()
    assert lines[0].split() == ["trial", "params", "steps", "knn_top1", "status"]
    assert lines[2].split() == ["a_00001", "optim.lr=1e+06", "2", "0.4000", "stopped", "early", "(ASHA)"]
    assert lines[4].split(None, 4) == ["a_00003", "optim.lr=0.005", "-", "-", f"failed: {refused}"]


def test_steps_reached_are_the_run_folders_newest_metrics_row(tmp_path):
    from ssl_dist.metrics import MetricsLog

    log = MetricsLog(str(tmp_path / "run"), start_step=0, max_steps=10, global_batch=32)
    for step in (1, 2, 3):
        log.add(step=step, epoch=0, loss=1.0, lr=0.1, samples_seen=32 * step)
    log.close()
    # a trial ASHA stopped after its evaluation at step 2 had gone on to step 3 meanwhile
    assert sweep.steps_reached(str(tmp_path / "run"), {}, 2) == 3
    assert sweep.steps_reached(str(tmp_path / "nothing"), {}, 2) == 2
