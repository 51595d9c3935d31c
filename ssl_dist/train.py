"""The worker loop that Ray Train runs on every training worker (one DeepSpeed rank each)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist

from ssl_dist import checkpoint, config, data
from ssl_dist.augment import BatchTwoViews, Decode, TwoViews
from ssl_dist.engine import build_engine
from ssl_dist.evaluate import eval_storage_options, knn_during_training
from ssl_dist.gradcache import embedding_grads, surrogate_loss
from ssl_dist.loss import nt_xent
from ssl_dist.metrics import MetricsLog
from ssl_dist.model import build_model
from ssl_dist.timing import PhaseTimer


def say(message: str) -> None:
    """One progress line to the worker's stdout, which Ray forwards to the driver.

    Not `print`: Ray Train patches print into its logger, and the driver would show each
    line twice.
    """
    sys.stdout.write(f"[ssl-dist] {message}\n")
    sys.stdout.flush()


def train_loop(loop_config: dict) -> None:
    """Pretrain until `train.max_steps`, resuming from the newest complete checkpoint if any.

    `loop_config`: {"config": resolved config dict, "run_url": the run folder,
    "data_options" / "storage_options": credential-free fsspec options}. Every worker calls it.
    """
    import ray.train

    cfg = config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    # ---- threads: share the node's cores among its workers, or torch oversubscribes them
    threads = cfg.train.torch_threads or max(1, cfg.run.cpus_per_worker)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))

    # ---- resume point, decided by rank 0 for all: Ray Train's newest registered checkpoint if
    # complete, else the newest complete one before it (said out loud); with none registered
    # (a first start, or Ray Train's snapshot lost) the newest complete one in the run folder
    started = time.time()
    run_url, storage_options = loop_config["run_url"], loop_config["storage_options"]
    control = dist.new_group(backend="gloo")  # CPU collectives for decisions, whatever trains
    resume = checkpoint.agree_on_resume(run_url, storage_options, ray.train.get_checkpoint(), cfg, rank=rank,
                                        local_rank=context.get_local_rank(), group=control)
    decided = time.time()
    if rank == 0:
        for note in resume.notes:
            say(note)

    # ---- global batch: the run's own, kept on any number of workers (resharded restarts)
    global_batch = resume.info.global_batch if resume.info else cfg.data.batch_size * cfg.run.num_workers
    batch_size, note = checkpoint.worker_batch(global_batch, world, cfg.data.batch_size,
                                               cfg.train.indivisible_batch)
    if note and rank == 0:
        say(note)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch_size))

    # ---- model and engine: same seed on every rank, so replicas start equal
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(build_model(cfg.model), cfg, world)

    # ---- data: this rank's share of every global batch; augmentation runs in loader workers
    loader = data.make_loader(cfg.data.train_url, rank=rank, world_size=world, batch_size=cfg.data.batch_size,
                              num_workers=cfg.data.loader_workers, seed=cfg.data.seed,
                              transform=TwoViews(cfg.data.image_size) if cfg.data.augment == "per_sample"
                              else Decode(cfg.data.image_size),
                              storage_options=loop_config["data_options"], shuffle_window=cfg.data.shuffle_window,
                              max_skip_fraction=cfg.data.max_skip_fraction, read_retries=cfg.data.read_retries,
                              image_format="tensor" if cfg.data.augment == "per_batch" else "pil")

    # ---- resume: weights, optimizer, LR schedule, RNG and data position; resharded (universal
    # checkpoint, stream re-plan) when the checkpoint was written by another number of workers
    engine_ready = time.time()
    state, restore_timings = checkpoint.TrainState(), {}
    if resume.info is not None:
        state, restore_timings = checkpoint.restore(resume.info, engine=engine, loader=loader, rank=rank,
                                                    world_size=world, local_rank=context.get_local_rank(),
                                                    options=storage_options, group=control)
        if rank == 0:
            resharded = (f", resharded from {resume.info.world_size} to {world} workers"
                         if resume.info.world_size != world else "")
            say(f"resumed from step {state.step} (epoch {loader.epoch}) of {resume.info.name}{resharded}")
    attempt = checkpoint.AttemptLog(run_url, rank=rank, start_step=state.step, attempt_id=resume.attempt_id,
                                    world_size=world, resumed_from=resume.info.name if resume.info else None,
                                    notes=resume.notes, storage_options=storage_options,
                                    timeline={"start": started, "decided": decided, "engine": engine_ready,
                                              "restored": time.time()},
                                    restore=restore_timings)
    keys = checkpoint.KeyLog(run_url, rank=rank, start_step=state.step, attempt_id=resume.attempt_id,
                             storage_options=storage_options) if cfg.train.log_keys else None
    taken = set(resume.taken)  # checkpoint folder names in storage: a new one must not reuse them
    last_save = time.monotonic()

    log = MetricsLog(loop_config["run_url"], start_step=state.step, max_steps=cfg.train.max_steps,
                     global_batch=loader.layout.global_batch,
                     storage_options=loop_config["storage_options"]) if rank == 0 else None
    running_loss = torch.zeros(())
    steps_in_window = 0

    batch_views = BatchViews(cfg, engine.device, rank) if cfg.data.augment == "per_batch" else None
    timer = PhaseTimer(sync=cfg.train.profile)
    micro_batches = []  # outside the epoch loop: an accumulation may span two epochs
    deadline = time.monotonic() + 60 * cfg.train.max_minutes if cfg.train.max_minutes > 0 else None
    out_of_time = False
    while state.step < cfg.train.max_steps and not out_of_time:
        for batch in loader:
            timer.mark("data")  # time spent waiting for the loader
            if batch_views is not None:
                batch = batch_views(batch, loader.epoch)
                timer.mark("augment")
            micro_batches.append(batch)
            if len(micro_batches) < cfg.train.accumulate:
                continue
            loss = contrastive_step(engine, micro_batches, cfg, timer)
            step_batches, micro_batches = micro_batches, []  # step_batches: for the key log

            state.step += 1
            state.samples_seen += loader.layout.global_batch * cfg.train.accumulate
            running_loss += loss
            steps_in_window += 1

            # ---- metrics: one all-reduce per log interval, not per step
            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                mean_loss = running_loss / steps_in_window
                dist.all_reduce(mean_loss)
                mean_loss /= world
                running_loss.zero_()
                steps_in_window = 0
                stream = loader.stats()
                skipped = torch.tensor([stream["skipped_samples"], stream["skipped_shards"]])
                dist.all_reduce(skipped, group=control)  # per-rank shares add up to the run's totals
                if log is not None:
                    row = log.add(step=state.step, epoch=loader.epoch, loss=float(mean_loss),
                                  lr=engine.get_lr()[0], samples_seen=state.samples_seen,
                                  skipped_samples=int(skipped[0]), skipped_shards=int(skipped[1]),
                                  dropped_remainder=stream["dropped_remainder"], **timer.take())
                    say(log.progress_line(row))
                    log.flush()
                timer.mark("log")

            # ---- kNN on small labeled sets (eval.every): every rank embeds its share, so that
            # ZeRO-3's collective forward passes line up; rank 0 scores, logs and says it
            if cfg.eval.every and (state.step % cfg.eval.every == 0 or state.step == cfg.train.max_steps):
                top1 = knn_during_training(engine.module, cfg.eval, image_size=cfg.data.image_size, rank=rank,
                                           world=world, storage_options=eval_storage_options(cfg, loop_config))
                if log is not None:
                    log.add_eval(state.step, knn_top1=top1)
                    say(f"kNN top-1 at step {state.step}: {top1:.4f}")
                    log.flush()
                timer.mark("eval")

            attempt.step_done(state.step)  # the recovery timeline: first step after a (re)start
            if keys is not None:
                keys.add(state.step, loader.epoch, step_batches)
                if state.step % cfg.train.log_every == 0:
                    keys.flush()

            # ---- checkpoint: every K steps, every T minutes (rank 0's clock), at the end; all
            # ranks write their part, Ray Train uploads (in the background) and merges them
            if deadline is not None:  # rank 0's clock decides, so every rank stops at the same step
                out_of_time = checkpoint.rank0_says(rank == 0 and time.monotonic() >= deadline, group=control)
            every = cfg.train.checkpoint_every
            due = (every and state.step % every == 0) or state.step == cfg.train.max_steps or out_of_time
            if not due and cfg.train.checkpoint_minutes > 0:
                late = time.monotonic() - last_save >= 60 * cfg.train.checkpoint_minutes
                due = checkpoint.rank0_says(rank == 0 and late, group=control)
            if due:
                name = checkpoint.checkpoint_name(state.step, taken)
                taken.add(name)
                if keys is not None:
                    keys.flush()
                timing = checkpoint.save_and_report({"step": state.step, "samples_seen": state.samples_seen},
                                                    engine=engine, loader=loader, state=state, rank=rank,
                                                    world_size=world, config=loop_config["config"], name=name,
                                                    target_global_batch=global_batch,
                                                    async_upload=cfg.train.async_upload)
                attempt.checkpointed(state.step, name, timing)
                last_save = time.monotonic()
                timer.mark("checkpoint")
            if state.step >= cfg.train.max_steps or out_of_time:
                break

    if log is not None:
        log.close()  # last flush of the CSV and the TensorBoard file


class BatchViews:
    """Two views of a decoded uint8 batch, made on the training device (data.augment=per_batch).

    The random draws are seeded by (seed, epoch, batch number, rank), so a resumed run with
    the same layout augments every batch as the uninterrupted run did.
    """

    def __init__(self, cfg, device, rank: int):
        self.augment = BatchTwoViews(cfg.data.image_size).to(device)
        self.device, self.seed, self.rank = device, cfg.data.seed, rank

    def __call__(self, batch: dict, epoch: int) -> dict:
        torch.manual_seed(data.sample_seed(self.seed, epoch, f"batch{batch['__batch__']}/rank{self.rank}"))
        images = batch.pop("image").to(self.device, non_blocking=True)
        batch["view1"], batch["view2"] = self.augment(images)
        return batch


def embed(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(z1, z2), each (b, D) float32: both views through the model in one pass, so that
    BatchNorm normalises them with the same statistics.

    The views are cast to the engine's parameter dtype (bf16 under train.precision=bf16);
    the embeddings come back as float32, because the loss's log-sum-exp over thousands of
    similarities loses too much in bf16.
    """
    param = next(engine.module.parameters())
    views = torch.cat([batch["view1"], batch["view2"]]).to(param.device, param.dtype)
    return engine(views).float().chunk(2)


