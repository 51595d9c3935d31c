"""End to end: `ssl-dist pretrain method.name=clip` with the tiny open_clip towers
(jobs/configs/clip-tiny.json) on a real local Ray cluster, 2 DeepSpeed ZeRO-2 workers,
captioned CIFAR-10 shards (real JPEGs, a `.txt` caption naming the class beside each) on the
moto S3 server; then a second invocation resumes from its checkpoint, logit scale included."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import webdataset as wds
from cifar import cifar_slice
from runs import ssl_dist_cli

from ssl_dist import metrics, shards, storage
from ssl_dist.checkpoint.weights import fp32_state_dict
from ssl_dist.model import build_image_text_model

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "clip-tiny.json"
INIT_SCALE = math.log(1 / 0.07)


def captioned_shards(tmp: Path, url: str) -> str:
    """160 CIFAR-10 JPEGs, each with the caption "a photo of a CLASS", as webdataset shards
    (ShardWriter: jpg + txt) uploaded to `url` and indexed there; returns `url`."""
    images = cifar_slice(tmp / "images", per_class=16)
    (tmp / "shards").mkdir()
    with wds.ShardWriter(str(tmp / "shards" / "shard-%06d.tar"), maxcount=80, verbose=0) as sink:
        for path in sorted(images.glob("*/*.jpg")):
            sink.write({"__key__": f"{path.parent.name}_{path.stem}", "jpg": path.read_bytes(),
                        "txt": f"a photo of a {path.parent.name}"})
    fs, root = storage.filesystem(url)
    for shard in sorted((tmp / "shards").glob("*.tar")):
        fs.put_file(str(shard), f"{root}/{shard.name}")
    shards.index_shards(url)
    return url


def logit_scale(run_url: str, step: int) -> float:
    return float(state_at(run_url, step)["logit_scale"])


def test_clip_pretrains_from_captioned_shards_then_resumes(tmp_path, bucket, ray_address):
    train_url = captioned_shards(tmp_path, f"s3://{bucket}/captioned")
    run_url = f"s3://{bucket}/runs/clip"
    args = ["pretrain", "method.name=clip", f"model.clip_arch={TINY}", f"data.train_url={train_url}",
            f"run.storage_path=s3://{bucket}/runs", "run.name=clip", "data.batch_size=16", "data.loader_workers=1",
            "run.num_workers=2", "run.cpus_per_worker=1", "train.zero_stage=2", "train.log_every=1",
            "optim.lr=0.002", "optim.warmup_steps=0", "optim.schedule=constant", "train.checkpoint_every=0"]
    first = ssl_dist_cli(*args, "train.max_steps=6", env={"RAY_ADDRESS": ray_address})
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    (attempt,) = metrics.read_history(run_url)
    losses = [float(row["loss"]) for row in attempt]
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    scale6 = logit_scale(run_url, 6)
    assert abs(scale6 - INIT_SCALE) > 1e-3, scale6  # the temperature trains (a parameter of the engine's module)

    second = ssl_dist_cli(*args, "train.max_steps=10", env={"RAY_ADDRESS": ray_address})
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "resumed from step 6" in out, out[-4000:]
    history = metrics.read_history(run_url)
    assert [int(row["step"]) for row in history[-1]] == [7, 8, 9, 10]
    scale10 = logit_scale(run_url, 10)
    print(f"logit_scale init {INIT_SCALE:.5f} step 6 {scale6:.5f} step 10 {scale10:.5f}")
    # Restored, not re-initialised: step 10 is 4 AdamW steps (each at most ~lr) from step 6's
    # scale, and the whole state is nearer step 6's than the initial one (a re-initialised run
    # would be 4 steps from the init and 6 + 4 from step 6).
    assert abs(scale10 - scale6) <= 4 * 0.002 * 1.5, (INIT_SCALE, scale6, scale10)
    initial, step6, step10 = initial_state(), state_at(run_url, 6), state_at(run_url, 10)
    assert distance(step10, step6) < distance(step10, initial), (distance(step10, step6), distance(step10, initial))


def state_at(run_url: str, step: int) -> dict:
    return fp32_state_dict(f"{run_url}/checkpoint-{step:08d}")[0]


def initial_state() -> dict:
    """The module every rank builds before training (the loop seeds with train.seed=0)."""
    torch.manual_seed(0)
    return build_image_text_model(str(TINY), image_size=32, init_logit_scale=INIT_SCALE).state_dict()


def distance(a: dict, b: dict) -> float:
    return float(torch.cat([(a[k].float() - b[k].float()).flatten() for k in b if k in a]).norm())
