"""Driver side of a run: connect to (or start) Ray, build the TorchTrainer, run it.

Runs on the machine that submits (a laptop, or the Ray job's driver on a cluster).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ssl_dist import config as config_lib
from ssl_dist import shards, storage


class LaunchError(RuntimeError):
    """A user-facing problem found before or while starting a run."""


@dataclass
class RunResult:
    """What a finished run leaves: its folder, its newest checkpoint and its curves."""

    run_url: str
    checkpoint_url: str | None
    metrics: dict
    curves_url: str | None = None  # the run folder's curves.png, when rank 0 wrote metrics to draw


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address` / RAY_ADDRESS, or start a local one.

    A local cluster listens on the machine's address, so it starts with Ray's token
    authentication, its token kept in the user's Ray folder and readable by them only
    (`ray_token.local_auth_mode`), unless the user set RAY_AUTH_MODE themselves. A cluster
    at an address has its own mode: RAY_AUTH_MODE and the token come from the caller.

    Either way every process of the job (Ray Train's controller and workers) starts with
    `ssl_dist.quiet`'s filters on the third-party lines a user cannot act on; a local Ray
    also drops Ray Train's start-up lines and does without its PreemptionWatcher (one node,
    nothing drains it). Ray's deduplication of repeated worker lines stays on.
    """
    import ray

    from ssl_dist import quiet, ray_token

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and ray_token.local_auth_mode(os.environ) == "token":
        # Ray read RAY_AUTH_MODE when it was imported: refresh its config so that this driver
        # is in token mode too, as ray.init does when it turns token mode on by itself.
        from ray._raylet import Config

        Config.initialize("")
    # Workers inherit the driver's environment on a local cluster: that is how they find
    # the S3 endpoint and credentials without either being written into the config.
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=quiet.runtime_env(local=False))
    else:
        # The dashboard process also serves the state API that Ray Train's clean-up uses.
        ray.init(num_cpus=num_cpus, log_to_driver=True, runtime_env=quiet.runtime_env(local=True))


def run_url(cfg) -> str:
    """Folder of the run: `storage_path/name`."""
    return storage.join(cfg.run.storage_path, cfg.run.name)


def preflight(cfg) -> tuple[dict, dict]:
    """Check the data and the storage before any worker starts; returns (data, storage) options.

    A missing bucket, refused credentials or a missing manifest is one clear error here,
    in seconds, instead of a stack trace from every worker after a cluster start-up.
    """
    if not cfg.data.train_url:
        raise LaunchError("data.train_url is empty: set it to a folder of shards (with index.json), e.g. "
                          "data.train_url=s3://bucket/shards, or make some with `ssl-dist shards make SRC DEST`")
    from ssl_dist import model  # (here: torch, and timm for a timm encoder, only once a run is started)
    model.check_arch(cfg)  # a timm encoder no worker could build: its name, kwargs, image size
    data_options = storage.options_from_config(cfg.data.train_url, cfg.storage)
    storage_options = storage.options_from_config(cfg.run.storage_path, cfg.storage)
    storage.check_bucket(cfg.data.train_url, data_options)
    manifest = shards.read_manifest(cfg.data.train_url, data_options)
    total = sum(s["num_samples"] for s in manifest["shards"])
    if total < cfg.data.batch_size * cfg.run.num_workers:
        raise LaunchError(f"{cfg.data.train_url} holds {total} samples, fewer than one global batch "
                          f"({cfg.data.batch_size} x {cfg.run.num_workers} workers): lower data.batch_size")
    check_method(cfg, manifest)
    storage.check_writable_root(cfg.run.storage_path, storage_options)
    check_eval_sets(cfg)
    return data_options, storage_options


def check_method(cfg, manifest: dict) -> None:
    """`method.name` names a usable method, and the shards carry the fields it needs (where
    the manifest lists its samples' fields)."""
    from ssl_dist import decode, methods

    try:
        method = methods.resolve(cfg.method.name)
        method.check(cfg)
    except methods.MethodError as err:
        raise LaunchError(str(err)) from None
    if "fields" not in manifest:
        return
    have = set(manifest["fields"]) | ({"image"} if set(manifest["fields"]) & set(decode.IMAGE_EXTS) else set())
    missing = [name for name in method.fields if name not in have]
    if missing:
        raise LaunchError(f"method.name={cfg.method.name} needs the sample fields {', '.join(missing)}, and the "
                          f"shards at {cfg.data.train_url} hold {', '.join(manifest['fields'])}: point "
                          f"data.train_url at shards that carry them")


