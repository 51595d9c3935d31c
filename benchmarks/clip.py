"""CLIP on captioned CIFAR-10: ssl_dist (2 Ray workers, DeepSpeed ZeRO-2, shards from S3)
against open_clip's own trainer (`open_clip_train.main`, 2 torchrun processes on gloo), with
the same towers, batch, optimizer, precision and wall-clock budget; then a killed worker in
each; then the per-rank peak memory of the SigLIP loss at 1, 2 and 4 ranks.

    python benchmarks/clip.py [--minutes 15] [--batch-size 128] [--train-samples 0]
                              [--eval-samples 10000] [--fault-steps 20] [--loss-batch 2048]
                              [--seeds 1] [--first-seed 0] [--budget-only]

`--seeds N` trains each trainer N times (seeds K..K+N-1, `--first-seed K`: initial weights, data
order, crops; ssl_dist's train.seed and data.seed, open_clip's --seed), alternating between the
trainers, and compares the medians: one 15-minute run's zero-shot top-1 moves by about a point
from seed to seed, more than the gap between the trainers.

Data. Every CIFAR-10 training image (../shared/data/cifar10/train.tar; `--train-samples N`:
the first N of a seeded shuffle) gets the caption "TEMPLATE with its class name", the template
drawn (seed 0) from the 18 standard CIFAR-10 prompts (`ssl_dist.zero_shot.CIFAR10_TEMPLATES`).
The pairs, in that shuffled order, are written as webdataset shards (KEY.jpg + KEY.txt, 2500
a shard), uploaded to a moto S3 server this script starts on 127.0.0.1, and indexed with
`ssl_dist.shards.index_shards`. ssl_dist reads them through s3fs; open_clip reads the same
objects over plain HTTP from the same server (webdataset's curl on path-style URLs; the shard
objects are public-read, as a public dataset's are, since moto refuses unsigned GETs of
private ones). The test set is labeled shards (`ssl_dist.shards.make_shards`).

Both runs: the model config JSON written below (a ViT of 4 layers, width 128, patch 4 at 32
px; text transformer of 4 layers, width 128), batch `--batch-size` per process (2 processes,
1 torch thread and 1 loader worker each), AdamW (betas 0.9/0.999, eps 1e-8) at the same lr,
weight decay and linear warm-up, then a constant lr (a time budget knows no step count),
fp32 on CPU, CLIP's InfoNCE with negatives from both ranks (open_clip: `--local-loss
--gather-with-grad`); both exempt gains, biases and the logit scale from weight decay (every
tensor of fewer than 2 dims). Budget: `--minutes` of training each, counted after start-up
(ssl_dist's `train.max_minutes`, from the end of its set-up; open_clip's through the tap of
clip_open_clip_tap.py, from its first batch); each stops at a step that rank 0's clock
decides for both ranks, and saves a final checkpoint.

Numbers printed:
- samples/s: the global batch x steps / seconds over windows of 10 steps (ssl_dist: its
  metrics rows, train.log_every=10; open_clip: rank 0's step-completion times from the tap,
  grouped by 10), median over the windows after the first fifth (start-up and warm-up).
- zero-shot top-1: on the first `--eval-samples` CIFAR-10 test images, CLIP's recipe with the
  18 templates, for each final checkpoint (ssl_dist's through `evaluate.load_checkpoint_model`,
  open_clip's through `open_clip.create_model_and_transforms(name, pretrained=ckpt)`), both
  through the same function here: the same tokenizer, the same images normalised with
  open_clip's mean/std at 32 px (`ssl_dist.augment.EvalView`), `ssl_dist.zero_shot`'s
  classifier and top-1. "random init" is the towers before training.
- killed worker: each trainer on a smaller set (`--fault-steps` global batches an epoch, 4
  equal shards) for 2 epochs; when it has done 1.6 epochs of steps, one training process is
  SIGKILLed (ssl_dist: a Ray Train worker, which Ray Train restarts from the newest
  checkpoint, taken every quarter epoch; open_clip: the rank-1 process, torchrun stops the
  job, and the same command with `--resume latest` starts it again from its newest
  checkpoint, `--save-most-recent`, which open_clip writes at epoch ends only). Keys come from
  what each trainer actually consumed: ssl_dist's `train.log_keys` (the keys of every step of
  every attempt), open_clip's tap (the keys of every completed step). "In the final weights"
  counts the steps whose updates the final model holds (a step done again after a restart
  replaces the one done before the kill), and reports how many of the killed epoch's samples
  they saw twice or never; "consumed twice" counts every step run, redone ones included.
- SigLIP loss memory: `benchmarks/loss.py`'s machinery (spawned gloo ranks, peak RSS VmHWM
  above the RSS before, max over ranks) for ssl_dist.loss.siglip_loss (the ring) and
  open_clip.loss.SigLipLoss, forward + backward at `--loss-batch` pairs per rank, D = 128.

Targets (from the issue) are printed beside the results as pass/fail; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
CIFAR = Path(os.environ.get("SSL_DIST_SHARED", ROOT.parent / "shared")) / "data" / "cifar10"
TAP = Path(__file__).resolve().parent / "clip_open_clip_tap.py"
BUCKET = "bench"
MODEL_NAME = "bench-clip"
MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
LOG_EVERY = 10  # steps per throughput window, for both trainers
SAMPLES_PER_SHARD = 2500


@dataclass
class Setup:
    """What both trainers share: the services, the shards and the towers."""

    endpoint: str
    ray_address: str
    work: Path
    model_json: Path
    train_url: str
    train_http: str  # the same shards as open_clip reads them
    train_samples: int
    fault_url: str
    fault_http: str
    fault_keys: list[str]
    test_url: str
    args: argparse.Namespace

    @property
    def global_batch(self) -> int:
        return 2 * self.args.batch_size


# ---- services: moto's S3 server and a Ray head --------------------------------------------------


def start_services(work: Path) -> tuple[str, str, list]:
    """moto on 127.0.0.1 (AWS_* variables point ssl_dist at it) and `ray start --head`, token
    auth off. Returns (endpoint, Ray address, what to stop)."""
    from services import start_moto, start_ray_head

    moto, endpoint = start_moto()
    os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "RAY_AUTH_MODE": "disabled"})
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    ray_temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    address = start_ray_head(Path(ray_temp), num_cpus=4)
    return endpoint, address, [moto, ray_temp]


def stop_services(handles: list) -> None:
    from services import stop_ray_node

    moto, ray_temp = handles
    stop_ray_node(ray_temp)
    moto.terminate()


# ---- data -----------------------------------------------------------------------------------


def captioned_pairs(limit: int) -> list[tuple[str, bytes, str]]:
    """(key, JPEG bytes, caption) of the training images in a seeded shuffle (shards of one
    class each would starve both trainers' shuffle buffers of negatives); `limit` 0: all."""
    from ssl_dist.zero_shot import CIFAR10_TEMPLATES, fill

    pairs = []
    with tarfile.open(CIFAR / "train.tar") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                _, cls, name = member.name.split("/")
                pairs.append((f"{cls}_{Path(name).stem}", tar.extractfile(member).read(), cls))
    rng = random.Random(0)
    rng.shuffle(pairs)
    pairs = pairs[:limit] if limit else pairs
    return [(key, jpg, fill(rng.choice(CIFAR10_TEMPLATES), cls.replace("_", " "))) for key, jpg, cls in pairs]


def upload_shards(pairs: list, folder: Path, url: str, per_shard: int) -> int:
    """Write `pairs` as webdataset shards (KEY.jpg + KEY.txt) into `folder`, upload them to
    `url` (public-read, as a public dataset's bucket: open_clip reads them over plain HTTP,
    and moto refuses unsigned GETs of private objects) and index them there. Returns the
    number of shards."""
    import webdataset as wds

    from ssl_dist import shards, storage

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for key, jpg, caption in pairs:
            sink.write({"__key__": key, "jpg": jpg, "txt": caption})
    fs, root = storage.filesystem(url)
    names = sorted(p.name for p in folder.glob("*.tar"))
    for name in names:
        fs.put_file(str(folder / name), f"{root}/{name}")
        fs.chmod(f"{root}/{name}", acl="public-read")
    shards.index_shards(url)
    return len(names)


def http_urls(endpoint: str, prefix: str, count: int) -> str:
    """The brace pattern webdataset expands into the shards' plain-HTTP URLs on moto."""
    return f"{endpoint}/{BUCKET}/{prefix}/shard-{{000000..{count - 1:06d}}}.tar"


def prepare(args, work: Path, endpoint: str, ray_address: str) -> Setup:
    from ssl_dist.shards import make_shards

    started = time.perf_counter()
    pairs = captioned_pairs(args.train_samples)
    train_count = upload_shards(pairs, work / "train", f"s3://{BUCKET}/clip/train", SAMPLES_PER_SHARD)
    # The killed-worker runs: fault_steps global batches an epoch, in 4 equal shards (even
    # shares for open_clip's shard-per-rank split), so that no remainder blurs the counts.
    fault_size = args.fault_steps * 2 * args.batch_size
    if fault_size > len(pairs) or fault_size % 4:
        raise SystemExit(f"--fault-steps {args.fault_steps} x global batch {2 * args.batch_size} = {fault_size} "
                         f"samples: needs a multiple of 4 and at most the {len(pairs)} training pairs")
    fault_count = upload_shards(pairs[:fault_size], work / "fault", f"s3://{BUCKET}/clip/fault", fault_size // 4)
    make_shards(str(CIFAR / "test.tar"), f"s3://{BUCKET}/clip/test", samples_per_shard=5000, workers=2)
    model_dir = work / "model"
    model_dir.mkdir()
    model_json = model_dir / f"{MODEL_NAME}.json"  # open_clip's model name is the file's stem
    model_json.write_text(json.dumps(MODEL, indent=1))
    print(f"shards: {len(pairs)} captioned train pairs ({train_count} shards), {fault_size} for the killed-worker "
          f"runs, test set: {time.perf_counter() - started:.0f} s", flush=True)
    return Setup(endpoint=endpoint, ray_address=ray_address, work=work, model_json=model_json,
                 train_url=f"s3://{BUCKET}/clip/train", train_http=http_urls(endpoint, "clip/train", train_count),
                 train_samples=len(pairs), fault_url=f"s3://{BUCKET}/clip/fault",
                 fault_http=http_urls(endpoint, "clip/fault", fault_count),
                 fault_keys=[key for key, _, _ in pairs[:fault_size]], test_url=f"s3://{BUCKET}/clip/test", args=args)


# ---- a trainer as a process of its own, its output read as it comes ------------------------------


class Job:
    """A command run in the background; a thread collects its output (so that a full pipe never
    blocks it, and the benchmark can watch it)."""

    def __init__(self, command: list[str], env: dict, log: Path):
        self.log = log
        self.proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the trainer and its children
            self.proc.wait()
        self.reader.join(timeout=30)
        self.log.write_text(self.output)
        return self.proc.returncode


def checked(job: Job, timeout: float, what: str) -> str:
    if job.wait(timeout) != 0:
        raise SystemExit(f"{what} failed (exit {job.proc.returncode}; log {job.log}):\n{job.output[-4000:]}")
    return job.output


# ---- run 1: ssl_dist ------------------------------------------------------------------------------


def ssl_dist_job(s: Setup, name: str, train_url: str, extra: list[str]) -> Job:
    a = s.args
    overrides = [
        "method.name=clip", f"model.clip_arch={s.model_json}", f"data.train_url={train_url}", "data.image_size=32",
        f"data.batch_size={a.batch_size}", "data.loader_workers=1", "run.num_workers=2", "run.cpus_per_worker=1",
        "train.zero_stage=2", "train.precision=fp32", "optim.name=adamw", f"optim.lr={a.lr}",
        f"optim.weight_decay={a.wd}", f"optim.warmup_steps={a.warmup}", "optim.schedule=constant",
        f"run.storage_path=s3://{BUCKET}/runs", f"run.name={name}", *extra]
    return Job([sys.executable, "-m", "ssl_dist.cli", "pretrain", "--no-resume", *overrides],
               {"RAY_ADDRESS": s.ray_address}, s.work / f"{name}.log")


def run_ssl_dist(s: Setup, seed: int) -> dict:
    """Training for --minutes (train.max_minutes); samples/s from the metrics rows. `seed`
    draws the initial weights, the data order and the crops."""
    from ssl_dist import checkpoint, metrics

    name = f"clip-budget-seed{seed}"
    job = ssl_dist_job(s, name, s.train_url, [f"train.max_minutes={s.args.minutes}", "train.max_steps=10000000",
                                              "train.checkpoint_every=0", f"train.log_every={LOG_EVERY}",
                                              f"train.seed={seed}", f"data.seed={seed}"])
    checked(job, 60 * s.args.minutes + 900, "ssl_dist run")
    url = f"s3://{BUCKET}/runs/{name}"
    rows = metrics.read_history(url)[-1]
    rates = [float(r["samples_per_s"]) for r in rows if r.get("samples_per_s")]
    return {"samples_per_s": steady_median(rates), "steps": int(rows[-1]["step"]),
            "checkpoint": checkpoint.newest_complete(url).url}


def steady_median(rates: list[float]) -> float:
    """Median of the per-window rates after the first fifth (start-up, warm-up)."""
    steady = rates[len(rates) // 5:] or rates
    return statistics.median(steady) if steady else float("nan")


# ---- run 2: open_clip's trainer ----------------------------------------------------------------------


def open_clip_job(s: Setup, name: str, train_http: str, samples: int, attempt: int, *, minutes: float,
                  epochs: int, resume: bool = False, seed: int = 0) -> Job:
    a = s.args
    flags = [
        "--train-data", train_http, "--train-num-samples", str(samples), "--dataset-type", "webdataset",
        "--model", MODEL_NAME, "--batch-size", str(a.batch_size), "--workers", "1",
        "--lr", str(a.lr), "--wd", str(a.wd), "--warmup", str(a.warmup), "--lr-scheduler", "const",
        "--beta1", "0.9", "--beta2", "0.999", "--eps", "1e-8", "--precision", "fp32",
        "--device", "cpu", "--dist-backend", "gloo", "--local-loss", "--gather-with-grad",
        "--epochs", str(epochs), "--save-most-recent", "--save-frequency", "0", "--zeroshot-frequency", "0",
        "--log-every-n-steps", str(LOG_EVERY), "--seed", str(seed), "--logs", str(s.work / "open_clip"), "--name", name,
        *(["--resume", "latest"] if resume else [])]
    tap = ["--model-dir", str(s.model_json.parent), "--tap-dir", str(tap_dir(s, name)), "--attempt", str(attempt),
           "--minutes", str(minutes)]
    # 1 torch thread per process (torchrun's default), as ssl_dist's 1 CPU per worker
    return Job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TAP),
                *tap, "--", *flags], {"OMP_NUM_THREADS": "1"}, s.work / f"{name}-{attempt}.log")


