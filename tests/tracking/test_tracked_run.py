"""A tracked run end to end: 2 workers on the session's real Ray, checkpoints in the moto S3
server, MLflow on a real tracking server and W&B in offline mode, one worker killed midway.

One run covers what the trackers must show (each Ray run costs minutes here): the resolved
config as the parent run's parameters, each attempt's rows as a nested run (the killed one
and the restart, named after their metrics CSVs), kNN scores, the curves and the exported
encoder as artifacts (on MLflow, and on W&B from the driver's artifacts run), the W&B offline
runs copied into the run folder, and no credential of the environment anywhere in what was logged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from runs import kill_a_worker_and_finish, start
from services import TEST_SECRET_KEY
from wandb_offline import artifact_records, run_record, wandb_records

from ssl_dist import config, metrics, storage
from ssl_dist.tracking.params import flat_params

MAX_STEPS = 12
EVERY = 4
RUN = ["data.batch_size=16", "data.loader_workers=1", "data.image_size=32", "model.cifar_stem=false",
       "model.proj_hidden_dim=128", "model.proj_dim=32", "optim.lr=0.002", "optim.warmup_steps=3",
       "train.log_every=1", f"train.checkpoint_every={EVERY}", f"train.max_steps={MAX_STEPS}",
       "run.cpus_per_worker=1", "run.num_workers=2", "run.keep_checkpoints=2", "run.max_failures=2",
       "eval.every=6", "eval.k=20", "eval.max_samples=100"]
# What a user's shell holds: none of it may reach a parameter, a tag or a tracker's file
SECRETS = {"MLFLOW_TRACKING_USERNAME": "tracking-user-ssl-dist", "MLFLOW_TRACKING_PASSWORD": "pw-5b1e9c7d2f-ssl-dist",
           "WANDB_API_KEY": "wandb-key-7c0d2e4f6a8b1c3d5e7f9a0b2c4d6e8f0a1b3c5d"}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def attempt_names(url: str) -> list[str]:
    """metrics/attempt-*.csv of the run, oldest first, without .csv."""
    fs, path = storage.filesystem(storage.join(url, "metrics"))
    fs.invalidate_cache()
    names = [p.rsplit("/", 1)[1][:-4] for p in fs.ls(path, detail=False) if p.endswith(".csv")]
    return sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]))


def test_a_tracked_run_logs_every_attempt_and_its_artifacts(mlflow_server, cifar_shards_s3, ray_address, tmp_path,
                                                            monkeypatch):
    from mlflow.tracking import MlflowClient

    wandb_data = tmp_path / "wandb-data"  # where W&B stages an offline artifact's files (not the user's ~/.local)
    for name, value in {**SECRETS, "WANDB_MODE": "offline", "WANDB_DATA_DIR": str(wandb_data)}.items():
        monkeypatch.setenv(name, value)  # the driver's environment (its process inherits it)
    shards = cifar_shards_s3
    url = f"s3://{shards['bucket']}/tracked/run"
    driver = start(["pretrain", f"data.train_url={shards['train']}", f"run.storage_path=s3://{shards['bucket']}/tracked",
                    "run.name=run", *RUN, f"eval.train_url={shards['train']}", f"eval.test_url={shards['test']}",
                    f"track.mlflow_uri={mlflow_server}", "track.experiment=tracked-e2e",
                    "track.wandb_project=ssl-dist-e2e"], ray_address)
    kill_a_worker_and_finish(url, driver, ray_address, steps=MAX_STEPS, every=EVERY)
    assert "warning:" not in driver.output, driver.output[-4000:]
    history, names = metrics.read_history(url), attempt_names(url)
    secrets = [*SECRETS.values(), TEST_SECRET_KEY]  # TEST_SECRET_KEY: the workers' AWS_SECRET_ACCESS_KEY

    # ---- MLflow: one parent run holding the resolved config, one nested run per attempt
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("tracked-e2e")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    fs, path = storage.filesystem(storage.join(url, "config.yaml"))
    resolved = config.from_dict(yaml.safe_load(fs.cat_file(path)))
    assert parent.data.params == flat_params(resolved)
    assert parent.data.params["train.max_steps"] == "12" and parent.data.params["track.mlflow_uri"] == mlflow_server
    assert parent.data.tags["ssl_dist.run_url"] == url and parent.data.tags["ssl_dist.run_name"] == "run"
    assert parent.data.tags["ssl_dist.driver_attempt"]
    assert parent.info.status == "FINISHED"

    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.info.start_time)
    assert [c.info.run_name for c in children] == names and len(names) == 2
    assert [c.info.status for c in children] == ["FAILED", "FINISHED"]  # the killed attempt never closed
    for child, rows in zip(children, history):
        logged = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "loss")}
        written = {int(r["step"]): float(r["loss"]) for r in rows if r.get("loss")}
        if child is children[-1]:
            assert logged == pytest.approx(written)  # every row, step = optimizer step
        else:  # killed: what its sender had sent by then
            assert logged and {s: written[s] for s in logged} == pytest.approx(logged)
    last = children[-1]
    knn = {m.step: m.value for m in client.get_metric_history(last.info.run_id, "knn_top1")}
    assert knn and knn == pytest.approx({int(r["step"]): float(r["knn_top1"]) for r in history[-1]
                                         if r.get("knn_top1")})
    assert {"lr", "samples_per_s", "skipped_samples", "skipped_shards"} <= set(last.data.metrics)

    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"curves.png", "encoder"} <= artifacts
    assert {"encoder/encoder.safetensors", "encoder/encoder.json"} <= \
        {f.path for f in client.list_artifacts(parent.info.run_id, "encoder")}
    spec = json.loads(Path(client.download_artifacts(parent.info.run_id, "encoder/encoder.json",
                                                     str(tmp_path))).read_text())
    assert spec["step"] == MAX_STEPS

    for run in [parent, *children]:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert not any(secret in value for secret in secrets), value

    # ---- W&B offline: each attempt's run folder copied into the run folder, holding its rows,
    # and the driver's artifacts run's, holding the curves and the encoder
    fs, path = storage.filesystem(storage.join(url, "wandb"))
    fs.invalidate_cache()
    folders = sorted(fs.ls(path, detail=False))
    assert len(folders) == 3 and all(f.rsplit("/", 1)[1].startswith("offline-run-") for f in folders)
    by_attempt, logged_artifacts = {}, []
    for folder in folders:
        local = tmp_path / folder.rsplit("/", 1)[1]
        fs.get(folder, str(local), recursive=True)
        for file in local.rglob("*"):
            if file.is_file():
                assert not any(secret.encode() in file.read_bytes() for secret in secrets), file
        records = wandb_records(local)
        record = run_record(records)
        assert record["run_group"] == "run" and record["project"] == "ssl-dist-e2e"
        if record["job_type"] == "artifacts":
            assert record["display_name"] == "run-artifacts"
            logged_artifacts += artifact_records(records)
            continue
        assert record["config"]["update"]["train"]["max_steps"] == MAX_STEPS
        by_attempt[record["display_name"]] = {int(r["history"]["step"]["num"]): r["history"]["item"]
                                              for r in records if r["type"] == "history"}
    assert sorted(by_attempt) == sorted(names)
    for name, rows in zip(names, history):
        written = {int(r["step"]): float(r["loss"]) for r in rows if r.get("loss")}
        logged = {step: item["loss"] for step, item in by_attempt[name].items() if "loss" in item}
        if name == names[-1]:
            assert logged == pytest.approx(written)
        else:
            assert logged and {s: written[s] for s in logged} == pytest.approx(logged)
    assert "wandb sync" in driver.output and "W&B offline artifacts run" in driver.output
    (artifact,) = logged_artifacts
    files = {f["path"]: f for f in artifact["manifest"]["contents"]}
    assert {"curves.png", "encoder/encoder.safetensors", "encoder/encoder.json"} <= set(files)
    assert artifact["type"] == "model" and artifact["name"] == "run"
    # the files `wandb sync` uploads from the driver's machine: the encoder of the run's last step
    staged = Path(files["encoder/encoder.json"]["local_path"])
    assert staged.is_relative_to(wandb_data) and json.loads(staged.read_text())["step"] == MAX_STEPS
