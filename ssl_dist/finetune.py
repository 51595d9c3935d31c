"""Fine-tuning on a fraction of labels: the whole encoder and a linear head, on Ray Train workers.

The semi-supervised protocol of SimCLR and VISSL: a class-stratified subset of a labeled set,
drawn by seed (`finetune_subset`), trains the checkpoint's encoder and a new linear head;
top-1 on a test set is reported next to the same fine-tune from random initialisation (the
same encoder, built from the checkpoint's model config with fresh weights).

Driver (`finetune`): everything a user can get wrong is found here, before any worker
starts (a fraction that gives no subset, test shards without labels, a `--head` of another
feature width); the train set's keys and labels are listed in one pass over its shards (a
label is a tar member beside each image, so there is no cheaper correct way: the sidecars
hold offsets only; images are not decoded), the subset is drawn once and written to the
output folder (subset.json), and the checkpoint's fp32 weights are read once and sent to
the workers.

Workers (`worker_loop`, DDP through `ray.train.torch.prepare_model`, gloo or NCCL): the
stream (`data.make_loader`) plans whole sets and takes no key filter, and a fine-tune's
subset is small (1% or 10% of a set), so each rank reads its share of the subset's samples
once, still encoded, into memory, and decodes and augments them each step (random resized
crop + flip, then the method's own normalisation). Each rank writes the keys it trained on
(trained-keys-rankNNNNN.json), so that what a run trained on can be checked against
subset.json. Every rank scores its share of the test set; the counts are summed and rank 0
writes both arms' top-1 (scores.json), which the driver folds into results.json.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ssl_dist import storage
from ssl_dist.evaluate import EvaluationError
from ssl_dist.finetune_subset import Sample, SubsetError, class_counts, stratified_subset

SUBSET = "subset.json"
RESULTS = "results.json"
SCORES = "scores.json"  # rank 0's top-1 of both arms
SUBSET_FORMAT = "ssl_dist.finetune_subset/1"


@dataclass
class FinetuneSettings:
    """What a fine-tune does besides its data: the same for both arms (pretrained, random init)."""

    label_fraction: float
    seed: int = 0
    epochs: int = 30
    batch_size: int = 64  # per worker
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_scale: tuple[float, float] = (0.2, 1.0)
    num_workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False


def default_out(checkpoint_url: str, fraction: float, seed: int) -> str:
    """<the checkpoint's run folder>/finetune-<fraction>-seed<seed>."""
    run = checkpoint_url.rstrip("/").rsplit("/", 1)[0]
    return storage.join(run, f"finetune-{fraction:g}-seed{seed}")


# ---- driver: what the labeled sets hold ------------------------------------------------------


def list_labeled(url: str, options: dict | None = None) -> list[Sample]:
    """Every sample of the shards at `url` as (key, label, shard, index), in manifest order: one
    pass over the shards, labels parsed, images not decoded. EvaluationError for a sample
    without a label or with a negative one."""
    from ssl_dist import data
    from ssl_dist.decode import field_value

    shards = data.ShardSet(url, options if options is not None else storage.storage_options(url))
    samples = []
    for shard, count in enumerate(shards.counts.tolist()):
        for (_, index), (key, fields) in sorted(shards.read_runs([(shard, 0, count)]).items()):
            if "cls" not in fields:
                raise EvaluationError(f"sample {key!r} of {url} has no label (.cls): fine-tuning needs labeled "
                                      f"train shards (`ssl-dist shards make` of class folders)")
            label = field_value(key, "cls", fields["cls"])
            if label < 0:
                raise EvaluationError(f"sample {key!r} of {url} has the negative label {label}: labels are class "
                                      f"indices 0, 1, ...")
            samples.append(Sample(key, label, shard, index))
    return samples


def check_test_labeled(url: str, options: dict | None = None) -> None:
    """EvaluationError unless the test shards at `url` carry labels: the manifest's "fields"
    list "cls" (a manifest without the list: its first sample has one)."""
    from ssl_dist import data

    shards = data.ShardSet(url, options if options is not None else storage.storage_options(url))
    fields = shards.manifest.get("fields")
    if fields is None:
        first = next(iter(shards.read_runs([(int(np.flatnonzero(shards.counts)[0]), 0, 1)]).values()))
        fields = list(first[1])
    if "cls" not in fields:
        raise EvaluationError(f"the test shards at {url} have no labels (their samples hold {', '.join(fields)}; no "
                              f".cls): fine-tuning is scored on a labeled test set, made with `ssl-dist shards make` "
                              f"from class folders")


