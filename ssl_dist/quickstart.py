"""`ssl-dist quickstart`: the whole system in a few minutes on a laptop.

Makes a synthetic labeled dataset as shards (unless it is there already), pretrains a SimCLR
encoder on a local Ray cluster with 2 DeepSpeed workers, then prints the kNN accuracy of
the pretrained encoder next to that of the same encoder at random initialisation.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ssl_dist import config, evaluate, launch, shards, storage, synthetic

# The embedded default run (jobs/configs/quickstart.yaml holds the same values; a test checks).
QUICKSTART = {
    "data": {"batch_size": 128, "loader_workers": 1, "image_size": 32, "shuffle_window": 2048},
    "model": {"arch": "resnet18", "cifar_stem": False, "proj_hidden_dim": 256, "proj_dim": 64},
    "loss": {"temperature": 0.2},
    "optim": {"name": "adamw", "lr": 2e-3, "warmup_steps": 20},
    "train": {"max_steps": 200, "zero_stage": 2, "checkpoint_every": 100, "log_every": 20},
    "run": {"name": "quickstart", "num_workers": 2},
}
TRAIN_PER_CLASS, TEST_PER_CLASS = 1000, 200


def make_dataset(root: Path) -> tuple[str, str]:
    """Synthetic train/test shards under `root` (made once, reused by later runs)."""
    urls = []
    for split, per_class, seed in (("train", TRAIN_PER_CLASS, 1), ("test", TEST_PER_CLASS, 2)):
        dest = root / split
        if not (dest / "index.json").exists():
            with tempfile.TemporaryDirectory(prefix="ssl-dist-synthetic-") as tmp:
                synthetic.write_image_folder(tmp, per_class=per_class, seed=seed)
                # overwrite: a crash may have left shards without their manifest
                shards.make_shards(tmp, str(dest), samples_per_shard=1000, workers=2, overwrite=True)
        urls.append(str(dest))
    return urls[0], urls[1]


def quickstart_config(out: Path, train_url: str, overrides: list[str] | tuple[str, ...] = ()) -> config.Config:
    """The quickstart's config: embedded defaults, its data and run folder, then `overrides`."""
    cfg = config.merge(config.Config(), QUICKSTART, origin="quickstart defaults")
    cfg = config.merge(cfg, {"data": {"train_url": train_url}, "run": {"storage_path": str(out.resolve())}},
                       origin="quickstart paths")
    cfg = config.merge(cfg, config.parse_overrides(overrides), origin="command line")
    cfg.validate()
    return cfg


def run(out: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Make data, pretrain, evaluate; prints a summary and returns the scores."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"[quickstart] data: synthetic shapes under {out_dir / 'data'}", flush=True)
    train_url, test_url = make_dataset(out_dir / "data")
    cfg = quickstart_config(out_dir, train_url, overrides)
    # A fresh run each time: an earlier quickstart's checkpoints would be resumed otherwise.
    run_url = launch.run_url(cfg)
    fs, path = storage.filesystem(run_url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    launch.connect_ray(num_cpus=os.cpu_count())
    result = launch.pretrain(cfg)
    print(f"[quickstart] evaluating {result.checkpoint_url}", flush=True)
    scores = evaluate.evaluate_checkpoint(result.checkpoint_url, train_url, test_url)
    minutes = (time.monotonic() - started) / 60
    print(f"\nkNN top-1, pretrained encoder:      {scores['knn_top1']:.3f}")
    print(f"kNN top-1, random initialisation:   {scores['knn_top1_random_init']:.3f}")
    print(f"run folder: {result.run_url}  ({minutes:.1f} min)")
    return scores
