"""Fault tolerance end to end: a killed worker, a killed driver, a resume on another number of
workers, a corrupt checkpoint, and the exported encoder. Real Ray (the session's local
cluster), real DeepSpeed on CPU, checkpoints in the moto S3 server.

A run that fails and resumes must be indistinguishable from one that never failed: same
final parameters (to float32 round-off) and the same sample keys at every step. The
failure-free references run once per ZeRO stage and are shared by the tests.

Most of a run's time on a CPU machine is start-up (driver, Ray Train's controller and its
actors, workers importing torch and DeepSpeed), so runs that need nothing of each other are
started together where they fit the cluster's 4 CPUs: the two references, and the two resumes
on 1 and 3 workers. A test that kills a worker has the cluster to itself (it finds its victims
among the cluster's training workers).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from runs import (finish, keys_per_step, kill_a_worker_and_finish, ssl_dist_cli, start, train_workers,
                  wait_for_registered)
from services import free_port

from ssl_dist import checkpoint, metrics, storage
from ssl_dist.engine import lr_factor

MAX_STEPS = 12  # 6 global batches of 32 per epoch (200 samples, 8 dropped): 2 epochs
EVERY = 4
RUN = [
    "data.batch_size=16", "data.loader_workers=1", "data.image_size=32",
    "model.cifar_stem=false", "model.proj_hidden_dim=128", "model.proj_dim=32",
    "optim.lr=0.002", "optim.warmup_steps=3", "train.log_every=1", "train.log_keys=true",
    f"train.checkpoint_every={EVERY}", "run.cpus_per_worker=1", "run.keep_checkpoints=2", "run.max_failures=2",
    # the lr follows the global batch; at 2 workers x 16 the scale is exactly 1
    "optim.lr_scaling=linear", "optim.base_batch=32",
]
README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ---- helpers --------------------------------------------------------------------------------


def args_for(shards, name, *extra, workers=2, stage=1, steps=MAX_STEPS):
    return ["pretrain", f"data.train_url={shards['train']}", f"run.storage_path=s3://{shards['bucket']}/ft",
            f"run.name={name}", *RUN, f"run.num_workers={workers}", f"train.zero_stage={stage}",
            f"train.max_steps={steps}", *extra]


def run_url(shards, name):
    return f"s3://{shards['bucket']}/ft/{name}"


def wait_until_no_workers(ray_address, timeout=120):
    deadline = time.monotonic() + timeout
    while train_workers(ray_address):
        assert time.monotonic() < deadline, "training workers outlived their driver"
        time.sleep(0.5)


def final_state(url) -> dict[str, torch.Tensor]:
    """Consolidated fp32 parameters and buffers of the run's final checkpoint (no DeepSpeed engine)."""
    from ssl_dist.evaluate import load_checkpoint_model

    model, _ = load_checkpoint_model(storage.join(url, checkpoint.checkpoint_name(MAX_STEPS)))
    return model.state_dict()


def assert_same_run(url, reference):
    """Same sample keys per step and per rank, and the same final parameters, as the reference."""
    got, want = keys_per_step(url), keys_per_step(reference)
    assert sorted(want) == list(range(1, MAX_STEPS + 1))
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == want[step], f"step {step}: other samples than the failure-free run"
    a, b = final_state(url), final_state(reference)
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=f"{name} differs")


def drop(url):
    """Delete a run folder once checked: moto keeps every object in memory."""
    fs, path = storage.filesystem(url)
    fs.rm(path, recursive=True)


def copy_checkpoints(shards, source_name, target_name, names):
    fs, _ = storage.filesystem(run_url(shards, source_name))
    for name in names:
        src = run_url(shards, source_name)[5:] + "/" + name
        fs.copy(src, run_url(shards, target_name)[5:] + "/" + name, recursive=True)


REFERENCE_STAGES = (1, 3)


