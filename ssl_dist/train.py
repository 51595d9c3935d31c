"""The worker loop that Ray Train runs on every training worker (one DeepSpeed rank each).

`train_loop` reads top to bottom: one setup call (`start`: resume decision, engine, loader,
restore, records), then per step: batch -> method step -> report -> evaluation when due ->
checkpoint when due. What a batch becomes is the method's business (`methods/`); when to
checkpoint is the checkpointer's (`checkpoint/save.py`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ssl_dist import checkpoint, collective, data, methods, records, tracking
from ssl_dist.config import Config
from ssl_dist.engine import build_engine, follow_schedule
from ssl_dist.lr_rule import restart_note
from ssl_dist.live_eval import eval_storage_options, eval_templates, knn_during_training, zero_shot_during_training
from ssl_dist.metrics import MetricsLog, attempt_name
from ssl_dist.step import optimizer_step
from ssl_dist.timing import PhaseTimer


def say(message: str) -> None:
    """One progress line to the worker's stdout, which Ray forwards to the driver.

    Not `print`: Ray Train patches print into its logger, and the driver would show each
    line twice.
    """
    sys.stdout.write(f"[ssl-dist] {message}\n")
    sys.stdout.flush()


def train_loop(loop_config: dict) -> None:
    """Pretrain until `train.max_steps` (or `train.max_minutes`), resuming from the newest
    complete checkpoint if any. Every worker calls it.

    `loop_config`: {"config": the typed Config, "run_url": the run folder, "data_options" /
    "storage_options": credential-free fsspec options, "method_class": a user's Method class
    shipped by the driver, or absent for a built-in method, "attempt": the driver's attempt id,
    which its checkpoints carry, "tracking": the trackers rank 0 logs to (`tracking.parent`), or absent}.
    """
    run = start(loop_config)
    cfg, method, engine, loader, state, timer = run.cfg, run.method, run.engine, run.loader, run.state, run.timer
    micro_batches: list[dict] = []  # outside the epoch loop: an accumulation may span two epochs
    stop = state.step >= cfg.train.max_steps
    while not stop:
        # every rank takes its next batch together: one rank's error (its data past the skip
        # limit) is raised on every rank, not left for the others to wait on in the next step
        for batch in collective.iterate_together(loader, run.control):
            timer.mark("data")  # time spent waiting for the loader
            micro_batches.append(method.on_device(batch, epoch=loader.epoch, device=engine.device))
            timer.mark("augment")
            if len(micro_batches) < cfg.train.accumulate:
                continue
            loss = optimizer_step(engine, method, micro_batches, timer)
            state.step += 1
            state.samples_seen += loader.layout.global_batch * cfg.train.accumulate
            run.attempt.step_done(state.step)  # the recovery timeline: first steps after a (re)start
            if run.keys is not None:
                run.keys.add(state.step, loader.epoch, micro_batches)
            micro_batches = []

            # ---- out of time (train.max_minutes): this step is the last, logged and checkpointed
            out_of_time = run.out_of_time()
            stop = state.step >= cfg.train.max_steps or out_of_time
            # ---- metrics: one all-reduce per log interval, not per step
            run.report.add(loss)
            if state.step % cfg.train.log_every == 0 or stop:
                run.report.flush(state, loader, engine, phases=timer.take())
                run.flush_keys()
                timer.mark("log")
            # ---- kNN on small labeled sets: every rank embeds its share (ZeRO-3's forwards line up)
            if cfg.eval.every and (state.step % cfg.eval.every == 0 or stop):
                run.evaluate(state.step)
                timer.mark("eval")
            # ---- checkpoint when the checkpointer says so; out of time forces a last one
            saved = run.checkpointer.save(state, engine=engine, loader=loader, force=out_of_time,
                                          before=run.flush_keys)
            if saved is not None:
                run.attempt.checkpointed(state.step, saved["name"], saved)
                timer.mark("checkpoint")
            if stop:
                break
    run.close()


SCORE_NAMES = {"knn_top1": "kNN top-1", "zero_shot_top1": "zero-shot top-1"}


@dataclass
class Run:
    """What one rank's loop holds, made by `start`."""

    cfg: Config
    rank: int
    world: int
    control: object  # gloo group for CPU decisions, whatever backend trains
    method: methods.Method
    engine: object
    loader: data.Loader
    state: checkpoint.TrainState
    checkpointer: checkpoint.Checkpointer
    report: "Report"
    attempt: records.AttemptLog
    keys: records.KeyLog | None
    timer: PhaseTimer
    eval_options: dict
    deadline: float | None

    def out_of_time(self) -> bool:
        """train.max_minutes has passed, by rank 0's clock, so every rank stops at the same step."""
        if self.deadline is None:
            return False
        return collective.rank0_says(self.rank == 0 and time.monotonic() >= self.deadline, group=self.control)

    def evaluate(self, step: int) -> None:
        """kNN top-1 of the live image features (when eval.train_url is set) and zero-shot top-1
        of an image-text method (one with a tokenizer); every rank embeds its share, rank 0
        scores and logs, and every rank reports the scores to Ray Train (see below)."""
        import ray.train

        scores, common = {}, dict(image_size=self.cfg.data.image_size, rank=self.rank, world=self.world,
                                  storage_options=self.eval_options, view=self.method.eval_view(),
                                  max_pixels=self.cfg.data.max_pixels)
        if self.cfg.eval.train_url:
            scores["knn_top1"] = knn_during_training(self.engine.module, self.cfg.eval, **common)
        tokenizer = self.method.tokenizer()
        if tokenizer is not None:
            scores["zero_shot_top1"] = zero_shot_during_training(self.engine.module, self.cfg.eval, tokenizer,
                                                                 eval_templates(self.cfg.eval), **common)
        if self.report.log is not None:
            self.report.log.add_eval(step, **scores)
            for name, value in scores.items():
                say(f"{SCORE_NAMES[name]} at step {step}: {value:.4f}")
            self.report.log.flush()
        # Ray Train's report is collective (every rank, the same calls in the same order): rank 0's
        # scores (the others have None) are what a sweep's Tune callback reads on the controller.
        # Without a checkpoint it leaves the checkpointer's reports and Ray Train's checkpoint
        # bookkeeping as they are; it waits, like the next checkpoint's report would, for a
        # background upload still under way.
        ray.train.report({"step": step, **{name: value for name, value in scores.items() if value is not None}})

    def flush_keys(self) -> None:
        if self.keys is not None:
            self.keys.flush()

    def close(self) -> None:
        if self.report.log is not None:
            self.report.log.close()  # last flush of the CSV and the TensorBoard file; ends the trackers' runs