def draw_subset(samples: list[Sample], fraction: float, seed: int) -> list[Sample]:
    """`finetune_subset.stratified_subset`, its refusals as EvaluationError (the CLI's exit 2)."""
    try:
        return stratified_subset(samples, fraction, seed)
    except SubsetError as err:
        raise EvaluationError(str(err)) from None


def feature_width(module: torch.nn.Module, image_size: int) -> int:
    """The width F of `module.features` at `image_size` (one forward of a blank batch of 2)."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        width = int(module.features(torch.zeros(2, 3, image_size, image_size)).shape[1])
    module.train(was_training)
    return width


def read_head(url: str, width: int, num_classes: int, options: dict | None = None) -> dict[str, torch.Tensor]:
    """A linear head to start the pretrained arm from ({"weight": (C, F), "bias": (C,)} in a
    safetensors file: nothing is unpickled). EvaluationError unless F is the encoder's feature
    width and C the train set's class count."""
    from safetensors.torch import load

    fs, path = storage.filesystem(url, options)
    with storage.translate_errors(url):
        try:
            tensors = load(fs.cat_file(path))
        except FileNotFoundError:
            raise EvaluationError(f"--head {url}: no such file") from None
        except Exception as err:  # noqa: BLE001 (safetensors raises its own error types for a bad file)
            raise EvaluationError(f"--head {url} is not a safetensors file ({err})") from None
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None or weight.ndim != 2 or bias.shape != weight.shape[:1]:
        raise EvaluationError(f"--head {url} must hold 'weight' (classes, features) and 'bias' (classes,)")
    if weight.shape[1] != width:
        raise EvaluationError(f"--head {url} takes {weight.shape[1]}-d features but the checkpoint's encoder gives "
                              f"{width}-d ones: pass a head fitted on this encoder's features, or none")
    if weight.shape[0] != num_classes:
        raise EvaluationError(f"--head {url} has {weight.shape[0]} classes but the train set has {num_classes}: "
                              f"pass a head for this set's classes, or none")
    return {"weight": weight.float(), "bias": bias.float()}


def subset_record(train_url: str, subset: list[Sample], all_counts: dict[int, int], fraction: float,
                  seed: int, names: list[str]) -> dict:
    """subset.json: what reproduces the protocol (the set, fraction, seed, and every key)."""
    return {"format": SUBSET_FORMAT, "train": train_url, "label_fraction": fraction, "seed": seed,
            "num_samples": len(subset), "class_counts": {str(c): n for c, n in class_counts(subset).items()},
            "set_class_counts": {str(c): n for c, n in all_counts.items()},
            "samples": [{"key": s.key, "label": s.label, "shard": names[s.shard], "index": s.index}
                        for s in subset]}


def write_subset(out: str, record: dict, options: dict | None) -> None:
    """Write subset.json, refusing to replace one of another subset (a rerun of the same one is fine)."""
    url = storage.join(out, SUBSET)
    fs, path = storage.filesystem(url, options)
    text = json.dumps(record, indent=1)
    if fs.exists(path):
        if json.loads(fs.cat_file(path)) != record:
            raise EvaluationError(f"{url} holds another subset (another set, fraction or seed): pass another --out, "
                                  f"or delete that folder")
        return
    storage.write_text(url, text, options)


# ---- driver: the run -------------------------------------------------------------------------


