"""The driver's side of a run's tracking: its MLflow run (the parent of every attempt's run),
and what the workers need to log their attempts (MLflow and W&B).

One MLflow run per ssl-dist run, found again by its `ssl_dist.run_url` tag when the run
folder is resumed (another driver, a later day), so that every attempt of the run hangs
under the same parent. Its parameters are the resolved config (`params.flat_params`); its
artifacts, at the end, the curves and the exported encoder, which W&B gets too, from a short
run of the driver's in the run's group (`wandb_artifacts`).
"""

from __future__ import annotations

import os
import tempfile

from ssl_dist import storage
from ssl_dist.tracking import warning
from ssl_dist.tracking.mlflow_sink import (TAG_DRIVER_ATTEMPT, TAG_PARENT, TAG_RUN_NAME, TAG_RUN_URL, http_limits)
from ssl_dist.tracking.params import flat_params

CHECK = {"timeout": 3, "retries": 0}  # the driver's first request: a server that is down costs seconds
CALLS = {"timeout": 10, "retries": 1}
UPLOAD = {"timeout": 300, "retries": 2}  # an encoder's weights: tens to hundreds of MB
MAX_PARAMS = 100  # parameters in one log_batch request (MLflow's limit)


class RunTracking:
    """What `open_run` set up: the MLflow parent run (`mlflow`: uri, experiment_id,
    parent_run_id; None when MLflow is off or unreachable) and the W&B settings (`wandb`)."""

    def __init__(self, run_url: str, *, mlflow: dict | None = None, wandb: dict | None = None):
        self.run_url, self.mlflow, self.wandb = run_url, mlflow, wandb
        self.finished = False

    def for_workers(self) -> dict:
        """The loop config's "tracking": what rank 0 needs to open its attempt's sinks."""
        return {"mlflow": self.mlflow, "wandb": self.wandb}

    def finish(self, *, failed: bool = False, checkpoint_url: str | None = None, storage_options: dict | None = None,
               say=print) -> None:
        """End the run's tracking. When it succeeded, the run folder's curves.png (when drawn)
        and the encoder exported from `checkpoint_url` (the run folder's newest complete
        checkpoint when None), exported once for both trackers, become the artifacts of the
        MLflow parent run and of a W&B artifacts run in the run's group (`wandb_artifacts`).
        The parent run ends FAILED or FINISHED; an attempt run still RUNNING ended without
        closing (a killed worker): it is marked FAILED. Driver only; once; never raises."""
        if self.finished or (self.mlflow is None and self.wandb is None):
            return
        self.finished = True
        options = storage_options or {}
        with tempfile.TemporaryDirectory(prefix="ssl-dist-artifacts-") as tmp:
            curves, encoder = (None, None) if failed else self._artifact_files(tmp, checkpoint_url, options)
            if self.mlflow is not None:
                self._finish_mlflow(failed, curves, encoder, say)
            if self.wandb is not None and (curves or encoder):
                from ssl_dist.tracking.wandb_artifacts import log_artifacts

                log_artifacts(self.wandb, curves=curves, encoder=encoder, run_url=self.run_url,
                              storage_options=options, say=say)

    def _artifact_files(self, tmp: str, checkpoint_url: str | None, options: dict) -> tuple[str | None, str | None]:
        """(local curves.png, local folder of the exported encoder) in `tmp`, None for what is
        not there or cannot be had (one warning: a run's artifacts may be the curves alone)."""
        from ssl_dist import export, plots

        trackers = " and ".join(([f"MLflow at {self.mlflow['uri']}"] if self.mlflow else []) +
                                ([f"W&B project {self.wandb['project']}"] if self.wandb else []))
        curves, encoder = os.path.join(tmp, plots.PNG_NAME), os.path.join(tmp, "encoder")
        try:
            fs, path = storage.filesystem(storage.join(self.run_url, plots.PNG_NAME), options)
            if fs.exists(path):
                fs.get_file(path, curves)
        except Exception as err:  # noqa: BLE001 (a tracker never fails a run)
            warning(f"{trackers} (reading curves.png)", err, self.run_url, scope="the curves artifact")
            if os.path.exists(curves):
                os.remove(curves)  # a part of it is no artifact
        try:
            export.export_encoder(checkpoint_url or self.run_url, encoder, options)
        except Exception as err:  # noqa: BLE001 (ExportError: no complete checkpoint; the artifacts are the curves)
            warning(f"{trackers} (exporting the encoder)", err, self.run_url, scope="the encoder artifact")
            encoder = None
        return (curves if os.path.exists(curves) else None), encoder

    def _finish_mlflow(self, failed: bool, curves: str | None, encoder: str | None, say) -> None:
        from mlflow.tracking import MlflowClient

        client, run_id = MlflowClient(tracking_uri=self.mlflow["uri"]), self.mlflow["parent_run_id"]
        try:
            if curves or encoder:
                with http_limits(**UPLOAD):
                    if curves:
                        client.log_artifact(run_id, curves)
                    if encoder:
                        client.log_artifacts(run_id, encoder, artifact_path="encoder")
                logged = " and ".join(what for what, file in (("curves", curves), ("encoder", encoder)) if file)
                say(f"MLflow: {logged} logged to run {run_id}")
            with http_limits(**CALLS):
                for child in client.search_runs([self.mlflow["experiment_id"]],
                                                filter_string=f"tags.`{TAG_PARENT}` = '{run_id}' and "
                                                              f"attributes.status = 'RUNNING'"):
                    client.set_terminated(child.info.run_id, "FAILED")
                client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        except Exception as err:  # noqa: BLE001 (a tracker never fails a run)
            warning(f"MLflow at {self.mlflow['uri']}", err, self.run_url, scope="the rest of this run")


