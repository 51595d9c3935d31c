"""End to end: `ssl-dist pretrain method.name=clip / siglip` with the tiny open_clip towers
(jobs/configs/clip-tiny.json) on the session's real local Ray cluster, 2 DeepSpeed workers,
captioned CIFAR-10 shards (real JPEGs, a `.txt` caption naming the class beside each) on the
moto S3 server.

- CLIP, ZeRO-2: the loss falls, the logit scale trains, zero-shot top-1 on labeled CIFAR-10
  shards is scored during training (eval.every); the same command on 3 workers resumes the
  2-worker checkpoint (resharded), scale included, and no sample is seen twice in the epoch.
- SigLIP, ZeRO-3: the loss falls, scale and bias train; a worker killed mid-run (Ray Train
  restarts the group from its checkpoint) ends with the keys per step and the final
  parameters (both towers, scale and bias) of the run without the kill.

Runs that need nothing of each other start together where they fit the cluster's 4 CPUs:
the CLIP run and the SigLIP reference (2 workers of 1 CPU each).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import webdataset as wds
from cifar import cifar_slice
from runs import finish, keys_per_step, kill_a_worker_and_finish, start

from ssl_dist import metrics, shards, storage
from ssl_dist.checkpoint.weights import fp32_state_dict
from ssl_dist.model import build_image_text_model

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "clip-tiny.json"
INIT_SCALE = math.log(1 / 0.07)
PER_EPOCH = 5  # 160 pairs, global batch 32
CLIP_STEPS, RESUMED_STEPS, SIGLIP_STEPS, EVERY = 6, 10, 10, 4


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, s3_endpoint) -> dict:
    """160 CIFAR-10 JPEGs, each with the caption "a photo of a CLASS", as webdataset shards
    (ShardWriter: jpg + txt, 80 a shard) in a bucket of their own, indexed there."""
    import boto3

    tmp = tmp_path_factory.mktemp("captioned")
    bucket = "captioned"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    images = cifar_slice(tmp / "images", per_class=16)
    (tmp / "shards").mkdir()
    keys = []
    with wds.ShardWriter(str(tmp / "shards" / "shard-%06d.tar"), maxcount=80, verbose=0) as sink:
        for path in sorted(images.glob("*/*.jpg")):
            keys.append(f"{path.parent.name}_{path.stem}")
            sink.write({"__key__": keys[-1], "jpg": path.read_bytes(), "txt": f"a photo of a {path.parent.name}"})
    url = f"s3://{bucket}/train"
    fs, root = storage.filesystem(url)
    for shard in sorted((tmp / "shards").glob("*.tar")):
        fs.put_file(str(shard), f"{root}/{shard.name}")
    shards.index_shards(url)
    return {"train": url, "bucket": bucket, "keys": keys}


def args_for(captioned, name, method, *extra, workers=2, stage=2, steps):
    return ["pretrain", f"method.name={method}", f"model.clip_arch={TINY}", f"data.train_url={captioned['train']}",
            f"run.storage_path=s3://{captioned['bucket']}/runs", f"run.name={name}", "data.batch_size=16",
            "data.loader_workers=1", f"run.num_workers={workers}", "run.cpus_per_worker=1",
            f"train.zero_stage={stage}", "train.log_every=1", "train.log_keys=true", "optim.lr=0.002",
            "optim.warmup_steps=0", "optim.schedule=constant", f"train.max_steps={steps}", *extra]


def run_url(captioned, name):
    return f"s3://{captioned['bucket']}/runs/{name}"


def state_at(run_url: str, step: int) -> dict:
    return fp32_state_dict(f"{run_url}/checkpoint-{step:08d}")[0]


def losses_of(run_url: str) -> list[float]:
    return [float(row["loss"]) for attempt in metrics.read_history(run_url) for row in attempt]


def falls(losses: list[float]) -> bool:
    return sum(losses[-2:]) / 2 < sum(losses[:2]) / 2


@pytest.fixture(scope="module")
def first_runs(captioned, cifar_shards_s3, ray_address) -> dict:
    """The CLIP run (6 steps, zero-shot every 3) and the SigLIP reference (ZeRO-3, 10 steps,
    a checkpoint every 4), at once; returns their driver outputs."""
    zero_shot = ["eval.every=3", f"eval.test_url={cifar_shards_s3['test']}", "eval.max_samples=40"]
    drivers = {
        "clip": start(args_for(captioned, "clip", "clip", *zero_shot, "train.checkpoint_every=0", steps=CLIP_STEPS),
                      ray_address),
        "siglip-reference": start(args_for(captioned, "siglip-reference", "siglip", f"train.checkpoint_every={EVERY}",
                                           stage=3, steps=SIGLIP_STEPS), ray_address),
    }
    return {name: finish(driver) for name, driver in drivers.items()}


def test_clip_pretrains_scores_zero_shot_then_resumes_on_three_workers(captioned, first_runs, ray_address):
    url = run_url(captioned, "clip")
    losses = losses_of(url)
    assert len(losses) == CLIP_STEPS and falls(losses), losses
    for step in (3, 6):  # zero-shot top-1 of the live towers on labeled CIFAR-10, logged and printed
        assert f"zero-shot top-1 at step {step}:" in first_runs["clip"], first_runs["clip"][-3000:]
    (attempt,) = metrics.read_history(url)
    assert [0 <= float(row["zero_shot_top1"]) <= 1 for row in attempt if row.get("zero_shot_top1")] == [True] * 2
    scale6 = float(state_at(url, CLIP_STEPS)["logit_scale"])
    assert abs(scale6 - INIT_SCALE) > 1e-3, scale6  # the temperature trains (a parameter of the engine's module)

    output = finish(start(args_for(captioned, "clip", "clip", "train.checkpoint_every=0", workers=3,
                                   steps=RESUMED_STEPS), ray_address))
    assert f"resumed from step {CLIP_STEPS} (epoch 1)" in output and "resharded from 2 to 3 workers" in output
    history = metrics.read_history(url)
    assert [int(row["step"]) for row in history[-1]] == list(range(CLIP_STEPS + 1, RESUMED_STEPS + 1))
    # Exactly once: the epoch the resume is in sees no pair twice (32 + 4 x 30 of its 160 pairs).
    steps = keys_per_step(url)
    epoch1 = [key for step in range(PER_EPOCH + 1, RESUMED_STEPS + 1) for rank in steps[step] for key in rank]
    assert len(epoch1) == 32 + 4 * 30 and len(set(epoch1)) == len(epoch1) and set(epoch1) <= set(captioned["keys"])
    scale10 = float(state_at(url, RESUMED_STEPS)["logit_scale"])
    # Restored, not re-initialised: step 10 is 4 AdamW steps (each at most ~lr) from step 6's
    # scale, and the whole state is nearer step 6's than the initial one.
    assert abs(scale10 - scale6) <= 4 * 0.002 * 1.5, (INIT_SCALE, scale6, scale10)
    initial, step6, step10 = initial_state(), state_at(url, CLIP_STEPS), state_at(url, RESUMED_STEPS)
    assert distance(step10, step6) < distance(step10, initial), (distance(step10, step6), distance(step10, initial))


def test_siglip_killed_worker_at_zero3_resumes_as_if_nothing_happened(captioned, first_runs, ray_address):
    reference = run_url(captioned, "siglip-reference")
    losses = losses_of(reference)
    assert len(losses) == SIGLIP_STEPS and falls(losses), losses
    final = state_at(reference, SIGLIP_STEPS)
    scale, bias = float(final["logit_scale"].detach()), float(final["logit_bias"].detach())
    assert abs(scale - math.log(10)) > 1e-3 and abs(bias + 10) > 1e-3, (scale, bias)

    name = "siglip-killed"
    url = run_url(captioned, name)
    driver = start(args_for(captioned, name, "siglip", f"train.checkpoint_every={EVERY}", stage=3,
                            steps=SIGLIP_STEPS), ray_address)
    kill_a_worker_and_finish(url, driver, ray_address, steps=SIGLIP_STEPS, every=EVERY)
    got, want = keys_per_step(url), keys_per_step(reference)
    assert sorted(want) == list(range(1, SIGLIP_STEPS + 1)) and got == want
    after = state_at(url, SIGLIP_STEPS)
    assert after.keys() == final.keys() and {"logit_scale", "logit_bias"} <= set(final)
    for key in final:  # both towers, the scale and the bias
        torch.testing.assert_close(after[key], final[key], rtol=1e-5, atol=1e-7, msg=f"{key} differs")


def initial_state() -> dict:
    """The module every rank builds before training (the loop seeds with train.seed=0)."""
    torch.manual_seed(0)
    return build_image_text_model(str(TINY), image_size=32, init_logit_scale=INIT_SCALE).state_dict()


def distance(a: dict, b: dict) -> float:
    return float(torch.cat([(a[k].float() - b[k].float()).flatten() for k in b if k in a]).norm())
