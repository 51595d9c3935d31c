"""Client side of the Ray Jobs API: submit a run to a cluster someone else runs, watch it,
stop it.

`ssl-dist submit` resolves and validates the config here (a bad key costs a second, not a
cluster round trip), then submits `python jobs/pretrain.py key=value ...` with a runtime
environment: the project's files as `working_dir` and, unless the cluster already has them,
the project's pip requirements. The job's driver runs `ssl-dist pretrain` on the cluster.

Never sent: credentials. The working_dir is a zip of what git tracks (and would track:
`.gitignore` respected), less every file that looks like it holds secrets, even when tracked
(`secret_filter`); the runtime environment holds that code, package names and, on request,
environment variables that are not secrets (`--env`, names and values checked). The cluster
reaches object storage through its own identity (instance role, Kubernetes secret) and Ray's
token comes from the caller's RAY_AUTH_TOKEN / ~/.ray/auth_token, as a header, never in the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ssl_dist import config as config_lib
from ssl_dist import secret_filter

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Outside a git checkout (a copied or unpacked project) these are left out instead of what
# .gitignore would leave out: environments, run outputs, data, VCS, build outputs, caches.
NOT_PROJECT_FILES = {"top": (".venv", "venv", ".git", "runs", "data", "build", "dist"),
                     "any": ("__pycache__", ".pytest_cache", "*.egg-info", "*.pyc")}

DEFAULT_ENTRYPOINT = "jobs/pretrain.py"


class SubmitError(RuntimeError):
    """A user-facing problem talking to a cluster's Jobs API; the message says what to do."""


# ---- what is sent ----------------------------------------------------------------------------


def config_arguments(cfg: config_lib.Config) -> list[str]:
    """`section.key=value` arguments for every field of `cfg` that differs from the defaults.

    Values are written by the YAML library that parses them back (`config.parse_overrides`),
    so the job gets exactly what was resolved here (1e-05 stays a float, "true" a string),
    whatever file the client read them from.
    """
    import yaml

    defaults = config_lib.to_dict(config_lib.Config())
    args = []
    for section, values in config_lib.to_dict(cfg).items():
        for key, value in values.items():
            if value != defaults[section][key]:
                text = yaml.safe_dump(value, default_flow_style=True).strip()
                args.append(f"{section}.{key}={text.removesuffix('...').strip()}")
    return args


def pip_requirements(pyproject: Path = PROJECT_ROOT / "pyproject.toml", extras=()) -> list[str]:
    """The project's runtime dependencies from pyproject.toml, then those of each of its
    `extras` ([project.optional-dependencies], e.g. "mlflow"), each once, without Ray: the
    cluster runs its own Ray, and a second one in the job's environment would not match it."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = list(project["dependencies"])
    declared = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in declared:
            raise SubmitError(f"{pyproject} declares no extra {extra!r} ([project.optional-dependencies]), which "
                              f"the job needs: add it there, or install {extra} on the cluster and pass --installed")
        deps += [d for d in declared[extra] if d not in deps]
    return [d for d in deps if not re.match(r"^ray(\[|[<>=!~ ]|$)", d.strip())]


def tracker_extras(cfg: config_lib.Config) -> list[str]:
    """The project's extras a job of `cfg` needs besides its dependencies: the client of each
    tracker it configures (track.mlflow_uri: "mlflow", track.wandb_project: "wandb"), which
    the job's driver opens the run with."""
    from ssl_dist.tracking import EXTRAS

    return [extra for extra, key in EXTRAS.items() if cfg.get(key)]