def open_run(cfg, *, run_url: str, attempt: str, resume: bool | None, say=print) -> RunTracking:
    """Set up the run's tracking (driver only, its lease held, before the trainer starts): the
    MLflow parent run, created, or found again by its run_url tag unless the run starts over
    (`resume` False); the W&B settings for the workers, WANDB_MODE taken from the driver's
    environment (the user's choice, which a cluster's workers would not see). A server that
    is down or refuses gives one warning, and MLflow is off for this run."""
    tracking = RunTracking(run_url)
    if cfg.track.mlflow_uri:
        tracking.mlflow = _open_mlflow(cfg, run_url, attempt, resume, say)
    if cfg.track.wandb_project:
        tracking.wandb = {"project": cfg.track.wandb_project, "entity": cfg.track.wandb_entity,
                          "group": cfg.run.name, "mode": os.environ.get("WANDB_MODE") or None,
                          "driver_attempt": attempt}
    return tracking


def _open_mlflow(cfg, run_url: str, attempt: str, resume: bool | None, say) -> dict | None:
    from mlflow.tracking import MlflowClient

    uri = cfg.track.mlflow_uri
    client = MlflowClient(tracking_uri=uri)
    try:
        with http_limits(**CHECK):
            experiment = client.get_experiment_by_name(cfg.track.experiment)
        with http_limits(**CALLS):
            experiment_id = (experiment.experiment_id if experiment is not None
                             else client.create_experiment(cfg.track.experiment))
            tags = {TAG_RUN_NAME: cfg.run.name, TAG_RUN_URL: run_url, TAG_DRIVER_ATTEMPT: attempt}
            parent = None if resume is False else _find_parent(client, experiment_id, run_url)
            if parent is None:
                parent = client.create_run(experiment_id, run_name=cfg.run.name, tags=tags)
                _log_params(client, parent.info.run_id, flat_params(cfg))
                found = "created"
            else:
                client.update_run(parent.info.run_id, status="RUNNING")
                for key, value in tags.items():
                    client.set_tag(parent.info.run_id, key, value)
                _log_params(client, parent.info.run_id, flat_params(cfg), logged=parent.data.params)
                found = "resumed"
    except Exception as err:  # noqa: BLE001 (a tracker never fails a run)
        warning(f"MLflow at {uri}", err, run_url, scope="this run")
        return None
    run_id = parent.info.run_id
    link = f" ({uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})" if uri.startswith("http") else ""
    say(f"MLflow: {found} run {run_id} in experiment {cfg.track.experiment}{link}")
    return {"uri": uri, "experiment_id": experiment_id, "parent_run_id": run_id, "driver_attempt": attempt}


def _find_parent(client, experiment_id: str, run_url: str):
    """The newest run of the experiment tagged with this run folder (not an attempt's), or None."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_RUN_URL}` = '{run_url}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    return next((run for run in runs if TAG_PARENT not in run.data.tags), None)


def _log_params(client, run_id: str, params: dict[str, str], logged: dict | None = None) -> None:
    """Log `params` in batches. On a resumed parent (`logged`: what it holds), MLflow refuses a
    new value for a logged key: a key whose value changed (the resume's overrides) is kept as
    the tag `ssl_dist.resumed.<key>` with its new value instead."""
    from mlflow.entities import Param

    logged = logged or {}
    new = [Param(key, value) for key, value in params.items() if key not in logged]
    for start in range(0, len(new), MAX_PARAMS):
        client.log_batch(run_id, params=new[start:start + MAX_PARAMS])
    for key, value in params.items():
        if key in logged and logged[key] != value:
            client.set_tag(run_id, f"ssl_dist.resumed.{key}", value)
