"""The `ssl-dist` command's answer to input a user gets wrong: one clear message that names
the thing and the fix, exit status 2, no traceback, nothing written, no worker started.

In this process (`cli.main`, what the console script calls): a process of its own would
cost seconds of start-up for each one-line message. RAY_ADDRESS names a port where nothing
listens, so a check that came after the driver connects to Ray fails instead of starting a
cluster. Errors that need an environment of their own (credentials a second S3 server
refuses) run the command as a process, in e2e/test_pretrain.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_dist import cli


@pytest.fixture(autouse=True)
def no_ray_here(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")


def test_unknown_config_key_is_a_clear_error(capsys):
    assert cli.main(["pretrain", "train.max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.max_stepz'" in err and "train.max_steps" in err


def test_missing_bucket_is_a_clear_error(cifar_shards_s3, tmp_path, capsys):
    assert cli.main(["pretrain", "data.train_url=s3://no-such-bucket/shards", f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "bucket 'no-such-bucket'" in err and "does not exist" in err

    assert cli.main(["pretrain", f"data.train_url={cifar_shards_s3['train']}",
                     "run.storage_path=s3://no-such-runs-bucket/runs"]) == 2
    assert "bucket 'no-such-runs-bucket'" in capsys.readouterr().err


def test_empty_source_folder_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["shards", "make", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "empty" in err.lower() and str(tmp_path / "empty") in err
    assert not (tmp_path / "out" / "index.json").exists()


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["pretrain", f"data.train_url={tmp_path}", f"run.storage_path={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err
    assert "no index.json" in err, err


def test_missing_eval_set_is_a_clear_error_before_any_worker_starts(cifar_shards_s3, tmp_path, capsys):
    # RAY_ADDRESS names nothing: the check must come before the driver tries to connect
    assert cli.main(["pretrain", f"data.train_url={cifar_shards_s3['train']}", f"run.storage_path={tmp_path}/runs",
                     "eval.every=5", f"eval.train_url={cifar_shards_s3['train']}",
                     f"eval.test_url={tmp_path}/no-test-set"]) == 2
    err = capsys.readouterr().err
    assert f"eval set {tmp_path}/no-test-set" in err and "no index.json" in err


def test_clip_on_shards_without_captions_is_a_clear_error_before_any_worker_starts(cifar_shards_s3, tmp_path,
                                                                                    capsys):
    tiny = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "clip-tiny.json"
    assert cli.main(["pretrain", "method.name=clip", f"model.clip_arch={tiny}", f"data.train_url={cifar_shards_s3['train']}",
                     f"run.storage_path={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err
    assert "method.name=clip needs the sample fields txt" in err and "point data.train_url at shards" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()  # nothing written


def test_resume_without_a_checkpoint_is_a_clear_error(cifar_shards_s3, tmp_path, capsys):
    assert cli.main(["pretrain", "--resume", f"data.train_url={cifar_shards_s3['train']}",
                     f"run.storage_path={tmp_path}/runs", "run.name=nothing-here"]) == 2
    err = capsys.readouterr().err
    assert "--resume: nothing to resume in" in err and "nothing-here" in err


def test_every_user_error_is_known_and_found_through_rays_wrappers():
    import importlib

    from ssl_dist.checkpoint import CheckpointError, IncompleteCheckpoint

    for module, name in cli.USER_ERRORS.items():
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)
    wrapped = RuntimeError("worker group failed")
    wrapped.worker_failures = {0: IncompleteCheckpoint("checkpoint-00000004 misses rank 1's part list")}
    assert cli.user_error_message(wrapped) == "checkpoint-00000004 misses rank 1's part list"
    assert cli.user_error_message(CheckpointError("x")) == "x" and cli.user_error_message(KeyError("y")) is None


def test_a_user_error_raised_in_a_ray_task_is_its_one_line_not_the_remote_traceback():
    # A Tune trial's error comes back as a RayTaskError made an instance of the cause's class too
    # (here LaunchError), whose str() is the whole remote traceback: that was the message printed.
    from ray.exceptions import RayTaskError

    from ssl_dist.launch import LaunchError

    cause = LaunchError("data.train_url is empty: set it")
    try:
        raise cause
    except LaunchError:
        import traceback

        wrapped = RayTaskError("trial", traceback.format_exc(), cause).as_instanceof_cause()
    assert isinstance(wrapped, LaunchError) and "raise cause" in str(wrapped)  # the remote trace
    assert cli.user_error_message(wrapped) == "data.train_url is empty: set it"


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../../x", "-rf"])
def test_a_run_name_that_is_not_one_folder_is_refused_and_nothing_is_deleted(cifar_shards_s3, tmp_path, capsys,
                                                                              name):
    # On the code before run.name was validated, `run.name=.. --no-resume` deleted the parent of
    # run.storage_path and `run.name=.` every run beside it.
    runs = tmp_path / "area" / "runs"
    for kept in (runs / "other-run" / "checkpoint-000010", tmp_path / "area" / "beside", tmp_path / "x"):
        kept.mkdir(parents=True)
        (kept / "meta.json").write_text("{}")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert cli.main(["pretrain", f"data.train_url={cifar_shards_s3['train']}", f"run.storage_path={runs}",
                     f"run.name={name}", "--no-resume"]) == 2
    err = capsys.readouterr().err
    assert f"run.name={name!r}" in err and "one folder under run.storage_path" in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# ---- one writer per run folder; --no-resume moves aside, deletes only what ssl-dist wrote ---


@pytest.fixture(params=["local", "s3"])
def runs_url(request, tmp_path):
    """run.storage_path: a local folder, or a prefix in a fresh moto bucket."""
    return str(tmp_path / "runs") if request.param == "local" else f"s3://{request.getfixturevalue('bucket')}/runs"


PREVIOUS = {"checkpoint-00000004/meta.json": b"{}", "checkpoint-00000004/deepspeed/model.pt": b"m" * 20,
            "checkpoint_manager_snapshot.json": b"{}", "metrics/attempt-00000000-1.csv": b"step\n",
            "config.yaml": b"run: {}\n", "notes.txt": b"the user's own"}


def write_tree(url: str, files: dict) -> None:
    from ssl_dist import storage

    fs, path = storage.filesystem(url)
    for rel, data in files.items():
        fs.makedirs(f"{path}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{path}/{rel}", data)


def read_tree(url: str) -> dict:
    """{path relative to `url`: bytes} of every file under `url`."""
    from ssl_dist import storage

    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    return {p[len(path) + 1:]: fs.cat_file(p) for p, info in fs.find(path, detail=True).items()
            if info["type"] != "directory"}


def test_a_second_driver_on_a_run_is_refused_and_deletes_nothing_of_the_first(cifar_shards_s3, runs_url, capsys,
                                                                              monkeypatch):
    # The likely way in: Ctrl-C on `ssl-dist submit` leaves the job running, and the user submits
    # again; the second job's driver runs this command. On the code before, it deleted the first
    # run's checkpoint and metrics (--no-resume), then went on to start its workers.
    from ssl_dist import lease

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # going past the check fails at once, not in minutes
    write_tree(f"{runs_url}/r", PREVIOUS)
    first = lease.acquire(f"{runs_url}/r", 60)  # the first run's driver, alive
    before = read_tree(runs_url)
    assert cli.main(["pretrain", "--no-resume", f"data.train_url={cifar_shards_s3['train']}",
                     f"run.storage_path={runs_url}", "run.name=r"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"run folder {runs_url}/r is in use by another driver" in err and f"attempt {first.attempt}" in err
    assert "whose lease expires at" in err and "another run.name" in err
    assert read_tree(runs_url) == before  # nothing of the first run moved, deleted or written
    first.release()


def test_no_resume_takes_an_expired_lease_and_moves_the_previous_run_aside(cifar_shards_s3, runs_url, capsys,
                                                                          monkeypatch):
    # On the code before, every entry of the run folder (notes.txt too) was deleted, silently.
    import time

    from ssl_dist import lease

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # the run stops where Ray would start
    write_tree(f"{runs_url}/r", PREVIOUS)
    dead = lease.acquire(f"{runs_url}/r", 60, clock=lambda: time.time() - 120)  # its driver died 1 min ago
    with pytest.raises(ValueError, match="Invalid Ray address"):
        cli.main(["pretrain", "--no-resume", f"data.train_url={cifar_shards_s3['train']}",
                  f"run.storage_path={runs_url}", "run.name=r"])
    out = capsys.readouterr().out
    assert f"took over the expired lease of {runs_url}/r" in out and f"attempt {dead.attempt}" in out
    moved = [line for line in out.splitlines() if line.startswith("--no-resume: moved")]
    assert len(moved) == 1 and "4 entries, 1 checkpoint(s)" in moved[0], out
    aside = moved[0].split(" to ", 1)[1].split(";", 1)[0]
    assert aside.startswith(f"{runs_url}/r.previous-") and len(aside.rsplit("-", 1)[1]) == len("20251202T000000Z")
    assert read_tree(aside) == {rel: data for rel, data in PREVIOUS.items() if rel != "notes.txt"}
    assert f"--no-resume: left notes.txt in {runs_url}/r: not written by ssl-dist" in out
    left = read_tree(f"{runs_url}/r")
    assert left.pop("notes.txt") == PREVIOUS["notes.txt"] and set(left) == {"config.yaml"}  # the new run's
    assert b"name: r" in left["config.yaml"]  # and the lease was released when the driver stopped


def test_delete_previous_deletes_only_what_ssl_dist_wrote_and_says_so(cifar_shards_s3, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    runs = str(tmp_path / "runs")
    write_tree(f"{runs}/r", PREVIOUS)
    base = [f"data.train_url={cifar_shards_s3['train']}", f"run.storage_path={runs}", "run.name=r"]
    assert cli.main(["pretrain", "--delete-previous", *base]) == 2  # without --no-resume: refused, nothing done
    assert "use it with --no-resume" in capsys.readouterr().err and read_tree(f"{runs}/r") == PREVIOUS
    with pytest.raises(ValueError, match="Invalid Ray address"):
        cli.main(["pretrain", "--no-resume", "--delete-previous", *base])
    out = capsys.readouterr().out
    assert (f"--no-resume --delete-previous: deleted what the previous run wrote in {runs}/r (checkpoint-00000004, "
            f"checkpoint_manager_snapshot.json, config.yaml, metrics)") in out, out
    assert set(read_tree(f"{runs}/r")) == {"notes.txt", "config.yaml"} and list(tmp_path.iterdir()) == [tmp_path / "runs"]
