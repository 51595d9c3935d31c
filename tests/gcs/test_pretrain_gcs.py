"""A run on Google Cloud Storage (the real emulator) end to end: shards, Ray Train's storage and
the checkpoints all in gs://, a training worker killed mid-run, the run resumed from its last
checkpoint there, and the encoder exported from it. One real Ray run (the session's local
cluster, DeepSpeed on CPU): its cost is start-up, so it is checked from its own records (every
sample of every step once, the same keys when a step is redone) rather than against a second,
failure-free run (tests/e2e/test_fault_tolerance.py compares those, on S3, with the same code).
"""

from __future__ import annotations

import pytest
from runs import keys_per_step, kill_a_worker_and_finish, start

from ssl_dist import checkpoint, cli, metrics, storage

# 6 global batches of 32 per epoch (200 samples, 8 dropped): into a third epoch. 16 steps, not 8:
# with 8 the first attempt could finish before the kill (after the step-4 checkpoint) landed
STEPS, EVERY = 16, 4
RUN = [
    "data.batch_size=16", "data.loader_workers=1", "data.image_size=32", "model.cifar_stem=false",
    "model.proj_hidden_dim=128", "model.proj_dim=32", "optim.lr=0.002", "optim.warmup_steps=3",
    "train.log_every=1", "train.log_keys=true", f"train.checkpoint_every={EVERY}", "run.cpus_per_worker=1",
    "run.keep_checkpoints=2", "run.max_failures=2", "run.num_workers=2", f"train.max_steps={STEPS}",
]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_a_killed_worker_resumes_from_its_checkpoint_in_gs(ray_address, cifar_gs, gcs_bucket, capsys):
    # ray_address first: the session's Ray head is started (when this test is the first to ask
    # for it) before STORAGE_EMULATOR_HOST is set, as it is when tests/e2e ran first. Its workers
    # do not see the variable: the emulator reaches them in the options the driver resolved.
    url = f"gs://{gcs_bucket}/runs/killed-worker"
    driver = start(["pretrain", f"data.train_url={cifar_gs['train']}", f"run.storage_path=gs://{gcs_bucket}/runs",
                    "run.name=killed-worker", *RUN], ray_address)
    resumed_at = kill_a_worker_and_finish(url, driver, ray_address, steps=STEPS, every=EVERY)

    # every step's 2 x 16 samples, each once within its epoch; a step redone after the resume saw
    # the same keys both times (keys_per_step checks)
    steps = keys_per_step(url)
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert all(len(ranks) == 2 and all(len(keys) == 16 for keys in ranks) for ranks in steps.values())
    first_epoch = [k for step in range(1, 7) for keys in steps[step] for k in keys]
    assert len(first_epoch) == len(set(first_epoch)) == 192
    assert len(metrics.read_history(url)) == 2 and resumed_at in range(EVERY, STEPS, EVERY)

    newest = checkpoint.newest_complete(url)
    assert newest is not None and newest.step == STEPS and newest.url.startswith(f"{url}/checkpoint-")
    fs, path = storage.filesystem(url)
    assert fs.exists(f"{path}/config.yaml") and fs.exists(f"{path}/checkpoint_manager_snapshot.json")

    out = f"gs://{gcs_bucket}/exported"
    assert cli.main(["export", url, out]) == 0
    assert "wrote the encoder of" in capsys.readouterr().out
    assert {p.rsplit("/", 1)[-1] for p in storage.filesystem(out)[0].ls(f"{gcs_bucket}/exported", detail=False)} \
        >= {"encoder.safetensors", "encoder.json"}