@pytest.fixture(scope="module")
def references(cifar_shards_s3, ray_address):
    """Failure-free runs, one per ZeRO stage, made when first asked for: both at once (2
    workers of 1 CPU each: together they fit the cluster's 4 CPUs)."""
    made = {}

    def reference(stage):
        if stage not in made:
            drivers = {s: start(args_for(cifar_shards_s3, f"reference-z{s}", stage=s), ray_address)
                       for s in REFERENCE_STAGES if s not in made}
            for s, driver in drivers.items():
                finish(driver)
                made[s] = run_url(cifar_shards_s3, f"reference-z{s}")
        return made[stage]

    yield reference
    fs, _ = storage.filesystem(run_url(cifar_shards_s3, "x"))
    fs.rm(f"{cifar_shards_s3['bucket']}/ft", recursive=True)  # moto keeps objects in memory


# ---- a killed worker, a killed driver ------------------------------------------------------


def wait_for_restarted(url, driver, timeout=300) -> int:
    """Until Ray Train's second start of the worker group has done a step and its "resumed
    from step N" has reached the driver; returns N."""
    deadline = time.monotonic() + timeout
    while True:
        attempts = metrics.read_history(url)
        if len(attempts) >= 2 and attempts[1]:
            resumed_at = int(attempts[1][0]["step"]) - 1
            if f"resumed from step {resumed_at}" in driver.output:
                return resumed_at
        assert driver.poll() is None, driver.output[-4000:]
        assert time.monotonic() < deadline, f"the worker group did not resume in {timeout} s"
        time.sleep(0.2)


def test_killed_worker_then_killed_driver_resume_as_if_nothing_happened(cifar_shards_s3, ray_address, references):
    """ZeRO-1: a worker killed (Ray Train restarts the group in the same job, from the
    checkpoint it registered), then, while the restarted group trains, the whole job killed
    (the same command again resumes it): one run, two failures, the keys and final parameters
    of the failure-free run. A redone step must see the same keys every time (keys_per_step)."""
    reference = references(1)
    name = "killed-worker-then-driver"
    url = run_url(cifar_shards_s3, name)
    driver = start(args_for(cifar_shards_s3, name), ray_address)
    wait_for_registered(url, driver)
    victims = train_workers(ray_address)
    assert len(victims) == 2
    os.kill(victims[-1].pid, signal.SIGKILL)  # from outside, like the OOM killer or a preemption
    worker_resumed_at = wait_for_restarted(url, driver)
    assert worker_resumed_at % EVERY == 0 and worker_resumed_at >= EVERY

    driver.kill()  # the whole job: driver, Ray Train controller, workers
    wait_until_no_workers(ray_address)
    assert checkpoint.newest_complete(url).step < MAX_STEPS

    output = finish(start(args_for(cifar_shards_s3, name), ray_address))  # the same command again
    assert "the run resumes" in output
    resumed_at = int(re.search(r"resumed from step (\d+)", output).group(1))
    assert worker_resumed_at <= resumed_at < MAX_STEPS

    attempts = [[int(r["step"]) for r in rows] for rows in metrics.read_history(url)]
    assert len(attempts) == 3, attempts
    assert attempts[1][0] - 1 == worker_resumed_at and attempts[2][0] - 1 == resumed_at
    assert attempts[2][-1] == MAX_STEPS
    assert_same_run(url, reference)
    drop(url)


def test_killed_worker_at_zero3_resumes_as_if_nothing_happened(cifar_shards_s3, ray_address, references):
    reference = references(3)
    name = "killed-worker-z3"
    url = run_url(cifar_shards_s3, name)
    driver = start(args_for(cifar_shards_s3, name, stage=3), ray_address)
    kill_a_worker_and_finish(url, driver, ray_address, steps=MAX_STEPS, every=EVERY)
    assert_same_run(url, reference)
    drop(url)


