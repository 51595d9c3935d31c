"""Jobs on a real multi-node Ray cluster built on this machine (`two_node_cluster`): submitted
with `ssl-dist submit` through the Jobs API, 2 DeepSpeed workers on 2 Ray nodes, shards read
from the moto S3 server, checkpoints written there; watched (progress, CSV, TensorBoard,
PNG), evaluated (jobs/evaluate.py), and a lost node survived by an elastic run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import TEST_ACCESS_KEY, TEST_SECRET_KEY

from ssl_dist import cli, metrics, plots, storage

SMALL_RUN = [
    "data.batch_size=16", "data.loader_workers=1", "data.image_size=32",
    "model.cifar_stem=false", "model.proj_hidden_dim=128", "model.proj_dim=32",
    "optim.lr=0.002", "optim.warmup_steps=3", "train.zero_stage=2", "train.log_every=1",
    "run.num_workers=2", "run.cpus_per_worker=1",
]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def submit_args(cluster, shards, name, *extra):
    return ["submit", "--address", cluster.jobs_url, "--installed", f"data.train_url={shards['train']}",
            f"run.storage_path=s3://{shards['bucket']}/runs", f"run.name={name}", *SMALL_RUN, *extra]


def train_worker_nodes(cluster, job_id: str) -> dict[str, str]:
    """{actor id: node id} of the job's Ray Train workers, from the head's state API (dead ones included)."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    ray_job_id = JobSubmissionClient(cluster.jobs_url).get_job_info(job_id).job_id
    actors = list_actors(address=cluster.jobs_url, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                         limit=1000, raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors if a.job_id == ray_job_id}


def submitted_job_id(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("submitted job "))
    return line.split()[2].rstrip(":")


def run_folder_bytes(run_url: str) -> dict[str, bytes]:
    """Every object of a run folder: {path: content}."""
    fs, path = storage.filesystem(run_url)
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(path)}


def ray_log_files(cluster) -> list[Path]:
    return [p for node in cluster.nodes for p in Path(node["temp_dir"]).rglob("*") if p.is_file()
            and "logs" in p.parts and p.stat().st_size < 50 * 2**20]


def wait_for_registered_checkpoint(run_url: str, client: subprocess.Popen, timeout: float = 600) -> None:
    """Until Ray Train has registered a checkpoint of the run (what a restart resumes from)."""
    deadline = time.monotonic() + timeout
    fs, path = storage.filesystem(run_url)
    while True:
        assert client.poll() is None, client.stdout.read()[-5000:]
        assert time.monotonic() < deadline, f"no checkpoint after {timeout} s"
        fs.invalidate_cache()
        try:
            snapshot = json.loads(fs.cat_file(f"{path}/checkpoint_manager_snapshot.json"))
            if snapshot.get("latest_checkpoint_result"):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.5)