def finetune(checkpoint_url: str, train_url: str, test_url: str, settings: FinetuneSettings, *,
             out: str | None = None, head_url: str | None = None, address: str | None = None,
             say=print) -> dict:
    """Fine-tune a checkpoint's encoder on a fraction of `train_url`'s labels and score it on
    `test_url`, next to the same fine-tune from random initialisation. Driver only; every
    check runs before any worker starts. Returns results.json's dict ({"top1",
    "top1_random_init", "out", ...}), also written to `out` (default: `default_out`)."""
    from ssl_dist import evaluate, export, launch
    from ssl_dist.finetune_subset import check_fraction

    try:  # a fraction outside (0, 1] is refused before anything is read
        check_fraction(settings.label_fraction, {})
    except SubsetError as err:
        raise EvaluationError(str(err)) from None
    train_url, test_url = storage.absolute(train_url), storage.absolute(test_url)
    info = export.resolve_checkpoint(storage.absolute(checkpoint_url), storage.storage_options(checkpoint_url))
    out = storage.absolute(out) if out else default_out(info.url, settings.label_fraction, settings.seed)
    evaluate.check_same_classes(train_url, test_url)
    check_test_labeled(test_url)
    samples = list_labeled(train_url)
    subset = draw_subset(samples, settings.label_fraction, settings.seed)
    if len(subset) < settings.num_workers:
        raise EvaluationError(f"the subset holds {len(subset)} samples, fewer than the {settings.num_workers} "
                              f"workers: pass fewer --workers or a larger --label-fraction")
    model, cfg = evaluate.load_checkpoint_model(info)
    width = feature_width(model, cfg.data.image_size)
    counts = class_counts(samples)
    num_classes = max(counts) + 1
    head = read_head(head_url, width, num_classes, storage.storage_options(head_url)) if head_url else None
    out_options = storage.storage_options(out)
    from ssl_dist.data import ShardSet

    names = ShardSet(train_url, storage.storage_options(train_url)).names
    write_subset(out, subset_record(train_url, subset, counts, settings.label_fraction, settings.seed, names),
                 out_options)
    say(f"subset: {len(subset)} of {len(samples)} samples ({settings.label_fraction:g} of each of {len(counts)} "
        f"classes, seed {settings.seed}): {storage.join(out, SUBSET)}")
    loop_config = {"config": cfg, "state": model.state_dict(), "head": head, "width": width,
                   "num_classes": num_classes, "subset": [tuple(s) for s in subset], "train_url": train_url,
                   "test_url": test_url, "train_options": storage.storage_options(train_url),
                   "test_options": storage.storage_options(test_url), "settings": settings, "out": out,
                   "out_options": out_options}
    launch.connect_ray(address)
    result = build_trainer(loop_config, out, out_options, settings).fit()
    if result.error is not None:
        raise result.error
    scores_url = storage.join(out, SCORES)
    fs, path = storage.filesystem(scores_url, out_options)
    fs.invalidate_cache()
    results = {**json.loads(fs.cat_file(path)), "checkpoint": info.url,
               "train": train_url, "test": test_url, "label_fraction": settings.label_fraction,
               "seed": settings.seed, "subset_samples": len(subset), "epochs": settings.epochs,
               "workers": settings.num_workers, "out": out}
    storage.write_text(storage.join(out, RESULTS), json.dumps(results, indent=1), out_options)
    return results


def build_trainer(loop_config: dict, out: str, out_options: dict, settings: FinetuneSettings):
    """The TorchTrainer of a fine-tune (DDP; Ray Train's own files under `out`/ray-train)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    filesystem, path = storage.pyarrow_filesystem(out, out_options)
    return TorchTrainer(
        train_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                                               resources_per_worker={"CPU": settings.cpus_per_worker}),
        run_config=ray.train.RunConfig(name="ray-train", storage_path=path, storage_filesystem=filesystem,
                                       failure_config=ray.train.FailureConfig(max_failures=0)))


def train_loop(loop_config: dict) -> None:
    """What each Ray Train worker runs (imported there: the driver never loads the loop)."""
    from ssl_dist.finetune import worker_loop

    worker_loop(loop_config)


# ---- workers ---------------------------------------------------------------------------------


class Classifier(torch.nn.Module):
    """A method's module (its `features`: (B, 3, S, S) -> (B, F)) and a linear head (F -> C)."""

    def __init__(self, module: torch.nn.Module, width: int, num_classes: int):
        super().__init__()
        self.module = module
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.module.features(images))


class TrainView:
    """Sample dict -> {"image": normalised tensor, "cls"}: random resized crop + flip, then the
    method's evaluation view (its resize and normalisation)."""

    def __init__(self, image_size: int, eval_view, scale: tuple[float, float]):
        from torchvision.transforms import v2

        self.augment = v2.Compose([v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
                                   v2.RandomHorizontalFlip()])
        self.eval_view = eval_view

    def __call__(self, sample: dict) -> dict:
        return self.eval_view({**sample, "image": self.augment(sample["image"])})


