"""Experiment tracking beside the run folder's CSV and TensorBoard files: MLflow and Weights & Biases.

The driver (`launch.pretrain`) opens the run's MLflow run, the parent (`parent.open_run`):
the resolved config as parameters, the run's name, folder and driver attempt as tags, found
again by its `ssl_dist.run_url` tag when the run folder is resumed; at the end the curves and
the exported encoder become its artifacts. Each start of the worker group is an attempt, as
in the metrics CSVs: rank 0 gives its `MetricsLog` one sink per tracker (`attempt_sinks`),
an MLflow run nested under the parent and a W&B run grouped by the run's name, both named
after the attempt's CSV, so a restart shows as a second line over the same steps.

A tracker never fails a run: the driver checks the server first, in seconds; an error later
is one warning line (`warning`), and that tracker is off for the rest of the attempt. The
CSV and TensorBoard files stay the record either way.

Only the clients' own APIs are used (`MlflowClient(tracking_uri=...)`, `wandb.init(...)`
returning its run): Ray Train v2's RunConfig takes no logger callbacks, and Ray's
`setup_mlflow` / `setup_wandb` set the libraries' module-wide active run, one per call,
with no nested runs and no request timeouts.
"""

from __future__ import annotations

import importlib.util
import sys
import threading

# What `pip install` brings each tracker's client (the project's extras)
EXTRAS = {"mlflow": "track.mlflow_uri", "wandb": "track.wandb_project"}


def check_clients(cfg) -> None:
    """A LaunchError naming the extra to install when a tracker is configured and its client
    package is missing. Driver only, before any worker starts."""
    from ssl_dist.launch import LaunchError

    for package, key in EXTRAS.items():
        if cfg.get(key) and importlib.util.find_spec(package) is None:
            raise LaunchError(f"{key}={cfg.get(key)} needs the {package} package, which is not installed: "
                              f"pip install 'ssl-dist[{package}]'")


def warning(tracker: str, err: BaseException | str, run_url: str, *, scope: str = "this attempt") -> None:
    """The one line a failing tracker gives (stderr, which Ray forwards from the workers)."""
    what = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    what = " ".join(what.split())  # one line: a client's message may span several
    what = what if len(what) <= 300 else what[:297] + "..."
    sys.stderr.write(f"[ssl-dist] warning: {tracker} failed ({what}); it is off for {scope}, and the metrics CSV "
                     f"and TensorBoard files in {run_url} remain the record\n")
    sys.stderr.flush()


def attempt_sinks(tracking: dict | None, cfg, *, attempt: str, run_url: str, storage_options: dict,
                  say=print) -> list:
    """The sinks of this attempt's metric rows (rank 0 only): an MLflow run nested under the
    driver's parent run, a W&B run; each only where the driver configured it in `tracking`
    (`parent.RunTracking.for_workers`). A tracker that cannot start gives one warning and no sink."""
    sinks = []
    tracking = tracking or {}
    if tracking.get("mlflow"):
        from ssl_dist.tracking.mlflow_sink import MlflowSink

        sinks.append(MlflowSink(**tracking["mlflow"], attempt=attempt, run_url=run_url))
    if tracking.get("wandb"):
        try:
            from ssl_dist.tracking.wandb_sink import WandbSink

            sinks.append(WandbSink(**tracking["wandb"], cfg=cfg, attempt=attempt, run_url=run_url,
                                   storage_options=storage_options, say=say))
        except Exception as err:  # noqa: BLE001 (a tracker never fails a run)
            warning("W&B", err, run_url)
    return sinks


def within(seconds: float, fn) -> bool:
    """Run `fn()` in a daemon thread and wait for it at most `seconds`; True if it ended. Its
    error, if it ended with one, is raised here. For a client's call that may block on a
    network that is gone (a run's last upload), so that a run's end never waits on it."""
    outcome: dict = {}

    def call():
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 (re-raised in the caller's thread)
            outcome["error"] = err

    thread = threading.Thread(target=call, name="ssl-dist-tracking", daemon=True)
    thread.start()
    thread.join(seconds)
    if "error" in outcome:
        raise outcome["error"]
    return not thread.is_alive()