def test_submitted_to_two_nodes_survives_a_lost_node_watched_evaluated_and_leaks_no_credentials(
        two_node_cluster, cifar_shards_s3):
    """One job does what a user's does: submitted with `ssl-dist submit`, 2 workers on 2 Ray
    nodes, kNN during training, a node lost once Ray Train has registered a checkpoint, the
    elastic run going on on the node left, watched (progress, CSV, TensorBoard, PNG) through
    both attempts, then evaluated by jobs/evaluate.py; no credential anywhere. (Two tests, the
    submitted run and the lost node, each started a 12-step job of this kind; this is both.)"""
    cluster, shards = two_node_cluster, cifar_shards_s3
    if len(cluster.alive_nodes()) < 2:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_jobs_api()
    node_ids = {n["node_ip"]: n["node_id"] for n in cluster.alive_nodes()}
    second = next(n for n in cluster.nodes if n["ip"] != "127.0.0.2" and n["ip"] in node_ids)
    run_url = f"s3://{shards['bucket']}/runs/two-nodes"
    exe = [sys.executable, "-m", "ssl_dist.cli"]
    client = subprocess.Popen([*exe, *submit_args(cluster, shards, "two-nodes", "run.min_workers=1",
                                                   "train.max_steps=12", "train.checkpoint_every=4",
                                                   "run.max_failures=3", "eval.every=6",
                                                   f"eval.train_url={shards['train']}",
                                                   f"eval.test_url={shards['test']}", "eval.k=20",
                                                   "eval.max_samples=100")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_registered_checkpoint(run_url, client)
        assert cluster.lose_node(second) > 0
        output, _ = client.communicate(timeout=600)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, output[-5000:]
    assert second["ip"] not in {a["node_ip"] for a in cluster.alive_nodes()}
    job_id = submitted_job_id(output)

    # First attempt on 2 workers, on two different Ray nodes (each node has its own id and
    # loopback address; 1 CPU each), then the rest of the run on the remaining node from a checkpoint.
    nodes = train_worker_nodes(cluster, job_id)
    assert set(n for n in nodes.values() if n) == {node_ids["127.0.0.2"], node_ids[second["ip"]]}, nodes
    attempts = [[int(r["step"]) for r in rows] for rows in metrics.read_history(run_url)]
    assert len(attempts) == 2, attempts
    first, second_attempt = attempts
    resumed_at = second_attempt[0] - 1
    assert first[0] == 1 and first == list(range(1, first[-1] + 1))
    assert resumed_at % 4 == 0 and 4 <= resumed_at <= first[-1]
    assert second_attempt == list(range(resumed_at + 1, 13))
    assert f"resumed from step {resumed_at}" in output and "resharded from 2 to 1 workers" in output

    # The job's logs came back through the Jobs API: progress and the kNN during training.
    assert "step 12/12" in output and "samples/s" in output and "ETA" in output
    assert "kNN top-1 at step 6:" in output and "kNN top-1 at step 12:" in output

    # Checkpoints in S3; metrics CSV, TensorBoard files and PNG in the run folder, with the steps
    # that ran in each attempt, and the kNN at every 6th of them. The first attempt's last
    # flush may have been cut short by the lost node (its TensorBoard copy follows its CSV, and
    # a kNN is attached to its step's row once done): its records may end a step early there.
    fs, path = storage.filesystem(run_url)
    fs.invalidate_cache()
    assert any(p.rsplit("/", 1)[-1].startswith("checkpoint-") for p in fs.ls(path, detail=False))
    knn_steps = []
    for number, rows in enumerate(metrics.read_history(run_url)):
        knn = {int(r["step"]): float(r["knn_top1"]) for r in rows if r["knn_top1"]}
        due = [s for s in attempts[number] if s % 6 == 0]
        assert sorted(knn) == due or (number == 0 and sorted(knn) == due[:-1]), (number, knn)
        assert all(0.0 <= v <= 1.0 for v in knn.values())
        knn_steps += sorted(knn)
    assert {6, 12} <= set(knn_steps), knn_steps
    files = metrics.read_tensorboard(run_url)
    assert len(files) == 2
    tb_first, tb_second = sorted(files.values(), key=lambda events: events["train/loss"][0][0])
    tb_steps = [step for step, _ in tb_first["train/loss"]]
    assert tb_steps == first[:len(tb_steps)] and len(tb_steps) >= resumed_at  # what was flushed before the loss
    assert [step for step, _ in tb_second["train/loss"]] == second_attempt
    assert [step for step, _ in tb_second["eval/knn_top1"]] == [s for s in second_attempt if s % 6 == 0]
    assert set(step for step, _ in tb_first.get("eval/knn_top1", [])) <= {6}
    assert {"train/lr", "train/samples_per_s"} <= set(tb_first) & set(tb_second)
    png = fs.cat_file(f"{path}/{plots.PNG_NAME}")
    assert png.startswith(b"\x89PNG")
    summary = plots.read_summary(png)  # drawn at the end, from the CSV of both attempts
    assert summary == {"steps": first + second_attempt, "knn_steps": knn_steps, "attempts": 2}

    # jobs/evaluate.py as a job on the same cluster: kNN and linear probe of the newest checkpoint.
    from ssl_dist import submit

    newest = "s3://" + sorted(p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("checkpoint-"))[-1]
    jobs, sent = submit.submit_script("jobs/evaluate.py", [newest, "--train", shards["train"], "--test",
                                                           shards["test"], "--k", "20", "--json"],
                                      address=cluster.jobs_url, installed=True, name="evaluate")
    assert submit.follow(jobs, sent.job_id, progress=False) == 0
    eval_logs = jobs.get_job_logs(sent.job_id)
    scores = json.loads(next(line for line in reversed(eval_logs.splitlines()) if line.startswith("{")))
    assert set(scores) == {"knn_top1", "knn_top1_random_init", "linear_top1", "linear_top1_random_init"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())

    # Security: the test's credentials are nowhere in what the run and the jobs left behind:
    # the run folder (config, metrics, TensorBoard, PNG, checkpoints), the captured logs, the
    # jobs' runtime environments, nor Ray's own log files on either node (the lost one's too).
    secrets = [TEST_ACCESS_KEY.encode(), TEST_SECRET_KEY.encode()]
    for obj, content in run_folder_bytes(run_url).items():
        assert not any(s in content for s in secrets), f"credential in {obj}"
    for text in (output, eval_logs, json.dumps(submit.status(cluster.jobs_url, job_id)),
                 json.dumps(jobs.get_job_info(job_id).runtime_env), json.dumps(sent.runtime_env)):
        assert not any(s.decode() in text for s in secrets)
    leaking = [str(p) for p in ray_log_files(cluster) if any(s in p.read_bytes() for s in secrets)]
    assert not leaking, leaking


def test_status_logs_stop_of_unknown_job_are_clear_errors(two_node_cluster, capsys):
    for command in (["status", "no-such-job"], ["logs", "no-such-job"], ["stop", "no-such-job"]):
        assert cli.main([*command, "--address", two_node_cluster.jobs_url]) == 2
        err = capsys.readouterr().err
        assert "no such job" in err and "Traceback" not in err