def read_share(url: str, options: dict, samples: list[Sample]) -> list[tuple[str, dict]]:
    """The encoded (key, fields) of `samples`, in their order: one ranged read per stretch of a
    shard that holds some of them (gaps of up to READ_THROUGH_GAP samples read through)."""
    from ssl_dist import data

    shards = data.ShardSet(url, options)
    wanted = sorted({(s.shard, s.index) for s in samples})
    runs, start = [], 0
    for i in range(1, len(wanted) + 1):
        if i == len(wanted) or wanted[i][0] != wanted[i - 1][0] or \
                wanted[i][1] - wanted[i - 1][1] > data.READ_THROUGH_GAP + 1:
            runs.append((wanted[start][0], wanted[start][1], wanted[i - 1][1] + 1))
            start = i
    found = shards.read_runs(runs)
    return [found[(s.shard, s.index)] for s in samples]


def batches(share: list, batch_size: int, steps: int, seed: int, rank: int):
    """`steps` lists of `batch_size` items of `share`, which is gone through in a new random
    order (seeded by seed, rank, pass) each time it is used up."""
    order: list[int] = []
    passes = 0
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = np.random.default_rng([seed, rank, passes, 0xF1]).permutation(len(share)).tolist()
                passes += 1
            batch.append(share[order.pop()])
        yield batch


def worker_loop(loop_config: dict) -> None:
    """Each rank: fine-tune the pretrained and the randomly initialised encoder on its share of
    the subset, score both on its share of the test set; the summed top-1 is reported."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ssl_dist import data, evaluate

    cfg, settings = loop_config["config"], loop_config["settings"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    subset = [Sample(*s) for s in loop_config["subset"]]
    mine = subset[rank::world]
    share = read_share(loop_config["train_url"], loop_config["train_options"], mine)
    storage.write_text(storage.join(loop_config["out"], f"trained-keys-rank{rank:05d}.json"),
                       json.dumps(sorted(key for key, _ in share)), loop_config["out_options"])
    global_batch = settings.batch_size * world
    steps = settings.epochs * math.ceil(len(subset) / global_batch)
    view = evaluate.eval_view(cfg)
    train_view = TrainView(cfg.data.image_size, view, settings.crop_scale)
    scores = {}
    for arm in ("pretrained", "random_init"):
        torch.manual_seed(settings.seed)  # the same fresh weights (and head) on every rank and for both arms
        module = evaluate.build_module(cfg)
        if arm == "pretrained":
            module.load_state_dict(loop_config["state"])
        model = Classifier(module, loop_config["width"], loop_config["num_classes"])
        if arm == "pretrained" and loop_config["head"] is not None:
            model.head.load_state_dict(loop_config["head"])
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum, nesterov=True,
                                    weight_decay=settings.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        model.train()
        for step, batch in enumerate(batches(share, settings.batch_size, steps, settings.seed, rank), start=1):
            views = [train_view(data.decode_sample(key, fields, max_pixels=cfg.data.max_pixels))
                     for key, fields in batch]
            images = torch.stack([v["image"] for v in views]).to(device)
            labels = torch.tensor([v["cls"] for v in views], device=device)
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if rank == 0 and (step % 10 == 0 or step == steps):
                print(f"fine-tune ({arm}) step {step}/{steps}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
        counts = test_counts(model, loop_config, view, rank, world, device)
        dist.all_reduce(counts)
        scores["top1" if arm == "pretrained" else "top1_random_init"] = float(counts[0] / counts[1])
        if rank == 0:
            print(f"fine-tune ({arm}): test top-1 {float(counts[0] / counts[1]):.4f} of {int(counts[1])} samples",
                  file=sys.stderr, flush=True)
    if rank == 0:  # Ray Train 2 keeps a report's metrics only with a checkpoint: the driver reads this file
        storage.write_text(storage.join(loop_config["out"], SCORES), json.dumps(scores), loop_config["out_options"])


@torch.no_grad()
def test_counts(model, loop_config: dict, view, rank: int, world: int, device) -> torch.Tensor:
    """(correct, total) of this rank's share of the test set (samples rank, rank + world, ...)."""
    from ssl_dist import evaluate

    cfg = loop_config["config"]
    model.eval()
    correct = total = 0
    for images, labels in evaluate.iter_labeled(loop_config["test_url"], image_size=cfg.data.image_size,
                                                storage_options=loop_config["test_options"], rank=rank,
                                                world=world, view=view, max_pixels=cfg.data.max_pixels):
        correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
        total += len(labels)
    return torch.tensor([correct, total], dtype=torch.float64, device=device)