def start(loop_config: dict) -> Run:
    """Everything before the first step, on every rank: threads, the resume decision (rank 0
    decides for all), the batch plan, engine, loader, restore, records."""
    import ray.train

    started = time.time()
    cfg: Config = loop_config["config"]
    context = ray.train.get_context()
    rank, world, local_rank = context.get_world_rank(), context.get_world_size(), context.get_local_rank()
    run_url, options = loop_config["run_url"], loop_config["storage_options"]

    # ---- threads: share the node's cores among its workers, or torch oversubscribes them
    threads = cfg.train.torch_threads or max(1, cfg.run.cpus_per_worker)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    # ---- resume point and batch plan: Ray Train's newest registered checkpoint if complete,
    # else the newest complete one before it; the run's global batch on this many workers
    control = collective.control_group(cfg.run.collective_timeout_s)
    resume = checkpoint.agree_on_resume(run_url, options, ray.train.get_checkpoint(), cfg, rank=rank,
                                        local_rank=local_rank, group=control)
    batch = checkpoint.decide_batch(cfg, world, resume.info)
    decided = time.time()
    for note in (resume.notes + [batch.note] if batch.note else resume.notes) if rank == 0 else []:
        say(note)

    # ---- method, engine and loader: same seed on every rank, so replicas start equal. What
    # can fail on one rank alone (a method's module, the shards it reads) fails on all together.
    method = collective.together(
        lambda: (loop_config.get("method_class") or methods.resolve(cfg.method.name))(cfg, rank=rank), control)
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(method.build_module(), cfg, world, micro_batch=batch.per_worker)
    loader = collective.together(lambda: data.make_loader(
        cfg.data.train_url, rank=rank, world_size=world, batch_size=batch.per_worker,
        num_workers=cfg.data.loader_workers, seed=cfg.data.seed, transform=method.sample_transform(),
        image_format=method.image_format, storage_options=loop_config["data_options"],
        shuffle_window=cfg.data.shuffle_window, max_skip_fraction=cfg.data.max_skip_fraction,
        read_retries=cfg.data.read_retries, read_deadline_s=cfg.data.read_deadline_s, max_pixels=cfg.data.max_pixels,
        verify=cfg.data.verify), control)
    engine_ready = time.time()

    # ---- restore: weights, optimizer, LR schedule, RNG and data position; resharded when the
    # checkpoint was written by another number of workers
    state, restore_timings = checkpoint.TrainState(), {}
    if resume.info is not None:
        # a rank whose part of the checkpoint does not load stops every rank with its error
        state, restore_timings = collective.together(
            lambda: checkpoint.restore(resume.info, engine=engine, loader=loader, rank=rank, world_size=world,
                                       local_rank=local_rank, options=options, group=control), control)
        if rank == 0:
            resharded = (f", resharded from {resume.info.world_size} to {world} workers"
                         if resume.info.world_size != world else "")
            say(f"resumed from step {state.step} (epoch {loader.epoch}) of {resume.info.name}{resharded}")
        follow_schedule(engine)  # optim.lr_scaling at this global batch from the first step on
        note = restart_note(cfg.optim, old_batch=resume.info.step_batch,
                            new_batch=loader.layout.global_batch * cfg.train.accumulate)
        if note and rank == 0:
            say(note)

    attempt = records.AttemptLog(run_url, rank=rank, start_step=state.step, attempt_id=resume.attempt_id,
                                 world_size=world, resumed_from=resume.info.name if resume.info else None,
                                 notes=resume.notes, storage_options=options, restore=restore_timings,
                                 timeline={"start": started, "decided": decided, "engine": engine_ready,
                                           "restored": time.time()})
    keys = records.KeyLog(run_url, rank=rank, start_step=state.step, attempt_id=resume.attempt_id,
                          storage_options=options) if cfg.train.log_keys else None
    # train.max_minutes counts from here: the end of the set-up, but for rank 0's trackers starting
    deadline = time.monotonic() + 60 * cfg.train.max_minutes if cfg.train.max_minutes > 0 else None
    log = None
    if rank == 0:  # rank 0 writes the metrics: CSV, TensorBoard, and the trackers' runs of this attempt
        name = attempt_name(state.step)
        sinks = tracking.attempt_sinks(loop_config.get("tracking"), cfg, attempt=name, run_url=run_url,
                                       storage_options=options, say=say)
        log = MetricsLog(run_url, start_step=state.step, max_steps=cfg.train.max_steps, name=name, sinks=sinks,
                         global_batch=loader.layout.global_batch, storage_options=options, deadline=deadline)
    checkpointer = checkpoint.Checkpointer(cfg, rank=rank, world_size=world, group=control, taken=set(resume.taken),
                                           batch=batch, attempt=loop_config.get("attempt", ""))
    return Run(cfg=cfg, rank=rank, world=world, control=control, method=method, engine=engine, loader=loader,
               state=state, checkpointer=checkpointer, report=Report(log, world, control), attempt=attempt,
               keys=keys, timer=PhaseTimer(sync=cfg.train.profile),
               eval_options=eval_storage_options(cfg, loop_config) if cfg.eval.every else {},
               deadline=deadline)


