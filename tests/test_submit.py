"""submit.py and the `ssl-dist submit/status/logs/stop` commands without a cluster: what is
refused before any cluster is contacted, what an unreachable Jobs API says, and that the
arguments a job gets resolve to the config resolved here. The jobs on a real two-node
cluster are in e2e/test_jobs.py."""

from __future__ import annotations

from pathlib import Path

from runs import ssl_dist_cli
from services import TEST_SECRET_KEY, free_port

from ssl_dist import cli


def test_submit_to_an_address_where_nothing_listens_is_a_clear_error(capsys):
    address = f"http://127.0.0.1:{free_port()}"
    done = ssl_dist_cli("submit", "--address", address, "--installed", "train.max_steps=1", timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"cannot reach the Ray Jobs API at {address}" in done.stderr and "Traceback" not in done.stderr
    for command in (["status", "x"], ["logs", "x"], ["stop", "x"]):  # the same handling, in this process
        assert cli.main([*command, "--address", address]) == 2
        assert "cannot reach the Ray Jobs API" in capsys.readouterr().err


def test_submit_refuses_bad_config_and_secret_env_before_contacting_a_cluster(capsys):
    address = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["submit", "--address", address, "train.max_stepz=1"]) == 2
    assert "unknown config key 'train.max_stepz'" in capsys.readouterr().err
    assert cli.main(["submit", "--address", address, "--env", f"AWS_SECRET_ACCESS_KEY={TEST_SECRET_KEY}"]) == 2
    out = capsys.readouterr()
    assert "secrets are never sent" in out.err and TEST_SECRET_KEY not in out.err + out.out
    # a secret under an innocent name: its value gives it away, and is not echoed
    assert cli.main(["submit", "--address", address, "--env", "DATABASE_URL=postgres://app:hunter2@db/app"]) == 2
    out = capsys.readouterr()
    assert "DATABASE_URL: its value is a URL with a password" in out.err and "hunter2" not in out.err + out.out


def test_submitted_arguments_round_trip_the_resolved_config():
    import shlex

    from ssl_dist import config, submit

    cfg = config.load(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "cifar10-cluster.yaml",
                      ["optim.weight_decay=1.0e-5", "run.name='true'", "data.train_url=s3://b/a b:c",
                       "storage.endpoint_url=http://minio:9000/#x"])
    command = shlex.split(submit.entrypoint(submit.DEFAULT_ENTRYPOINT, submit.config_arguments(cfg)))
    assert command[:2] == ["python", "jobs/pretrain.py"]
    assert config.load(None, command[2:]) == cfg  # what the job resolves is what was resolved here


def project_extras() -> dict[str, list[str]]:
    """The project's extras as pyproject.toml declares them."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]


def test_a_job_of_a_tracked_run_gets_the_client_of_each_configured_tracker():
    # Before: the job's pip requirements were the project's dependencies only, and the cluster's
    # driver of `ssl-dist submit ... track.mlflow_uri=...` stopped at "needs the mlflow package".
    from ssl_dist import config, submit

    extras = project_extras()
    plain = submit.runtime_env(working_dir="job.zip", extras=submit.tracker_extras(config.load(None, [])))
    assert not set(plain["pip"]) & {*extras["mlflow"], *extras["wandb"]}
    mlflow, wandb = "track.mlflow_uri=http://mlflow:5000", "track.wandb_project=ssl"
    for overrides, wanted in (([mlflow], ["mlflow"]), ([wandb], ["wandb"]), ([mlflow, wandb], ["mlflow", "wandb"])):
        cfg = config.load(None, overrides)
        assert submit.tracker_extras(cfg) == wanted
        runtime = submit.runtime_env(working_dir="job.zip", extras=submit.tracker_extras(cfg))
        assert runtime["pip"] == plain["pip"] + [r for extra in wanted for r in extras[extra]], overrides
        # --installed: the cluster has ssl-dist and its clients already, nothing is installed
        assert "pip" not in submit.runtime_env(working_dir="job.zip", installed=True,
                                               extras=submit.tracker_extras(cfg))


def test_an_extra_the_project_does_not_declare_is_a_clear_error(tmp_path):
    import pytest

    from ssl_dist import submit

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\ndependencies = ['numpy', 'ray[train]>=2.60']\n"
                                             "[project.optional-dependencies]\n"
                                             "mlflow = ['mlflow>=2.12', 'numpy', 'ray>=2.60']\n")
    assert submit.pip_requirements(tmp_path / "pyproject.toml", extras=["mlflow"]) == ["numpy", "mlflow>=2.12"]
    with pytest.raises(submit.SubmitError, match=r"declares no extra 'wandb'.*--installed"):
        submit.runtime_env(working_dir="job.zip", extras=["wandb"], project=tmp_path)