def test_killed_worker_in_a_mocov3_run_leaves_online_and_momentum_parameters_as_without_the_kill(cifar_shards_s3,
                                                                                               ray_address):
    """MoCo v3 at ZeRO-3: the momentum encoder (frozen, partitioned, updated per partition) and its
    update count are in the checkpoint, so the restarted group continues the EMA and its schedule
    exactly: final online *and* momentum parameters are those of the failure-free run."""
    mocov3 = ("method.name=mocov3", "model.width=16", "method.momentum=0.9")
    reference = run_url(cifar_shards_s3, "mocov3-reference")
    finish(start(args_for(cifar_shards_s3, "mocov3-reference", *mocov3, stage=3), ray_address))
    url = run_url(cifar_shards_s3, "mocov3-killed")
    driver = start(args_for(cifar_shards_s3, "mocov3-killed", *mocov3, stage=3), ray_address)
    kill_a_worker_and_finish(url, driver, ray_address, steps=MAX_STEPS, every=EVERY)
    assert_same_run(url, reference)  # every tensor of the module's state: online and momentum branches
    state = final_state(url)
    assert int(state["momentum_updates"]) == MAX_STEPS
    online, momentum = state["encoder.conv1.weight"], state["momentum.encoder.conv1.weight"]
    assert not torch.allclose(online, momentum)  # a momentum encoder of its own, not the online one
    drop(url)
    drop(reference)


# ---- another number of workers -------------------------------------------------------------


RESIZE_MID, RESIZE_STEPS = 8, 14  # step 8: 2 batches into epoch 1; 14: into epoch 2


@pytest.fixture(scope="module")
def resized(cifar_shards_s3, ray_address, references):
    """{workers: driver output} of the reference's 2-worker checkpoint at step 8 resumed on 1
    and on 3 workers: both runs at once (1 + 3 workers of 1 CPU fit the cluster's 4 CPUs)."""
    references(1)
    drivers = {}
    for workers in (1, 3):
        name = f"resized-{workers}"
        copy_checkpoints(cifar_shards_s3, "reference-z1", name, [checkpoint.checkpoint_name(RESIZE_MID)])
        drivers[workers] = start(args_for(cifar_shards_s3, name, "--resume", workers=workers, steps=RESIZE_STEPS),
                                 ray_address)
    outputs = {workers: (driver.wait(), driver.output) for workers, driver in drivers.items()}
    yield outputs
    for workers in drivers:
        drop(run_url(cifar_shards_s3, f"resized-{workers}"))


