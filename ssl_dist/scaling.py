"""A scaling model: what one training step and one epoch cost, per rank and in total, as a
function of the workload and the number of workers W. Pure arithmetic, no I/O.

Each figure follows from how the code does the work (the module named next to it), not from
a fit: `benchmarks/scaling.py` checks the figures against runs at W = 1, 2, 4 and prints them
for a 1,024-GPU workload; docs/scaling.md explains them and what breaks first.

- Loss memory and gathered bytes: loss/softmax.py (NT-Xent, CLIP, MoCo v3: one all-gather of
  fp32 rows plus their validity column, a (chunk x M) logits workspace, the gradient of the
  gathered rows kept transposed and then contiguous) and loss/sigmoid.py (SigLIP: blocks and
  their gradients around a ring, three (chunk x n) buffers).
- Gradient and parameter traffic: DeepSpeed's ZeRO stages as engine.py configures them, as
  DeepSpeed's comms logger shows them.
- S3 requests: data/plan.py lays an epoch out in windows of `window_batches` global batches;
  in a window each loader worker that has batches reads one contiguous stretch of the
  epoch's sample sequence, one ranged GET per shard the stretch touches, and each loader
  worker reads a shard's sidecar once per epoch (data/reader.py caches small sidecars).
- Checkpoint: DeepSpeed's files (weights, fp32 master copy, optimizer moments) split by ZeRO
  stage, each rank uploading its own part at once (checkpoint/save.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ssl_dist.loss.numerics import auto_chunk

FP32 = 4
SIDECAR_BYTES_PER_SAMPLE = 8  # one little-endian uint64 offset per sample (shards/manifest.py)
MANIFEST_BYTES_PER_SHARD = 256  # a manifest entry as shards.make writes it, measured (benchmarks/scaling.py)
STAGE3_MAX_LIVE_PARAMETERS = 10**9  # DeepSpeed's default
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "lars": 1, "sgd": 1}  # fp32 tensors per parameter


@dataclass(frozen=True)
class Workload:
    """What the model needs to know of a run. Sizes in samples, bytes and parameters."""

    method: str  # simclr, mocov3, clip, siglip
    params: int  # trainable parameters of the engine's module
    embed_dim: int  # D: width of the loss's embeddings
    batch_size: int  # n: samples per rank per step
    chunk_size: int | None = None  # loss.chunk_size (None: the loss's own choice, numerics.auto_chunk)
    device: str = "cuda"  # where the loss runs: sets auto_chunk's budget
    zero_stage: int = 2
    precision_bytes: int = FP32  # 4 (fp32) or 2 (bf16): weights and gradients on the wire
    optimizer: str = "adamw"
    loader_workers: int = 1
    shuffle_window: int = 4096
    shard_samples: int = 5000
    sample_bytes: int = 2500  # mean bytes of one sample in its shard (tar headers included)
    total_samples: int = 50000
    prefixes: int = 1  # S3 key prefixes the shards are spread over


def window_batches(w: Workload, workers: int) -> int:
    """Global batches per shuffle window (data/loader.py): at least one."""
    return max(1, w.shuffle_window // (w.batch_size * workers))


# ---- the loss --------------------------------------------------------------------------------


def loss_shapes(w: Workload, workers: int) -> dict:
    """Anchor rows per set m, anchor sets, gathered columns M and gathered width F (+1 for
    the validity column) of the loss on one rank."""
    n, d, world = w.batch_size, w.embed_dim, workers
    if w.method == "simclr":  # both views are anchors and columns: (2n, D) gathered into (2N, D)
        return {"m": 2 * n, "sets": 1, "M": 2 * n * world, "F": d + 1}
    if w.method in ("clip", "mocov3"):  # two sets of n anchors against (N, 2D) gathered pairs/keys
        return {"m": n, "sets": 2, "M": n * world, "F": 2 * d + 1}
    if w.method == "siglip":
        return {"m": n, "sets": 1, "M": n, "F": d}
    raise ValueError(f"no loss model for method {w.method!r}")


def loss_memory_bytes(w: Workload, workers: int) -> int:
    """Peak bytes one rank's loss holds beyond its inputs, fp32 (compute_dtype of bf16 input).

    Both: the two inputs normalised in fp32 (2 x n x D). softmax.py: SimCLR's concatenated
    anchors (2n x D), the gathered rows (M x F), the gradient of the gathered rows
    transposed (F x M), each set's (m x D) anchor gradient, and the larger of the logits
    workspace (chunk x M, freed after the passes) and the contiguous copy of the gradient
    saved for backward (M x F, made after them). The block handed to the gather lives only
    during the gather. sigmoid.py: three (chunk x n) buffers (alive to the end), the anchor
    gradient, the own block's gradient (D x n) and its contiguous copy, saved for backward
    (3 x n x D), and with more than one rank the block arriving while the current one is
    used, the gradient of the block at hand, and the one arriving (3 x n x D). chunk: the
    Workload's, or the loss's own choice for its device (numerics.auto_chunk).
    """
    s, n, d = loss_shapes(w, workers), w.batch_size, w.embed_dim
    chunk = min(w.chunk_size or auto_chunk(s["m"], s["M"], FP32, w.device), s["m"])
    inputs = 2 * n * d
    if w.method == "siglip":
        arriving = 3 * n * d if workers > 1 else 0
        return FP32 * (inputs + 3 * chunk * n + 3 * n * d + arriving)
    anchors = 2 * n * d if w.method == "simclr" else 0
    held = inputs + anchors + s["M"] * s["F"] + s["F"] * s["M"] + s["sets"] * s["m"] * d
    return FP32 * (held + max(chunk * s["M"], s["M"] * s["F"]))


def gathered_bytes(w: Workload, workers: int) -> dict:
    """Bytes one rank receives for the loss per step: {"forward", "backward"}.

    softmax.py: an all-gather of (M, F) fp32 rows (the rank's own block included, as the
    collective's output is that size) and its backward, a reduce-scatter of the same
    size. sigmoid.py: W - 1 blocks of (n, D) and W - 1 travelling gradients of (D, n)."""
    if workers == 1:
        return {"forward": 0, "backward": 0}
    s = loss_shapes(w, workers)
    if w.method == "siglip":
        block = FP32 * w.batch_size * w.embed_dim
        return {"forward": (workers - 1) * block, "backward": (workers - 1) * block}
    size = FP32 * s["M"] * s["F"]
    return {"forward": size, "backward": size}


# ---- gradients and parameters -------------------------------------------------------------------


def reduced_bytes(w: Workload, workers: int) -> dict:
    """Sizes of the buffers one rank hands to the gradient and parameter collectives per
    step: {"all_reduce", "reduce_scatter", "all_gather"} (an all-gather's output, a
    reduce-scatter's input). On the wire a ring moves about 2 (W-1)/W of an all-reduce's
    buffer and (W-1)/W of the others'.

    As DeepSpeed 0.19 does it (measured by benchmarks/scaling.py with its comms logger):
    ZeRO-0, -1 and -2 all-reduce the gradients (in buckets), and ZeRO-1/2 then all-gather
    the updated parameters from their owners. ZeRO-3 all-gathers each parameter once per
    step and reduce-scatters the gradients: a parameter gathered for the forward stays
    for the backward while the model is under stage3_max_live_parameters (1e9); above it,
    it is gathered again."""
    if workers == 1:
        return {"all_reduce": 0, "reduce_scatter": 0, "all_gather": 0}
    p = w.params * w.precision_bytes
    if w.zero_stage == 0:
        return {"all_reduce": p, "reduce_scatter": 0, "all_gather": 0}
    if w.zero_stage in (1, 2):
        return {"all_reduce": p, "reduce_scatter": 0, "all_gather": p}
    gathers = 1 if w.params <= STAGE3_MAX_LIVE_PARAMETERS else 2
    return {"all_reduce": 0, "reduce_scatter": p, "all_gather": gathers * p}


# ---- S3 -------------------------------------------------------------------------------------


def reads_per_epoch(w: Workload, workers: int) -> dict:
    """S3 requests and bytes of one epoch, all ranks together: {"data_gets", "sidecar_gets",
    "data_bytes", "sidecar_bytes", "stretch"}.

    In each window, the loader workers of a rank that have batches (at most window_batches of
    them) each read one stretch of about `stretch` consecutive samples: one ranged GET per
    shard it touches, so one per stretch plus one per shard boundary. A loader worker reads a shard's
    sidecar once per epoch: when a window is smaller than a shard, every reader meets every
    shard; when larger, a shard meets about shard_samples / stretch + 1 readers.
    """
    t, k = w.total_samples, w.shard_samples
    kw = window_batches(w, workers)
    global_batch = w.batch_size * workers
    used = (t // global_batch) * global_batch  # the remainder smaller than one batch is dropped
    windows = math.ceil(used / (kw * global_batch))
    loaders = max(1, w.loader_workers)  # 0: the stream runs in the training process, one reader a rank
    active = workers * min(loaders, kw)  # readers with batches in a window
    stretch = used / (windows * active)  # samples a reader reads in a window, on average
    # one GET per stretch, and one more where a shard ends inside a stretch (at most once per
    # shard boundary: a boundary on a stretch's start costs nothing, not counted here)
    data_gets = windows * active + math.ceil(used / k) - 1
    shards = math.ceil(t / k)
    readers_of_a_shard = min(workers * loaders, k / stretch + 1)
    sidecar_gets = shards * readers_of_a_shard
    return {"data_gets": data_gets, "sidecar_gets": sidecar_gets, "data_bytes": used * w.sample_bytes,
            "sidecar_bytes": sidecar_gets * k * SIDECAR_BYTES_PER_SAMPLE, "stretch": stretch}


def s3_rates(w: Workload, workers: int, samples_per_s: float) -> dict:
    """GET/s and MB/s per prefix at a training rate of `samples_per_s` (all ranks), the shards
    spread evenly over `w.prefixes` prefixes."""
    r = reads_per_epoch(w, workers)
    epochs_per_s = samples_per_s / w.total_samples
    gets = (r["data_gets"] + r["sidecar_gets"]) * epochs_per_s
    mb = (r["data_bytes"] + r["sidecar_bytes"]) * epochs_per_s / 1e6
    return {"get_per_s": gets / w.prefixes, "mb_per_s": mb / w.prefixes}


def shuffle_window_for(w: Workload, workers: int, samples_per_s: float, get_limit: float) -> int:
    """The smallest data.shuffle_window (a whole number of global batches) that keeps each
    prefix under `get_limit` GET/s (S3: 5,500 per prefix) at `samples_per_s`."""
    global_batch = w.batch_size * workers
    kw = 1
    while s3_rates(replace(w, shuffle_window=kw * global_batch), workers, samples_per_s)["get_per_s"] > get_limit:
        kw *= 2
        if kw > 1 << 20:
            raise ValueError("no shuffle window keeps the requests under the limit: add prefixes")
    return kw * global_batch


# ---- manifest, checkpoint ----------------------------------------------------------------


def dataset_index_bytes(w: Workload) -> dict:
    """{"manifest", "sidecar"}: the manifest (one entry per shard) and one shard's sidecar."""
    shards = math.ceil(w.total_samples / w.shard_samples)
    return {"manifest": shards * MANIFEST_BYTES_PER_SHARD, "sidecar": w.shard_samples * SIDECAR_BYTES_PER_SAMPLE}


def checkpoint_bytes(w: Workload, workers: int) -> dict:
    """{"total", "per_rank_max"}: DeepSpeed's checkpoint files of one save (the largest
    rank's share is rank 0's).

    The optimizer's fp32 moments and, under ZeRO (and bf16), its fp32 copy of the
    parameters, which DeepSpeed keeps even for fp32 training. ZeRO-0: rank 0 writes the
    weights and all of that. ZeRO-1/2: rank 0 writes the weights in the engine's precision,
    every rank 1/W of the optimizer's state. ZeRO-3: every rank 1/W of the optimizer's
    state, which holds the weights (the fp32 copy); the module files are small."""
    weights = w.params * w.precision_bytes
    master = 1 if w.zero_stage > 0 or w.precision_bytes < FP32 else 0
    state = w.params * FP32 * (OPTIMIZER_SLOTS[w.optimizer] + master)
    if w.zero_stage == 0:
        return {"total": weights + state, "per_rank_max": weights + state}
    if w.zero_stage in (1, 2):
        return {"total": weights + state, "per_rank_max": weights + state / workers}
    return {"total": state, "per_rank_max": state / workers}


def checkpoint_seconds(w: Workload, workers: int, rank_mb_per_s: float, store_mb_per_s: float) -> float:
    """Upload time of one save: every rank at once, each at most `rank_mb_per_s`, all
    together at most `store_mb_per_s` (the store's or the network's aggregate)."""
    c = checkpoint_bytes(w, workers)
    return max(c["per_rank_max"] / (rank_mb_per_s * 1e6), c["total"] / (store_mb_per_s * 1e6))


# ---- restart after a lost worker ----------------------------------------------------------------


def restore_read_bytes(w: Workload, workers: int, *, resharded_nodes: int = 0, job_start: bool = False) -> dict:
    """Bytes a restart reads from the store: {"choose", "per_rank", "total"}.

    checkpoint/resume.py: rank 0 chooses the checkpoint by reading every file of it once and
    hashing it against its rank's digest (`layout.inspect`): the whole checkpoint. Then
    checkpoint/restore.py, on the world size that wrote it: each rank downloads its own ZeRO
    files and the shared model states (ZeRO-1/2: the weights; ZeRO-3: small module files),
    which is the share rank 0 writes at a save. On another world size (`resharded_nodes` > 0)
    one rank per node downloads the whole checkpoint to convert it. Small files (meta, stream
    states, part lists: a few KB) are left out. `job_start`: a job started again (`--resume`,
    not Ray Train restarting its workers in the same job), whose driver first checks the
    newest checkpoint the same way (launch.prepare_resume): "choose" counts both reads."""
    c = checkpoint_bytes(w, workers)
    choose = c["total"] * (2 if job_start else 1)
    if resharded_nodes:
        return {"choose": choose, "per_rank": c["total"], "total": choose + c["total"] * resharded_nodes}
    weights = w.params * w.precision_bytes
    # every rank's share together: the optimizer state once, and under ZeRO-1/2 the weights W times
    restored = c["total"] + (workers - 1) * weights if w.zero_stage in (1, 2) else c["total"]
    return {"choose": choose, "per_rank": c["per_rank_max"], "total": choose + restored}


def steps_lost(checkpoint_every: int, upload_steps: float) -> float:
    """Steps a failure at a uniformly random moment undoes on average: half an interval, plus
    the steps a checkpoint's asynchronous upload takes before Ray Train registers it (until
    then a restart goes back to the one before)."""
    return checkpoint_every / 2 + upload_steps


def restart_seconds(w: Workload, workers: int, *, detect_s: float, start_s: float, engine_s: float,
                    seek_s: float, rank_mb_per_s: float, store_mb_per_s: float, step_s: float,
                    lost_steps: float, convert_s: float = 0.0, resharded_nodes: int = 0) -> dict:
    """Seconds from a lost worker to the run back where it was, phase by phase, as
    benchmarks/checkpoint.py and the attempt records split them, and their "total".

    detect: Ray noticing the loss (a killed process: at once; a silent node: its health
    check, 5 failed checks 3 s apart with 10 s timeouts, 15 to 65 s). start: Ray Train
    stopping the group and starting W workers (and, for a lost node, a new node if the run
    waits for one). choose: rank 0 lists the run and hashes the checkpoint (all of it) at
    `rank_mb_per_s`. engine: DeepSpeed's initialise. download: each rank its share, at most
    `rank_mb_per_s` each and `store_mb_per_s` together. convert: the universal conversion
    (another world size only). seek: the stream's first window. redo: the steps since the
    checkpoint, done again. The fixed terms are inputs, measured by benchmarks/scaling.py."""
    reads = restore_read_bytes(w, workers, resharded_nodes=resharded_nodes)
    rank_rate, store_rate = rank_mb_per_s * 1e6, store_mb_per_s * 1e6
    phases = {"detect": detect_s, "start": start_s, "choose": reads["choose"] / rank_rate, "engine": engine_s,
              "download": max(reads["per_rank"] / rank_rate, (reads["total"] - reads["choose"]) / store_rate),
              "convert": convert_s, "seek": seek_s, "redo": lost_steps * step_s}
    return {**phases, "total": sum(phases.values())}


def checkpoint_interval_for(held_s: float, step_s: float, mtbf_s: float) -> int:
    """Steps between checkpoints that minimise the time lost to checkpoints and failures
    together (Young's first-order optimum: sqrt(2 x held x MTBF)), for a loop held `held_s`
    per checkpoint (the local write and the report; the upload is asynchronous) and a mean
    time between failures of the whole job `mtbf_s` (a node's MTBF / nodes)."""
    return max(1, round(math.sqrt(2 * held_s * mtbf_s) / step_s))
