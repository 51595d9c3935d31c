"""What clipping the gradient norm to 1.0 does to `jobs/configs/cifar10_gpu.yaml`'s SGD recipe.

    python benchmarks/grad_clip.py SHARDS_URL [--steps 400] [--clip 1.0] [overrides ...]

Until `optim.grad_clip` existed, every run was clipped to norm 1.0 without saying so
(DeepSpeed >= 0.19's default when its config omits `gradient_clipping`). This trains the
recipe twice from the same initialisation on the same batches, once unclipped (the default
now) and once clipped to `--clip`, and prints the median gradient norm before clipping,
the final loss, samples/s and kNN top-1 (k = 200): neighbours are the first 5/6 of the
labeled shards' samples and queries the rest (labels are used only here). One process,
world size 1; on a GPU by default, a CPU smoke run with `train.precision=fp32 data.batch_size=16`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def train(cfg, url: str, steps: int) -> tuple[torch.nn.Module, dict]:
    """`steps` training steps of the loop's own `optimizer_step` (SimCLR, per-batch views); returns (model, figures)."""
    from ssl_dist import data
    from ssl_dist.engine import build_engine
    from ssl_dist.methods.simclr import SimCLR
    from ssl_dist.step import optimizer_step

    torch.manual_seed(cfg.train.seed)
    method = SimCLR(cfg, rank=0)
    engine = build_engine(method.build_module(), cfg, 1)
    loader = data.make_loader(url, rank=0, world_size=1, batch_size=cfg.data.batch_size, seed=cfg.data.seed,
                              num_workers=cfg.data.loader_workers, image_format=method.image_format,
                              transform=method.sample_transform())
    norms, losses, step = [], [], 0
    start = time.perf_counter()
    while step < steps:
        for batch in loader:
            losses.append(optimizer_step(engine, method, [method.on_device(batch, epoch=loader.epoch,
                                                                             device=engine.device)]))
            norms.append(engine.get_global_grad_norm())  # before clipping
            step += 1
            if step >= steps:
                break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return engine.module, {"grad_norm": statistics.median(float("nan") if n is None else float(n) for n in norms),
                           "loss": statistics.mean(float(x) for x in losses[-20:]),
                           "samples_per_s": steps * cfg.data.batch_size / seconds}


@torch.no_grad()
def knn_split(model, url: str, image_size: int) -> float:
    """kNN top-1: the first 5/6 of the samples at `url` are the neighbours, the rest the queries."""
    from ssl_dist.evaluate import iter_labeled, knn_top1

    model.eval()
    param = next(model.parameters())  # bf16 under train.precision=bf16
    feats, labels = [], []
    for images, y in iter_labeled(url, image_size=image_size, batch_size=512):
        feats.append(F.normalize(model.features(images.to(param.device, param.dtype)).float(), dim=1).cpu())
        labels.append(y)
    feats, labels = torch.cat(feats), torch.cat(labels)
    cut = len(feats) * 5 // 6
    return knn_top1(feats[:cut], labels[:cut], feats[cut:], labels[cut:], k=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("overrides", nargs="*", help="config overrides")
    args = parser.parse_intermixed_args()

    from ssl_dist import config

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rows = {}
    for clip in (0.0, args.clip):
        # warm-up shortened to a tenth of the run: the recipe's 500 steps would cover all of it
        cfg = config.load(ROOT / "jobs" / "configs" / "cifar10_gpu.yaml",
                          [f"data.train_url={args.url}", f"optim.warmup_steps={max(1, args.steps // 10)}",
                           f"train.max_steps={args.steps}", *args.overrides, f"optim.grad_clip={clip}"])
        model, rows[clip] = train(cfg, args.url, args.steps)
        rows[clip]["knn"] = knn_split(model, args.url, cfg.data.image_size)
        print(clip, rows[clip], flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, batch {cfg.data.batch_size}, {cfg.train.precision}, {args.steps} steps (cosine after "
          f"{cfg.optim.warmup_steps} of warm-up), SGD lr {cfg.optim.lr}\n")
    print("| optim.grad_clip | median gradient norm | loss (last 20 steps) | kNN top-1 | samples/s |")
    print("|---|---|---|---|---|")
    for clip, r in rows.items():
        print(f"| {clip:g}{' (off)' if not clip else ''} | {r['grad_norm']:.2f} | {r['loss']:.3f} | "
              f"{r['knn']:.3f} | {r['samples_per_s']:.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
