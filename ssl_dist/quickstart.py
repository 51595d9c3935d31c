"""`ssl-dist quickstart`: the whole system in a few minutes on a laptop.

Makes a synthetic dataset as shards (unless it is there already), pretrains on a local Ray
cluster with 2 DeepSpeed workers, then prints scores of the pretrained model next to the same
model at random initialisation:

- `method="simclr"` (the default): a SimCLR encoder on the labeled shapes; kNN top-1.
- `method="clip"`: CLIP's two towers (`CLIP_ARCH`) on the captioned shapes ("a large red
  circle in the top left"); zero-shot top-1 on the shape names, and retrieval recall@1/5
  image->text and text->image on the test split.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ssl_dist import config, evaluate, launch, metrics, quiet, shards, storage, synthetic

METHODS = ("simclr", "clip")

# The embedded default run (jobs/configs/quickstart.yaml holds the same values; a test checks).
# A quarter-width ResNet-18 with its views made per batch: 3.5x the samples/s of the full width
# with PIL views in the loader, so in fewer minutes it takes 2.5x the steps and learns more (on 2
# CPU cores, 2026-12-03, the whole command: 200 steps of the full width, 6.8 min, kNN +15.8
# points over random init; of this, 500 steps (the default) 3.8 min, +19.3, and 600 steps 5.1
# min, +21.2; 200 steps of the full width with per-batch views 5.3 min, +12.9). The rest of the
# command is Ray's start, data, evaluation. log_every: the progress line (and the bar, which reads the
# metrics rank 0 rewrites at each line) about every 8 s at this run's 0.4 s a step.
QUICKSTART = {
    "data": {"batch_size": 128, "loader_workers": 1, "image_size": 32, "shuffle_window": 2048,
             "augment": "per_batch"},
    "model": {"arch": "resnet18", "width": 32, "cifar_stem": False, "proj_hidden_dim": 256, "proj_dim": 64},
    "loss": {"temperature": 0.2},
    "optim": {"name": "adamw", "lr": 2e-3, "warmup_steps": 20},
    "train": {"max_steps": 500, "zero_stage": 2, "checkpoint_every": 250, "log_every": 20},
    "run": {"name": "quickstart", "num_workers": 2},
}

# open_clip's config of the CLIP quickstart's towers, package data (installed with ssl_dist,
# which jobs/configs is not). A small ResNet image tower: on 32-pixel shapes it learns the
# shape within minutes on a CPU, where ViTs like jobs/configs/clip-tiny.json learn colour and
# position first and, in the same time, reached about 0.4 zero-shot on the shapes (this: 0.65).
CLIP_ARCH = Path(__file__).resolve().parent / "configs" / "quickstart-clip.json"

# The embedded default of `--method clip`.
QUICKSTART_CLIP = {
    "data": {"batch_size": 128, "loader_workers": 1, "image_size": 32, "shuffle_window": 2048},
    "method": {"name": "clip"},
    "model": {"clip_arch": str(CLIP_ARCH)},
    "optim": {"name": "adamw", "lr": 2e-3, "warmup_steps": 20, "weight_decay": 0.1},
    "train": {"max_steps": 400, "zero_stage": 2, "checkpoint_every": 200, "log_every": 20},
    "run": {"name": "quickstart-clip", "num_workers": 2},
}
DEFAULTS = {"simclr": QUICKSTART, "clip": QUICKSTART_CLIP}
TRAIN_PER_CLASS = 1000
TEST_FRACTION = 5  # the test split has a fifth as many images per class as the training split


def make_dataset(root: Path, *, per_class: int = TRAIN_PER_CLASS, captions: bool = False) -> tuple[str, str]:
    """Synthetic train/test shards under `root`: `per_class` training images of each shape and
    a fifth as many test images (at least 1); captioned ones with `captions`. Made once and
    reused by later runs of the same size."""
    urls = []
    for split, count, seed in (("train", per_class, 1), ("test", max(1, per_class // TEST_FRACTION), 2)):
        dest = root / split
        if not holds_samples(dest, count * len(synthetic.CLASSES)):
            with tempfile.TemporaryDirectory(prefix="ssl-dist-synthetic-") as tmp:
                synthetic.write_image_folder(tmp, per_class=count, seed=seed, captions=captions)
                # overwrite: a crash may have left shards without their manifest
                shards.make_shards(tmp, str(dest), samples_per_shard=1000, workers=2, overwrite=True)
        urls.append(str(dest))
    return urls[0], urls[1]


def holds_samples(dest: Path, count: int) -> bool:
    """Whether `dest` holds finished shards of `count` samples (a set of another size is remade)."""
    index = dest / "index.json"
    return index.exists() and json.loads(index.read_text()).get("num_samples") == count


def quickstart_config(out: Path, train_url: str, overrides: list[str] | tuple[str, ...] = (),
                      method: str = "simclr") -> config.Config:
    """The quickstart's config: `method`'s embedded defaults, its data and run folder, then `overrides`."""
    cfg = config.merge(config.Config(), DEFAULTS[method], origin=f"quickstart --method {method} defaults")
    cfg = config.merge(cfg, {"data": {"train_url": train_url}, "run": {"storage_path": str(out.resolve())}},
                       origin="quickstart paths")
    cfg = config.merge(cfg, config.parse_overrides(overrides), origin="command line")
    cfg.validate()
    return cfg


def run(out: str, overrides: list[str] | tuple[str, ...] = (), *, method: str = "simclr",
        per_class: int = TRAIN_PER_CLASS, delete_previous: bool = False) -> dict:
    """Make data, pretrain `method` ("simclr" or "clip"), evaluate; prints a summary and returns
    the scores. `per_class`: training images of each shape (the test split gets a fifth).
    Each quickstart starts over: an earlier one's run is moved to `<run>.previous-<UTC time>`
    (its checkpoints would be resumed otherwise), or deleted with `delete_previous`."""
    if method not in DEFAULTS:
        raise ValueError(f"unknown quickstart method {method!r}: one of {', '.join(METHODS)}")
    quiet.install()  # this process evaluates with DeepSpeed too
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    captions = method == "clip"
    data_dir = out_dir / ("data-clip" if captions else "data")
    print(f"[quickstart] data: synthetic {'captioned ' if captions else ''}shapes under {data_dir}", flush=True)
    train_url, test_url = make_dataset(data_dir, per_class=per_class, captions=captions)
    cfg = quickstart_config(out_dir, train_url, overrides, method)
    launch.connect_ray(num_cpus=os.cpu_count())  # a local Ray with token auth, unless RAY_ADDRESS is set
    print(f"[quickstart] pretraining {method} for {cfg.train.max_steps} steps on {cfg.run.num_workers} Ray "
          f"workers (a progress line every {cfg.train.log_every} steps)", flush=True)
    # the bar of `ssl-dist pretrain` (on a terminal; elsewhere rank 0's progress lines are the record)
    with metrics.watch_run(launch.run_url(cfg), storage.options_from_config(cfg.run.storage_path, cfg.storage),
                           max_steps=cfg.train.max_steps):
        result = launch.pretrain(cfg, resume=False, delete_previous=delete_previous)
    print(f"[quickstart] evaluating {result.checkpoint_url}", flush=True)
    if captions:
        scores = evaluate.evaluate_text_checkpoint(result.checkpoint_url, zero_shot_url=test_url,
                                                   templates=synthetic.caption_templates(), retrieval_url=test_url,
                                                   max_samples=0)
        print_clip_scores(scores)
    else:
        scores = evaluate.evaluate_checkpoint(result.checkpoint_url, train_url, test_url)
        print(f"\nkNN top-1, pretrained encoder:      {scores['knn_top1']:.3f}")
        print(f"kNN top-1, random initialisation:   {scores['knn_top1_random_init']:.3f}")
    minutes = (time.monotonic() - started) / 60
    print(f"run folder: {result.run_url}  ({minutes:.1f} min)")
    if result.curves_url:
        print(f"curves: {result.curves_url}")
    print(f"TensorBoard: {tensorboard_command(result.run_url)}")
    return scores


def tensorboard_command(run_url: str) -> str:
    """The command that shows the run's TensorBoard files, and how to get TensorBoard if this
    environment lacks it (ssl-dist writes the files with tensorboardX, without TensorBoard)."""
    command = f"tensorboard --logdir {storage.join(run_url, metrics.TENSORBOARD_DIR)}"
    return command if shutil.which("tensorboard") else f"{command}  (after `pip install tensorboard`)"


CLIP_ROWS = (("zero-shot top-1 (shape names)", "zero_shot_top1"), ("image->text recall@1", "image_to_text_R@1"),
             ("image->text recall@5", "image_to_text_R@5"), ("text->image recall@1", "text_to_image_R@1"),
             ("text->image recall@5", "text_to_image_R@5"))


def print_clip_scores(scores: dict) -> None:
    """The CLIP quickstart's figures on the test split, each next to the same towers at random init."""
    print(f"\n{'':32}{'pretrained':>12}{'random init':>14}")
    for label, key in CLIP_ROWS:
        print(f"{label:32}{scores[key]:12.3f}{scores[key + '_random_init']:14.3f}")
