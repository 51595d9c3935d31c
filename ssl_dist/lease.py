"""One writer per run folder: the driver's lease, `<run>/lease.json`.

The driver takes the lease before it changes anything in the run folder (moving a previous
run aside, deleting, writing config.yaml) and before any worker starts; it renews it every
`run.lease_s / 4` while the run lives and releases it at the end. A second driver on the
same run folder finds the lease live and stops with one message naming the holder and
when its lease expires; a lease left by a driver that died is taken over once it has
expired. Every change is atomic, so of two drivers racing only one wins:

- S3: create is a conditional PUT (`If-None-Match: *`); renewing and taking over are PUTs
  with `If-Match: <ETag>` of the lease read; releasing is a DELETE with `If-Match`.
- GCS: create is an upload with `ifGenerationMatch=0`; renewing, taking over and releasing
  carry `ifGenerationMatch=<generation>` of the lease read (GCS answers 412 to a changed one).
- local: create is `os.open(O_CREAT | O_EXCL)`; each read-check-write (renew, take over,
  release) runs under an exclusive `flock` of the run folder, and creation too, so that a
  reader never sees a half-written lease.

The lease holds {"holder": {"host", "pid", "attempt", "ray_job"}, "created", "renewed",
"expires"} (unix seconds). `attempt` is a random id of this driver's run, which its
checkpoints carry. Expiry is judged by the reader's clock against the writer's: clocks
that differ by more than a fraction of run.lease_s shift when a stale lease may be taken.

No Ray here (the Ray job id is read from the environment a Ray job's driver runs in).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from ssl_dist import storage

LEASE = "lease.json"


class LeaseHeld(RuntimeError):
    """Another driver holds the run folder's lease (the message names it and its expiry)."""


class LeaseConflict(RuntimeError):
    """The lease changed between our read and our write (another driver won the race)."""


def holder_record() -> dict:
    """Who this driver is: host, pid, a random attempt id, and the Ray job id when it runs as
    a Ray job's driver (the job supervisor puts it in the driver's environment)."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {})
    except ValueError:
        job = {}
    return {"host": socket.gethostname(), "pid": os.getpid(), "attempt": uuid.uuid4().hex[:16],
            "ray_job": job.get("job_submission_id")}


def describe_holder(record: dict, now: float) -> str:
    """'host H, pid P (Ray job J), attempt A, whose lease expires at T UTC (in N s)'."""
    who = record.get("holder", {})
    job = f" (Ray job {who['ray_job']})" if who.get("ray_job") else ""
    expires = float(record.get("expires", 0))
    when = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return (f"host {who.get('host', '?')}, pid {who.get('pid', '?')}{job}, attempt {who.get('attempt', '?')}, "
            f"whose lease expires at {when} UTC (in {max(0, round(expires - now))} s)")


# ---- the two stores: an object with conditional writes, a local file under flock -------------


class _S3Lease:
    """The lease object on S3: tokens are ETags, every write is conditional."""

    def __init__(self, url: str, options: dict | None):
        self.url = url
        self.fs, self.path = storage.filesystem(url, options)

    def create(self, data: bytes) -> str:
        """Write the lease if there is none (FileExistsError otherwise); its token."""
        with storage.translate_errors(self.url):
            return self.fs.pipe_file(self.path, data, mode="create")["ETag"]

    def read(self) -> tuple[bytes, str] | None:
        """(bytes, token) of the lease, or None. The token is read first: a change in between
        makes a later conditional write with it fail, never succeed on what was not read."""
        with storage.translate_errors(self.url):
            self.fs.invalidate_cache(self.path)
            try:
                token = self.fs.info(self.path)["ETag"]
                return self.fs.cat_file(self.path), token
            except FileNotFoundError:
                return None

    def replace(self, data: bytes, token: str) -> str:
        """Overwrite the lease if it is still the one of `token` (LeaseConflict otherwise)."""
        with storage.translate_errors(self.url):
            try:
                return self.fs.pipe_file(self.path, data, IfMatch=token)["ETag"]
            except OSError as err:
                if _precondition_failed(err):
                    raise LeaseConflict(self.url) from None
                raise

    def delete(self, token: str) -> None:
        """Delete the lease if it is still the one of `token` (LeaseConflict otherwise)."""
        bucket, key = self.path.split("/", 1)
        with storage.translate_errors(self.url):
            try:
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=token)
            except OSError as err:
                if _precondition_failed(err):
                    raise LeaseConflict(self.url) from None
                raise
        self.fs.invalidate_cache(self.path)


class _GCSLease:
    """The lease object on Google Cloud Storage: tokens are object generations, every write is
    conditional on one (`ifGenerationMatch`; 0: no object yet). gcsfs's `pipe_file` can only
    create conditionally, so the uploads and the delete are its JSON-API requests, made here."""

    def __init__(self, url: str, options: dict | None):
        self.url = url
        self.fs, self.path = storage.filesystem(url, options)
        self.bucket, self.key = self.path.split("/", 1)

    def _upload(self, data: bytes, generation: str) -> str:
        """One media upload if the object's generation is `generation`; the new generation.
        gcsfs raises FileExistsError for GCS's 412 (the precondition failed)."""
        with storage.translate_errors(self.url):
            reply = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{{}}/o", self.bucket,
                                 uploadType="media", name=self.key, ifGenerationMatch=generation, data=data,
                                 headers={"Content-Type": "application/octet-stream"}, json_out=True)
        self.fs.invalidate_cache(self.path)
        return str(reply["generation"])

    def create(self, data: bytes) -> str:
        """Write the lease if there is none (FileExistsError otherwise); its token."""
        return self._upload(data, "0")

    def read(self) -> tuple[bytes, str] | None:
        """(bytes, token) of the lease, or None. The token is read first: a change in between
        makes a later conditional write with it fail, never succeed on what was not read."""
        with storage.translate_errors(self.url):
            self.fs.invalidate_cache(self.path)
            try:
                token = str(self.fs.info(self.path)["generation"])
                return self.fs.cat_file(self.path), token
            except FileNotFoundError:
                return None

    def replace(self, data: bytes, token: str) -> str:
        """Overwrite the lease if it is still the one of `token` (LeaseConflict otherwise)."""
        try:
            return self._upload(data, token)
        except (FileExistsError, FileNotFoundError):
            raise LeaseConflict(self.url) from None

    def delete(self, token: str) -> None:
        """Delete the lease if it is still the one of `token` (LeaseConflict otherwise)."""
        with storage.translate_errors(self.url):
            try:
                self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=token)
            except (FileExistsError, FileNotFoundError):
                raise LeaseConflict(self.url) from None
        self.fs.invalidate_cache(self.path)


