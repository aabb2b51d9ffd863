"""structlog set-up: JSON lines by default, a readable console when stderr is a TTY.

arq and aiohttp log through the standard library; those records are routed through the same
renderer so a worker's output is one JSON object per line whatever wrote it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog


def configure_logging(log_format: str = "auto", level: str = "info", **context: Any) -> None:
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
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
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
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


def _dumps(obj: Any, **kwargs: Any) -> str:
    import msgspec

    return msgspec.json.encode(obj, enc_hook=str).decode()


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
