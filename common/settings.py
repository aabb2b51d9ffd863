"""One settings object for every crawlfleet process, read from ``CRAWLFLEET_*`` variables.

Each field's environment variable is ``CRAWLFLEET_`` + the field name in upper case. CLI flags
override the environment (``Settings.from_env(overrides=...)``). A bad value raises
:class:`SettingsError` naming the variable, so a typo in a deployment file fails at start-up with
a readable message instead of deep inside a worker.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import socket
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

ENV_PREFIX = "CRAWLFLEET_"
# Settings that were renamed: the old variable still works for one release.
RENAMED = {"request_timeout": "fetch_timeout"}
# Redis URL schemes: redis-py's three and the embedded in-process backend.
REDIS_SCHEMES = ("redis", "rediss", "unix", "embedded")
# Log level names the standard library knows (CRAWLFLEET_LOG_LEVEL).
LOG_LEVELS = tuple(name.lower() for name in logging.getLevelNamesMapping() if name != "NOTSET")
# Fields whose value is a URL that may carry credentials: shown only through redact_url().
SECRET_URL_FIELDS = ("redis_url", "redis_urls", "proxy")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


_SECRET_QUERY = re.compile(r"pass|secret|token|auth", re.IGNORECASE)
_USERINFO = re.compile(r"(//[^/?#@\s:]*):[^/?#\s]*@")


def redact_url(url: str) -> str:
    """``url`` fit to print or log: its password (and any password-like query parameter)
    replaced by ``***``, e.g. ``redis://:***@host:6379/0``. The user name, host, port and path
    stay, so the message still says where. Never raises, whatever the text."""
    try:
        parts = urlsplit(url)
        userinfo, at, hostport = parts.netloc.rpartition("@")
        netloc = parts.netloc
        if at and ":" in userinfo:
            netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
        query = parts.query
        if query and _SECRET_QUERY.search(query):
            query = urlencode([(k, "***" if _SECRET_QUERY.search(k) else v)
                               for k, v in parse_qsl(query, keep_blank_values=True)],
                              safe="*", quote_via=quote)
        if (netloc, query) == (parts.netloc, parts.query):
            return url
        slashes = "//" if url[len(parts.scheme) + 1:].startswith("//") else ""
        return (f"{parts.scheme}:{slashes}{netloc}{parts.path}" + (f"?{query}" if query else "")
                + (f"#{parts.fragment}" if parts.fragment else ""))
    except ValueError:
        return _USERINFO.sub(r"\1:***@", url)


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (plus an ellipsis) for a one-line message."""
    return text if len(text) <= limit else text[:limit] + "…"


