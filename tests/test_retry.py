"""Retry decisions and backoff arithmetic."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from crawlfleet.workers.retry import backoff_delay, is_retryable, parse_retry_after


@pytest.mark.parametrize(
    "error", ["timeout", "connect", "protocol", "http_5xx", "http_429", "dns_temporary"]
)
def test_transient_errors_are_retried(error: str) -> None:
    assert is_retryable(error)


@pytest.mark.parametrize("error", [None, "http_4xx", "dns", "too_large", "binary", "robots",
                                   "blocked_address", "too_many_redirects", "tls"])
def test_final_errors_are_not(error: str | None) -> None:
    assert not is_retryable(error)


def test_retry_after_seconds_and_dates() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("120", now=now) == 120.0
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30.0)
    assert parse_retry_after("in a while", now=now) is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("999999999", now=now) == 86_400.0


def test_backoff_grows_exponentially_with_jitter_and_cap() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, base=2.0, cap=60.0, rng=rng) for n in range(8)]
    for n, delay in enumerate(delays):
        ceiling = min(60.0, 2.0 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert delays[7] <= 60.0
    # Jitter: two workers retrying the same host do not pick the same moment.
    assert backoff_delay(3, base=2, cap=60, rng=random.Random(1)) != backoff_delay(
        3, base=2, cap=60, rng=random.Random(2))


def test_backoff_never_sooner_than_retry_after() -> None:
    assert backoff_delay(0, base=1.0, cap=60.0, retry_after=45.0) >= 45.0
