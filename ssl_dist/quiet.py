"""Third-party lines that tell a user nothing they can act on, silenced where they are made.

Each line is matched by the logger (or warning category) that makes it and the start of its
exact message: nothing else from those libraries is hidden, stdout and stderr are left alone,
and Ray still deduplicates repeated worker lines. A worker's own errors, and any warning not
listed here, still show.

`install` runs in the driver and, as Ray's `worker_process_setup_hook` (`runtime_env`, used by
`launch.connect_ray`), in every process of the run's job, before its first line: Ray Train's
controller, its workers, and what they fork (the data loader's workers).

What is dropped everywhere, and why it carries no information:

- DeepSpeed's "Setting accelerator to CPU. If you have GPU ..." (every rank and the driver's
  evaluation): the config already says where a run trains (`run.use_gpu`).
- torch's "No CUDA runtime is found, using CUDA_HOME=..." (every rank, from DeepSpeed's op
  builder): no CUDA op is built on a CPU run.
- torch's FutureWarning "`torch.distributed.all_gather_into_tensor` is deprecated" (every rank,
  from DeepSpeed's ZeRO, not ssl-dist's code): only DeepSpeed can act on it.
- Ray Train's "Checkpoint successfully created at: ..." and "Reporting training result N: ..."
  (every rank at every checkpoint): a failed checkpoint is an error, which still shows.
- Ray Train's PlacementGroupCleaner's "Found multiple active Ray instances" traceback, when
  another Ray runs on the machine: each worker is told its own cluster's address.

Dropped on a local Ray only (`install_local`, `LOCAL_ENV`), where the whole run is this machine:

- Ray Train's start-up lines ("Requesting resources", "Attempting to start training worker
  group", "Started training worker group" with a line per worker, "Setting up process group
  for"). On a cluster they say where each rank runs, and stay.
- Ray core's `core_worker.cc ... E` line about the PreemptionWatcher actor: Ray Train starts
  that actor to watch for nodes being drained (spot preemption); a local Ray started by this
  driver has one node and no autoscaler to drain it, so the watcher is not started at all.

Not silenced: DeepSpeed's "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
successfully", a bare print() (one line a rank; Ray Train also logs a copy of every print,
which is dropped): only a wrapper around stdout could drop it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings


def _ray_train_context_logger() -> str:
    """The name of Ray Train's context.py logger: `logging.getLogger(__file__)`, that module's
    path, found from Ray's package folder without importing Ray."""
    spec = importlib.util.find_spec("ray")
    ray_dir = os.path.dirname(spec.origin) if spec is not None and spec.origin else "ray"
    return os.path.join(ray_dir, "train", "v2", "_internal", "execution", "context.py")


# {logger name: patterns matched at the start of the formatted message}
LOG_LINES = {
    "DeepSpeed": (r"Setting accelerator to CPU\. If you have GPU",),
    "torch.utils.cpp_extension": (r"No CUDA runtime is found, using CUDA_HOME=",),
    # the root logger: Ray Train's workers log a copy of every print(), here of DeepSpeed's
    "": (r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully$",),
    "ray.train.v2._internal.execution.storage": (r"Checkpoint successfully created at: ",),
    _ray_train_context_logger(): (r"Reporting training result \d+: TrainingReport\(",),
}
LOCAL_LOG_LINES = {
    "ray.train.v2._internal.execution.scaling_policy.scaling_policy": (r"Requesting resources: ",),
    "ray.train.v2._internal.execution.worker_group.worker_group": (
        r"Attempting to start training worker group of size \d+ ", r"Started training worker group of size \d+: "),
    "ray.train.torch.config": (r"Setting up process group for: ",),
}
WARNINGS = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),)

# Ray Train's switch for its PreemptionWatcher actor (ray.train.v2._internal.constants).
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class DropLines(logging.Filter):
    """A logger's filter that drops the records whose message matches one of `patterns`."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = tuple(patterns)
        self._compiled = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self._compiled)


def install() -> None:
    """Drop the lines of `LOG_LINES` and `WARNINGS` in this process (idempotent), and in a Ray
    worker name its own cluster (`_name_own_cluster`). Cheap: it imports no package, so Ray
    may run it in every worker process it starts."""
    _add(LOG_LINES)
    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    _name_own_cluster()


def install_local() -> None:
    """`install`, and Ray Train's start-up lines (`LOCAL_LOG_LINES`): for a local Ray."""
    install()
    _add(LOCAL_LOG_LINES)


def runtime_env(*, local: bool) -> dict:
    """The `ray.init(runtime_env=...)` that installs the filters in every process of the job;
    with `local`, for a Ray started by this driver, also without the PreemptionWatcher."""
    hook = f"{__name__}.{'install_local' if local else 'install'}"
    return {"worker_process_setup_hook": hook, **({"env_vars": dict(LOCAL_ENV)} if local else {})}


def _add(table: dict) -> None:
    for name, patterns in table.items():
        logger = logging.getLogger(name or None)
        if not any(isinstance(f, DropLines) and f.patterns == tuple(patterns) for f in logger.filters):
            logger.addFilter(DropLines(patterns))


def _name_own_cluster() -> None:
    """In a Ray worker process without RAY_ADDRESS: RAY_ADDRESS = its own cluster's GCS.

    Ray Train's PlacementGroupCleaner asks the state API about the controller without an
    address; with a second Ray on the machine (a `ray start` cluster, another quickstart) it
    found both, and printed a ConnectionError traceback ("Found multiple active Ray
    instances") into the run's output. A process where Ray is not connected (a driver
    before `ray.init`) is left alone."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; nothing else need
    if os.environ.get("RAY_ADDRESS") or ray is None or not ray.is_initialized():
        return
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