def check_redis_url(url: str) -> str | None:
    """Why ``url`` cannot be a crawlfleet Redis URL (None if it can): one of ``redis://``,
    ``rediss://``, ``unix://`` (as redis-py reads them) or ``embedded://NAME``, with a valid
    port, an integer database and only the query options redis-py knows."""
    parts = urlsplit(url.strip())
    if parts.scheme not in REDIS_SCHEMES or not url.strip().lower().startswith(
            parts.scheme + "://"):
        return "must start with redis://, rediss://, unix:// or embedded://NAME"
    if parts.scheme == "embedded":
        return None
    try:
        port = parts.port
    except ValueError as exc:
        return f"has a bad port: {exc}"
    if port == 0:
        return "has a bad port: 0"
    if parts.scheme == "unix":
        if not parts.path:
            return "names no socket path (unix:///path/to/redis.sock)"
    elif parts.path not in ("", "/"):
        db = parts.path.lstrip("/")
        if not db.isdigit():
            return f"has a bad database {shorten(db, 20)!r}: the path must be /N, N >= 0"
    try:
        from redis.asyncio import ConnectionPool

        # redis-py's own reading: query options are parsed, and unknown ones refused, only
        # when a connection object is made (nothing connects here).
        ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except (ValueError, TypeError) as exc:
        return f"is not accepted by redis-py: {shorten(str(exc), 120)}"
    return None


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class Settings:
    # Where and under which name the crawl lives; two crawls can share one Redis.
    redis_url: str = "redis://localhost:6379/0"
    # Several Redis servers, comma-separated: the frontier sharded by host (common/shards.py).
    # Wins over redis_url, which is the one-shard case.
    redis_urls: str | None = None
    namespace: str = "crawlfleet"

    # Fetching (per worker process).
    max_in_flight: int = 64
    # Politeness, per host across the whole fleet: requests in flight, and seconds between the
    # starts of two requests (robots.txt Crawl-delay raises it, up to max_crawl_delay).
    per_host_concurrency: int = 2
    crawl_delay: float = 0.5
    max_crawl_delay: float = 30.0
    max_redirects: int = 10
    # Retries of timeouts, connection errors, 429 and 5xx: exponential backoff with jitter from
    # retry_base seconds, capped at retry_max, and never sooner than a Retry-After.
    max_retries: int = 3
    retry_base: float = 2.0
    retry_max: float = 300.0
    # A fetch's time once it is sent (pacing waits for the host's turn do not count), and the
    # longest silence between two reads of a response.
    fetch_timeout: float = 30.0
    read_timeout: float = 20.0
    connect_timeout: float = 10.0
    max_body_bytes: int = 10 * 1024 * 1024
    # Links followed from one page; the rest are counted in the result, not followed.
    max_links_per_page: int = 5000
    # Longest response status line or header field; a longer one fails the page as protocol.
    max_header_bytes: int = 8190
    user_agent: str = "crawlfleet/0.1 (+https://github.com/crawlfleet/crawlfleet)"
    dns_nameservers: tuple[str, ...] = ()
    dns_cache_ttl: int = 300
    allow_private: bool = False
    # The SSRF guard (common/addresses.py). allow_networks: CIDRs; when set, ONLY addresses in
    # them are fetched, private ones included. allowed_ports: when set, the only ports fetched;
    # unset, 80, 443 and the ports the seeds name. proxy: an http:// proxy (user:password@
    # allowed) every request goes through, robots.txt included.
    allow_networks: tuple[str, ...] = ()
    allowed_ports: tuple[str, ...] = ()
    proxy: str | None = None

    # robots.txt: how long a fetched copy is trusted, and how soon an unreachable one is retried.
    robots_ttl: float = 86400.0
    robots_retry: float = 300.0
    # How long a robots.txt that keeps answering 5xx is retried (with backoff) before the host's
    # URLs fail as robots_unavailable.
    robots_max_wait: float = 3600.0

    # Frontier and scheduling. batch_size: URLs a host's lease holds at a time (the worker
    # refills it from the host queue as it goes). A worker keeps a host for up to
    # host_turn_seconds, and gives it back after host_turn_pages when other hosts are waiting.
    batch_size: int = 20
    host_turn_seconds: float = 120.0
    host_turn_pages: int = 500
    # About how many URLs the crawl will see: it sizes the seen set's buckets when the crawl
    # opens (common/keys.py seen_digits); a bigger crawl stays exact, at more bytes per URL.
    expected_urls: int = 1_000_000
    # Fingerprints of links a worker remembers having sent, so that a site's navigation links
    # cost Redis nothing after their first page (two generations of half this size each).
    link_cache_size: int = 200_000
    max_depth: int | None = None
    max_pages: int | None = None
    sort_query: bool = False

    # Scope: the seeds' hosts, plus allowed_domains, plus their subdomains if asked; URL
    # patterns (one regular expression each, searched in the canonical URL); trap defences.
    allowed_domains: tuple[str, ...] = ()
    include_subdomains: bool = False
    allow_pattern: str | None = None
    deny_pattern: str | None = None
    max_pages_per_host: int | None = None
    max_query_variants: int = 100
    max_repeated_segments: int = 3
    max_url_length: int = 2048
    lease_seconds: float = 60.0
    max_worker_losses: int = 3
    dispatch_ahead: int = 32

    # arq worker loop. jobs_per_worker: hosts one worker holds at once; with max_in_flight 64
    # and 2 fetches a host, 32 slots let the fetch cap, not the slots, bound the worker.
    jobs_per_worker: int = 32
    poll_delay: float = 0.05
    # Polls that find nothing slow down to this (doubling), and speed up when work comes.
    poll_max_delay: float = 0.5
    # Seconds a worker has after SIGTERM to finish or hand back its batches; deployment files
    # set terminationGracePeriodSeconds / stop_grace_period a little above it.
    shutdown_grace: float = 25.0

    # Output (common/storage.py, common/sink.py): a directory or s3://bucket/prefix. Unset,
    # results stay in Redis for `crawlfleet export`; set, `crawlfleet sink` drains them into
    # JSON-lines parts there, a part per output_part_results results or output_part_seconds.
    output: str | None = None
    output_part_results: int = 5000
    output_part_seconds: float = 10.0
    # Page bodies as gzip WARC 1.1 files in the output (workers/warc.py), rotated by size;
    # visible text and lang in each result (workers/parse.py).
    warc: bool = False
    warc_max_bytes: int = 1_000_000_000
    text: bool = False

    # Operating: Prometheus /metrics (and /healthz) on this port, 0 = off (common/metrics.py);
    # seconds between a worker's health-check writes (`crawlfleet health` reads its own).
    metrics_port: int = 0
    health_check_interval: float = 10.0

    # The event loop: uvloop when installed (0 keeps asyncio's own).
    uvloop: bool = True

    # Logging: "json", "console" or "auto" (console on a TTY, JSON otherwise).
    log_format: str = "auto"
    log_level: str = "info"

    worker_id: str = field(default_factory=_default_worker_id)

    def __post_init__(self) -> None:
        _check_finite(self)
        positive = (
            "max_in_flight", "per_host_concurrency", "batch_size", "jobs_per_worker",
            "max_body_bytes", "dispatch_ahead", "max_worker_losses", "max_query_variants",
            "max_repeated_segments", "max_url_length", "max_links_per_page", "max_header_bytes",
            "host_turn_pages", "expected_urls", "link_cache_size", "output_part_results",
            "warc_max_bytes",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(
                    f"{env_name(name)} must be at least 1, got {getattr(self, name)}"
                )
        for name in ("fetch_timeout", "read_timeout", "connect_timeout", "lease_seconds",
                     "poll_delay", "poll_max_delay", "host_turn_seconds", "robots_ttl",
                     "robots_retry", "robots_max_wait", "output_part_seconds",
                     "health_check_interval"):
            if getattr(self, name) <= 0:
                raise SettingsError(
                    f"{env_name(name)} must be positive, got {getattr(self, name)}")
        if self.poll_max_delay < self.poll_delay:
            raise SettingsError(
                f"{env_name('poll_max_delay')} must be at least {env_name('poll_delay')} "
                f"({self.poll_delay:g}), got {self.poll_max_delay:g}")
        for name in ("crawl_delay", "max_crawl_delay", "max_retries", "max_redirects",
                     "retry_base", "retry_max"):
            if getattr(self, name) < 0:
                raise SettingsError(
                    f"{env_name(name)} must be 0 or more, got {getattr(self, name)}"
                )
        for name in ("allow_pattern", "deny_pattern"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise SettingsError(
                        f"{env_name(name)} is not a valid regular expression: {exc}"
                    ) from None
        for name in ("max_depth", "max_pages", "max_pages_per_host"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise SettingsError(f"{env_name(name)} must be 0 or more, got {value}")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"{env_name('metrics_port')} must be a port 1..65535, or 0 for "
                                f"none, got {self.metrics_port}")
        if self.log_format not in ("json", "console", "auto"):
            raise SettingsError(
                f"{env_name('log_format')} must be json, console or auto, got {self.log_format!r}"
            )
        if self.log_level.lower() not in LOG_LEVELS:
            raise SettingsError(
                f"{env_name('log_level')} must be one of {', '.join(LOG_LEVELS)}, "
                f"got {shorten(self.log_level, 40)!r}"
            )
        problem = check_redis_url(self.redis_url)
        if problem:
            raise SettingsError(
                f"{env_name('redis_url')}={shorten(redact_url(self.redis_url))!r} {problem}"
            )
        if self.redis_urls is not None:
            from .shards import ShardConfigError, parse_redis_urls

            try:
                urls = parse_redis_urls(self.redis_urls)
            except ShardConfigError as exc:
                raise SettingsError(str(exc)) from None
            # The first shard is also redis_url, for what speaks to one Redis (health, crawl);
            # one URL is the one-shard case, as if given as CRAWLFLEET_REDIS_URL.
            object.__setattr__(self, "redis_url", urls[0])
            if len(urls) == 1:
                object.__setattr__(self, "redis_urls", None)
        if not self.namespace or any(c in self.namespace for c in " {}:"):
            raise SettingsError(
                f"{env_name('namespace')} must be non-empty without spaces, braces or colons"
            )
        for server in self.dns_nameservers:
            _check_nameserver(server)
        _check_guard(self)
        _check_output(self)

    @property
    def shard_urls(self) -> list[str]:
        """The Redis servers of the frontier, in shard order: CRAWLFLEET_REDIS_URLS, else the
        one CRAWLFLEET_REDIS_URL."""
        if self.redis_urls is None:
            return [self.redis_url]
        from .shards import parse_redis_urls

        return parse_redis_urls(self.redis_urls)

    @property
    def redis_where(self) -> str:
        """Where the frontier lives, fit to print (passwords redacted)."""
        return ",".join(redact_url(url) for url in self.shard_urls)

    def __repr__(self) -> str:
        # Credentials in URLs (the Redis password, a proxy's) never reach a log or a traceback.
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_URL_FIELDS and isinstance(value, str):
                value = ",".join(redact_url(part) for part in value.split(","))
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    __str__ = __repr__

    @property
    def request_timeout(self) -> float:
        """The old name of ``fetch_timeout``, kept for one release."""
        return self.fetch_timeout

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
    ) -> Settings:
        """Read every field from ``environ`` (default ``os.environ``), then apply ``overrides``.

        Overrides whose value is None are ignored, so argparse results can be passed as they are.
        """
        environ = os.environ if environ is None else environ
        _warn_unknown(environ)
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        renamed = {old: new for old, new in RENAMED.items() if env_name(old) in environ
                   and env_name(new) not in environ}
        for f in dataclasses.fields(cls):
            old = next((o for o, n in renamed.items() if n == f.name), None)
            raw = environ.get(env_name(f.name if old is None else old))
            if raw is not None:
                values[f.name] = _parse(f.name, raw, hints[f.name])
        for name, value in (overrides or {}).items():
            if value is None:
                continue
            if name not in hints:
                raise SettingsError(f"unknown setting {name!r}")
            values[name] = _parse(name, value, hints[name]) if isinstance(value, str) else value
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, default, type) rows: the README's settings table is checked against it."""
        rows = []
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            default = "hostname-pid" if f.name == "worker_id" else _show(f.default)
            rows.append((env_name(f.name), default, _type_name(hints[f.name])))
        return rows


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _check_finite(settings: Settings) -> None:
    """nan and inf are floats, but no delay, timeout or lease can be one (a nan crawl delay
    never elapses; a nan lease breaks the scripts' arithmetic)."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{env_name(f.name)} must be a finite number, got {value}")


def known_variables() -> set[str]:
    """Every ``CRAWLFLEET_*`` variable crawlfleet reads, renamed old names included."""
    return {env_name(f.name) for f in dataclasses.fields(Settings)} | {
        env_name(old) for old in RENAMED}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each ``CRAWLFLEET_*`` variable that is no setting (a typo is otherwise
    silently ignored), with the closest known name."""
    known = known_variables()
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        warnings.append(f"{shorten(name, 60)} is not a crawlfleet setting{hint}; ignored")
    return warnings


