"""One place that turns a URL into a filesystem.

Local paths, `file://`, `s3://` (AWS or any S3-compatible endpoint) and `gs://` all go
through fsspec. S3 credentials are never part of the options: botocore reads them from the
usual environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_PROFILE) or the instance role, so they are never written to a config, log or checkpoint.
The endpoint comes from the config or, like the AWS CLI, from AWS_ENDPOINT_URL_S3 /
AWS_ENDPOINT_URL.

Google Cloud Storage (gcsfs) takes its credentials from the environment too: google-auth's
default chain (GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default login, the VM's or
pod's identity); the options only say `token: google_default` (never gcsfs's token cache, and
never a silent fall-back to anonymous). An emulator is named, as Google's own clients and
gcloud name it, by STORAGE_EMULATOR_HOST; requests to it are anonymous (an emulator takes no
credentials; google-cloud-storage's client does the same), as are those of
`storage.anonymous=true` (public buckets).
"""

from __future__ import annotations

import os
from typing import Any

import fsspec


class StorageError(RuntimeError):
    """A user-facing storage problem (missing bucket, rejected credentials, unreachable endpoint)."""


def storage_options(url: str, *, endpoint_url: str = "", region: str = "", anonymous: bool = False) -> dict:
    """fsspec options for `url`: the S3 endpoint and region, never credentials.

    Called by the driver; the result is small and credential-free, so it can travel to Ray
    workers inside the config. For gs:// URLs: the emulator's endpoint (STORAGE_EMULATOR_HOST)
    and the token *method* (see the module docstring); `endpoint_url` and `region` are S3's.
    """
    if url.startswith("gs://"):
        return gcs_options(anonymous=anonymous)
    if not url.startswith(("s3://", "s3a://")):
        return {}
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
    options: dict[str, Any] = {"config_kwargs": {"retries": {"max_attempts": 5, "mode": "standard"}}}
    client: dict[str, Any] = {}
    if endpoint:
        client["endpoint_url"] = endpoint
    if region:
        client["region_name"] = region
    if client:
        options["client_kwargs"] = client
    if anonymous:
        options["anon"] = True
    return options


def gcs_emulator() -> str:
    """The GCS emulator's endpoint URL from STORAGE_EMULATOR_HOST ("host:port" or a URL, as gcloud
    and Google's clients take it), or "" for Google's own endpoint."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip().rstrip("/")
    if host in ("", "default"):
        return ""
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def gcs_options(*, anonymous: bool = False) -> dict:
    """gcsfs options: the emulator's endpoint, resolved here so that workers elsewhere use the
    driver's, and how to authenticate: anonymously (an emulator, public buckets) or with
    google-auth's default credentials (`google_default`: the environment or the identity)."""
    emulator = gcs_emulator()
    options: dict[str, Any] = {"endpoint_url": emulator} if emulator else {}
    options["token"] = "anon" if anonymous or emulator else "google_default"
    return options


def options_from_config(url: str, storage_cfg) -> dict:
    """`storage_options` with the fields of a `config.StorageConfig`."""
    return storage_options(url, endpoint_url=storage_cfg.endpoint_url, region=storage_cfg.region,
                           anonymous=storage_cfg.anonymous)


def single_attempt(url: str, options: dict | None) -> dict:
    """`options` for a reader that retries itself (`data.reader`, through `data.retry`): the S3
    clients below it try each request once, so retries never multiply.

    Two layers retry inside s3fs: botocore (`config_kwargs["retries"]`; its `max_attempts`
    counts *retries*, so one attempt is `total_max_attempts: 1`) and s3fs itself, twice
    nested around each GET (its `retries`, 5, a class attribute its constructor does not
    take: `filesystem` sets it from the "retries" option). gcsfs retries inside each request
    (6 attempts, ~30 s of its own backoff, fixed when its class is defined): "retries": 1
    makes `filesystem` use a class that sends each request once (`ssl_dist.gcs`). Local
    options are returned as they are.
    """
    options = dict(options or {})
    if url.startswith("gs://"):
        options["retries"] = 1
        return options
    if not url.startswith(("s3://", "s3a://")):
        return options
    config = dict(options.get("config_kwargs") or {})
    config["retries"] = {"total_max_attempts": 1, "mode": "standard"}
    options["config_kwargs"] = config
    options["retries"] = 1
    return options


