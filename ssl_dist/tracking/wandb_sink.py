"""One attempt's Weights & Biases run: rank 0's metric rows with step = optimizer step,
grouped by the run's name (one W&B run per attempt, as one CSV and one TensorBoard file).

`wandb.init` returns its run object, used as such (no module-wide `wandb.log`); `run.log`
hands the row to wandb's own service process and returns, so a slow network never stalls a
step. In offline mode (WANDB_MODE=offline, for clusters without internet) the run lives in a
local folder, copied into the run folder (`<run>/wandb/offline-run-...`, on object storage
too) at every flush and at the end, where `wandb sync` uploads it later.
"""

from __future__ import annotations

import os
import tempfile

from ssl_dist import storage
from ssl_dist.tracking import warning, within
from ssl_dist.tracking.params import nested_config

WANDB_DIR = "wandb"  # in the run folder: the offline runs' copies
INIT_TIMEOUT_S = 30.0  # wandb's default, 90 s, is that long a stall of rank 0 when the network is gone
FINISH_WAIT_S = 60.0  # an online run's last upload; the attempt's end never waits longer

# Quiet: no banner or links in the job's log, stdout left to Ray (wandb's console capture would
# wrap what Ray already redirects), no code or git state saved with the run.
SETTINGS = {"silent": True, "console": "off", "disable_git": True, "disable_code": True, "save_code": False,
            "disable_job_creation": True, "init_timeout": INIT_TIMEOUT_S,
            # write the offline run's file every second, so a copy taken at a flush holds the rows
            "x_transaction_log_flush_interval": 1.0}


class WandbSink:
    """Rank 0's W&B run of one attempt (see the module's docstring). Made by
    `tracking.attempt_sinks`; wandb.init's error (no API key online, no network) is the caller's."""

    def __init__(self, *, project: str, entity: str, group: str, mode: str | None, driver_attempt: str, cfg,
                 attempt: str, run_url: str, storage_options: dict, say=print):
        import wandb

        self.name = f"W&B project {project}"
        self.run_url, self.options, self.say = run_url, storage_options, say
        self._tmp = tempfile.TemporaryDirectory(prefix="ssl-dist-wandb-")
        self.run = wandb.init(project=project, entity=entity or None, group=group, name=attempt, job_type="pretrain",
                              config={**nested_config(cfg), "ssl_dist": {"driver_attempt": driver_attempt,
                                                                         "run_url": run_url}},
                              dir=self._tmp.name, mode=mode, reinit="create_new", settings=wandb.Settings(**SETTINGS))
        self.copy_url = offline_copy_url(self.run, run_url)

    def log(self, step: int, values: dict[str, float]) -> None:
        """One row's numbers at `step` (wandb sends them in the background)."""
        self.run.log(values, step=step)

    def flush(self) -> None:
        """Offline: copy the run's folder as it is now into the run folder."""
        if self.copy_url is not None:
            self._copy()

    def close(self) -> None:
        """End the W&B run (waiting at most FINISH_WAIT_S); offline, copy its folder a last time
        and say how to upload it."""
        try:
            if not within(FINISH_WAIT_S, lambda: finish_run(self.run)):
                warning(self.name, f"the run did not finish within {FINISH_WAIT_S:.0f} s", self.run_url)
                return
            if self.copy_url is not None:
                self._copy()
                self.say(f"W&B offline run: {self.copy_url}; upload it with `wandb sync <folder>` on a machine with "
                         f"internet (a local copy of that folder)")
        finally:
            self._tmp.cleanup()

    def _copy(self) -> None:
        copy_offline(self.run.settings.sync_dir, self.copy_url, self.options)


def finish_run(run) -> None:
    """End `run`; offline, also wait until wandb's service has closed the run's file, so that a
    copy holds all of it. run.finish() only tells the service to close the file (its last
    step, `inform_finish`, does not wait) and the file may hold its header alone until then;
    wandb.teardown() waits for the service process to exit, which closes every file. The
    calling process holds one W&B run at a time (rank 0's attempt, or the driver's artifacts
    run), so nothing else uses that service; the next wandb.init starts a new one."""
    import wandb

    run.finish()
    if run.offline:
        wandb.teardown()


def offline_copy_url(run, run_url: str) -> str | None:
    """Where an offline W&B run's folder is copied: `<run>/wandb/offline-run-...`; None online."""
    return storage.join(run_url, WANDB_DIR, os.path.basename(run.settings.sync_dir)) if run.offline else None


def copy_offline(local: str, url: str, options: dict) -> None:
    """Copy the offline run's folder `local` (its sync_dir) as it is now to `url`, file by file
    (object storage has no folders to copy)."""
    fs, path = storage.filesystem(url, options)
    for folder, _, files in os.walk(local):
        relative = os.path.relpath(folder, local)
        target = path if relative == "." else f"{path}/{relative}"
        fs.makedirs(target, exist_ok=True)
        for name in files:
            fs.put_file(os.path.join(folder, name), f"{target}/{name}")