_warned: set[str] = set()


def _warn_unknown(environ: Mapping[str, str]) -> None:
    for warning in unknown_variables(environ):
        if warning not in _warned:  # once per process, however many times settings are read
            _warned.add(warning)
            print(f"crawlfleet: warning: {warning}", file=sys.stderr)


def _check_guard(settings: Settings) -> None:
    """allow_networks, allowed_ports and proxy; a proxy's password never enters a message."""
    from .addresses import allowed_port_numbers, parse_networks

    try:
        parse_networks(settings.allow_networks)
    except ValueError as exc:
        raise SettingsError(f"{env_name('allow_networks')}: {exc}") from None
    try:
        allowed_port_numbers(settings.allowed_ports)
    except ValueError:
        raise SettingsError(
            f"{env_name('allowed_ports')} must be port numbers 1..65535, comma-separated, "
            f"got {','.join(settings.allowed_ports)!r}"
        ) from None
    if settings.proxy is not None:
        shown = redact_url(settings.proxy)
        try:
            parts = urlsplit(settings.proxy)
            port = parts.port
        except ValueError:
            raise SettingsError(f"{env_name('proxy')}: {shown!r} has a bad port") from None
        if parts.scheme.lower() != "http" or not parts.hostname:
            raise SettingsError(
                f"{env_name('proxy')} must be http://[user:password@]host[:port], got {shown!r}"
            )
        if port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise SettingsError(
                f"{env_name('proxy')} must be http://[user:password@]host[:port] with a port "
                f"1..65535 and no path, got {shown!r}"
            )