def check_eval_sets(cfg) -> None:
    """What `eval.every` scores during training can be scored: the labeled sets exist and
    have a manifest; an image-only method has kNN's eval.train_url; an image-text method's
    test set names its classes and its templates file reads (zero-shot)."""
    from ssl_dist import methods, zero_shot
    from ssl_dist.evaluate import EvaluationError

    if not cfg.eval.every:
        return
    image_text = "txt" in methods.resolve(cfg.method.name).fields
    if not image_text and not cfg.eval.train_url:
        raise LaunchError(f"eval.every={cfg.eval.every} with method.name={cfg.method.name} scores kNN, which needs "
                          f"neighbours: set eval.train_url to a small labeled set")
    for url in (cfg.eval.train_url, cfg.eval.test_url):
        if not url:
            continue
        options = storage.options_from_config(url, cfg.storage)
        storage.check_bucket(url, options)
        try:
            shards.read_manifest(url, options)
        except shards.ShardError as err:
            raise LaunchError(f"eval set {url}: {err}") from None
    if image_text:
        try:
            zero_shot.class_names(cfg.eval.test_url, storage.options_from_config(cfg.eval.test_url, cfg.storage))
            if cfg.eval.templates:
                zero_shot.read_templates(cfg.eval.templates, storage.options_from_config(cfg.eval.templates,
                                                                                         cfg.storage))
        except EvaluationError as err:
            raise LaunchError(f"eval.every={cfg.eval.every} (zero-shot during training): {err}") from None


def write_resolved_config(cfg, storage_options: dict) -> str:
    """Write the resolved config (never credentials: the config holds none) to the run folder."""
    url = storage.join(run_url(cfg), "config.yaml")
    storage.write_text(url, config_lib.dump_yaml(cfg), storage_options)
    return url


def build_trainer(cfg, *, data_options: dict, storage_options: dict, attempt: str = "", callbacks=(),
                  tracking: dict | None = None):
    """The Ray Train TorchTrainer of a run (driver side; nothing starts until `fit`).
    `callbacks`: Ray Train UserCallbacks of the caller's (a sweep's Tune reporter), run by the
    controller beside ssl-dist's own. `tracking`: what rank 0 logs each attempt to
    (`tracking.parent.RunTracking.for_workers`: the MLflow parent run, W&B's settings)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    filesystem, path = storage.pyarrow_filesystem(cfg.run.storage_path, storage_options)
    loop_config = {"config": cfg, "run_url": run_url(cfg), "data_options": data_options,
                   "storage_options": storage_options, "attempt": attempt, **user_method(cfg)}
    if tracking:
        loop_config["tracking"] = tracking
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        # the default group's collectives (the loss's gathers) give up after run.collective_timeout_s
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo",
                                 timeout_s=math.ceil(cfg.run.collective_timeout_s)),
        scaling_config=ray.train.ScalingConfig(num_workers=worker_range(cfg), use_gpu=cfg.run.use_gpu,
                                               resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            callbacks=[stop_on_fatal(), *callbacks],
        ),
    )


def stop_on_fatal():
    """A Ray Train callback, run by its controller, that ends the run at once with a worker's
    error when that error is one a restart cannot fix (`failures.is_fatal`: the config, the
    method, data past data.max_skip_fraction, no usable checkpoint), instead of restarting the
    workers run.max_failures times to fail the same way. Any other error is retried as before.

    Ray Train's FailureConfig retries every worker error alike; what it never retries is an
    error raised on its controller, which is what a callback's error becomes: the driver's
    `fit()` raises a ControllerError whose `controller_failure` is the worker's error.
    """
    from ray.train import UserCallback

    from ssl_dist import failures

    class StopOnFatal(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            failures.raise_fatal(worker_exceptions)

    return StopOnFatal()


def user_method(cfg) -> dict:
    """{"method_class": the class} for a method of the user's own (`package.module:Class`),
    pickled by value so that it ships with the run: the workers need not be able to import
    the user's module (a notebook, a script beside the job). {} for a built-in method, which
    the workers resolve by name."""
    from ssl_dist import methods

    if cfg.method.name in methods.BUILTIN:
        return {}
    import sys

    import ray.cloudpickle

    cls = methods.resolve(cfg.method.name)
    ray.cloudpickle.register_pickle_by_value(sys.modules[cls.__module__])
    return {"method_class": cls}


def train_loop(loop_config: dict) -> None:
    """What each Ray Train worker runs: `ssl_dist.train.train_loop`, imported there.

    The driver hands Ray this function, not the worker loop itself, so that it never imports
    the loop's modules (torchvision, and through it torch._dynamo: seconds of CPU per run).
    """
    from ssl_dist.train import train_loop as worker_loop

    worker_loop(loop_config)


def worker_range(cfg) -> int | tuple[int, int]:
    """Ray Train's num_workers: a fixed count, or the elastic range (min, max)."""
    if cfg.run.min_workers and cfg.run.min_workers < cfg.run.num_workers:
        return (cfg.run.min_workers, cfg.run.num_workers)
    return cfg.run.num_workers


