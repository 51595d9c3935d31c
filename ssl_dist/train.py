"""The worker loop that Ray Train runs on every training worker (one DeepSpeed rank each)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from ssl_dist import checkpoint, config, data
from ssl_dist.augment import TwoViews
from ssl_dist.engine import build_engine
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
    """Pretrain until `train.max_steps`, resuming from Ray Train's newest checkpoint if any.

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

    # ---- model and engine: same seed on every rank, so replicas start equal
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(build_model(cfg.model), cfg, world)

    # ---- data: this rank's share of every global batch; augmentation runs in loader workers
    loader = data.make_loader(cfg.data.train_url, rank=rank, world_size=world, batch_size=cfg.data.batch_size,
                              num_workers=cfg.data.loader_workers, seed=cfg.data.seed,
                              transform=TwoViews(cfg.data.image_size),
                              storage_options=loop_config["data_options"], shuffle_window=cfg.data.shuffle_window)

    # ---- resume: Ray Train hands back the newest checkpoint after a restart
    state = checkpoint.TrainState()
    resumed_from = ray.train.get_checkpoint()
    if resumed_from is not None:
        state = checkpoint.restore_from_ray(resumed_from, engine=engine, loader=loader, rank=rank, world_size=world)
        if rank == 0:
            say(f"resumed from step {state.step} (epoch {loader.epoch})")

    log = MetricsLog(loop_config["run_url"], start_step=state.step, max_steps=cfg.train.max_steps,
                     global_batch=loader.layout.global_batch,
                     storage_options=loop_config["storage_options"]) if rank == 0 else None
    running_loss = torch.zeros(())
    steps_in_window = 0

    timer = PhaseTimer(sync=cfg.train.profile)
    micro_batches = []  # outside the epoch loop: an accumulation may span two epochs
    while state.step < cfg.train.max_steps:
        for batch in loader:
            timer.mark("data")  # time spent waiting for the loader
            micro_batches.append(batch)
            if len(micro_batches) < cfg.train.accumulate:
                continue
            loss = contrastive_step(engine, micro_batches, cfg, timer)
            micro_batches = []

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
                if log is not None:
                    row = log.add(step=state.step, epoch=loader.epoch, loss=float(mean_loss),
                                  lr=engine.get_lr()[0], samples_seen=state.samples_seen, **timer.take())
                    say(log.progress_line(row))
                    log.flush()
                timer.mark("log")

            # ---- checkpoint: all ranks write their part; Ray Train merges and persists them
            every = cfg.train.checkpoint_every
            if (every and state.step % every == 0) or state.step == cfg.train.max_steps:
                checkpoint.save_and_report({"step": state.step, "samples_seen": state.samples_seen},
                                           engine=engine, loader=loader, state=state, rank=rank,
                                           world_size=world, config=loop_config["config"])
                timer.mark("checkpoint")
            if state.step >= cfg.train.max_steps:
                break


def embed(engine, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(z1, z2), each (b, D): both views through the model in one pass, so that BatchNorm
    normalises them with the same statistics."""
    views = torch.cat([batch["view1"], batch["view2"]])
    return engine(views).chunk(2)


def contrastive_step(engine, micro_batches: list[dict], cfg, timer: PhaseTimer | None = None) -> torch.Tensor:
    """One optimizer step over this rank's micro-batches; returns this rank's loss (detached).

    Every rank calls it with the same number of micro-batches (the loss gathers from all).
    With one micro-batch it is the plain step. With k > 1 it is gradient caching: the loss
    sees all k micro-batches of every rank as negatives, while the encoder holds the
    activations of one micro-batch at a time. `timer` gets a mark after each phase.
    """
    timer = timer or PhaseTimer()
    def loss_fn(z1, z2):
        # NT-Xent with negatives from every rank; this rank's mean over its own anchors.
        return nt_xent(z1, z2, cfg.loss.temperature, chunk_size=cfg.loss.chunk_size or None)

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
