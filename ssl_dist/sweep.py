"""`ssl-dist sweep`: a Ray Tune search over ordinary ssl_dist runs, with ASHA early stopping
on the periodic evaluation. Driver side.

Each trial is a Tune function trainable that runs one ssl_dist run (`launch.pretrain`) named
`<sweep>-<trial id>` under run.storage_path: its own run folder, config.yaml, metrics,
checkpoints and lease, resumable by `ssl-dist pretrain --config <run folder>/config.yaml`.
Every evaluation (`eval.every`) is reported to Ray Train by every rank (`train.Run.evaluate`);
a Ray Train callback on the run's controller forwards the ones that carry the swept metric
to Tune, with the optimizer step as ASHA's time. Tune's own state lives beside the runs, in
`<storage>/<sweep>.tune`. At the end: a table of the trials and the best trial's config as a
YAML file that `ssl-dist pretrain --config` takes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ssl_dist import config as config_lib
from ssl_dist import storage, sweep_space
from ssl_dist.config import Config, ConfigError

# What `--metric` can name: the scores of the periodic evaluation, and which way is better.
METRICS = {"knn_top1": "max", "zero_shot_top1": "max"}

# A trial's own actor only drives its Ray Train run (the workers ask Ray for their CPUs
# themselves), so it must hold no CPU: one it held would be missing for its own workers and
# break the count of trials that fit. Tune refuses a trial that asks for nothing at all, so it
# asks for 1 MiB of Ray's memory resource, which every node has.
TRIAL_DRIVER = {"CPU": 0, "memory": 2**20}

# Tune's trial ids are 11 characters (`3f2a1_00004`); "-best-" before one makes 17.
MAX_NAME = 128 - 17

STOPPED, FINISHED, FAILED = "stopped early (ASHA)", "finished", "failed"


@dataclass
class Trial:
    """One trial as the table shows it."""

    trial_id: str
    run_url: str
    params: dict
    step: int | None  # the last optimizer step its run folder's metrics reached
    score: float | None  # the metric at its last evaluation
    status: str
    error: str = ""


@dataclass
class SweepResult:
    """The trials, the best one (None when none was scored) and where its config was written."""

    trials: list[Trial]
    best: Trial | None
    best_config: str | None


def metrics_of(cfg: Config) -> list[str]:
    """The scores `eval.every` produces for this config: kNN top-1 with eval.train_url (every
    method), zero-shot top-1 for an image-text method."""
    from ssl_dist import methods

    produced = ["knn_top1"] if cfg.eval.every and cfg.eval.train_url else []
    if cfg.eval.every and "txt" in methods.resolve(cfg.method.name).fields:
        produced.append("zero_shot_top1")
    return produced


def check(cfg: Config, metric: str, *, grace_evals: int, reduction_factor: int) -> int:
    """That `metric` is scored during every trial and that ASHA can stop a trial before its
    end; returns ASHA's grace period in steps. A ConfigError naming the fix otherwise."""
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric}: a sweep ranks trials by a score of the periodic evaluation; allowed: "
                          f"{', '.join(METRICS)}")
    if not cfg.eval.every:
        raise ConfigError(f"--metric {metric} is scored by the periodic evaluation, which is off (eval.every=0): set "
                          f"eval.every (with eval.test_url, and eval.train_url for kNN) so that every trial is "
                          f"scored as it trains")
    if metric not in metrics_of(cfg):
        fix = ("set eval.train_url to a small labeled set (the kNN neighbours)" if metric == "knn_top1" else
               "zero-shot needs an image-text method: method.name=clip or siglip")
        raise ConfigError(f"--metric {metric} is not scored by this config's evaluation "
                          f"(it scores {', '.join(metrics_of(cfg)) or 'nothing'}): {fix}")
    if reduction_factor < 2:
        raise ConfigError(f"--reduction-factor {reduction_factor}: must be at least 2 (ASHA keeps 1 trial in that "
                          f"many at each rung)")
    grace = grace_evals * cfg.eval.every
    if grace >= cfg.train.max_steps:
        raise ConfigError(f"--grace-evals {grace_evals} x eval.every={cfg.eval.every} is step {grace}, not before "
                          f"train.max_steps={cfg.train.max_steps}: ASHA could never stop a trial early; lower "
                          f"eval.every or --grace-evals")
    return grace


def trial_run_name(sweep: str, trial_id: str) -> str:
    """The run folder name of one trial."""
    return f"{sweep}-{trial_id}"


