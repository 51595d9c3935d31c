"""CIFAR-10 pretraining: ssl_dist (2 Ray workers, DeepSpeed ZeRO-2, shards from S3) against a
plain single-process PyTorch SimCLR loop, with the same wall-clock budget each.

    python benchmarks/cifar10.py [--minutes 20] [--eval-train 50000] [--eval-test 10000]
    python benchmarks/cifar10.py --methods simclr,mocov3,rotnet,simclr@vit,mocov3@vit [--minutes 20]
        [--results benchmarks/results/cifar10_methods.jsonl]

Both runs use the same encoder, two-view augmentation, NT-Xent, optimizer and schedule
(warm-up then constant: with a time budget neither knows its number of steps) and the same
global batch. Prints samples/s, kNN top-1 (k = 200, cosine, neighbours from the train set)
and linear-probe top-1 on the test set for each and for the encoder at random
initialisation, the ratios ssl_dist / plain, and ssl_dist's per-step time breakdown.

With `--methods`, the method table instead: each METHOD[@ENCODER] pretrained by ssl_dist for
the same wall clock (ENCODER: `resnet`, the CPU ResNet of cifar10.yaml, or `vit`, `--vit-arch`
with `--vit-kwargs`, patch 4 at 32 px), then scored by `ssl_dist.evaluate.evaluate_checkpoint`
(kNN top-1 and a linear probe fit on the train images, scored on the test images) and
fine-tuned (`ssl_dist.finetune`) on `--finetune-fractions` of the train images' labels, each
next to the same encoder at random initialisation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
CIFAR = Path(os.environ.get("SSL_DIST_SHARED", ROOT.parent / "shared")) / "data" / "cifar10"
CONFIG = ROOT / "jobs" / "configs" / "cifar10.yaml"


def start_s3() -> tuple[subprocess.Popen, str]:
    from services import start_moto

    proc, endpoint = start_moto()
    os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "RAY_AUTH_MODE": "disabled"})
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return proc, endpoint


def make_shards() -> dict:
    from ssl_dist.shards import make_shards

    urls = {}
    for split in ("train", "test"):
        started = time.perf_counter()
        make_shards(str(CIFAR / f"{split}.tar"), f"s3://bench/cifar10/{split}", samples_per_shard=5000, workers=4)
        print(f"shards {split}: {time.perf_counter() - started:.1f} s", flush=True)
        urls[split] = f"s3://bench/cifar10/{split}"
    return urls


# ---- run 1: ssl_dist ------------------------------------------------------------------------


def run_ssl_dist(urls: dict, minutes: float, overrides: list[str], name: str = "cifar10-bench") -> dict:
    from ssl_dist import config, metrics

    cfg = config.load(CONFIG, [f"data.train_url={urls['train']}", "run.storage_path=s3://bench/runs",
                               f"run.name={name}", f"train.max_minutes={minutes}", "train.max_steps=1000000",
                               "optim.schedule=constant", "train.checkpoint_every=0", *overrides])
    args = [f"{k}={v}" for k, v in flatten(config.to_dict(cfg)).items()]
    cpu_before, started = psutil.cpu_times(), time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ssl_dist.cli", "pretrain", *args], capture_output=True, text=True)
    wall = time.monotonic() - started
    cpu_busy = busy_share(cpu_before, psutil.cpu_times())
    if done.returncode != 0:
        raise SystemExit(f"ssl_dist run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = metrics.read_history(f"s3://bench/runs/{name}")[-1]
    if not rows:
        raise SystemExit(f"ssl_dist run {name} logged no metrics row in {minutes} min: give it more --minutes")
    checkpoint = [line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("newest checkpoint")][-1]
    steady = rows[len(rows) // 5:] or rows  # skip the first fifth: start-up and warm-up
    phases = {k: sum(float(r[k]) for r in steady) for k in rows[0] if k.startswith("time_")}
    return {"samples_per_s": statistics.median(float(r["samples_per_s"]) for r in steady),
            "steps": int(rows[-1]["step"]), "wall_s": wall, "cpu_busy": cpu_busy, "phases": phases,
            "checkpoint": "s3://" + checkpoint.removeprefix("s3://"), "config": cfg}


def flatten(d: dict) -> dict:
    """{"section.key": value} of a config dict; a dict value (model.arch_kwargs) as JSON, one override."""
    return {f"{section}.{k}": json.dumps(v) if isinstance(v, dict) else v
            for section, values in d.items() for k, v in values.items()}


def busy_share(before, after) -> float:
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    total = sum(after) - sum(before)
    return 1 - idle / total if total else float("nan")


# ---- run 2: the plain loop ---------------------------------------------------------------------


class Folder(torch.utils.data.Dataset):
    """Extracted JPEGs -> what ssl_dist's loader workers make of a sample with the same config:
    two augmented views (per_sample), or the decoded uint8 image (per_batch)."""

    def __init__(self, root: Path, image_size: int, per_batch: bool):
        from ssl_dist.augment import Decode, TwoViews

        self.files = sorted(root.glob("*/*.jpg"))
        self.per_batch = per_batch
        self.transform = Decode(image_size) if per_batch else TwoViews(image_size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        out = self.transform({"__key__": str(i), "image": Image.open(self.files[i]).convert("RGB")})
        return out["image"] if self.per_batch else (out["view1"], out["view2"])


def run_plain(cfg, minutes: float, workdir: Path) -> tuple[dict, torch.nn.Module]:
    """The loop a researcher writes first: one process, torch's DataLoader, no Ray, no DeepSpeed.
    Same encoder, augmentation (and its placement), loss, optimizer, schedule and global batch."""
    from ssl_dist.augment import BatchTwoViews
    from ssl_dist.engine import build_optimizer, lr_factor
    from ssl_dist.loss import nt_xent
    from ssl_dist.model import build_model

    with tarfile.open(CIFAR / "train.tar") as tar:
        tar.extractall(workdir, filter="data")
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(2)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    global_batch = cfg.data.batch_size * cfg.run.num_workers
    per_batch = cfg.data.augment == "per_batch"
    augment = BatchTwoViews(cfg.data.image_size) if per_batch else None
    data = torch.utils.data.DataLoader(Folder(workdir / "train", cfg.data.image_size, per_batch),
                                       batch_size=global_batch, shuffle=True, drop_last=True,
                                       num_workers=cfg.run.num_workers * cfg.data.loader_workers,
                                       persistent_workers=True)
    stamps, step = [], 0
    cpu_before, deadline = psutil.cpu_times(), time.monotonic() + 60 * minutes
    while time.monotonic() < deadline:
        for batch in data:
            v1, v2 = augment(batch) if per_batch else batch
            for group in optimizer.param_groups:
                group["lr"] = cfg.optim.lr * lr_factor(step, warmup_steps=cfg.optim.warmup_steps,
                                                       max_steps=cfg.train.max_steps, schedule=cfg.optim.schedule)
            z1, z2 = model(torch.cat([v1, v2])).chunk(2)
            loss = nt_xent(z1, z2, cfg.loss.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:  # what DeepSpeed's gradient_clipping does to the engine's step
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            step += 1
            stamps.append(time.monotonic())
            if time.monotonic() >= deadline:
                break
    cpu_busy = busy_share(cpu_before, psutil.cpu_times())
    first = len(stamps) // 5  # skip the first fifth: start-up and warm-up
    # Wall-clock rate over the steady part, data waits included (as ssl_dist's is measured).
    rate = (len(stamps) - 1 - first) * global_batch / max(stamps[-1] - stamps[first], 1e-9)
    return {"samples_per_s": rate, "steps": step, "cpu_busy": cpu_busy, "loss": loss.item()}, model


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def features(model, url: str, limit: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from ssl_dist.evaluate import iter_labeled

    model.eval()
    feats, labels, n = [], [], 0
    for images, y in iter_labeled(url, image_size=image_size, batch_size=500):
        feats.append(torch.nn.functional.normalize(model.features(images), dim=1))
        labels.append(y)
        n += len(y)
        if n >= limit:
            break
    return torch.cat(feats)[:limit], torch.cat(labels)[:limit]


def scores(model, urls: dict, args, image_size: int) -> dict:
    from ssl_dist.evaluate import knn_top1

    torch.set_num_threads(2)
    train_f, train_y = features(model, urls["train"], args.eval_train, image_size)
    test_f, test_y = features(model, urls["test"], args.eval_test, image_size)
    out = {"knn": knn_top1(train_f, train_y, test_f, test_y, k=200)}
    try:
        from sklearn.linear_model import LogisticRegression

        half = len(test_f) // 2  # the probe is fit on one half of the test set, scored on the other
        probe = LogisticRegression(max_iter=1000).fit(test_f[:half].numpy(), test_y[:half].numpy())
        out["probe"] = float(probe.score(test_f[half:].numpy(), test_y[half:].numpy()))
    except ImportError:
        out["probe"] = float("nan")
    return out


# ---- the method table (--methods) --------------------------------------------------------------


def encoder_overrides(encoder: str, args) -> list[str]:
    """Config overrides of an encoder name of --methods: resnet (cifar10.yaml's own) or vit."""
    if encoder == "resnet":
        return []
    if encoder == "vit":  # the ResNet-only options back at their defaults: check_arch refuses them with timm
        return [f"model.arch={args.vit_arch}", f"model.arch_kwargs={args.vit_kwargs}", "model.width=64",
                "model.stem_stride=1"]
    raise SystemExit(f"--methods: unknown encoder {encoder!r} (resnet or vit, as METHOD@vit)")


def eval_sets(urls: dict, args, workdir: Path) -> dict:
    """Labeled shards of the first --eval-train / --eval-test images (per class), or the whole
    sets: what evaluate_checkpoint and the fine-tunes read."""
    from cifar import cifar_slice

    from ssl_dist.shards import make_shards

    out = {}
    for split, count, full in (("train", args.eval_train, 50000), ("test", args.eval_test, 10000)):
        if count >= full:
            out[split] = urls[split]
            continue
        folder = cifar_slice(workdir / f"eval-{split}", per_class=max(count // 10, 1), split=split)
        out[split] = f"s3://bench/cifar10/eval-{split}"
        make_shards(str(folder), out[split], samples_per_shard=5000, workers=2)
    return out


def finetune_scores(checkpoint: str, sets: dict, args, name: str) -> dict:
    """{fraction: (top1, top1 at random init)} of `ssl_dist.finetune`, "error" where it failed
    (the error is printed)."""
    from ssl_dist import finetune

    fractions = [float(f) for f in args.finetune_fractions.split(",") if f]
    found = {}
    for fraction in fractions:
        settings = finetune.FinetuneSettings(label_fraction=fraction, epochs=args.finetune_epochs, num_workers=2)
        try:
            result = finetune.finetune(checkpoint, sets["train"], sets["test"], settings,
                                       out=f"s3://bench/finetune/{name}-{fraction:g}", say=lambda line: None)
            found[fraction] = (result["top1"], result["top1_random_init"])
        except Exception as err:  # a benchmark row, not the end of the table
            print(f"fine-tune {name} at {fraction:g}: {type(err).__name__}: {err}", flush=True)
            found[fraction] = "error"
    return found


def protocol(args) -> dict:
    """What makes two method rows comparable: a --results file only holds rows of one protocol."""
    return {"minutes": args.minutes, "eval_train": args.eval_train, "eval_test": args.eval_test,
            "finetune_fractions": args.finetune_fractions, "finetune_epochs": args.finetune_epochs,
            "vit_arch": args.vit_arch, "vit_kwargs": args.vit_kwargs, "overrides": args.overrides}


def read_results(path: Path | None, args) -> list[dict]:
    """The rows already in --results (JSON lines), refused if they were measured another way."""
    if path is None or not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if row["protocol"] != protocol(args):
            raise SystemExit(f"--results {path}: row {row['spec']} was measured with {row['protocol']}, not "
                             f"{protocol(args)}: pass the same options or another --results file")
    return rows


def run_methods(urls: dict, args) -> list[dict]:
    """Each METHOD[@ENCODER] of --methods pretrained for --minutes, then scored: one row each.
    With --results, each row is appended there as soon as it is measured and a spec already
    there is not run again, so one table can be measured over several sittings."""
    from ssl_dist.evaluate import evaluate_checkpoint

    results = Path(args.results) if args.results else None
    rows = read_results(results, args)
    with tempfile.TemporaryDirectory(prefix="cifar-eval-") as tmp:
        sets = eval_sets(urls, args, Path(tmp))
        for spec in args.methods.split(","):
            method, _, encoder = spec.partition("@")
            encoder = encoder or "resnet"
            if any(row["spec"] == f"{method}@{encoder}" for row in rows):
                print(f"{method} ({encoder}): in {results} already", flush=True)
                continue
            name, commit = f"cifar10-{method}-{encoder}", git_commit()  # the code this row measures
            print(f"{method} ({encoder}): {args.minutes} min ...", flush=True)
            run = run_ssl_dist(urls, args.minutes, [f"method.name={method}", *encoder_overrides(encoder, args),
                                                    *args.overrides], name=name)
            arch = run.pop("config").model.arch
            print(f"{method} ({encoder}): evaluating ...", flush=True)
            scores = evaluate_checkpoint(run["checkpoint"], sets["train"], sets["test"])
            tuned = finetune_scores(run["checkpoint"], sets, args, name)
            row = {"spec": f"{method}@{encoder}", "method": method, "encoder": encoder, "arch": arch, "run": run,
                   "scores": scores, "finetune": {f"{f:g}": v for f, v in tuned.items()},
                   "protocol": protocol(args), "commit": commit, "measured": time.strftime("%Y-%m-%d %H:%M")}
            rows.append(row)
            if results is not None:
                with results.open("a") as out:
                    out.write(json.dumps(row) + "\n")
            print(f"{method} ({encoder}): {json.dumps(scores)} fine-tune {json.dumps(row['finetune'])}", flush=True)
    return rows


def git_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def report_methods(args, rows: list[dict]) -> None:
    fractions = [float(f) for f in args.finetune_fractions.split(",") if f]

    def cell(value, arm: int) -> str:
        return value if isinstance(value, str) else f"{value[arm]:.3f}"

    def tuned(row: dict, fraction: float, arm: int) -> str:
        return f" {cell(row['finetune'][f'{fraction:g}'], arm)} |"

    print(f"\nCIFAR-10 methods, {args.minutes:g} min each; kNN (k = 200) and linear probe over {args.eval_train} "
          f"train / {args.eval_test} test images; fine-tune on a fraction of the train labels\n")
    print("| method | encoder | steps | samples/s | kNN top-1 | linear probe |"
          + "".join(f" fine-tune {100 * f:g}% |" for f in fractions))
    print("|---|---|---|---|---|---|" + "---|" * len(fractions))
    seen = set()
    for row in rows:
        r, s = row["run"], row["scores"]
        print(f"| {row['method']} | {row['arch']} | {r['steps']} | {r['samples_per_s']:.1f} | {s['knn_top1']:.3f} | "
              f"{s['linear_top1']:.3f} |" + "".join(tuned(row, f, 0) for f in fractions))
    for row in rows:  # one random-init row per encoder: every method builds it from the same seed
        if row["arch"] in seen:
            continue
        seen.add(row["arch"])
        same = [r for r in rows if r["arch"] == row["arch"]]
        print(f"| random init | {row['arch']} | - | - | {spread(same, 'knn_top1_random_init')} | "
              f"{spread(same, 'linear_top1_random_init')} |"
              + "".join(f" {spread_tuned(same, f)} |" for f in fractions))


def spread(rows: list[dict], score: str) -> str:
    """One random-init score over the rows of one encoder: the value, or min-max where the
    methods' random-init arms differ (the fine-tunes are not bit-reproducible)."""
    values = sorted({round(r["scores"][score], 3) for r in rows})
    return f"{values[0]:.3f}" if len(values) == 1 else f"{values[0]:.3f}-{values[-1]:.3f}"


def spread_tuned(rows: list[dict], fraction: float) -> str:
    values = sorted({round(r["finetune"][f"{fraction:g}"][1], 3) for r in rows
                     if not isinstance(r["finetune"][f"{fraction:g}"], str)})
    if not values:
        return "error"
    return f"{values[0]:.3f}" if len(values) == 1 else f"{values[0]:.3f}-{values[-1]:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock training budget of each run")
    parser.add_argument("--eval-train", type=int, default=50000, help="train images for the kNN neighbours")
    parser.add_argument("--eval-test", type=int, default=10000, help="test images for kNN queries and the probe")
    parser.add_argument("--methods", default="", help="the method table instead of the plain-loop comparison: "
                        "METHOD[@ENCODER],... e.g. simclr,mocov3,rotnet,simclr@vit,mocov3@vit")
    parser.add_argument("--vit-arch", default="timm/vit_tiny_patch16_224", help="model.arch of the vit encoder")
    # 6 of ViT-Tiny's 12 blocks: at 64 tokens (patch 4 at 32 px) the whole net fits only about
    # one epoch into 20 CPU minutes here; half the blocks is half the compute per sample
    parser.add_argument("--vit-kwargs", default="{img_size: 32, patch_size: 4, depth: 6}",
                        help="its model.arch_kwargs")
    parser.add_argument("--finetune-fractions", default="0.01,0.1", help="label fractions of the fine-tune "
                        "columns (empty: none)")
    # 10 epochs (SimCLR's protocol: 30 at 10%, 60 at 1%): 10% of CIFAR-10 is 5,000 labels, and
    # two arms of 30 epochs would take longer than the pretraining on this machine
    parser.add_argument("--finetune-epochs", type=int, default=10, help="epochs of each fine-tune")
    parser.add_argument("--results", default="", help="JSON-lines file of method rows: each row is appended "
                        "when measured, specs already there are skipped, the table is printed from all of them")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs (e.g. data.batch_size=64)")
    args = parser.parse_args()

    proc, _ = start_s3()
    try:
        urls = make_shards()
        if args.methods:
            rows = run_methods(urls, args)
        else:
            ours, plain, results = compare_with_plain(urls, args)
    finally:
        proc.terminate()
    if args.methods:
        report_methods(args, rows)
    else:
        report(args, ours, plain, results)


def compare_with_plain(urls: dict, args) -> tuple[dict, dict, dict]:
    """SimCLR by ssl_dist and by the plain loop for --minutes each, then both scored next to random init."""
    from ssl_dist.evaluate import load_checkpoint_model
    from ssl_dist.model import build_model

    print(f"ssl_dist: {args.minutes} min ...", flush=True)
    ours = run_ssl_dist(urls, args.minutes, args.overrides)
    cfg = ours["config"]
    print(f"plain loop: {args.minutes} min ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="cifar-plain-") as tmp:
        plain, plain_model = run_plain(cfg, args.minutes, Path(tmp))
    print("evaluating ...", flush=True)
    ours_model, _ = load_checkpoint_model(ours["checkpoint"])
    torch.manual_seed(cfg.train.seed)
    results = {"ssl_dist": scores(ours_model, urls, args, cfg.data.image_size),
               "plain": scores(plain_model, urls, args, cfg.data.image_size),
               "random init": scores(build_model(cfg.model), urls, args, cfg.data.image_size)}
    return ours, plain, results


def report(args, ours: dict, plain: dict, results: dict) -> None:
    print(f"\nCIFAR-10, {args.minutes:g} min each, kNN over {args.eval_train} train / {args.eval_test} test images\n")
    print("| run | steps | samples/s | CPU busy | kNN top-1 | linear probe |")
    print("|---|---|---|---|---|---|")
    for name, run in (("ssl_dist", ours), ("plain", plain), ("random init", None)):
        r = results[name]
        head = f"| {name} | {run['steps']} | {run['samples_per_s']:.1f} | {100 * run['cpu_busy']:.0f}% |" if run \
            else f"| {name} | - | - | - |"
        print(f"{head} {r['knn']:.3f} | {r['probe']:.3f} |")
    print(f"\nratio ssl_dist / plain: throughput {ours['samples_per_s'] / plain['samples_per_s']:.2f}, "
          f"kNN {results['ssl_dist']['knn'] / results['plain']['knn']:.2f}; "
          f"kNN gain over random init: {100 * (results['ssl_dist']['knn'] - results['random init']['knn']):+.1f} points")
    total = sum(ours["phases"].values())
    print("\nssl_dist step time (rank 0, steady state):")
    print("| phase | share |")
    print("|---|---|")
    for phase, seconds in ours["phases"].items():
        print(f"| {phase.removeprefix('time_')} | {100 * seconds / total:.1f}% |")


if __name__ == "__main__":
    main()