def parse_env(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["NAME=value", ...]` for the job's environment; a name or a value that looks like a
    secret (`secret_filter.secret_env_reason`) is refused, without echoing the value."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SubmitError("--env takes NAME=value (a variable name, '=', its value): one argument is not "
                              "of that form")
        why = secret_filter.secret_env_reason(name, value)
        if why:
            raise SubmitError(f"--env {name}: {why}, and secrets are never sent with a job (its runtime "
                              f"environment is stored as plain text on the cluster): give the cluster its own "
                              f"access instead, an instance/IAM role (cluster/aws-gpu.yaml), a Kubernetes secret "
                              f"(the ssl-dist-s3 envFrom in cluster/kuberay-*.yaml) or the nodes' own environment")
        env[name] = value
    return env


def project_files(project: Path, say: Callable[[str], None]) -> list[str]:
    """The project's files a job gets (paths relative to `project`, with /): what git tracks
    and would track (`git ls-files --cached --others --exclude-standard`: .gitignore respected);
    outside a git checkout, every file but environments, outputs and caches (said so)."""
    try:
        listed = subprocess.run(["git", "-C", str(project), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True).stdout
        return sorted({p for p in os.fsdecode(listed).split("\0") if p})
    except (OSError, subprocess.CalledProcessError):
        pass
    say(f"ssl-dist: {project} is not a git checkout: the job gets every file in it but "
        f"{', '.join(NOT_PROJECT_FILES['top'] + NOT_PROJECT_FILES['any'])}")
    files = []
    for folder, dirs, names in os.walk(project):
        here = Path(folder).relative_to(project)
        dirs[:] = sorted(d for d in dirs if not _left_out(here / d, top=here == Path(".")))
        files += [(here / n).as_posix() for n in names if not _left_out(here / n, top=False)]
    return sorted(files)


def _left_out(path: Path, *, top: bool) -> bool:
    return (top and path.name in NOT_PROJECT_FILES["top"]) or \
        any(fnmatch.fnmatchcase(path.name, p) for p in NOT_PROJECT_FILES["any"])


@contextlib.contextmanager
def job_working_dir(project: Path = PROJECT_ROOT, say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """A zip of the project's files for a job's runtime_env working_dir, for as long as the
    `with` lasts (the submit call uploads it): `project_files` less every file that looks like
    it holds secrets, even when tracked, and less links out of the project (both warned).

    A local .zip working_dir is uploaded by Ray as it is: what is in it is exactly what the
    cluster gets, with no further include/exclude rules of Ray's applied.
    """
    say = say or (lambda message: print(message, file=sys.stderr))
    project = project.resolve()
    kept, secret, outside = [], [], []
    for rel in project_files(project, say):
        target = (project / rel).resolve()  # a link is judged by what it points to, as well
        if not target.is_relative_to(project):
            outside.append(rel)
        elif secret_filter.secret_file_pattern(rel) or \
                secret_filter.secret_file_pattern(target.relative_to(project).as_posix()):
            secret.append(rel)
        elif target.is_file():  # (a file deleted but still tracked, a submodule: nothing to send)
            kept.append(rel)
    if secret or outside:
        say("ssl-dist: not uploaded with the job: " + "; ".join(
            part for part in (f"files that look like secrets ({', '.join(secret)})" if secret else "",
                              f"links out of the project ({', '.join(outside)})" if outside else "") if part))
    with tempfile.TemporaryDirectory(prefix="ssl-dist-job-") as scratch:
        package = Path(scratch) / "working_dir.zip"
        with zipfile.ZipFile(package, "w", zipfile.ZIP_DEFLATED) as zf:
            for rel in kept:
                # A fixed timestamp: the same files give the same zip, which Ray then reuses.
                info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = ((project / rel).stat().st_mode & 0xFFFF) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with open(project / rel, "rb") as src, zf.open(info, "w") as dst:
                    shutil.copyfileobj(src, dst)
        yield package


def runtime_env(*, working_dir: str | Path, installed: bool = False, env: dict[str, str] | None = None,
                extras=(), project: Path = PROJECT_ROOT) -> dict:
    """The job's runtime environment: `working_dir` (what `job_working_dir` made) and (unless
    `installed`) the `project`'s pip requirements with those of its `extras` (`tracker_extras`);
    `env` holds non-secret variables only (see `parse_env`)."""
    runtime = {"working_dir": str(working_dir)}
    if not installed:
        runtime["pip"] = pip_requirements(project / "pyproject.toml", extras)
    if env:
        runtime["env_vars"] = dict(env)
    return runtime


def entrypoint(script: str, arguments: list[str]) -> str:
    """The shell command the job runs, e.g. `python jobs/pretrain.py run.name=x 'data.train_url=s3://b/a b'`."""
    return " ".join(["python", shlex.quote(script), *map(shlex.quote, arguments)])


# ---- talking to the cluster ------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """The Jobs API URL: `--address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster to talk to: pass --address http://HEAD:8265 (the Ray dashboard / Jobs API "
                          "port) or set RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address


def client(address: str | None):
    """A connected `JobSubmissionClient`, or a SubmitError that says what to fix."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url)
    except AuthenticationError:
        raise SubmitError(f"the cluster at {url} refused us: it uses Ray token authentication; set "
                          f"RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or put the token in ~/.ray/auth_token, "
                          f"see `ray get-auth-token`)") from None
    except (ConnectionError, OSError) as err:
        raise SubmitError(f"cannot reach the Ray Jobs API at {url}: nothing answers there ({err}). Check that the "
                          f"cluster is up (`ray up cluster/aws-gpu.yaml`, `kubectl get raycluster`) and that the "
                          f"address is the head's dashboard port (8265 by default; port-forward it if needed)") \
            from None
    except Exception as err:  # noqa: BLE001 (Ray raises RuntimeError/ValueError for a wrong address)
        raise SubmitError(f"cannot use {url} as a Ray Jobs API address: {err}") from None


def _call(what: str, fn, *args, **kwargs):
    """Run one Jobs API call; a missing job or a refused request becomes a SubmitError."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError:
        raise SubmitError(f"{what}: the cluster refused our token; check RAY_AUTH_TOKEN") from None
    except RuntimeError as err:
        text = str(err)
        if "404" in text or "does not exist" in text:
            raise SubmitError(f"{what}: no such job on this cluster (`ssl-dist status` lists them)") from None
        raise SubmitError(f"{what}: {text}") from None
    except (ConnectionError, OSError) as err:
        raise SubmitError(f"{what}: the cluster stopped answering ({err})") from None


@dataclasses.dataclass
class Submission:
    """What `submit` sent: the job's id and the exact request (for logs and tests)."""

    job_id: str
    entrypoint: str
    runtime_env: dict


def submit(cfg: config_lib.Config, *, address: str | None, installed: bool = False, env: dict | None = None,
           submission_id: str | None = None, entrypoint_num_cpus: float | None = None) -> tuple[object, Submission]:
    """Submit a pretraining run of `cfg` (jobs/pretrain.py) as a Ray job, with the client of
    each tracker it configures (`tracker_extras`); returns (client, Submission)."""
    return submit_script(DEFAULT_ENTRYPOINT, config_arguments(cfg), address=address, installed=installed, env=env,
                         name=cfg.run.name, metadata={"ssl_dist_run": cfg.run.name,
                                                      "storage_path": cfg.run.storage_path},
                         submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus,
                         extras=tracker_extras(cfg))


def submit_script(script: str, arguments: list[str], *, address: str | None, installed: bool = False,
                  env: dict | None = None, name: str = "job", metadata: dict | None = None,
                  submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
                  extras=()) -> tuple[object, Submission]:
    """Submit `python script arguments...` (a path inside the project, e.g. jobs/evaluate.py) as a Ray job;
    `extras`: the project's extras its pip requirements add (`pip_requirements`)."""
    jobs = client(address)
    command = entrypoint(script, arguments)
    job_id = submission_id or f"ssl-dist-{re.sub(r'[^A-Za-z0-9_-]', '-', name)}-{uuid.uuid4().hex[:8]}"
    kwargs = {"entrypoint_num_cpus": entrypoint_num_cpus} if entrypoint_num_cpus is not None else {}
    with job_working_dir(PROJECT_ROOT) as working_dir:
        runtime = runtime_env(working_dir=working_dir, installed=installed, env=env, extras=extras)
        # submit_job uploads the zip before it returns: it may go once the call is done.
        _call("submit", jobs.submit_job, entrypoint=command, runtime_env=runtime, submission_id=job_id,
              metadata=metadata or {}, **kwargs)
    return jobs, Submission(job_id=job_id, entrypoint=command, runtime_env=runtime)


def follow(jobs, job_id: str, *, out=None, progress: bool | None = None) -> int:
    """Stream a job's logs until it ends (with a progress bar on a terminal); returns its exit status.

    0 when it succeeded; the driver's exit code (or 1) when it failed; 1 when it was stopped.
    """
    from ssl_dist.metrics import ProgressBar, parse_progress_line

    out = out or sys.stdout
    bar = ProgressBar(enabled=progress)

    async def stream() -> None:
        pending = ""
        async for chunk in jobs.tail_job_logs(job_id):
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                bar.write(line, file=out)
                row = parse_progress_line(line)
                if row is not None:
                    bar.update(row)
        if pending:
            bar.write(pending, file=out)

    try:
        asyncio.run(stream())
    finally:
        bar.close()
    info = _wait_terminal(jobs, job_id)
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    detail = (info.message or "").strip().splitlines()
    print(f"ssl-dist: job {job_id} {status}" + (f": {detail[0]}" if detail else ""), file=sys.stderr)
    return 1 if status == "STOPPED" else (info.driver_exit_code or 1)


def _wait_terminal(jobs, job_id: str, timeout: float = 60.0):
    """The job's info once its status is terminal (the log stream can end just before)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        info = _call(f"status of {job_id}", jobs.get_job_info, job_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def status(address: str | None, job_id: str | None = None) -> list[dict]:
    """One job's status, or every job's (newest first), as plain dicts."""
    jobs = client(address)
    infos = [_call(f"status of {job_id}", jobs.get_job_info, job_id)] if job_id else \
        sorted(_call("list jobs", jobs.list_jobs), key=lambda i: i.start_time or 0, reverse=True)
    return [{"job_id": i.submission_id or i.job_id, "status": str(i.status), "entrypoint": i.entrypoint,
             "message": (i.message or "").strip().splitlines()[0] if i.message else "",
             "driver_exit_code": i.driver_exit_code} for i in infos]


def logs(address: str | None, job_id: str, *, follow_logs: bool = False) -> int:
    """Print a job's logs (all so far, or `follow_logs` to its end); returns the exit status."""
    jobs = client(address)
    if follow_logs:
        return follow(jobs, job_id)
    sys.stdout.write(_call(f"logs of {job_id}", jobs.get_job_logs, job_id))
    return 0


def stop(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop a job; True if it was running."""
    return bool(_call(f"stop {job_id}", client(address).stop_job, job_id))