def _precondition_failed(err: BaseException) -> bool:
    """s3fs turns 412 PreconditionFailed into OSError(EINVAL) (FileExistsError for If-None-Match);
    a missing object under If-Match is a conflict too (someone released or moved it)."""
    return isinstance(err, FileNotFoundError) or getattr(err, "errno", None) == errno.EINVAL or \
        "PreconditionFailed" in str(err) or "pre-conditions" in str(err)


class _LocalLease:
    """The lease file on a local filesystem: tokens are digests of its bytes; every change is
    made under an exclusive flock of the run folder (one machine's processes see one order)."""

    def __init__(self, url: str):
        self.url = url
        self.path = storage.filesystem(url)[1]
        self.folder = os.path.dirname(self.path)

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def create(self, data: bytes) -> str:
        with self._locked():
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return _digest(data)

    def read(self) -> tuple[bytes, str] | None:
        with self._locked():
            try:
                with open(self.path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
        return data, _digest(data)

    def replace(self, data: bytes, token: str) -> str:
        with self._locked():
            self._check(token)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        return _digest(data)

    def delete(self, token: str) -> None:
        with self._locked():
            self._check(token)
            os.unlink(self.path)

    def _check(self, token: str) -> None:
        try:
            with open(self.path, "rb") as f:
                current = _digest(f.read())
        except FileNotFoundError:
            raise LeaseConflict(self.url) from None
        if current != token:
            raise LeaseConflict(self.url)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _store(url: str, options: dict | None):
    if "://" not in url or url.startswith("file://"):
        return _LocalLease(url)
    return _GCSLease(url, options) if url.startswith("gs://") else _S3Lease(url, options)


# ---- the lease ------------------------------------------------------------------------------


@dataclass
class Lease:
    """A lease this driver holds. `renew` and `release` are conditional on it being unchanged
    since this driver last wrote it; `keep` renews it from a thread while a block runs."""

    run_url: str
    lease_s: float
    record: dict
    token: str
    store: object = field(repr=False)
    taken_over: dict | None = None  # the expired lease this one replaced, if any
    lost: str | None = None  # why this driver no longer holds it (set by a renewal that found it changed)
    clock: Callable[[], float] = field(default=time.time, repr=False)

    @property
    def attempt(self) -> str:
        """This driver's attempt id: its checkpoints carry it (meta.json "attempt")."""
        return self.record["holder"]["attempt"]

    def renew(self) -> None:
        """Push `expires` to now + lease_s (LeaseConflict if another driver took the lease)."""
        now = self.clock()
        record = dict(self.record, renewed=now, expires=now + self.lease_s)
        self.token = self.store.replace(_encode(record), self.token)
        self.record = record

    def release(self) -> None:
        """Delete the lease, if it is still this driver's (a lease taken over is left alone)."""
        if self.lost is None:
            with contextlib.suppress(LeaseConflict):
                self.store.delete(self.token)

    @contextlib.contextmanager
    def keep(self, say: Callable[[str], None] = print):
        """Renew every lease_s / 4 from a daemon thread while the block runs, then release.

        A renewal that fails on storage is retried at the next tick (the lease lasts four of
        them); one that finds the lease changed (this driver was silent past its expiry and
        another took over) stops renewing and says so.
        """
        stop = threading.Event()

        def renew_until_stopped() -> None:
            while not stop.wait(self.lease_s / 4):
                try:
                    self.renew()
                except LeaseConflict:
                    self.lost = (f"the lease of {self.run_url} was taken over by another driver after this one "
                                 f"failed to renew it for run.lease_s={self.lease_s:g} s: two drivers may now "
                                 f"write the run folder; stop one of them")
                    say(self.lost)
                    return
                except Exception as err:  # noqa: BLE001 (transient storage trouble: next tick retries)
                    say(f"could not renew the lease of {self.run_url} ({type(err).__name__}: {err}); retrying")

        thread = threading.Thread(target=renew_until_stopped, name="ssl-dist-lease", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=max(5.0, self.lease_s))
            self.release()


def holder_is_gone(record: dict) -> bool:
    """True when the lease's holder ran on this host and its process no longer exists: a
    driver killed here (SIGKILL, a closed terminal) cannot renew, and the same command run
    again should resume at once instead of waiting out run.lease_s. A holder on another host,
    or a live process (ours or another user's), keeps its lease until it expires."""
    who = record.get("holder", {})
    pid = who.get("pid")
    if who.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    return False


def _encode(record: dict) -> bytes:
    return json.dumps(record, indent=1).encode()


def acquire(run_url: str, lease_s: float, options: dict | None = None, *,
            clock: Callable[[], float] = time.time) -> Lease:
    """Take the lease of the run folder `run_url` for `lease_s` seconds. Driver only, before
    anything in the folder changes.

    Raises LeaseHeld, naming the holder and when its lease expires, while another driver's
    lease is live. An expired lease, or one whose holder's process on this host is gone
    (`holder_is_gone`), is replaced atomically (of two drivers taking over the
    same expired lease, one wins; the other gets LeaseHeld naming the winner).
    """
    store = _store(storage.join(run_url, LEASE), options)
    now = clock()
    record = {"holder": holder_record(), "created": now, "renewed": now, "expires": now + lease_s}
    for _ in range(3):  # a lease released between our create and our read: try again
        try:
            return Lease(run_url, lease_s, record, store.create(_encode(record)), store, clock=clock)
        except FileExistsError:
            pass
        found = store.read()
        if found is None:
            continue
        data, token = found
        current = _decode(data)
        if current.get("holder", {}).get("attempt") == record["holder"]["attempt"]:
            # Our own create, retried by the client after its answer was lost.
            return Lease(run_url, lease_s, record, token, store, clock=clock)
        now = clock()
        if float(current.get("expires", 0)) > now and not holder_is_gone(current):
            raise LeaseHeld(_held_message(run_url, current, now))
        try:
            token = store.replace(_encode(record), token)
        except LeaseConflict:
            continue  # another driver changed it first: read again (and name the winner)
        return Lease(run_url, lease_s, record, token, store, taken_over=current, clock=clock)
    found = store.read()
    current = _decode(found[0]) if found else {}
    raise LeaseHeld(_held_message(run_url, current, clock()))


def _decode(data: bytes) -> dict:
    """The lease record; an unreadable one counts as expired (it holds no live expiry)."""
    try:
        record = json.loads(data)
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def _held_message(run_url: str, record: dict, now: float) -> str:
    return (f"run folder {run_url} is in use by another driver ({describe_holder(record, now)}): wait for that run "
            f"to end (or stop it: `ssl-dist stop JOB_ID` for a Ray job), or start this one under another run.name")
