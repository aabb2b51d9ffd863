"""``crawlfleet health``: the liveness and readiness probe of one worker.

Every worker has its own arq health-check key, ``{ns}:arq:queue:health-check:{worker id}``
(``Keys.arq_health_check``; arq's default is one key per queue, which every worker overwrites).
arq's poll loop rewrites it every CRAWLFLEET_HEALTH_CHECK_INTERVAL seconds with an expiry one
second longer (``Worker.record_health``: PSETEX, interval + 1 s), so the key exists exactly
while that worker's loop runs and reaches Redis: a hung loop, a worker still waiting for Redis,
or one that stopped (arq deletes the key on the way out) all read as "no key".

The probe names the worker by CRAWLFLEET_WORKER_ID, so a pod sets it from its own name (the
downward API) and the worker and its probe agree. It is bounded in time: a kubelet runs it
every few seconds, and one left waiting on a Redis that does not answer must not pile up.
"""

from __future__ import annotations

import asyncio
import sys

from redis.exceptions import RedisError

from crawlfleet.common.cluster import quick_client
from crawlfleet.common.connections import RedisProblem, open_redis, redis_problem
from crawlfleet.common.keys import Keys
from crawlfleet.common.settings import Settings, redact_url

from .commands import run_on_redis

# Seconds the probe waits for Redis in all, below the probes' timeoutSeconds in k8s/.
DEADLINE = 3.0


def health_window(settings: Settings) -> int:
    """Seconds a health-check write lives: arq's interval (whole seconds, as worker_options
    rounds it) plus the one second arq adds to its expiry."""
    return max(1, round(settings.health_check_interval)) + 1


async def read_health(settings: Settings) -> tuple[bytes | None, int]:
    """The worker's health-check value (None: no key) and its remaining life in ms. With
    several shards the worker writes one on each (an arq worker per shard): the first shard
    that has it answers, so one shard's outage does not fail the probe of every worker."""
    key = Keys(settings.namespace).arq_health_check(settings.worker_id)
    urls = settings.shard_urls
    failure: BaseException | None = None
    for url in urls:
        redis = open_redis(url) if len(urls) == 1 else quick_client(url)
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                value, ttl = await pipe.execute()
            if value is not None or len(urls) == 1:
                return value, int(ttl)
        except (RedisError, OSError) as exc:
            if len(urls) == 1:
                raise
            failure = exc
        finally:
            await redis.aclose()
    if failure is not None:
        raise failure
    return None, -2


def health(settings: Settings) -> int:
    """0 when the worker named ``settings.worker_id`` wrote its health check within its
    window; 1 with one line on stderr when it did not; Redis trouble raises
    :class:`RedisProblem` (one line, exit 1 unreachable, 2 refused)."""

    async def go() -> tuple[bytes | None, int]:
        try:
            return await asyncio.wait_for(read_health(settings), DEADLINE)
        except TimeoutError:
            # open_redis retries a refused connection for ~30 s: a probe cannot wait that long.
            raise RedisProblem(f"Redis is unreachable at {redact_url(settings.redis_url)}: "
                               f"no answer within {DEADLINE:g} s", 1) from None
        except OSError as exc:
            raise redis_problem(exc, settings.redis_url) from None

    value, ttl_ms = run_on_redis(settings, go)
    window = health_window(settings)
    worker = settings.worker_id
    if value is None:
        print(f"crawlfleet health: no health check from worker {worker} in the last {window} s "
              f"(namespace {settings.namespace})", file=sys.stderr)
        return 1
    if ttl_ms < 0:
        # arq always sets an expiry: a key without one was not written by a running worker.
        print(f"crawlfleet health: the health check of worker {worker} has no expiry: it was "
              "not written by a running worker", file=sys.stderr)
        return 1
    print(f"worker {worker}: alive ({value.decode(errors='replace')})")
    return 0
