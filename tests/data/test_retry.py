"""The retry layer's policy (pure math, with a clock and a sleep the test drives) and what it calls
transient: the real exceptions botocore, aiohttp and s3fs raise, built as they build them."""

from __future__ import annotations

import errno

import pytest

from ssl_dist import shards, storage
from ssl_dist.data import retry
from ssl_dist.data.retry import BAD, TRANSIENT, RetryPolicy


class FakeTime:
    """A clock that only moves when slept on (or told to), and the sleeps it was asked for."""

    def __init__(self):
        self.now, self.slept = 1000.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


def policy(fake: FakeTime, **kw) -> RetryPolicy:
    return RetryPolicy(clock=fake.clock, sleep=fake.sleep, **kw)


def test_delays_are_full_jitter_under_a_doubling_capped_bound():
    fake = FakeTime()
    top = policy(fake, backoff_s=0.5, max_delay_s=20.0, uniform=lambda: 0.999999)
    assert [round(top.delay(n), 3) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    assert policy(fake, uniform=lambda: 0.0).delay(5) == 0.0  # full jitter: down to no wait at all
    assert top.bound(10_000) == 20.0  # no overflow, however long the outage
    # the real draws: uniform over [0, bound), different in every draw (no shared state to copy)
    draws = [RetryPolicy(backoff_s=0.5).delay(3) for _ in range(2000)]
    assert all(0 <= d < 2.0 for d in draws)
    assert min(draws) < 0.2 and max(draws) > 1.8 and len(set(draws)) > 1900
    assert 0.9 < sum(draws) / len(draws) < 1.1  # mean bound / 2


def test_transient_failures_wait_until_the_deadline_and_no_longer():
    fake = FakeTime()
    p = policy(fake, backoff_s=1.0, deadline_s=30.0, uniform=lambda: 0.999)
    attempts = p.start()
    while True:
        fake.now += 0.25  # each attempt takes a while too
        if not attempts.again(TRANSIENT):
            break
    # delays 1, 2, 4, 8 (x 0.999), then the next (16) cut to end at the deadline, then one more attempt
    assert [round(s, 2) for s in fake.slept] == [1.0, 2.0, 4.0, 7.99, 13.76]
    assert fake.now - 1000.0 == pytest.approx(30.25)  # the deadline plus the last attempt's own time
    assert fake.now - 0.25 == pytest.approx(1030.0)  # the last attempt started right at the deadline
    assert attempts.count == len(fake.slept) + 1 == 6
    assert not attempts.again(TRANSIENT) and attempts.count == 6  # spent: no more sleeping


def test_bad_data_is_retried_read_retries_times_within_the_deadline():
    fake = FakeTime()
    attempts = policy(fake, retries=3, backoff_s=0.1, uniform=lambda: 0.5).start()
    assert [attempts.again(BAD) for _ in range(5)] == [True, True, True, False, False]
    assert attempts.count == 4 and fake.slept == pytest.approx([0.05, 0.1, 0.2])
    # transient failures in between do not use up the retries of bad data
    fake = FakeTime()
    attempts = policy(fake, retries=1, uniform=lambda: 0.5).start()
    assert [attempts.again(k) for k in (TRANSIENT, TRANSIENT, BAD, TRANSIENT, BAD)] == [True] * 4 + [False]
    # and the deadline bounds them as well
    fake = FakeTime()
    attempts = policy(fake, retries=100, backoff_s=1.0, deadline_s=3.0, uniform=lambda: 0.999).start()
    while attempts.again(BAD):
        pass
    assert fake.now - 1000.0 == pytest.approx(3.0) and attempts.count == 4  # 1, 2, then 0.003 to the deadline


def client_error(code: str, status: int):
    """A botocore ClientError as botocore raises it for this reply."""
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": f"{code} says the store"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def translated(code: str, status: int) -> BaseException:
    """What s3fs raises for that reply: its translation, with botocore's error as the cause."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(client_error(code, status))


def caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


def test_throttling_timeouts_and_lost_connections_are_transient_and_answers_about_data_are_bad():
    import aiohttp
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
    from fsspec.exceptions import FSTimeoutError

    transient = [
        client_error("SlowDown", 503), translated("SlowDown", 503), client_error("TooManyRequests", 429),
        translated("Whatever", 429), client_error("ThrottlingException", 400),
        client_error("RequestLimitExceeded", 400),
        client_error("InternalError", 500), translated("ServiceUnavailable", 503), client_error("RequestTimeout", 400),
        OSError(errno.EBUSY, "Please reduce your request rate."),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ConnectTimeoutError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"), FSTimeoutError(), TimeoutError(), ConnectionResetError(),
        aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("cut"),
        # what storage.translate_errors makes of a refused connection: its cause decides
        caused(storage.StorageError("cannot reach the object store"), ConnectionRefusedError(111, "refused")),
    ]
    bad = [
        translated("NoSuchKey", 404), FileNotFoundError("shard-000001.tar"), translated("AccessDenied", 403),
        translated("InvalidObjectState", 403), shards.ShardError("sidecar x is shorter than the manifest says"),
        OSError(errno.EIO, "a bad sector"), ValueError("not a tar"),
        caused(storage.StorageError("access to s3://b was refused"), translated("AccessDenied", 403)),
    ]
    assert [retry.classify(e) for e in transient] == [TRANSIENT] * len(transient)
    assert [retry.classify(e) for e in bad] == [BAD] * len(bad)
    assert retry.is_throttling(translated("SlowDown", 503)) and retry.is_throttling(client_error("Throttling", 400))
    assert not retry.is_throttling(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    # `raise ... from None` means "this is the answer": a hidden transient context does not count
    try:
        try:
            raise TimeoutError()
        except TimeoutError:
            raise shards.ShardError("sidecar x is missing") from None
    except shards.ShardError as exc:
        assert retry.classify(exc) == BAD
