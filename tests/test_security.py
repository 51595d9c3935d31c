"""Security properties that need no cluster: the shipped cluster configs keep Ray's token
authentication on and reach S3 without keys; nothing a job sends carries credentials; a
checkpoint's model file is loaded without unpickling objects.

The end-to-end check (a real run's folder, its captured logs, the jobs' runtime environments
and Ray's own log files grepped for the test's credentials) is in e2e/test_jobs.py.
"""

from __future__ import annotations

import ast
import hashlib
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
    import zipfile

    with submit.job_working_dir(ROOT) as working_dir:  # the project's own files, zipped as a job gets them
        sent = json.dumps({"entrypoint": submit.entrypoint(submit.DEFAULT_ENTRYPOINT, submit.config_arguments(cfg)),
                           "runtime_env": submit.runtime_env(working_dir=working_dir, env={"NCCL_DEBUG": "INFO"}),
                           "config": config.dump_yaml(cfg)})
        runtime = submit.runtime_env(working_dir=working_dir)
        with zipfile.ZipFile(working_dir) as package:
            names = package.namelist()
            sent += "".join(package.read(n).decode(errors="replace") for n in names if not n.startswith("tests/"))
    for secret in (TEST_ACCESS_KEY, TEST_SECRET_KEY, "testing-ray-token-ssl-dist"):
        assert secret not in sent
    assert set(runtime) == {"working_dir", "pip"}  # no env_vars unless asked for
    assert "jobs/pretrain.py" in names and not any(n.startswith((".venv/", ".git/", "runs/")) for n in names)
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
    """A complete one-rank checkpoint (no engine): meta.json, the model file, the stream
    state, and the part list with each file's size and sha256, as `checkpoint.save` writes it."""
    cfg = config.load(None, ["train.zero_stage=2", "model.proj_hidden_dim=32", "model.proj_dim=8"])
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"format": "ssl_dist.checkpoint/2", "step": 1, "samples_seen": 1,
                                                  "world_size": 1, "config": config.to_dict(cfg)}))
    (folder / "stream-rank00000.json").write_text("{}")
    torch.save({"module": module_state, "ds_version": "0.19"}, folder / "deepspeed" / "mp_rank_00_model_states.pt")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    part = {"rank": 0, "step": 1, "files": {p.relative_to(folder).as_posix(): p.stat().st_size for p in files},
            "sha256": {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
    (folder / "parts").mkdir()
    (folder / "parts" / "rank00000.json").write_text(json.dumps(part))
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
    """Each torch.load in the library says weights_only, and it is True everywhere; each of
    DeepSpeed's loaders (which pass weights_only=False themselves) is called inside
    `safe_load.weights_only`, which overrides that (tests/checkpoint/test_safe_load.py shows
    that it does, on real checkpoints)."""
    calls, deepspeed_loads = [], []
    loaders = ("load_checkpoint", "ds_to_universal", "get_fp32_state_dict_from_zero_checkpoint")
    for path in sorted((ROOT / "ssl_dist").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = {id(node) for w in ast.walk(tree) if isinstance(w, ast.With)
                   and any(ast.unparse(item.context_expr).startswith("safe_load.weights_only(") for item in w.items)
                   for node in ast.walk(w)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            if name == "torch.load":
                flag = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                calls.append((path.name, node.lineno, flag))
            elif name.rsplit(".", 1)[-1] in loaders:
                deepspeed_loads.append((path.name, node.lineno, id(node) in guarded))
    assert calls and all(flag == "True" for _, _, flag in calls), calls
    assert len(deepspeed_loads) >= 4 and all(inside for _, _, inside in deepspeed_loads), deepspeed_loads


# ---- issue 14: secrets -------------------------------------------------------------------------

LOCAL_HEAD = """
import json, os, sys
import ray
from ssl_dist import launch
launch.connect_ray(num_cpus=1)
info = ray._private.worker.global_worker.node.address_info
print(json.dumps({"mode": os.environ.get("RAY_AUTH_MODE"), "gcs": info["gcs_address"],
                  "dashboard": info["webui_url"]}), flush=True)
sys.stdin.read()  # up until the test closes our stdin
"""


def test_a_local_ray_starts_with_token_auth_and_refuses_clients_without_the_token(tmp_path):
    # What `ssl-dist pretrain` / `quickstart` do on a laptop: RAY_AUTH_MODE unset, no address.
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    import urllib.error
    import urllib.request

    home = tmp_path / "home"
    home.mkdir()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    env.update(HOME=str(home), RAY_TMPDIR=temp)
    head = subprocess.Popen([sys.executable, "-c", LOCAL_HEAD], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        started = json.loads(head.stdout.readline())
        assert started["mode"] == "token"
        token_file = home / ".ray" / "auth_token"
        assert token_file.stat().st_mode & 0o777 == 0o600  # Ray's own would be world-readable
        assert (home / ".ray").stat().st_mode & 0o077 == 0
        token = token_file.read_text().strip()
        assert len(token) >= 32

        jobs_api = f"http://{started['dashboard']}/api/jobs/"
        with pytest.raises(urllib.error.HTTPError) as refused:  # a client without the token: refused
            urllib.request.urlopen(jobs_api, timeout=30)
        assert refused.value.code in (401, 403)
        with urllib.request.urlopen(urllib.request.Request(
                jobs_api, headers={"Authorization": f"Bearer {token}"}), timeout=30) as answer:
            assert answer.status == 200  # with it: served

        gcs_call = ("import sys\nfrom ray._raylet import GcsClient\n"  # what every Ray client does first
                    f"GcsClient(address={started['gcs']!r}).internal_kv_get(b'x', None, timeout=10)")
        for token_given, refused in (("not-the-token", True), (token, False)):
            # The GCS listens on the machine's address (not loopback): it refuses a wrong token.
            client = subprocess.run([sys.executable, "-c", gcs_call], capture_output=True, text=True, timeout=120,
                                    env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_given})
            assert (client.returncode != 0) == refused, client.stderr[-2000:]
            assert ("Authentication token is missing or incorrect" in client.stderr) == refused
    finally:
        head.stdin.close()
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_local_token_is_private_and_the_users_auth_choice_is_kept(monkeypatch, tmp_path):
    from ssl_dist import ray_token

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    environ = {}
    assert ray_token.local_auth_mode(environ) == "token" and environ["RAY_AUTH_MODE"] == "token"
    token_file = tmp_path / ".ray" / "auth_token"
    first = token_file.read_text()
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert ray_token.local_auth_mode({}) == "token" and token_file.read_text() == first  # generated once

    token_file.chmod(0o644)  # e.g. written by `ray get-auth-token --generate`
    ray_token.local_auth_mode({})
    assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.read_text() == first

    custom = tmp_path / "elsewhere" / "token"  # RAY_AUTH_TOKEN_PATH: the file Ray reads instead
    assert ray_token.local_auth_mode({"RAY_AUTH_TOKEN_PATH": str(custom)}) == "token"
    assert custom.stat().st_mode & 0o777 == 0o600 and custom.read_text() != first

    token_file.unlink()  # RAY_AUTH_TOKEN holds the token itself: nothing is written
    assert ray_token.local_auth_mode({"RAY_AUTH_TOKEN": "x" * 64}) == "token" and not token_file.exists()
    environ = {"RAY_AUTH_MODE": "disabled"}  # the user's choice stands, and needs no token
    assert ray_token.local_auth_mode(environ) == "disabled" and environ == {"RAY_AUTH_MODE": "disabled"}
    assert not token_file.exists()
    environ = {"RAY_AUTH_MODE": "token"}
    assert ray_token.local_auth_mode(environ) == "token" and environ == {"RAY_AUTH_MODE": "token"}
    assert token_file.stat().st_mode & 0o777 == 0o600


def git_project(root: Path, files: dict[str, str], untracked: dict[str, str]) -> Path:
    """A git repository at `root` with `files` committed and `untracked` left beside them."""
    import subprocess

    for rel, text in {**files, **untracked}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-f", *files], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    return root


SECRET_FILES = [".env", ".env.local", "id_rsa", "id_ed25519.pub", ".netrc", ".pgpass", "kubeconfig",
                "deploy/kubeconfig-prod.yaml", "infra/terraform.tfstate", "infra/terraform.tfstate.backup",
                "certs/server.pem", "certs/server.key", "conf/credentials.json", ".aws/config", ".ssh/known_hosts",
                "auth_token"]


def test_the_jobs_working_dir_is_what_git_tracks_without_secret_files(tmp_path):
    import zipfile

    code = {"pyproject.toml": "[project]\nname='x'\ndependencies=[]\n", "jobs/pretrain.py": "print(1)\n",
            "ssl_dist/keys.py": "KEYS = 1\n", ".gitignore": "runs/\n*.log\n"}
    project = git_project(tmp_path / "project", {**code, **{f: "secret\n" for f in SECRET_FILES}},
                          untracked={"notes.md": "new, not ignored\n", "runs/x/model.pt": "big\n",
                                     "debug.log": "ignored\n", ".env.production": "secret\n"})
    (tmp_path / "elsewhere.txt").write_text("not the project's\n")
    (project / "docs").mkdir()
    (project / "docs" / "settings.txt").symlink_to("../.env.local")  # a link to a secret is one
    (project / "escape.txt").symlink_to(tmp_path / "elsewhere.txt")  # a link out of the project
    warned = []
    with submit.job_working_dir(project, say=warned.append) as working_dir:
        runtime = submit.runtime_env(working_dir=working_dir, project=project)
        assert runtime["working_dir"] == str(working_dir) and "excludes" not in runtime
        with zipfile.ZipFile(working_dir) as package:  # what Ray uploads as it is (a local .zip working_dir)
            sent = set(package.namelist())
            assert package.read("jobs/pretrain.py") == b"print(1)\n"
    assert sent == {*code, "notes.md"}
    assert not Path(working_dir).exists()  # the package is gone once the job is submitted
    (message,) = warned
    assert "not uploaded" in message and all(name in message for name in SECRET_FILES + [".env.production"])
    assert "docs/settings.txt" in message and "links out of the project (escape.txt)" in message


def test_outside_a_git_checkout_the_working_dir_is_the_folder_without_outputs_or_secrets(tmp_path):
    import zipfile

    project = tmp_path / "project"
    for rel in ["pyproject.toml", "jobs/pretrain.py", ".venv/bin/python", ".git/config", "runs/x/model.pt",
                "ssl_dist/__pycache__/a.pyc", *SECRET_FILES]:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x\n")
    warned = []
    with submit.job_working_dir(project, say=warned.append) as working_dir:
        with zipfile.ZipFile(working_dir) as package:
            assert set(package.namelist()) == {"pyproject.toml", "jobs/pretrain.py"}
    assert any("not a git checkout" in w for w in warned) and any(".netrc" in w for w in warned)


def test_env_refuses_secret_names_and_values_with_one_message():
    refused_names = ["DB_PASSWORD", "DB_PASS", "MYSQL_PWD", "PGPASSWORD", "OPENAI_APIKEY", "GITHUB_TOKEN",
                     "SIGNING_KEY", "AZURE_CLIENT_SECRET", "GOOGLE_APPLICATION_CREDENTIALS", "MY_PRIVATE_THING"]
    refused_values = {"DATABASE_URL": "postgres://app:hunter2@db.internal:5432/app",
                      "BACKUP": "s3cr3t-ignored AKIAIOSFODNN7EXAMPLE",
                      "ROLE": "ASIAIOSFODNN7EXAMPLE",
                      "CERT_BODY": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\n-----END OPENSSH PRIVATE KEY-----",
                      "GH": "ghp_" + "a1B2c3D4e5" * 4,
                      "BLOB": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEYq9Zt"}
    for item in [f"{n}=x" for n in refused_names] + [f"{n}={v}" for n, v in refused_values.items()]:
        with pytest.raises(submit.SubmitError) as err:
            submit.parse_env([item])
        text = str(err.value)
        assert "secrets are never sent" in text and "role" in text and "Kubernetes secret" in text, text
        assert item.endswith("=x") or item.partition("=")[2] not in text  # the value is never echoed
    fine = ["NCCL_DEBUG=INFO", "AWS_ENDPOINT_URL_S3=http://minio:9000", "HF_HUB_OFFLINE=1",
            "GIT_COMMIT=3f786850e387550fdab836ed7e6dc881de23001b", "DATA=s3://bucket/a:b@c/shards",
            "RUN_ID=2f1d6a8e-6d43-4a3b-9c1e-0d9b5b7f1c2a", "CACHE=/mnt/datasets/imagenet-1k/train-shards-000123"]
    assert submit.parse_env(fine) == dict(item.split("=", 1) for item in fine)
    with pytest.raises(submit.SubmitError) as err:  # no '=': the argument itself is not echoed either
        submit.parse_env(["postgres://app:hunter2@db"])
    assert "hunter2" not in str(err.value)