def contrastive_step(engine, micro_batches: list[dict], cfg, timer: PhaseTimer | None = None) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns this rank's loss (detached).

    Every rank calls it with the same number of micro-batches (the loss gathers from all).
    With one micro-batch it is the plain step. With k > 1 it is gradient caching: the loss
    sees all k micro-batches of every rank as negatives, while the encoder holds the
    activations of one micro-batch at a time. `timer` gets a mark after each phase.
    """
    timer = timer or PhaseTimer()
    # A slot that the loader filled with a copy of a skipped sample is neither an anchor nor
    # a negative. The loader's batches always carry "__valid__"; hand-made ones may not.
    valid = (torch.cat([b["__valid__"] for b in micro_batches])
             if all("__valid__" in b for b in micro_batches) else None)

    def loss_fn(z1, z2):
        # NT-Xent with negatives from every rank; this rank's share of the global mean.
        return nt_xent(z1, z2, cfg.loss.temperature, valid=valid, chunk_size=cfg.loss.chunk_size or None)

    if len(micro_batches) == 1:
        z1, z2 = embed(engine, micro_batches[0])
        timer.mark("forward")
        loss = loss_fn(z1, z2)
        timer.mark("loss")
        engine.backward(loss)
        timer.mark("backward")
        engine.step()
        timer.mark("optimizer")
        return loss.detach()

    # ---- 1. embed every micro-batch without a graph
    with torch.no_grad():
        cached = [embed(engine, batch) for batch in micro_batches]
    timer.mark("forward")
    # ---- 2. loss over the whole accumulated batch, gradient w.r.t. the embeddings only
    loss, grads = embedding_grads(loss_fn, cached)
    timer.mark("loss")
    # ---- 3. re-run each micro-batch with a graph and push its slice of that gradient in;
    # the loss is already a mean over the accumulated batch, so DeepSpeed must not divide by k
    for batch, grad in zip(micro_batches, grads):
        engine.backward(surrogate_loss(embed(engine, batch), grad), scale_wrt_gas=False)
        timer.mark("backward")  # the re-run forward is charged here: it exists for the backward
        engine.step()  # DeepSpeed averages over ranks and updates on the k-th micro-batch
        timer.mark("optimizer")
    return loss