def _check_output(settings: Settings) -> None:
    """CRAWLFLEET_OUTPUT is a directory or s3://bucket[/prefix]; WARC files need an output."""
    output = settings.output
    if output is not None:
        if not output.strip():
            raise SettingsError(f"{env_name('output')} is empty")
        if "://" in output:
            parts = urlsplit(output)
            if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
                raise SettingsError(
                    f"{env_name('output')} must be a directory or s3://bucket[/prefix], got "
                    f"{shorten(redact_url(output))!r}")
    if settings.warc and output is None:
        raise SettingsError(f"{env_name('warc')}=1 needs {env_name('output')} (where the WARC "
                            "files go): a directory or s3://bucket/prefix")


def _check_nameserver(server: str) -> None:
    import ipaddress

    host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
    try:
        ipaddress.ip_address(host.strip("[]") if host else server)
        if port and not 0 < int(port) < 65536:
            raise ValueError(port)
    except ValueError as exc:
        raise SettingsError(
            f"{env_name('dns_nameservers')}: {server!r} is not an 'ip' or 'ip:port'"
        ) from exc


def setting_from_env(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting from the environment, parsed as :meth:`Settings.from_env` parses it (its
    default when unset), for what must be known before the rest is read (the event loop)."""
    environ = os.environ if environ is None else environ
    raw = environ.get(env_name(name))
    if raw is None:
        return next(f for f in dataclasses.fields(Settings) if f.name == name).default
    return _parse(name, raw, typing.get_type_hints(Settings)[name])


def _parse(name: str, raw: str, hint: Any) -> Any:
    """Convert one environment string to the field's type, or raise naming the variable."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    text = raw.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    try:
        if hint is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected true/false, 1/0, yes/no or on/off")
        if hint is int:
            return int(text.replace("_", ""))
        if hint is float:
            number = float(text)
            if not math.isfinite(number):
                raise ValueError("must be a finite number")
            return number
        if typing.get_origin(hint) is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return raw
    except ValueError as exc:
        raise SettingsError(
            f"{env_name(name)}={shorten(raw)!r} is not a valid {_type_name(hint)}: {exc}"
        ) from None


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        return "comma-separated list"
    return getattr(hint, "__name__", str(hint))


def _show(value: Any) -> str:
    if value is None:
        return "unset (no limit)"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(value) or "unset"
    return str(value)