def prepare_resume(cfg, resume: bool | None, storage_options: dict, say=print, *,
                   delete_previous: bool = False) -> None:
    """Apply `--resume` / `--no-resume` to the run folder before any worker starts. Driver
    only, with the run folder's lease held (`take_lease`).

    None (the default): a run folder holding checkpoints is resumed (Ray Train restores
    its snapshot; the workers check and pick the checkpoint). True: there must be a
    complete checkpoint, else a clear error. False: start over; what the previous run wrote
    in the folder (checkpoints, Ray Train's snapshot, metrics, records, config.yaml) is moved
    to the sibling `<run>.previous-<UTC time>`, or deleted with `delete_previous`; anything
    else in the folder stays where it is, and is named.
    """
    from ssl_dist import checkpoint

    url = run_url(cfg)
    if resume is False:
        if delete_previous:
            cleared = checkpoint.clear_run(url, storage_options)
            if cleared.entries:
                say(f"--no-resume --delete-previous: deleted what the previous run wrote in {url} "
                    f"({', '.join(cleared.entries)}); starting at step 0")
        else:
            cleared = checkpoint.move_run_aside(url, storage_options)
            if cleared.entries:
                say(f"--no-resume: moved what the previous run wrote in {url} ({len(cleared.entries)} entries, "
                    f"{cleared.checkpoints} checkpoint(s)) to {cleared.moved_to}; starting at step 0 "
                    f"(--delete-previous deletes it instead)")
        if cleared.left:
            say(f"--no-resume: left {', '.join(cleared.left)} in {url}: not written by ssl-dist")
        return
    newest = checkpoint.newest_complete(url, storage_options)
    if newest is None and resume:
        found = checkpoint.list_checkpoints(url, storage_options)
        detail = (f"its {len(found)} checkpoint folder(s) are all incomplete" if found
                  else "it holds no checkpoint")
        raise checkpoint.CheckpointError(f"--resume: nothing to resume in {url}: {detail}; check run.name and "
                                         f"run.storage_path, or start the run without --resume")
    if newest is not None:
        # What the workers would find out after a start-up, found out here in a second: a
        # checkpoint of another model, or a global batch the policy refuses to split.
        checkpoint.check_compatible(newest, cfg)
        if not cfg.run.min_workers:  # elastic: the world size is only known when the workers start
            checkpoint.decide_batch(cfg, cfg.run.num_workers, newest)
        say(f"{url} holds checkpoints up to step {newest.step}: the run resumes from its newest complete one "
            f"(--no-resume starts it over)")


def take_lease(cfg, storage_options: dict, say=print):
    """The run folder's writer lease (`ssl_dist.lease`), taken before anything in the folder
    changes; a LaunchError naming the holder and its expiry while another driver's is live.
    Driver only. Returns the `lease.Lease` (renew it with `.keep()`)."""
    from ssl_dist import lease

    url = run_url(cfg)
    try:
        held = lease.acquire(url, cfg.run.lease_s, storage_options)
    except lease.LeaseHeld as err:
        raise LaunchError(str(err)) from None
    if held.taken_over is not None:
        old = held.taken_over.get("holder", {})
        say(f"took over the expired lease of {url} (host {old.get('host', '?')}, pid {old.get('pid', '?')}, "
            f"attempt {old.get('attempt', '?')} stopped renewing it); this run is attempt {held.attempt}")
    return held


