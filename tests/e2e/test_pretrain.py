"""End to end: `ssl-dist pretrain` on a real local Ray cluster, 2 DeepSpeed ZeRO-2 workers,
real CIFAR-10 shards read from the moto S3 server, checkpoints written there."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from runs import ssl_dist_cli

from ssl_dist import metrics, storage

SMALL_RUN = [
    "data.batch_size=16", "data.loader_workers=1", "data.image_size=32",
    "model.cifar_stem=false", "model.proj_hidden_dim=128", "model.proj_dim=32",
    "optim.lr=0.002", "optim.warmup_steps=3", "train.zero_stage=2", "train.log_every=1",
    "run.num_workers=2", "run.cpus_per_worker=1",
]


def run_args(shards, name, *extra):
    return ["pretrain", f"data.train_url={shards['train']}", f"run.storage_path=s3://{shards['bucket']}/runs",
            f"run.name={name}", *SMALL_RUN, *extra]


def checkpoints(run_url: str) -> list[str]:
    """Complete checkpoints of a run (every rank's stream state and the meta file present)."""
    fs, path = storage.filesystem(run_url)
    if not fs.exists(path):
        return []
    fs.invalidate_cache()
    done = []
    for entry in sorted(fs.ls(path, detail=False)):
        if entry.rsplit("/", 1)[-1].startswith("checkpoint-"):
            names = {p.rsplit("/", 1)[-1] for p in fs.ls(entry, detail=False)}
            if {"meta.json", "stream-rank00000.json", "stream-rank00001.json"} <= names:
                done.append(entry)
    return done


def steps_of(history: list[list[dict]]) -> list[list[int]]:
    return [[int(row["step"]) for row in attempt] for attempt in history]


def test_pretrain_two_workers_from_s3_loss_falls_then_evaluate(cifar_shards_s3, ray_address):
    run_url = f"s3://{cifar_shards_s3['bucket']}/runs/e2e"
    done = ssl_dist_cli(*run_args(cifar_shards_s3, "e2e", "train.max_steps=36", "train.checkpoint_every=12"),
                        env={"RAY_ADDRESS": ray_address})
    assert done.returncode == 0, done.stderr[-3000:]

    history = metrics.read_history(run_url)
    assert steps_of(history) == [list(range(1, 37))]
    losses = [float(row["loss"]) for row in history[0]]
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.1, losses
    assert [c.rsplit("-", 1)[1] for c in checkpoints(run_url)] == ["00000024", "00000036"]  # newest 2 kept
    assert "step 36/36" in done.stdout + done.stderr  # progress reached the driver

    # The resolved config is next to the run, and the checkpoint evaluates without Ray.
    fs, path = storage.filesystem(run_url)
    assert "max_steps: 36" in fs.cat_file(f"{path}/config.yaml").decode()
    newest = "s3://" + checkpoints(run_url)[-1]
    meta = json.loads(fs.cat_file(f"{newest[5:]}/meta.json"))
    assert meta["step"] == 36 and meta["samples_seen"] == 36 * 32
    ev = ssl_dist_cli("evaluate", newest, "--train", cifar_shards_s3["train"], "--test", cifar_shards_s3["test"],
                      "--k", "20", "--json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    scores = json.loads(ev.stdout.strip().splitlines()[-1])
    assert 0.0 <= scores["knn_top1"] <= 1.0 and 0.0 <= scores["knn_top1_random_init"] <= 1.0


def test_quickstart_runs_from_its_default_relative_folder(tmp_path, ray_address):
    # The README's first command, shortened: `ssl-dist quickstart` with its default --out,
    # a path relative to where the user stands. Ray's workers run in another working
    # directory, so the driver must hand them absolute paths (they once got relative ones).
    # 50 images a shape (the default 1000 took most of the test's time): one global batch of 256.
    done = ssl_dist_cli("quickstart", "--per-class", "50", "train.max_steps=6", "train.log_every=3",
                        "train.checkpoint_every=3",
                        cwd=tmp_path, env={"RAY_ADDRESS": ray_address}, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "kNN top-1, pretrained encoder:" in done.stdout and "kNN top-1, random initialisation:" in done.stdout
    run_folder = tmp_path / "runs" / "quickstart" / "quickstart"
    assert (run_folder / "config.yaml").is_file()
    assert str(tmp_path) in (run_folder / "config.yaml").read_text()  # the resolved config names absolute paths
    assert sorted(run_folder.glob("checkpoint-*"))


def test_quickstart_clip_prints_zero_shot_and_retrieval_next_to_random_init(tmp_path, ray_address):
    # `ssl-dist quickstart --method clip`, shortened: 10 captioned images a shape, 4 steps.
    done = ssl_dist_cli("quickstart", "--method", "clip", "--out", str(tmp_path / "qs"), "--per-class", "10",
                        "data.batch_size=8", "train.max_steps=4", "train.log_every=2", "train.checkpoint_every=0",
                        env={"RAY_ADDRESS": ray_address}, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    figures = {}  # row label -> [pretrained, random init]
    for line in done.stdout.splitlines():
        if line.startswith(("zero-shot top-1", "image->text recall@", "text->image recall@")):
            *label, pretrained, random_init = line.split()
            figures[" ".join(label)] = [float(pretrained), float(random_init)]
    assert sorted(figures) == ["image->text recall@1", "image->text recall@5", "text->image recall@1",
                               "text->image recall@5", "zero-shot top-1 (shape names)"], done.stdout[-3000:]
    assert all(0.0 <= value <= 1.0 for pair in figures.values() for value in pair)
    run_folder = tmp_path / "qs" / "quickstart-clip"
    assert f"run folder: {run_folder}" in done.stdout
    assert "quickstart-clip.json" in (run_folder / "config.yaml").read_text()  # the packaged towers
    assert len(list((tmp_path / "qs" / "data-clip" / "train").glob("*.tar"))) >= 1


# ---- bad input: one clear message, a non-zero exit ------------------------------------------


def test_wrong_credentials_are_a_clear_error(tmp_path):
    from services import start_moto

    # A second moto server that checks credentials (IAM auth from the first request on):
    # keys it does not know are refused, as AWS refuses them.
    proc, endpoint = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    wrong = {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"}
    (tmp_path / "src" / "cls").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "cls" / "a.jpg")
    try:
        done = ssl_dist_cli("shards", "make", str(tmp_path / "src"), "s3://some-bucket/x", env=wrong)
        assert done.returncode == 2, done.stderr
        assert "refused" in done.stderr and "AWS_ACCESS_KEY_ID" in done.stderr
        assert "Traceback" not in done.stderr
        done = ssl_dist_cli("pretrain", "data.train_url=s3://some-bucket/x", f"run.storage_path={tmp_path}/runs",
                            env=wrong)
        assert done.returncode == 2 and "refused" in done.stderr, done.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_a_run_stopped_by_its_time_budget_logs_its_last_step(cifar_shards_s3, ray_address):
    # train.max_minutes stops the run between two log intervals: its last step must still be a
    # metrics row (a short run once logged none) and the checkpoint forced at the stop its step.
    run_url = f"s3://{cifar_shards_s3['bucket']}/runs/e2e-budget"
    done = ssl_dist_cli(*run_args(cifar_shards_s3, "e2e-budget", "train.max_steps=100000", "train.max_minutes=0.1",
                                  "optim.schedule=constant", "train.log_every=100000", "train.checkpoint_every=0"),
                        env={"RAY_ADDRESS": ray_address})
    assert done.returncode == 0, done.stderr[-3000:]

    history = metrics.read_history(run_url)
    newest = checkpoints(run_url)[-1]
    fs, _ = storage.filesystem(run_url)
    last = json.loads(fs.cat_file(f"{newest}/meta.json"))["step"]
    assert 0 < last < 100000
    assert steps_of(history) == [[last]]
