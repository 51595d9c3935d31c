"""A short slice of `jobs/configs/cifar10_gpu.yaml` on one GPU: samples/s per GPU of the
training step (DeepSpeed engine, bf16, NT-Xent) fed by the shard stream, for both
augmentation placements (per sample in the loader workers, per batch on the GPU).

    python benchmarks/gpu_slice.py SHARDS_URL [--steps 60] [--loader-workers 8]

Runs one process (world size 1); Ray is not needed for this measurement and the lent GPU
machine has none. Prints a table with median step times and samples/s, and the ratio of
the two placements, measured in the same run, and the median global gradient norm (before
any clipping: optim.grad_clip is off in the recipe).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def one_placement(cfg, url: str, steps: int, lookahead: bool = True) -> dict:
    """Time `steps` training steps (the loop's own `optimizer_step` and SimCLR method) fed by the stream."""
    from ssl_dist import data
    from ssl_dist.engine import build_engine
    from ssl_dist.methods.simclr import SimCLR
    from ssl_dist.step import optimizer_step

    torch.manual_seed(0)
    method = SimCLR(cfg, rank=0)
    engine = build_engine(method.build_module(), cfg, 1)
    per_batch = cfg.data.augment == "per_batch"
    loader = data.make_loader(url, rank=0, world_size=1, batch_size=cfg.data.batch_size,
                              num_workers=cfg.data.loader_workers, image_format=method.image_format,
                              transform=method.sample_transform(), lookahead=lookahead)
    times, waits, norms, step = [], [], [], 0
    tick = time.perf_counter()
    while step < steps:
        for batch in loader:
            got = time.perf_counter()
            batch = method.on_device(batch, epoch=loader.epoch, device=engine.device)
            loss = optimizer_step(engine, method, [batch])
            norms.append(engine.get_global_grad_norm())  # before clipping; read after the timing
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - tick)
            waits.append(got - tick)
            tick = now
            step += 1
            if step >= steps:
                break
    # Throughput over the whole steady window, stalls included (the median step hides them:
    # a loader that cannot keep up gives fast steps on prefetched batches, then long waits).
    steady = times[steps // 3:]
    wait = waits[steps // 3:]
    return {"step_s": statistics.median(steady), "samples_per_s": cfg.data.batch_size * len(steady) / sum(steady),
            "data_wait": sum(wait) / sum(steady), "loss": loss.item(),
            "grad_norm": statistics.median(float("nan") if n is None else float(n) for n in norms[steps // 3:]),
            "augment_ms": augment_ms(method.batch_views, cfg.data.batch_size, cfg.data.image_size, engine.device)
            if per_batch else None}


def augment_ms(views, batch_size: int, image_size: int, device) -> dict:
    """Milliseconds per batch of the per-batch augmentation on the device: in all, and each op's."""
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)
    x = torch.cat([images, images]).float().div_(255)

    def timed(fn, repeats=20) -> float:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start) / repeats

    out = {"all": timed(lambda: views(images))}
    for op in views.augment:
        out[type(op).__name__] = timed(lambda op=op: op(x))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--loader-workers", type=int, default=8)
    parser.add_argument("--no-lookahead", action="store_true",
                        help="start each epoch's loader workers only when it begins (as before the lookahead)")
    parser.add_argument("overrides", nargs="*", help="config overrides (a CPU smoke run: train.precision=fp32 ...)")
    args = parser.parse_intermixed_args()

    from ssl_dist import config

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rows = {}
    for placement in ("per_sample", "per_batch"):
        cfg = config.load(ROOT / "jobs" / "configs" / "cifar10_gpu.yaml",
                          [f"data.train_url={args.url}", f"data.augment={placement}",
                           f"data.loader_workers={args.loader_workers}", *args.overrides])
        rows[placement] = one_placement(cfg, args.url, args.steps, lookahead=not args.no_lookahead)
        print(placement, rows[placement], flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, batch {cfg.data.batch_size}, {cfg.train.precision}, ZeRO-{cfg.train.zero_stage}, "
          f"{args.loader_workers} loader workers{' (no lookahead)' if args.no_lookahead else ''}, "
          f"median of steps {args.steps // 3}..{args.steps}\n")
    print("| augmentation | median step (ms) | samples/s per GPU (all steps) | waiting for data | gradient norm |")
    print("|---|---|---|---|---|")
    for placement, r in rows.items():
        print(f"| {placement} | {1000 * r['step_s']:.1f} | {r['samples_per_s']:.0f} | {100 * r['data_wait']:.1f}% "
              f"| {r['grad_norm']:.2f} |")
    if rows["per_batch"]["augment_ms"]:
        print("\nper-batch augmentation on the device, ms per batch (both views):")
        print(" | ".join(f"{name} {ms:.1f}" for name, ms in rows["per_batch"]["augment_ms"].items()))
    print(f"\nratio per_batch / per_sample: {rows['per_batch']['samples_per_s'] / rows['per_sample']['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