class Report:
    """The loss window and stream counts between two log lines: summed locally per step,
    averaged over ranks once per `train.log_every`, written by rank 0 (CSV, TensorBoard, stdout)."""

    def __init__(self, log: MetricsLog | None, world: int, control):
        self.log, self.world, self.control = log, world, control
        self.loss_sum, self.steps = torch.zeros(()), 0

    def add(self, loss: torch.Tensor) -> None:
        """This rank's loss of one step (detached, () on the training device)."""
        self.loss_sum = self.loss_sum.to(loss.device) + loss
        self.steps += 1

    def flush(self, state: checkpoint.TrainState, loader: data.Loader, engine, phases: dict) -> None:
        """Every rank calls it at the same steps (two all-reduces); `phases`: `PhaseTimer.take()`."""
        mean_loss = self.loss_sum / max(self.steps, 1)
        dist.all_reduce(mean_loss)
        mean_loss /= self.world
        self.loss_sum, self.steps = torch.zeros((), device=mean_loss.device), 0
        stream = loader.stats()
        skipped = torch.tensor([stream["skipped_samples"], stream["skipped_shards"]])
        dist.all_reduce(skipped, group=self.control)  # per-rank shares add up to the run's totals
        if self.log is not None:
            row = self.log.add(step=state.step, epoch=loader.epoch, loss=float(mean_loss), lr=engine.get_lr()[0],
                               samples_seen=state.samples_seen, skipped_samples=int(skipped[0]),
                               skipped_shards=int(skipped[1]), dropped_remainder=stream["dropped_remainder"],
                               **phases)
            say(self.log.progress_line(row))
            self.log.flush()
