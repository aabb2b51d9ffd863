"""Redis connections: a real server, or the embedded in-process backend (``embedded://NAME``).

The embedded backend is fakeredis with Lua: every client in the process that opens the same
``embedded://NAME`` shares one in-memory server, so ``crawlfleet crawl`` runs the scheduler and
the workers in one process with nothing to install or start.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ConnectionError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from .logs import get_logger
from .messages import job_deserializer, job_serializer
from .settings import redact_url

__all__ = ["redact_url"]  # the one helper that makes a URL fit to print (common/settings.py)

EMBEDDED_SCHEME = "embedded://"
T = TypeVar("T")

# What a Redis restart looks like to a client. redis-py retries commands on an open connection,
# but not the first connect of a fresh one, so each loop also rides these out itself.
REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    ConnectionError, TimeoutError, BusyLoadingError, ConnectionRefusedError,
)


# Redis is there but cannot take writes for now (out of memory, a replica, a long script):
# worth waiting for, never a page's fault.
_TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OutOfMemoryError, ReadOnlyError, MasterDownError, TryAgainError,
)


# Redis is there and refuses us: a wrong password or user, or a database it does not have.
# Waiting cures none of them (redis-py makes the first two kinds of ConnectionError).
REFUSED: tuple[type[Exception], ...] = (AuthenticationError, AuthorizationError)


def is_refused(exc: BaseException) -> bool:
    """Redis answered, and will keep answering, no: wrong credentials, or (at SELECT) a
    database index out of range."""
    if isinstance(exc, REFUSED):
        return True
    text = str(exc)
    return isinstance(exc, ResponseError) and (
        "DB index is out of range" in text or text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")))


def is_transient(exc: BaseException) -> bool:
    """An error that waiting may cure: Redis unavailable, loading, out of memory, read-only,
    or busy running a script (BUSY). A refusal (``is_refused``) is not one."""
    if is_refused(exc):
        return False
    if isinstance(exc, (*REDIS_UNAVAILABLE, *_TRANSIENT_ERRORS)):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith("BUSY")


async def retry_while_unavailable(
    call: Callable[[], Awaitable[T]], *, give_up_after: float = 60.0
) -> T:
    """Await ``call()`` again (with backoff) while Redis is unavailable or busy
    (``is_transient``), for at most ``give_up_after`` seconds. Only for idempotent calls: a
    retried call may have run once."""
    delay = 0.05
    deadline = time.monotonic() + give_up_after
    while True:
        try:
            return await call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class RedisProblem(Exception):
    """Redis cannot be used, in one line naming where (password redacted); ``exit_code`` is the
    CLI's: 1 when it is unreachable (try again later), 2 when it refuses (fix the settings)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def redis_problem(exc: BaseException, redis_url: str) -> RedisProblem:
    """The one-line account of ``exc``, a Redis error met speaking to ``redis_url``."""
    where = redact_url(redis_url)
    detail = redact_url(str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip()
                        else type(exc).__name__)
    if is_refused(exc):
        if "DB index" in detail:
            return RedisProblem(f"Redis at {where} has no such database: {detail}", 2)
        return RedisProblem(f"Redis at {where} refused the credentials: {detail} "
                            "(check the password in CRAWLFLEET_REDIS_URL)", 2)
    if is_transient(exc) or isinstance(exc, OSError):
        return RedisProblem(f"Redis is unreachable at {where}: {detail}", 1)
    return RedisProblem(f"Redis at {where} answered an error: {detail}", 1)


async def wait_for_redis(
    redis: Any, redis_url: str, *, stop: asyncio.Event | None = None, role: str = "",
) -> bool:
    """Ping until Redis answers, logging ``redis_unavailable`` with a doubling backoff (up to
    5 s) meanwhile, as the scheduler does: a process started before its Redis waits for it.
    False if ``stop`` is set first; raises :class:`RedisProblem` if Redis refuses us (a wrong
    password waits for nothing)."""
    backoff = 0.1
    while stop is None or not stop.is_set():
        try:
            await redis.ping()
            return True
        except Exception as exc:
            if not is_transient(exc) and not isinstance(exc, OSError):
                raise redis_problem(exc, redis_url) from None
            get_logger("crawlfleet.redis").warning(
                "redis_unavailable", error=redact_url(str(exc)), redis=redact_url(redis_url),
                retry_in=backoff, **({"role": role} if role else {}))
        if stop is None:
            await asyncio.sleep(backoff)
        else:
            with contextlib.suppress(asyncio.TimeoutError):  # redis' TimeoutError is another
                await asyncio.wait_for(stop.wait(), backoff)
        backoff = min(backoff * 2, 5.0)
    return False


async def listen_for_wakes(redis: Any, channel: str, wake: Callable[[], None], *,
                           retry_s: float, when_subscribed: bool = False) -> None:
    """Call ``wake`` for every message on the pub/sub ``channel`` until cancelled, and with
    ``when_subscribed`` once each time the subscription is made too (for a listener whose
    owner would otherwise wait long for what was published while it was not there). A lost
    subscription is made again ``retry_s`` later: the listener's owner has a slower path that
    does not need it, and its own loop says what is wrong with Redis."""
    while True:
        try:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                if when_subscribed:
                    wake()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        wake()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            get_logger("crawlfleet.redis").debug("wake_channel_lost", channel=channel,
                                                  error=redact_url(str(exc)))
            await asyncio.sleep(retry_s)


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (clients here do not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value

_embedded_servers: dict[str, Any] = {}


def is_embedded(redis_url: str) -> bool:
    return redis_url.startswith(EMBEDDED_SCHEME)


def open_redis(redis_url: str, *, queue_name: str | None = None) -> ArqRedis:
    """One client (with its own pool) speaking to ``redis_url``."""
    kwargs: dict[str, Any] = {
        "job_serializer": job_serializer,
        "job_deserializer": job_deserializer,
    }
    if queue_name:
        kwargs["default_queue_name"] = queue_name
    if is_embedded(redis_url):
        return _EmbeddedArqRedis(connection_pool=_embedded_pool(redis_url), **kwargs)
    pool = ConnectionPool.from_url(
        redis_url,
        # A Redis restart must cost a pause, not a crash: retry with backoff for ~30 s.
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=20),
        retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError],
        health_check_interval=15,
        socket_connect_timeout=5,
        socket_keepalive=True,
    )
    return ArqRedis(connection_pool=pool, **kwargs)


def _embedded_pool(redis_url: str) -> ConnectionPool:
    import fakeredis
    from fakeredis.aioredis import FakeAsyncRedisConnection

    name = redis_url[len(EMBEDDED_SCHEME):] or "default"
    server = _embedded_servers.get(name)
    if server is None:
        server = _embedded_servers[name] = fakeredis.FakeServer()
    connection_class: Any = FakeAsyncRedisConnection
    return ConnectionPool(connection_class=connection_class, server=server)


class _EmbeddedPipeline(Pipeline):
    def info(self, section: str | None = None, *args: Any, **kwargs: Any) -> Any:
        # arq's worker start-up sends INFO in a pipeline just to log the server version;
        # fakeredis has no INFO, so queue a read that answers with an empty mapping instead.
        return self.execute_command("HGETALL", "crawlfleet:embedded:info")


class _EmbeddedArqRedis(ArqRedis):
    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        return _EmbeddedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )

    async def info(self, section: str | None = None, *args: Any, **kwargs: Any) -> Any:
        return {"redis_version": "embedded (fakeredis)"}