def run_sweep(cfg: Config, param_items: list[str], *, metric: str = "knn_top1", samples: int = 8,
              name: str | None = None, grace_evals: int = 1, reduction_factor: int = 2,
              max_concurrent: int | None = None, out: str | None = None, address: str | None = None,
              say: Callable[[str], None] = print, explain: Callable[[BaseException], str | None] = lambda e: None,
              ) -> SweepResult:
    """Run the sweep to its end; print the table and write the best trial's config. Driver only.

    `param_items`: the `--param` texts (`sweep_space`); `samples`: Tune's num_samples (with
    grid values, each grid is searched that many times); `name`: the sweep's name (default:
    run.name); `max_concurrent`: trials at a time (default: as many as the cluster's CPUs,
    and GPUs, hold); `out`: the best config's file (default: `<storage>/<name>-best.yaml`
    for a local run.storage_path, `./<name>-best.yaml` otherwise); `explain`: the one-line
    message of a trial's error, when it is one a user can fix.
    Everything a user can get wrong is found before Ray starts.
    """
    from ssl_dist import launch, tracking

    tracking.check_clients(cfg)  # a missing tracker client fails the sweep here, not every trial
    name = name or cfg.run.name
    cfg = config_lib.merge(cfg, {"run": {"name": name}}, origin="--name")
    cfg.validate()  # the sweep's name is a run name too
    if len(name) > MAX_NAME:
        raise ConfigError(f"--name {name}: at most {MAX_NAME} characters (a trial runs as <name>-<trial id>, the "
                          f"best config as <name>-best-<trial id>: a run name has at most 128)")
    params = sweep_space.parse_params(param_items, cfg)
    grace = check(cfg, metric, grace_evals=grace_evals, reduction_factor=reduction_factor)
    # Tune runs each trial in another working directory: relative paths must be made absolute here.
    cfg = launch.with_absolute_paths(cfg)
    _, storage_options = launch.preflight(cfg)  # data, storage and eval sets: as `pretrain` checks them
    out = out or default_out(cfg, name)

    launch.connect_ray(address)
    concurrent = max_concurrent or trials_that_fit(cfg, say)
    stopper = early_stopper(metric, grace=grace, max_steps=cfg.train.max_steps, reduction_factor=reduction_factor)
    results = tune_fit(cfg, params, name=name, metric=metric, samples=samples, scheduler=stopper,
                       concurrent=concurrent, storage_options=storage_options)
    trials = [trial_of(result, cfg, name, metric, stopper.stopped, storage_options, explain) for result in results]
    trials.sort(key=lambda t: t.trial_id)
    say(table(trials, metric))
    best = best_trial(trials, METRICS[metric])
    if best is None:
        say(f"no trial was scored on {metric}: no best config written")
        return SweepResult(trials, None, None)
    best_cfg = sweep_space.apply(cfg, best.params, run_name=f"{name}-best-{best.trial_id}")
    write_best(out, best_cfg)
    say(f"best: trial {best.trial_id} ({sweep_space.describe(best.params)}), {metric} {best.score:.4f} at its "
        f"last evaluation, {best.status}; its run folder: {best.run_url}")
    say(f"best config: {out}\ntrain it: ssl-dist pretrain --config {out}")
    say(f"every trial's run folder resumes with `ssl-dist pretrain --config <run folder>/config.yaml` (a stopped "
        f"trial's once its lease has expired, run.lease_s={cfg.run.lease_s:g} s after it stopped)")
    return SweepResult(trials, best, out)


def default_out(cfg: Config, name: str) -> str:
    """Where the best config goes without --out: beside the runs when they are local (a file
    --config can read), in the working directory when they are in a bucket."""
    if cfg.run.storage_path.startswith(("s3://", "s3a://", "gs://")):
        return f"{name}-best.yaml"
    return os.path.join(storage.filesystem(cfg.run.storage_path)[1], f"{name}-best.yaml")