@pytest.mark.parametrize("workers", [1, 3])
def test_two_worker_checkpoint_resumes_on_other_worker_counts_exactly_once(workers, cifar_shards_s3, references,
                                                                           resized):
    reference = references(1)
    mid, steps = RESIZE_MID, RESIZE_STEPS
    url = run_url(cifar_shards_s3, f"resized-{workers}")
    returncode, output = resized[workers]
    assert returncode == 0, output[-4000:]
    assert f"resumed from step {mid} (epoch 1)" in output and f"resharded from 2 to {workers} workers" in output
    global_batch = 32 if workers == 1 else 30
    if workers == 3:  # 32 does not divide by 3: the default policy rounds down, and says so
        assert "global batch of 32 does not divide among 3 workers" in output and "a global batch of 30" in output
        # and the lr rule follows the new batch: the log says so, every row after it shows it
        assert "global batch 32 -> 30: optim.lr_scaling=linear moves the peak lr 0.002 -> 0.001875" in output
    else:
        assert "optim.lr_scaling=linear moves" not in output  # the same global batch: the same lr
    rows = metrics.read_history(url)[0]
    factors = [lr_factor(int(r["step"]), warmup_steps=3, max_steps=steps, schedule="cosine") for r in rows]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.002 * global_batch / 32 * f for f in factors], rel=1e-5)

    # Epoch 1: its first 2 steps by the 2-worker run, the rest by this one: every sample once.
    before = [k for step, ranks in keys_per_step(reference).items() if 6 < step <= mid for keys in ranks
              for k in keys]
    after_rows = [row for log in checkpoint.read_keys(url) for row in log["rows"]]
    assert {row["step"] for row in after_rows} == set(range(mid + 1, steps + 1))
    assert all(len(row["keys"]) == global_batch // workers for row in after_rows)
    after = [k for row in after_rows if row["epoch"] == 1 for k in row["keys"]]
    epoch = before + after
    assert len(epoch) == len(set(epoch)), "a sample was used twice in the epoch"
    assert 200 - len(epoch) < global_batch  # only a remainder smaller than one global batch is left out
    assert {row["epoch"] for row in after_rows} == {1, 2}  # and the next epoch began
    assert [int(r["step"]) for r in metrics.read_history(url)[0]] == list(range(mid + 1, steps + 1))


# ---- a corrupt checkpoint --------------------------------------------------------------------


def test_checkpoint_missing_a_rank_shard_falls_back_to_the_previous_one(cifar_shards_s3, ray_address, references):
    reference = references(1)
    name = "corrupt"
    copy_checkpoints(cifar_shards_s3, "reference-z1", name, ["checkpoint-00000008", "checkpoint-00000012"])
    url = run_url(cifar_shards_s3, name)
    fs, path = storage.filesystem(url)
    fs.rm(f"{path}/checkpoint-00000012/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt")

    done = ssl_dist_cli(*args_for(cifar_shards_s3, name, "--resume"), env={"RAY_ADDRESS": ray_address})
    assert done.returncode == 0, done.stderr[-4000:]
    output = done.stdout + done.stderr
    assert "checkpoint checkpoint-00000012 is incomplete" in output and "zero_pp_rank_1" in output
    assert "falling back" in output and "resumed from step 8" in output
    # Steps 9-12 again, on the same 2 workers: the same run as the one never corrupted.
    rows = {row["step"]: row["keys"] for log in checkpoint.read_keys(url) for row in log["rows"] if log["rank"] == 0}
    assert sorted(rows) == [9, 10, 11, 12]
    assert all(rows[s] == keys_per_step(reference)[s][0] for s in rows)
    a, b = final_state(url), final_state(reference)
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    drop(url)


# ---- export ------------------------------------------------------------------------------------


def readme_snippet() -> str:
    """The Python snippet under the README's export section (the test runs the documented text)."""
    text = README.read_text()
    section = text[text.index("ssl-dist export"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


ENGINE_EMBEDDINGS = """
import os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
dist.init_process_group("gloo", rank=0, world_size=1)
from ssl_dist import checkpoint, config, data
from ssl_dist.engine import build_engine
from ssl_dist.model import build_model
info = checkpoint.inspect(sys.argv[1])
cfg = config.from_dict(info.meta["config"])
engine = build_engine(build_model(cfg.model), cfg, 1)
loader = data.make_loader(cfg.data.train_url, rank=0, world_size=1, batch_size=32, seed=cfg.data.seed)
checkpoint.restore(info, engine=engine, loader=loader, rank=0, world_size=1)  # 2 -> 1 worker: universal
engine.module.eval()
with torch.no_grad():
    torch.save(engine.module.features(torch.load(sys.argv[2])), sys.argv[2] + ".engine")
"""


def test_export_loads_into_plain_torchvision_with_the_engines_embeddings(cifar_shards_s3, references, tmp_path):
    reference = references(1)
    ckpt = storage.join(reference, checkpoint.checkpoint_name(MAX_STEPS))
    images = tmp_path / "images.pt"
    torch.save(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)), images)
    # The engine's embeddings in a process of its own, meanwhile (it needs the checkpoint only).
    engine_process = subprocess.Popen([sys.executable, "-c", ENGINE_EMBEDDINGS, ckpt, str(images), str(free_port())],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = tmp_path / "encoder"
        done = ssl_dist_cli("export", ckpt, str(out))
        assert done.returncode == 0, done.stderr[-4000:]
        spec = json.loads((out / "encoder.json").read_text())
        assert spec["arch"] == "resnet18" and spec["feature_dim"] == 512 and spec["step"] == MAX_STEPS

        # A fresh process with torchvision and safetensors only: the README's snippet, verbatim.
        plain = f"import os, sys\nos.chdir({str(tmp_path)!r})\n" + readme_snippet() + textwrap.dedent("""
            with torch.no_grad():
                torch.save(model(torch.load("images.pt")), "images.pt.plain")
            assert not {"deepspeed", "ray", "ssl_dist"} & set(sys.modules), "the snippet needs only torchvision"
        """)
        result = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        engine_output, _ = engine_process.communicate(timeout=300)
    finally:
        if engine_process.poll() is None:
            engine_process.kill()
    assert engine_process.returncode == 0, engine_output[-4000:]
    engine = torch.load(str(images) + ".engine")
    torch.testing.assert_close(torch.load(str(images) + ".plain"), engine, rtol=1e-5, atol=1e-6)
    assert engine.shape == (6, 512)
