"""Which failures are worth another try, and when: pure functions.

Timeouts, connection errors, broken responses, 429, 5xx and a failing nameserver
(``dns_temporary``: SERVFAIL, REFUSED, no answer) are transient; a 404, an NXDOMAIN (``dns``), a
robots refusal, a blocked address or a body over the cap will say the same thing next time, so
they are final.
"""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

RETRYABLE_ERRORS = frozenset(
    {"timeout", "connect", "protocol", "http_5xx", "http_429", "dns_temporary"}
)
MAX_RETRY_AFTER = 86_400.0  # honour a server's Retry-After, but not beyond a day


def is_retryable(error: str | None) -> bool:
    return error in RETRYABLE_ERRORS


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        seconds = when - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def backoff_delay(
    retries: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with jitter for the ``retries``-th retry (0 first), never sooner
    than the server's Retry-After. Jitter keeps a fleet from retrying a host in lockstep."""
    exponential = min(cap, base * (2.0 ** retries))
    delay = exponential * (rng or random).uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay
