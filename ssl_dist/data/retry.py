"""The one retry layer of the stream's reads: what a failure is, and when to try again.

Pure (no I/O): the reader (`reader.ShardSet._retrying`) asks `classify(exc)` what a failed
read means and an `Attempts` (`RetryPolicy.start()`, one per read) whether to try again;
the store's clients below it try each request once (`storage.single_attempt`), so one
attempt here is one request to the store, and retries never multiply.

Two kinds of failure:

- TRANSIENT: the store is throttling (503 SlowDown, 429, ThrottlingException,
  RequestLimitExceeded ...; GCS's 429 and 503), timing out, unreachable, or failing on its side (5xx). Waited
  for with exponential backoff and full jitter (a delay drawn uniformly from [0, bound), the
  bound doubling from `backoff_s` up to `max_delay_s`, so that many readers throttled at
  once do not come back at once) until the read's total deadline, `deadline_s`. Past it the
  reader stops the run naming the store: an outage says nothing about the data.
- BAD: the store answered, and the answer says the data is bad or absent: an object the
  manifest lists is missing (404), a sidecar has the wrong length, one object is refused.
  Retried `retries` times (within the deadline), then the reader skips the shard as bad data.

Anything else that is not known to be transient (an unknown 4xx, a local I/O error) counts
as BAD: it is repeatable, and the skip limit (`data.max_skip_fraction`) still stops a run
whose data turns out mostly unreadable.
"""

from __future__ import annotations

import errno
import random
import time
from dataclasses import dataclass, field
from typing import Callable

TRANSIENT = "transient"
BAD = "bad"

MAX_DELAY_S = 20.0  # the largest single wait (botocore's standard mode caps at 20 s too)

# S3 and AWS error codes that mean "slow down" or "try again later", whatever the HTTP status says
THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "RequestLimitExceeded", "TooManyRequests", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "PriorRequestNotComplete",
})
SERVER_CODES = frozenset({"InternalError", "ServiceUnavailable", "ServiceUnavailableException", "RequestTimeout",
                          "RequestTimeoutException"})
# what s3fs and aiohttp make of throttling, when the reply's code is no longer at hand
THROTTLING_TEXT = ("SlowDown", "reduce your request rate", "Throttling", "RequestLimitExceeded", "TooManyRequests",
                   "Too Many Requests")
# exception classes (by name: botocore, aiohttp, s3fs and fsspec are not imported here) of timeouts,
# refused or dropped connections and replies cut off in transit
TRANSIENT_TYPES = frozenset({
    "TimeoutError", "FSTimeoutError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionError",
    "EndpointConnectionError", "ConnectionClosedError", "ProxyConnectionError", "HTTPClientError",
    "ClientConnectorError", "ClientConnectionError", "ClientOSError", "ServerDisconnectedError",
    "ServerTimeoutError", "ClientPayloadError", "IncompleteRead", "ResponseParserError", "ResponseStreamingError",
    "TransportError",  # google-auth could not reach its token endpoint (gs://)
})
TRANSIENT_ERRNOS = frozenset({errno.EBUSY,  # s3fs's translation of SlowDown and 503
                              errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                              errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EAGAIN})


def classify(exc: BaseException) -> str:
    """TRANSIENT or BAD for a failed read's exception, judged along its chain of causes (s3fs
    and `storage.translate_errors` wrap botocore's and aiohttp's errors in their own)."""
    return TRANSIENT if any(_transient(link) for link in _chain(exc)) else BAD


def is_throttling(exc: BaseException) -> bool:
    """Whether the store asked us to slow down (for the message: throttled, not unreachable)."""
    for link in _chain(exc):
        code, status = _reply(link)
        if code in THROTTLING_CODES or status in (429, 503) or any(t in str(link) for t in THROTTLING_TEXT):
            return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    links, seen = [], set()
    while exc is not None and id(exc) not in seen and len(links) < 16:
        links.append(exc)
        seen.add(id(exc))
        # `raise ... from None` hides the context on purpose: what was raised then is the answer
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return links


def _reply(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) of a botocore ClientError, (None, HTTP status) of gcsfs's
    HttpError (429, 5xx: what gcsfs does not turn into an OS error); (None, None) for anything
    else (gcsfs raises FileNotFoundError for 404, OSError "Forbidden" for 403)."""
    if type(exc).__name__ == "HttpError" and isinstance(getattr(exc, "code", None), int):
        return None, exc.code
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None, None
    return response.get("Error", {}).get("Code"), response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _transient(exc: BaseException) -> bool:
    code, status = _reply(exc)
    if code is not None or status is not None:  # the store answered: its answer decides
        return code in THROTTLING_CODES or code in SERVER_CODES or status == 429 or (status or 0) >= 500
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if {cls.__name__ for cls in type(exc).__mro__} & TRANSIENT_TYPES:
        return True
    if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
        return True
    return any(t in str(exc) for t in THROTTLING_TEXT)


def system_uniform() -> float:
    """A uniform draw in [0, 1) from the OS's entropy: no state to copy into forked or spawned
    loader workers, so readers throttled together do not draw the same delays."""
    return random.SystemRandom().random()


@dataclass(frozen=True)
class RetryPolicy:
    """How one read is retried; picklable (it travels into loader workers with the ShardSet).

    `retries`: retries of a read whose data was found BAD before the shard is skipped.
    `backoff_s`: the first delay's bound; `max_delay_s`: the largest bound. `deadline_s`:
    the total time one read may spend (on attempts and waits) before TRANSIENT failures stop
    it. `clock`, `sleep`, `uniform` (in [0, 1)): time.monotonic, time.sleep and the OS's
    entropy; tests pass their own.
    """

    retries: int = 3
    backoff_s: float = 0.5
    deadline_s: float = 300.0
    max_delay_s: float = MAX_DELAY_S
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    uniform: Callable[[], float] = field(default=system_uniform, compare=False)

    def bound(self, failures: int) -> float:
        """The upper bound of the delay after the `failures`-th failed attempt (1, 2, ...)."""
        return min(self.max_delay_s, self.backoff_s * 2.0 ** min(failures - 1, 64))

    def delay(self, failures: int) -> float:
        """Full jitter: a delay drawn uniformly from [0, bound(failures))."""
        return self.uniform() * self.bound(failures)

    def start(self) -> Attempts:
        """The budget of one read, starting now (call it just before the read's first attempt)."""
        return Attempts(self)


class Attempts:
    """The attempts of one read (`RetryPolicy.start()`): counts them and sleeps between them."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.started = policy.clock()
        self.count = 1  # attempts made, the one under way included
        self.bad = 0  # of the failed ones, those whose data was found bad

    @property
    def elapsed(self) -> float:
        return self.policy.clock() - self.started

    def again(self, kind: str) -> bool:
        """After a failed attempt of `kind` (TRANSIENT or BAD): sleep the next delay and return
        True, or return False when this read has no tries left: BAD after `retries` retries,
        either kind once the deadline has passed. The last wait is cut to end at the deadline,
        so a transient failure is tried once more right there."""
        if kind == BAD:
            self.bad += 1
            if self.bad > self.policy.retries:
                return False
        left = self.policy.deadline_s - self.elapsed
        if left <= 0:
            return False
        self.policy.sleep(min(self.policy.delay(self.count), left))
        self.count += 1
        return True
