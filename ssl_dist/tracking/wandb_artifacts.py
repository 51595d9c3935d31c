"""A run's results on Weights & Biases: curves.png and the exported encoder as one artifact,
logged at the run's end by the driver (`parent.RunTracking.finish`) from a short run of its
own, `<run name>-artifacts` (job_type "artifacts"), in the group of the attempts' runs.

Offline (WANDB_MODE=offline), that run's folder is copied into the run folder beside the
attempts' (`<run>/wandb/offline-run-...`, `wandb_sink.copy_offline`). W&B keeps an offline
artifact's files in its data folder on the machine that logged it (WANDB_DATA_DIR,
~/.local/share/wandb by default), which the run's folder names: `wandb sync` of that folder
uploads the artifact from the driver's machine; elsewhere the run syncs without it.
"""

from __future__ import annotations

import os
import re
import tempfile

from ssl_dist.tracking import warning, within
from ssl_dist.tracking.wandb_sink import SETTINGS, copy_offline, finish_run, offline_copy_url

UPLOAD_WAIT_S = 300.0  # an encoder's weights, tens to hundreds of MB: the run's end never waits longer


def log_artifacts(settings: dict, *, curves: str | None, encoder: str | None, run_url: str, storage_options: dict,
                  say=print) -> None:
    """Log `curves` (a local curves.png) and `encoder` (a local folder, what `export_encoder`
    wrote), those that are not None, as one artifact of a new W&B run in the group of
    `settings` (`RunTracking.wandb`). Driver only, once, at a successful run's end; waits
    at most wandb's init_timeout and UPLOAD_WAIT_S; never raises (an error is one warning)."""
    name = f"W&B project {settings['project']}"
    tmp = tempfile.TemporaryDirectory(prefix="ssl-dist-wandb-", ignore_cleanup_errors=True)
    try:
        import wandb

        run = wandb.init(project=settings["project"], entity=settings["entity"] or None, group=settings["group"],
                         name=f"{settings['group']}-artifacts", job_type="artifacts",
                         config={"ssl_dist": {"driver_attempt": settings["driver_attempt"], "run_url": run_url}},
                         dir=tmp.name, mode=settings["mode"], reinit="create_new",
                         settings=wandb.Settings(**SETTINGS))
        run.log_artifact(_artifact(wandb, settings["group"], curves, encoder, run_url))
        link, copy_url = run.url, offline_copy_url(run, run_url)
        if not within(UPLOAD_WAIT_S, lambda: finish_run(run)):  # online: the upload happens here
            warning(name, f"its artifacts were not uploaded within {UPLOAD_WAIT_S:.0f} s", run_url,
                    scope="the rest of this run")
            return
        if copy_url is None:
            say(f"W&B: curves and encoder logged to run {run.name} ({link})")
            return
        copy_offline(run.settings.sync_dir, copy_url, storage_options)
        say(f"W&B offline artifacts run: {copy_url}; upload it with `wandb sync <folder>` (a local copy of that "
            f"folder) on this machine, where W&B keeps the artifact's files "
            f"({os.path.join(wandb.env.get_data_dir(), 'artifacts', 'staging')})")
    except Exception as err:  # noqa: BLE001 (a tracker never fails a run)
        warning(name, err, run_url, scope="the rest of this run")
    finally:
        tmp.cleanup()


def _artifact(wandb, group: str, curves: str | None, encoder: str | None, run_url: str):
    """The artifact: curves.png at its top, the encoder's files under encoder/ (a "model" when
    there is one). Files are added one by one: add_dir prints a line to the job's log."""
    from ssl_dist import plots

    artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]", "-", group),  # W&B's characters for an artifact's name
                              type="model" if encoder else "curves", metadata={"run_url": run_url})
    if curves:
        artifact.add_file(curves, name=plots.PNG_NAME)
    for folder, _, files in sorted(os.walk(encoder)) if encoder else ():
        for file in sorted(files):
            path = os.path.join(folder, file)
            artifact.add_file(path, name="encoder/" + os.path.relpath(path, encoder).replace(os.sep, "/"))
    return artifact