def filesystem(url: str, options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for `url`; a fresh instance per call is cheap (fsspec caches).

    The option "retries" (see `single_attempt`) is s3fs's retry count, set on the instance:
    s3fs's constructor has no such argument. The instance is fsspec's cached one for the
    other options, which carry botocore's single attempt too, so only readers that retry
    themselves share it. For gs:// the class is chosen by `ssl_dist.gcs` (one attempt per
    request with "retries": 1), with the environment's `gcs_options` where `options` are
    silent (a caller passing None gets what the driver would have resolved).
    """
    options = dict(options or {})
    retries = options.pop("retries", None)
    if url.startswith("gs://"):
        from ssl_dist import gcs

        with translate_errors(url):  # google-auth refuses missing or malformed credentials here
            fs, path = gcs.filesystem(url, {**gcs_options(), **options}, one_attempt=retries == 1)
        return fs, path.rstrip("/") or path
    fs, path = fsspec.core.url_to_fs(url, **options)
    if retries is not None:
        fs.retries = retries
    return fs, path.rstrip("/") or path


def describe_store(url: str, options: dict | None = None) -> str:
    """The store behind `url` in words, for messages: its endpoint and bucket ("the object store
    http://10.0.0.5:9000, bucket 'data'"), or the folder of a local path."""
    if "://" not in url or url.startswith("file://"):
        return f"the file system at {url}"
    scheme, rest = url.split("://", 1)
    bucket = rest.split("/", 1)[0]
    options = options or {}
    if scheme == "gs":
        emulator = options.get("endpoint_url") or gcs_emulator()
        return f"the GCS emulator {emulator}, bucket {bucket!r}" if emulator else \
            f"Google Cloud Storage, bucket {bucket!r}"
    endpoint = (options.get("client_kwargs") or {}).get("endpoint_url") or options.get("endpoint_url") or \
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3 (default endpoint)"
    return f"the object store {endpoint}, bucket {bucket!r}"


def absolute(url: str) -> str:
    """`url` with a local path made absolute (URLs with a scheme are returned as they are).

    The driver resolves local paths: Ray's workers run in another working directory.
    """
    if not url or "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    """Join URL parts with '/', for local paths and object-store URLs alike."""
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


def write_text(url: str, text: str, options: dict | None = None) -> None:
    """Write (replace) the text file at `url`, making its folder if the store has folders.
    Object stores cannot append: records that grow are rewritten whole."""
    fs, path = filesystem(url, options)
    with translate_errors(url):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "w") as f:
            f.write(text)


def pyarrow_filesystem(url: str, options: dict | None = None):
    """(pyarrow filesystem, path) for Ray Train's `RunConfig(storage_filesystem=...)`.

    Wraps the same fsspec filesystem, so Ray's checkpoint uploads use the same endpoint and
    credentials as the data.
    """
    import pyarrow.fs

    fs, path = filesystem(url, options)
    if url.startswith(("s3://", "s3a://", "gs://")):
        return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path
    return None, os.path.abspath(path)


def check_writable_root(url: str, options: dict | None = None) -> None:
    """Fail early, with a clear message, if the bucket behind `url` is missing or refuses us.

    Called by the driver before any worker starts, so that a typo costs seconds, not a
    cluster start-up. Local paths are created.
    """
    fs, path = filesystem(url, options)
    if not url.startswith(("s3://", "s3a://", "gs://")):
        os.makedirs(path, exist_ok=True)
        return
    check_bucket(url, options)


def check_bucket(url: str, options: dict | None = None) -> None:
    """Raise a clear StorageError if the bucket of an object-store `url` is missing or refuses
    our credentials; nothing for local paths. Called by the driver before work starts."""
    if not url.startswith(("s3://", "s3a://", "gs://")):
        return
    fs, path = filesystem(url, options)
    bucket = path.split("/", 1)[0]
    with translate_errors(url):
        # info() is a HEAD request: 404 for a missing bucket, 403 for refused credentials
        # (exists() would turn both into a silent False).
        fs.invalidate_cache(bucket)
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise StorageError(f"bucket {bucket!r} of {url} does not exist: create it or fix the URL") from None


class translate_errors:
    """Context manager: turn botocore/s3fs/OS errors about `url` into one clear StorageError."""

    def __init__(self, url: str):
        self.url = url

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, StorageError):
            return False
        message = explain(self.url, exc)
        if message is None:
            return False
        raise StorageError(message) from exc


def explain(url: str, exc: BaseException) -> str | None:
    """A one-line explanation and fix for a storage exception, or None if it is not one we know."""
    text = f"{type(exc).__name__}: {exc}"
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    if url.startswith("gs://"):
        found = _explain_gcs(url, bucket, exc, text)
        if found is not None:
            return found
    if any(s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden",
                               "ExpiredToken", "NoCredentialsError", "Unable to locate credentials")) \
            or isinstance(exc, PermissionError):
        return (f"access to {url} was refused (wrong or missing credentials): set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / an instance role) to credentials that may use bucket "
                f"{bucket!r}")
    if "NoSuchBucket" in text or (isinstance(exc, FileNotFoundError) and url.startswith(("s3://", "gs://"))
                                  and str(exc).strip("'\" ").rstrip("/") in (bucket, f"{bucket}")):
        return f"bucket {bucket!r} of {url} does not exist: create it or fix the URL"
    if any(s in text for s in ("EndpointConnectionError", "Could not connect", "ConnectionRefused",
                               "Connect timeout", "ClientConnectorError")):
        return (f"cannot reach the object store for {url}: check the endpoint (storage.endpoint_url or "
                f"AWS_ENDPOINT_URL_S3) and the network")
    if isinstance(exc, FileNotFoundError):
        return f"{url}: not found ({exc})"
    return None


# google-auth's errors (by name: google-auth is not imported here) that refuse the credentials
# themselves: none found, a key file missing or malformed, a token that cannot be refreshed
GOOGLE_AUTH_REFUSALS = ("DefaultCredentialsError", "RefreshError", "MalformedError", "InvalidValue",
                        "UserAccessTokenError", "OAuthError")


def _explain_gcs(url: str, bucket: str, exc: BaseException, text: str) -> str | None:
    """`explain` for gs:// URLs: gcsfs's and google-auth's errors (None: not one of those)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    code = getattr(exc, "code", None) if "HttpError" in names else None
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if names & set(GOOGLE_AUTH_REFUSALS) or code in (401, 403) or text.startswith("OSError: Forbidden") \
            or isinstance(exc, PermissionError):
        if text.startswith("OSError: Forbidden") and len(str(exc).splitlines()) > 1:
            reason = str(exc).splitlines()[1]  # the store's own words, after gcsfs's "Forbidden: path"
        return (f"access to {url} was refused ({reason}): set GOOGLE_APPLICATION_CREDENTIALS to a key file of "
                f"an account that may use bucket {bucket!r} (or log in with `gcloud auth application-default "
                f"login`, or run with such an identity); storage.anonymous=true reads a public bucket")
    if isinstance(exc, FileNotFoundError) and str(exc).strip("'\" /") in (bucket, f"b/{bucket}", f"b/{bucket}/o"):
        return f"bucket {bucket!r} of {url} does not exist: create it or fix the URL"
    if names & {"ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "TransportError"} or \
            isinstance(exc, (ConnectionError, TimeoutError)):
        return (f"cannot reach {describe_store(url)} ({reason}) for {url}: check the network, and "
                f"STORAGE_EMULATOR_HOST if an emulator should serve it")
    return None