def with_absolute_paths(cfg):
    """`cfg` with its local data and storage paths made absolute (from the driver's working
    directory): Ray's workers run elsewhere, where a relative path names nothing."""
    return config_lib.merge(cfg, {"data": {"train_url": storage.absolute(cfg.data.train_url)},
                              "run": {"storage_path": storage.absolute(cfg.run.storage_path)},
                              "eval": {"train_url": storage.absolute(cfg.eval.train_url),
                                       "test_url": storage.absolute(cfg.eval.test_url),
                                       "templates": storage.absolute(cfg.eval.templates)}},
                        origin="absolute paths")


def pretrain(cfg, *, address: str | None = None, resume: bool | None = None, delete_previous: bool = False,
             say=print, callbacks=()) -> RunResult:
    """Run a pretraining job to its end (or its last allowed failure). Driver only.

    `resume`: None resumes from the run folder's checkpoints if there are any, True
    requires one, False starts over, moving the previous run aside (deleting it with
    `delete_previous`; see `prepare_resume`). The run folder's lease is held from before
    anything in it changes until the run ends: a second driver on it is refused. `callbacks`:
    extra Ray Train UserCallbacks (see `build_trainer`).

    At the end, failed or not, the run folder gets its `curves.png` (once rank 0 has written
    metrics). With track.* set, the run is tracked (`ssl_dist.tracking`): its MLflow run is
    opened here, before any worker starts, and ended FAILED when the run fails, or with the
    curves and the exported encoder as its artifacts.
    """
    from ssl_dist import tracking
    from ssl_dist.tracking.parent import open_run as open_tracking

    if delete_previous and resume is not False:
        raise LaunchError("--delete-previous deletes the previous run of a run started over: use it with "
                          "--no-resume")
    tracking.check_clients(cfg)
    cfg = with_absolute_paths(cfg)
    data_options, storage_options = preflight(cfg)
    with take_lease(cfg, storage_options, say=say).keep(say=say) as held:
        prepare_resume(cfg, resume, storage_options, say=say, delete_previous=delete_previous)
        write_resolved_config(cfg, storage_options)
        tracked = open_tracking(cfg, run_url=run_url(cfg), attempt=held.attempt, resume=resume, say=say)
        try:
            connect_ray(address, num_cpus=None)
            trainer = build_trainer(cfg, data_options=data_options, storage_options=storage_options,
                                    attempt=held.attempt, callbacks=callbacks, tracking=tracked.for_workers())
            result = trainer.fit()
        except BaseException:
            draw_curves(run_url(cfg), storage_options, failed=True, say=say)
            tracked.finish(failed=True, say=say)
            raise
    curves = draw_curves(run_url(cfg), storage_options, failed=result.error is not None, say=say)
    if result.error is not None:
        tracked.finish(failed=True, say=say)
        raise result.error
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    if checkpoint is not None and cfg.run.storage_path.startswith(("s3://", "gs://")):
        checkpoint = cfg.run.storage_path.split("://")[0] + "://" + checkpoint
    tracked.finish(checkpoint_url=checkpoint, storage_options=storage_options, say=say)
    return RunResult(run_url=run_url(cfg), checkpoint_url=checkpoint, metrics=dict(result.metrics or {}),
                     curves_url=curves)


def draw_curves(url: str, storage_options: dict, *, failed: bool = False, say=print) -> str | None:
    """Draw the run folder's curves.png from its metrics (`plots.write_curves`); its URL, or None
    when there is nothing to draw yet. Driver only. After a failed run, which returns no
    result, it says where the curves are. Drawing never hides the run's own outcome: a
    problem with it is one line on stderr, and none after a failed run, whose error is the news."""
    import sys

    from ssl_dist import plots

    try:
        curves = plots.write_curves(url, storage_options)
    except Exception as err:  # noqa: BLE001
        if not failed:
            print(f"ssl-dist: could not draw the curves of {url}: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    if curves and failed:
        say(f"curves: {curves}")
    return curves
