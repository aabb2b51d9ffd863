"""structlog set-up: JSON lines by default, a readable console when stderr is a TTY.

arq and aiohttp log through the standard library; those records are routed through the same
renderer so a worker's output is one JSON object per line whatever wrote it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import msgspec
import structlog

# Where rendered lines go instead of stderr while something else owns the terminal (the live
# display of `crawlfleet crawl`: it prints them above itself). None, the default, is stderr.
_writer: Callable[[str], None] | None = None


def set_log_writer(writer: Callable[[str], None] | None) -> None:
    """Send every log line, one rendered line (no newline) a call, to ``writer``; None restores
    stderr. Covers structlog's lines and the standard library's (arq, aiohttp, asyncio)."""
    global _writer
    _writer = writer


class _StderrBytes:
    """structlog's last step for our own lines: the rendered bytes straight to stderr (whatever
    sys.stderr is at the time), without the standard library's records and formatters."""

    def __init__(self, name: str = "") -> None:
        self.name = name  # for structlog.stdlib.add_logger_name

    def msg(self, message: bytes | str) -> None:
        if _writer is not None:
            _writer(message.decode(errors="replace") if isinstance(message, bytes) else message)
            return
        stream = sys.stderr
        if isinstance(message, bytes):
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                stream.flush()
                buffer.write(message + b"\n")
                buffer.flush()
                return
            message = message.decode()
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _StderrHandler(logging.StreamHandler[TextIO]):
    """The standard library's records, to stderr or to the writer set by ``set_log_writer``."""

    def emit(self, record: logging.LogRecord) -> None:
        writer = _writer
        if writer is None:
            super().emit(record)
            return
        try:
            writer(self.format(record))
        except Exception:
            self.handleError(record)


def configure_logging(log_format: str = "auto", level: str = "info", **context: Any) -> None:
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    level_no = logging.getLevelName(level.upper())
    # crawlfleet's own lines (one a page: the hot path) go through structlog alone: filtered by
    # level before anything is built, rendered to bytes by msgspec, written once. arq's and
    # aiohttp's stdlib records get the same fields and renderer through ProcessorFormatter.
    own: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_credentials,
    ]
    structlog.configure(
        processors=[*own, structlog.dev.ConsoleRenderer() if use_console
                    else structlog.processors.JSONRenderer(serializer=_dumps_bytes)],
        logger_factory=_StderrBytes,
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        cache_logger_on_first_use=True,
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if use_console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact_credentials,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # arq logs every job start and end at INFO; crawlfleet logs its own richer lines per job.
    logging.getLogger("arq").setLevel(max(logging.WARNING, root.level))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)


# user:password@ in any URL-like text (a Redis URL, a proxy URL, an error quoting one).
_CREDENTIALS = re.compile(r"(//[^\s/?#@:'\"]*):[^\s/?#'\"]*@")


def redact_credentials(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The last step before rendering: no line, whoever logged it (arq and aiohttp included)
    and whatever it quotes, carries a URL's password (``redis://:***@host``)."""
    for key, value in event.items():
        event[key] = _scrub(value)
    return event


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return _CREDENTIALS.sub(r"\1:***@", value) if "@" in value else value
    if isinstance(value, (list, tuple)):
        return [_scrub(item) for item in value]
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    return value


_encode = msgspec.json.Encoder(enc_hook=str).encode


def _dumps(obj: Any, **kwargs: Any) -> str:
    return _encode(obj).decode()


def _dumps_bytes(obj: Any, **kwargs: Any) -> bytes:
    return _encode(obj)


def get_logger(name: str) -> Any:
    """A logger whose lines carry ``logger=name``, as the standard library's do."""
    return structlog.get_logger(name)