def trials_that_fit(cfg: Config, say: Callable[[str], None]) -> int:
    """How many trials the cluster runs at once: its CPUs (and GPUs) over one run's workers'."""
    import ray

    have = ray.cluster_resources()
    workers = cfg.run.num_workers
    fits = int(have.get("CPU", 0) // (workers * cfg.run.cpus_per_worker))
    if cfg.run.use_gpu:
        fits = min(fits, int(have.get("GPU", 0) // workers))
    if fits < 1:
        gpus = f" and {workers} GPUs" if cfg.run.use_gpu else ""
        say(f"one trial needs {workers * cfg.run.cpus_per_worker} CPUs{gpus} for its {workers} workers and the "
            f"cluster has {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs: trials wait for resources "
            f"(an autoscaler may add them)")
    return max(1, fits)


def early_stopper(metric: str, *, grace: int, max_steps: int, reduction_factor: int):
    """ASHA on `metric`, its time the optimizer step, its first rung after `grace` steps,
    recording which trials it stopped (`.stopped`: trial ids).

    Its rungs stay below train.max_steps (max_t = max_steps - 1, and the last trials are not
    stopped): a trial that got to its last evaluation is never stopped there, before the run's
    final checkpoint is written.
    """
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def __init__(self):
            super().__init__(time_attr="step", metric=metric, mode=METRICS[metric], max_t=max_steps - 1,
                             grace_period=grace, reduction_factor=reduction_factor, stop_last_trials=False)
            self.stopped: set[str] = set()

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                self.stopped.add(trial.trial_id)
            return action

    return RecordingASHA()


def tune_fit(cfg: Config, params: list, *, name: str, metric: str, samples: int, scheduler, concurrent: int,
             storage_options: dict):
    """Tune's run of the trials; returns its ResultGrid. Its experiment state goes to
    `<run.storage_path>/<name>.tune`, through the same filesystem as the runs."""
    from ray import tune

    filesystem, path = storage.pyarrow_filesystem(cfg.run.storage_path, storage_options)
    trainable = tune.with_resources(tune.with_parameters(run_trial, cfg=cfg, sweep=name, metric=metric),
                                    TRIAL_DRIVER)
    tuner = tune.Tuner(
        trainable,
        param_space=sweep_space.search_space(params),
        tune_config=tune.TuneConfig(num_samples=samples, scheduler=scheduler, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=f"{name}.tune", storage_path=path, storage_filesystem=filesystem, verbose=1),
    )
    return tuner.fit()


def run_trial(params: dict, *, cfg: Config, sweep: str, metric: str) -> None:
    """One trial, in its Tune actor: an ordinary ssl_dist run of `cfg` with `params`, whose
    evaluations reach Tune."""
    import ray.tune

    from ssl_dist import launch

    trial_cfg = sweep_space.apply(cfg, params, run_name=trial_run_name(sweep, ray.tune.get_context().get_trial_id()))
    launch.pretrain(trial_cfg, callbacks=[forward_scores(metric)])


def forward_scores(metric: str):
    """A Ray Train callback, run by the trial's Train controller, that hands Tune the reports
    carrying `metric` (the evaluations; rank 0's, which holds the scores). The checkpointer's
    reports (step, samples seen) stay with Ray Train: Tune would refuse a result without the
    metric it ranks by."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ForwardScores(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ForwardScores()


def trial_of(result, cfg: Config, sweep: str, metric: str, stopped: set[str], storage_options: dict,
             explain: Callable[[BaseException], str | None]) -> Trial:
    """The table's row of one Tune result."""
    from ssl_dist import launch

    trial_id = result.metrics["trial_id"]
    params = dict(result.config or {})
    run_url = launch.run_url(config_lib.merge(cfg, {"run": {"name": trial_run_name(sweep, trial_id)}},
                                              origin="sweep trial"))
    if result.error is not None:
        cause = result.error
        while getattr(cause, "cause", None) is not None:  # Ray's RayTaskError wraps the trial's own error
            cause = cause.cause
        first_line = (str(cause).strip().splitlines() or [""])[0]
        status, error = FAILED, explain(cause) or f"{type(cause).__name__}: {first_line} (its trace is in the log)"
    else:
        status, error = (STOPPED if trial_id in stopped else FINISHED), ""
    step = steps_reached(run_url, storage_options, result.metrics.get("step"))
    return Trial(trial_id=trial_id, run_url=run_url, params=params, step=step, score=result.metrics.get(metric),
                 status=status, error=error)


def steps_reached(run_url: str, options: dict, reported: int | None) -> int | None:
    """The newest step in the run folder's metrics (a stopped trial may have gone on a few
    steps past its last evaluation before it stopped), else the last reported one."""
    from ssl_dist import metrics

    try:
        history = metrics.read_history(run_url, options)
    except Exception:  # noqa: BLE001 (a trial that failed before writing metrics)
        return reported
    steps = [int(row["step"]) for attempt in history for row in attempt if row.get("step")]
    return max(steps) if steps else reported


def best_trial(trials: list[Trial], mode: str) -> Trial | None:
    """The best scored trial among those that ran to their end, else among those ASHA stopped
    (which it judged worse at a rung, on fewer steps)."""
    for pool in ([t for t in trials if t.status == FINISHED], [t for t in trials if t.status == STOPPED]):
        scored = [t for t in pool if t.score is not None]
        if scored:
            return (max if mode == "max" else min)(scored, key=lambda t: t.score)
    return None


def table(trials: list[Trial], metric: str) -> str:
    """The trials, one a line: id, values, steps reached, metric, status."""
    rows = [("trial", "params", "steps", metric, "status")]
    for t in trials:
        rows.append((t.trial_id, sweep_space.describe(t.params), "-" if t.step is None else str(t.step),
                     "-" if t.score is None else f"{t.score:.4f}", t.status + (f": {t.error}" if t.error else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)


def write_best(path: str, cfg: Config) -> None:
    """The best trial's resolved config, as `ssl-dist pretrain --config` reads it."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(config_lib.dump_yaml(cfg))