def tap_dir(s: Setup, name: str) -> Path:
    return s.work / "taps" / name


def tap_rows(s: Setup, name: str, attempt: int, rank: int) -> list[dict]:
    path = tap_dir(s, name) / f"attempt-{attempt}-rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_open_clip(s: Setup, seed: int) -> dict:
    """Training for --minutes (the tap's budget); samples/s from rank 0's step times. `seed`
    (open_clip's --seed) draws the initial weights, the shard order and the sample shuffle."""
    name = f"clip-budget-seed{seed}"
    job = open_clip_job(s, name, s.train_http, s.train_samples, 0, minutes=s.args.minutes, epochs=100000, seed=seed)
    checked(job, 60 * s.args.minutes + 900, "open_clip run")
    times = [row["time"] for row in tap_rows(s, name, 0, rank=0)]
    rates = [LOG_EVERY * s.global_batch / (b - a) for a, b in zip(times[::LOG_EVERY], times[LOG_EVERY::LOG_EVERY])]
    return {"samples_per_s": steady_median(rates), "steps": len(times),
            "checkpoint": str(s.work / "open_clip" / name / "checkpoints" / "epoch_latest.pt")}


# ---- zero-shot: one code path for both checkpoints ---------------------------------------------------


def zero_shot_top1(encode_image, encode_text, s: Setup) -> float:
    """CLIP's zero-shot recipe on the test shards, as ssl_dist.evaluate runs it: the 18 CIFAR-10
    templates, ssl_dist's tokenizer for the model config, images at 32 px with open_clip's
    mean/std (the statistics both trainers normalised with)."""
    import open_clip
    import torch

    from ssl_dist import augment, model, zero_shot

    torch.set_num_threads(2)
    view = augment.EvalView(32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        classifier = zero_shot.zero_shot_classifier(encode_text, model.build_tokenizer(str(s.model_json)),
                                                    zero_shot.class_names(s.test_url), zero_shot.CIFAR10_TEMPLATES)
        feats, labels = zero_shot.embed_labeled(encode_image, s.test_url, image_size=32,
                                                limit=s.args.eval_samples, view=view)
    return zero_shot.zero_shot_top1(feats, labels, classifier)


def zero_shot_scores(s: Setup, ours: list[dict], theirs: list[dict]) -> dict:
    """{"ssl_dist": [top-1 per seed], "open_clip": [top-1 per seed], "random init": top-1}."""
    import open_clip
    import torch

    from ssl_dist.evaluate import load_checkpoint_model
    from ssl_dist.model import build_image_text_model

    def score(towers, encode_image) -> float:
        towers.eval()
        return zero_shot_top1(encode_image, towers.encode_text, s)

    open_clip.add_model_config(str(s.model_json.parent))
    out = {"ssl_dist": [], "open_clip": []}
    for run in ours:
        module, _ = load_checkpoint_model(run["checkpoint"])
        out["ssl_dist"].append(score(module, module.features))
    for run in theirs:
        peer, _, _ = open_clip.create_model_and_transforms(MODEL_NAME, pretrained=run["checkpoint"])
        out["open_clip"].append(score(peer, peer.encode_image))
    torch.manual_seed(0)
    init = build_image_text_model(str(s.model_json), image_size=32, init_logit_scale=0.0)
    out["random init"] = score(init, init.features)
    return out


# ---- a killed worker ---------------------------------------------------------------------------------


def kill_step(s: Setup) -> int:
    """1.6 epochs: mid-way through the second epoch, between two of ssl_dist's checkpoints."""
    return int(1.6 * s.args.fault_steps)


def wait_until(condition, job: Job, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if job.proc.poll() is not None:
            raise SystemExit(f"{what}: the trainer exited first (log {job.log}):\n{job.output[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not reached in {timeout} s (log {job.log})")
        time.sleep(0.2)


def ssl_dist_fault(s: Setup) -> dict:
    """2 epochs with checkpoints every quarter epoch; one Ray Train worker SIGKILLed at the kill
    step; Ray Train restarts the group (run.max_failures) from the newest checkpoint."""
    import re

    from runs import train_workers

    from ssl_dist import checkpoint

    name, steps = "clip-fault", 2 * s.args.fault_steps
    job = ssl_dist_job(s, name, s.fault_url, [
        f"train.max_steps={steps}", f"train.checkpoint_every={max(1, s.args.fault_steps // 4)}",
        "train.log_every=1", "train.log_keys=true", "run.max_failures=2"])
    target = kill_step(s)

    def reached() -> bool:
        done = [int(m) for m in re.findall(r"step (\d+)/", job.output)]
        return bool(done) and max(done) >= target

    wait_until(reached, job, 900, "ssl_dist: the kill step")
    victims = train_workers(s.ray_address)
    os.kill(victims[-1].pid, signal.SIGKILL)  # from outside, like the OOM killer or a preemption
    checked(job, 900, "ssl_dist killed-worker run")
    logs = checkpoint.read_keys(f"s3://{BUCKET}/runs/{name}")
    attempts = sorted({log["attempt"] for log in logs})
    by_attempt = [[row for log in logs if log["attempt"] == a for row in log["rows"]] for a in attempts]
    first, *later = by_attempt
    killed_at = max(row["step"] for row in first)
    resumed_from = min(row["step"] for row in later[0]) - 1 if later else killed_at
    epoch = max(row["epoch"] for row in first if row["step"] == killed_at)
    # a step done again replaces the one before it: the final weights hold the last attempt's
    final: dict[tuple[int, int], dict] = {}
    for log in logs:  # oldest attempt first
        for row in log["rows"]:
            final[(row["step"], log["rank"])] = row
    return account(s, killed_at, resumed_from, epoch, list(final.values()), [r for rows in by_attempt for r in rows],
                   restarts=len(attempts) - 1)


def open_clip_fault(s: Setup) -> dict:
    """2 epochs; the rank-1 process SIGKILLed at the kill step (torchrun then stops the job);
    the same command with --resume latest goes on from open_clip's newest checkpoint."""
    import psutil

    name, per_epoch, samples = "clip-fault", s.args.fault_steps, len(s.fault_keys)
    job = open_clip_job(s, name, s.fault_http, samples, 0, minutes=0, epochs=2)
    target = kill_step(s)
    wait_until(lambda: len(tap_rows(s, name, 0, rank=0)) >= target, job, 900, "open_clip: the kill step")
    ranks = [p for p in psutil.Process(job.proc.pid).children() if p.environ().get("RANK") == "1"]
    os.kill(ranks[0].pid, signal.SIGKILL)
    job.wait(300)  # torchrun stops the job: it exits non-zero
    first = tap_rows(s, name, 0, rank=0) + tap_rows(s, name, 0, rank=1)
    checked(open_clip_job(s, name, s.fault_http, samples, 1, minutes=0, epochs=2, resume=True), 900,
            "open_clip resumed run")
    later = tap_rows(s, name, 1, rank=0) + tap_rows(s, name, 1, rank=1)

    def step(row: dict) -> int:
        return row["epoch"] * per_epoch + row["batch"] + 1

    killed_at = max(step(row) for row in first)
    resumed_epoch = min(row["epoch"] for row in later)
    epoch = max(row["epoch"] for row in first)
    # the resumed run starts from epoch `resumed_epoch`'s beginning: what the first run did
    # from there on is not in the final weights
    final = [row for row in first if row["epoch"] < resumed_epoch] + later
    return account(s, killed_at, resumed_epoch * per_epoch, epoch, final, first + later, restarts=1)


def account(s: Setup, killed_at: int, resumed_from: int, epoch: int, final: list[dict], consumed: list[dict],
            restarts: int) -> dict:
    """How often each sample of the killed epoch was seen: in the steps the final weights
    hold, and in every step run."""
    from collections import Counter

    def counts(rows: list[dict]) -> Counter:
        return Counter(key for row in rows if row["epoch"] == epoch for key in row["keys"])

    kept, ran = counts(final), counts(consumed)
    return {"killed_at": killed_at, "resumed_from": resumed_from, "redone": killed_at - resumed_from,
            "restarts": restarts, "epoch": epoch, "epoch_size": len(s.fault_keys),
            "twice": sum(1 for k in s.fault_keys if kept[k] >= 2),
            "never": sum(1 for k in s.fault_keys if kept[k] == 0),
            "consumed_twice": sum(1 for k in s.fault_keys if ran[k] >= 2)}


# ---- SigLIP loss memory per rank ----------------------------------------------------------------------


def siglip_memory(batch: int, ranks: list[int]) -> dict:
    """{(implementation, ranks): peak bytes per rank}, with benchmarks/loss.py's groups of spawned ranks."""
    import benchmarks.loss as loss_bench

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    impls = [i for i in loss_bench.IMPLS if i.loss == "siglip" and i.name in ("ours", "open_clip")]
    out = {}
    for world in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            loss_bench.run_group([(impl, batch) for impl in impls], 128, 1024, 2, True, Path(tmp), world=world)
            for impl in impls:
                out[(impl.name, world)] = json.loads((Path(tmp) / f"siglip-{impl.name}-{batch}.json").read_text())["peak"]
    return out


# ---- report -------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def report_budget(s: Setup, ours: list[dict], theirs: list[dict], zs: dict) -> None:
    """One row per trainer and seed, then (several seeds) each trainer's medians; the ratios
    compare the medians, since one 15-minute run's zero-shot moves by about a point."""
    a = s.args
    seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    print(f"\nCLIP on captioned CIFAR-10 ({s.train_samples} pairs), {a.minutes:g} min of training each, global batch "
          f"{s.global_batch}, 2 processes x 1 thread, fp32 CPU; zero-shot on {a.eval_samples} test images; "
          f"seeds {seeds[0]}-{seeds[-1]}, the runs in the order listed per seed\n")
    print("| run | seed | steps | samples/s (median, steady) | zero-shot top-1 |")
    print("|---|---|---|---|---|")
    trainers = (("ssl_dist (Ray, ZeRO-2, S3)", ours, zs["ssl_dist"]),
                ("open_clip_train (torchrun, gloo, HTTP)", theirs, zs["open_clip"]))
    for i, seed in enumerate(seeds):
        for name, runs, scores in trainers:
            print(f"| {name} | {seed} | {runs[i]['steps']} | {runs[i]['samples_per_s']:.1f} | {scores[i]:.4f} |")
    medians = {}
    for name, runs, scores in trainers:
        medians[name] = (statistics.median(r["samples_per_s"] for r in runs), statistics.median(scores))
        if a.seeds > 1:
            print(f"| {name} | median | {statistics.median(r['steps'] for r in runs):g} | {medians[name][0]:.1f} | "
                  f"{medians[name][1]:.4f} |")
    print(f"| random init | - | - | - | {zs['random init']:.4f} |")
    (ours_speed, ours_zs), (their_speed, their_zs) = medians.values()
    speed = ours_speed / their_speed
    print(f"\n| ratio ssl_dist / open_clip{' (medians)' if a.seeds > 1 else ''} | value | target | |")
    print("|---|---|---|---|")
    print(f"| throughput | {speed:.2f} | >= 1.00 | {verdict(speed >= 1.0)} |")
    print(f"| zero-shot top-1 | {ours_zs / max(their_zs, 1e-9):.3f} | >= 1.000 | {verdict(ours_zs >= their_zs)} |")


def report_faults(s: Setup, faults: dict) -> None:
    a = s.args
    print(f"\nKilled worker: {a.fault_steps} steps an epoch ({s.global_batch * a.fault_steps} samples), 2 epochs, "
          f"one training process SIGKILLed at step {kill_step(s)}\n")
    print("| run | killed after step | resumed from step | steps redone | epoch | seen twice (final weights) | "
          "never (final weights) | consumed twice (all steps run) | target: 0 twice, 0 never |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, f in faults.items():
        target = verdict(f["twice"] == 0 and f["never"] == 0) if name == "ssl_dist" else "-"
        print(f"| {name} | {f['killed_at']} | {f['resumed_from']} | {f['redone']} | {f['epoch']} | {f['twice']} | "
              f"{f['never']} | {f['consumed_twice']} | {target} |")


def report_memory(s: Setup, memory: dict) -> None:
    a = s.args
    print(f"\nSigLIP loss, forward + backward, {a.loss_batch} pairs per rank, D = 128: peak memory per rank (MiB)\n")
    ranks = sorted({w for _, w in memory})
    print("| implementation | " + " | ".join(f"{w} rank{'s' if w > 1 else ''}" for w in ranks) + " | "
          f"{ranks[-1]} / {ranks[0]} ranks |")
    print("|---|" + "---|" * (len(ranks) + 1))
    for impl, label in (("ours", "ssl_dist.loss.siglip_loss (ring)"), ("open_clip", "open_clip SigLipLoss")):
        peaks = [memory[(impl, w)] for w in ranks]
        print(f"| {label} | " + " | ".join(f"{p / 2**20:.0f}" for p in peaks) + f" | {peaks[-1] / peaks[0]:.2f} |")
    flat = memory[("ours", ranks[-1])] / memory[("ours", ranks[0])]
    print(f"\nssl_dist flat in ranks (expected; {ranks[-1]} / {ranks[0]} ranks <= 1.25): {verdict(flat <= 1.25)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock training budget of each run")
    p.add_argument("--batch-size", type=int, default=128, help="pairs per process (2 processes)")
    p.add_argument("--train-samples", type=int, default=0, help="captioned training pairs (0: all 50000)")
    p.add_argument("--eval-samples", type=int, default=10000, help="test images for zero-shot")
    p.add_argument("--fault-steps", type=int, default=20, help="steps an epoch of the killed-worker runs")
    p.add_argument("--loss-batch", type=int, default=2048, help="pairs per rank of the SigLIP memory runs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--seeds", type=int, default=1,
                   help="budget runs of each trainer, seeds 0..N-1 (initial weights, data order, crops); "
                        "the zero-shot ratio compares the medians")
    p.add_argument("--first-seed", type=int, default=0, help="the first of the --seeds seeds")
    p.add_argument("--budget-only", action="store_true",
                   help="only the budget runs and their zero-shot (no killed worker, no SigLIP memory)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clip-bench-"))
    print(f"work folder (logs, open_clip's runs): {work}", flush=True)
    endpoint, ray_address, handles = start_services(work)
    try:
        s = prepare(args, work, endpoint, ray_address)
        ours, theirs = [], []
        for seed in range(args.first_seed, args.first_seed + args.seeds):  # alternating, so that a busier stretch of the machine hits both
            print(f"seed {seed}: ssl_dist {args.minutes:g} min ...", flush=True)
            ours.append(run_ssl_dist(s, seed))
            print(f"seed {seed}: open_clip {args.minutes:g} min ...", flush=True)
            theirs.append(run_open_clip(s, seed))
        print("zero-shot ...", flush=True)
        zs = zero_shot_scores(s, ours, theirs)
        if not args.budget_only:
            print("killed worker: ssl_dist, then open_clip ...", flush=True)
            faults = {"ssl_dist": ssl_dist_fault(s), "open_clip": open_clip_fault(s)}
    finally:
        stop_services(handles)
    report_budget(s, ours, theirs, zs)
    if not args.budget_only:
        report_faults(s, faults)
        print("SigLIP loss memory ...", flush=True)
        report_memory(s, siglip_memory(args.loss_batch, [1, 2, 4]))


if __name__ == "__main__":
    main()
