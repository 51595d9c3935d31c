"""Security properties that need no cluster: the shipped cluster configs keep Ray's token
authentication on and reach S3 without keys; nothing a job sends carries credentials; a
checkpoint's model file is loaded without unpickling objects.

The end-to-end check (a real run's folder, its captured logs, the jobs' runtime environments
and Ray's own log files grepped for the test's credentials) is in e2e/test_jobs.py.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml
from services import TEST_ACCESS_KEY, TEST_SECRET_KEY

from ssl_dist import config, evaluate, submit
from ssl_dist.model import build_model

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SHIPPED = sorted([*CLUSTER.glob("*.yaml"), *(ROOT / "jobs" / "configs").glob("*.yaml")])


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def walk(node, path=""):
    """Every (path, mapping) in a YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def test_shipped_cluster_configs_keep_token_auth_on():
    launchers = [d for p in CLUSTER.glob("*.yaml") for d in documents(p) if "provider" in d]
    kubes = [d for p in CLUSTER.glob("*.yaml") for d in documents(p) if d.get("apiVersion") == "ray.io/v1"]
    assert launchers and kubes
    for cluster in launchers:  # every `ray start` runs with RAY_AUTH_MODE=token, and every node has the token
        starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cluster[key]
                  if "ray start" in c]
        assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), starts
        assert "~/.ray/auth_token" in cluster["file_mounts"]
    for doc in kubes:
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        assert spec["authOptions"]["mode"] == "token", doc["metadata"]["name"]
    for path in SHIPPED:  # and nothing turns it off
        assert not re.search(r"RAY_AUTH_MODE\W+disabled|mode:\s*disabled", path.read_text()), path


def test_shipped_configs_hold_no_keys_and_reach_s3_through_a_role_or_a_secret():
    key_like = re.compile(r"AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]|"
                          r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\s*[:=]\s*\S", re.I)
    secret_name = re.compile(r"KEY|SECRET|TOKEN|PASSWORD", re.I)
    for path in SHIPPED:
        text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        assert not key_like.search(text), f"{path}: looks like a credential"
        for where, node in (item for doc in documents(path) for item in walk(doc)):
            # a Kubernetes env var with a secret-like name never has a literal value
            if "name" in node and "value" in node and isinstance(node["name"], str):
                assert not secret_name.search(node["name"]), f"{path}{where}: {node['name']} set in plain text"
    for doc in (d for p in CLUSTER.glob("*.yaml") for d in documents(p)):
        if "provider" in doc:  # VMs: an instance role on every node type
            assert all("IamInstanceProfile" in t["node_config"] for t in doc["available_node_types"].values())
        elif doc.get("apiVersion") == "ray.io/v1":  # pods: the service account (IRSA) and/or a secret
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                pod = group["template"]["spec"]
                assert pod["serviceAccountName"] == "ssl-dist"
                for container in pod["containers"]:
                    sources = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
                    assert sources == ["ssl-dist-s3"]
    (account,) = [d for d in documents(CLUSTER / "kuberay-serviceaccount.yaml") if d["kind"] == "ServiceAccount"]
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]


def test_what_a_job_sends_holds_no_credentials(monkeypatch, tmp_path):
    # The submitting machine has credentials in its environment, as a user's laptop does.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "testing-ray-token-ssl-dist")
    cfg = config.load(ROOT / "jobs" / "configs" / "cifar10-cluster.yaml", ["storage.endpoint_url=http://minio:9000"])
    sent = json.dumps({"entrypoint": submit.entrypoint(submit.DEFAULT_ENTRYPOINT, submit.config_arguments(cfg)),
                       "runtime_env": submit.runtime_env(env={"NCCL_DEBUG": "INFO"}),
                       "config": config.dump_yaml(cfg)})
    for secret in (TEST_ACCESS_KEY, TEST_SECRET_KEY, "testing-ray-token-ssl-dist"):
        assert secret not in sent
    runtime = submit.runtime_env()
    assert set(runtime) == {"working_dir", "excludes", "pip"}  # no env_vars unless asked for
    assert {"/.venv/", "/.git/", ".env", ".aws/", "auth_token"} <= set(runtime["excludes"])
    assert not any(r.startswith("ray") for r in runtime["pip"])  # the cluster's own Ray stays
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN",
                 "WANDB_API_KEY", "DB_PASSWORD", "HF_TOKEN"):
        with pytest.raises(submit.SubmitError, match="secrets are never sent"):
            submit.parse_env([f"{name}=x"])
    assert submit.parse_env(["NCCL_DEBUG=INFO", "AWS_ENDPOINT_URL_S3=http://minio:9000"]) == {
        "NCCL_DEBUG": "INFO", "AWS_ENDPOINT_URL_S3": "http://minio:9000"}


class _Exploit:
    """Unpickling this runs code (writes a file): what a tampered checkpoint could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def fake_checkpoint(folder: Path, module_state) -> Path:
    cfg = config.load(None, ["train.zero_stage=2", "model.proj_hidden_dim=32", "model.proj_dim=8"])
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": 1, "samples_seen": 1, "world_size": 1,
                                                  "config": config.to_dict(cfg)}))
    torch.save({"module": module_state, "ds_version": "0.19"}, folder / "deepspeed" / "mp_rank_00_model_states.pt")
    return folder


def test_checkpoint_model_file_is_loaded_without_unpickling_objects(tmp_path):
    model = build_model(config.load(None, ["model.proj_hidden_dim=32", "model.proj_dim=8"]).model)
    good = fake_checkpoint(tmp_path / "good", model.state_dict())
    loaded, _ = evaluate.load_checkpoint_model(str(good))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    marker = tmp_path / "pwned.txt"
    bad = fake_checkpoint(tmp_path / "bad", {"conv.weight": _Exploit(marker)})
    with pytest.raises(evaluate.EvaluationError, match="refusing to unpickle"):
        evaluate.load_checkpoint_model(str(bad))
    assert not marker.exists()
    assert pickle.dumps(_Exploit(marker))  # (the exploit is a real one: plain pickle would run it)


def test_every_torch_load_states_how_much_it_unpickles():
    """Each torch.load in the library says weights_only explicitly; evaluation's is True."""
    calls = []
    for path in sorted((ROOT / "ssl_dist").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                flag = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                calls.append((path.name, node.lineno, flag))
    assert calls and all(flag in ("True", "False") for _, _, flag in calls), calls
    assert all(flag == "True" for name, _, flag in calls if name in ("evaluate.py", "weights.py")), calls
