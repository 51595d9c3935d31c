"""Client side of the Ray Jobs API: submit a run to a cluster someone else runs, watch it,
stop it.

`ssl-dist submit` resolves and validates the config here (a bad key costs a second, not a
cluster round trip), then submits `python jobs/pretrain.py key=value ...` with a runtime
environment: the project folder as `working_dir` and, unless the cluster already has them,
the project's pip requirements. The job's driver runs `ssl-dist pretrain` on the cluster.

Never sent: credentials. The runtime environment holds code, package names and, on request,
environment variables that are not secrets (`--env`); the cluster reaches object storage
through its own identity (instance role, Kubernetes secret) and Ray's token comes from the
caller's RAY_AUTH_TOKEN / ~/.ray/auth_token, as a header, never in the job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shlex
import sys
import uuid
from pathlib import Path

from ssl_dist import config as config_lib

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Never uploaded with the working dir: environments, run outputs, data, VCS, caches, and
# files that typically hold secrets.
WORKING_DIR_EXCLUDES = [  # gitignore patterns, relative to the project folder
    "/.venv/", "/venv/", "/.git/", "/runs/", "/data/", "/build/", "/dist/", "__pycache__/", "*.pyc", "*.egg-info/",
    ".pytest_cache/", ".env", "*.pem", "*.key", ".aws/", ".ray/", "auth_token",
]

# Environment variable names that hold secrets: refused by `--env`, whatever their value.
SECRET_NAME = re.compile(r"(^|_)KEYS?($|_)|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|SESSION|AUTH", re.I)

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


def pip_requirements(pyproject: Path = PROJECT_ROOT / "pyproject.toml") -> list[str]:
    """The project's runtime dependencies from pyproject.toml, without Ray: the cluster runs
    its own Ray, and a second one in the job's environment would not match it."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if not re.match(r"^ray(\[|[<>=!~ ]|$)", d.strip())]


def parse_env(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["NAME=value", ...]` for the job's environment; names that hold secrets are refused."""
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SubmitError(f"--env {item!r} is not of the form NAME=value")
        if SECRET_NAME.search(name):
            raise SubmitError(f"--env {name}: secrets are never sent with a job (they would be stored in the "
                              f"job's runtime environment as plain text); give the cluster its own access "
                              f"(instance role, Kubernetes secret) instead")
        env[name] = value
    return env


def runtime_env(*, installed: bool = False, env: dict[str, str] | None = None,
                working_dir: Path = PROJECT_ROOT) -> dict:
    """The job's runtime environment: the project folder and (unless `installed`) its pip
    requirements; `env` holds non-secret variables only (see `parse_env`)."""
    runtime = {"working_dir": str(working_dir), "excludes": list(WORKING_DIR_EXCLUDES)}
    if not installed:
        runtime["pip"] = pip_requirements(working_dir / "pyproject.toml")
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
    """Submit a pretraining run of `cfg` (jobs/pretrain.py) as a Ray job; returns (client, Submission)."""
    return submit_script(DEFAULT_ENTRYPOINT, config_arguments(cfg), address=address, installed=installed, env=env,
                         name=cfg.run.name, metadata={"ssl_dist_run": cfg.run.name,
                                                      "storage_path": cfg.run.storage_path},
                         submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus)


def submit_script(script: str, arguments: list[str], *, address: str | None, installed: bool = False,
                  env: dict | None = None, name: str = "job", metadata: dict | None = None,
                  submission_id: str | None = None, entrypoint_num_cpus: float | None = None) -> tuple[object, Submission]:
    """Submit `python script arguments...` (a path inside the project, e.g. jobs/evaluate.py) as a Ray job."""
    jobs = client(address)
    command = entrypoint(script, arguments)
    runtime = runtime_env(installed=installed, env=env)
    job_id = submission_id or f"ssl-dist-{re.sub(r'[^A-Za-z0-9_-]', '-', name)}-{uuid.uuid4().hex[:8]}"
    kwargs = {"entrypoint_num_cpus": entrypoint_num_cpus} if entrypoint_num_cpus is not None else {}
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
