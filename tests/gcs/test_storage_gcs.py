"""gs:// through storage.py against the real GCS emulator: the options a run carries (the
endpoint, no credential), a missing bucket and refused credentials as one message before any
worker starts, what the retry layer makes of the errors gcsfs raises, and one request per
attempt below it."""

from __future__ import annotations

import json
import time

import pytest
from data.throttle_proxy import ThrottleProxy

from ssl_dist import cli, data, storage
from ssl_dist.data import retry


def test_options_name_the_emulator_and_hold_no_credential(gcs_endpoint, monkeypatch, tmp_path):
    key = tmp_path / "service-account.json"
    key.write_text('{"type": "service_account", "private_key": "SECRET-KEY-MATERIAL"}')
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    options = storage.storage_options("gs://b/x")
    # an emulator takes no credentials (google-cloud-storage's client goes anonymous for one too)
    assert options == {"endpoint_url": gcs_endpoint, "token": "anon"}
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint.removeprefix("http://"))  # host:port, as gcloud sets it
    assert storage.storage_options("gs://b/x")["endpoint_url"] == gcs_endpoint

    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    # Google's endpoint: credentials from the environment or the identity (google-auth's default
    # chain), never a token of gcsfs's own cache; the options only say so
    assert storage.storage_options("gs://b/x") == {"token": "google_default"}
    assert storage.storage_options("gs://b/x", anonymous=True) == {"token": "anon"}
    assert str(key) not in json.dumps(storage.storage_options("gs://b/x")) and "SECRET" not in json.dumps(options)


def test_a_missing_bucket_is_one_message_before_any_worker_starts(cifar_gs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # going past the checks fails at once
    started = time.monotonic()
    assert cli.main(["pretrain", "data.train_url=gs://no-such-bucket/shards", f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "bucket 'no-such-bucket' of gs://no-such-bucket/shards does not exist" in err and "fix the URL" in err

    assert cli.main(["pretrain", f"data.train_url={cifar_gs['train']}", "run.storage_path=gs://no-runs-bucket/r"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bucket 'no-runs-bucket'" in err and "does not exist" in err, err
    assert time.monotonic() - started < 30
    assert not (tmp_path / "default").exists()


@pytest.mark.parametrize("credentials", ["missing", "not-a-key"])
def test_refused_credentials_are_one_message_before_any_worker_starts(credentials, tmp_path, capsys, monkeypatch):
    # The emulator takes any request: refused credentials are Google's endpoint refusing them.
    # Here google-auth refuses them before any request leaves (no network is needed).
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    key = tmp_path / "key.json"
    if credentials == "not-a-key":
        key.write_text('{"type": "service_account", "client_email": "x@y"}')
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    started = time.monotonic()
    assert cli.main(["pretrain", "data.train_url=gs://some-bucket/shards", f"run.storage_path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "access to gs://some-bucket/shards was refused" in err and "GOOGLE_APPLICATION_CREDENTIALS" in err
    assert str(key) in err  # which credentials: the file it named (never its contents)
    assert time.monotonic() - started < 20


def gcs_error(status: int, message: str = "") -> Exception:
    """The exception gcsfs raises for a reply of `status` (built by gcsfs itself)."""
    from gcsfs.retry import validate_response

    body = json.dumps({"error": {"code": status, "message": message}}).encode()
    try:
        validate_response(status, body, "b/{}/o/{}", ("bucket", "key"))
    except Exception as exc:  # noqa: BLE001 (whatever gcsfs makes of it)
        return exc
    raise AssertionError(f"gcsfs took {status} for an answer")


def test_the_retry_layer_waits_for_a_throttling_gcs_and_skips_what_it_refuses():
    assert retry.classify(gcs_error(429, "The rate of change requests to the object exceeds the rate limit")) == \
        retry.TRANSIENT
    assert retry.classify(gcs_error(503, "Backend Error")) == retry.TRANSIENT
    assert retry.classify(gcs_error(500, "Internal Error")) == retry.TRANSIENT
    assert retry.is_throttling(gcs_error(429, "rateLimitExceeded"))
    for status in (401, 403, 404):
        assert retry.classify(gcs_error(status, "Anonymous caller does not have storage.objects.get access")) == \
            retry.BAD, status
    refused = storage.explain("gs://bucket/key", gcs_error(403, "x@y does not have storage.objects.get access"))
    assert refused.startswith("access to gs://bucket/key was refused") and "GOOGLE_APPLICATION_CREDENTIALS" in refused


@pytest.fixture
def proxy(gcs_endpoint):
    """A proxy in front of the emulator that answers 503 to GETs when told, and logs every request."""
    with ThrottleProxy(gcs_endpoint) as running:
        yield running


def test_one_failed_get_is_one_attempt_below_the_retry_layer(cifar_gs, proxy):
    url = cifar_gs["train"]
    options = {**storage.storage_options(url), "endpoint_url": proxy.endpoint}
    # the client the stream reads through sends a failed GET once: gcsfs does not retry it
    fs, root = storage.filesystem(url, storage.single_attempt(url, options))
    proxy.throttle(forever=True)
    started = time.monotonic()
    with pytest.raises(Exception) as failed:
        fs.cat_file(f"{root}/shard-000000.idx")
    assert retry.classify(failed.value) == retry.TRANSIENT
    assert proxy.count("GET") == 1 and time.monotonic() - started < 5

    # under the reader: as many GETs reach the store as the retry layer makes attempts
    proxy.throttle()
    shardset = data.ShardSet(url, options, policy=retry.RetryPolicy(backoff_s=0.05, deadline_s=30))
    before = proxy.count("GET")
    proxy.throttle(requests=3)  # the next 3 GETs: 503
    samples = shardset.read_samples(1, 0, 5)
    assert all(not isinstance(s, data.Skip) for s in samples)
    assert proxy.count("GET") - before == 2 + 3  # sidecar and shard, 3 of them answered 503
    # the options of everything else (checkpoints, the lease, the driver's checks) keep gcsfs's retries
    assert storage.filesystem(url, options)[0] is not fs


PREVIOUS = {"checkpoint-00000004/meta.json": b"{}", "checkpoint-00000004/deepspeed/model.pt": b"m" * 20,
            "checkpoint_manager_snapshot.json": b"{}", "metrics/attempt-00000000-1.csv": b"step\n",
            "config.yaml": b"run: {}\n", "notes.txt": b"the user's own"}


def tree(url: str) -> dict:
    fs, path = storage.filesystem(url)
    fs.invalidate_cache()
    return {p[len(path) + 1:]: fs.cat_file(p) for p in fs.find(path)} if fs.exists(path) else {}


def test_a_run_started_over_moves_the_previous_one_aside_in_gs(gcs_bucket):
    from ssl_dist import checkpoint

    url = f"gs://{gcs_bucket}/runs/r"
    fs, path = storage.filesystem(url)
    for rel, blob in PREVIOUS.items():
        fs.pipe_file(f"{path}/{rel}", blob)
    cleared = checkpoint.move_run_aside(url)
    assert cleared.moved_to.startswith(f"{url}.previous-") and cleared.checkpoints == 1
    assert cleared.left == ["notes.txt"]
    assert tree(cleared.moved_to) == {rel: blob for rel, blob in PREVIOUS.items() if rel != "notes.txt"}
    assert tree(url) == {"notes.txt": b"the user's own"}  # every key copied, then deleted; the user's kept
