"""A bare HTTP/1.1 server on an asyncio protocol: the wire side of the test web.

The test web shares the machine's cores with the crawlers it serves, so what it spends a
request is taken from what it measures. aiohttp's server spent ~90 µs of CPU a request on a
prerendered page (request and response objects, a handler task, middleware, multidicts); this
protocol spends ~40, most of it the two system calls. It does only what the test web needs:

* ``GET``/``HEAD`` and anything else (the handler answers 405), origin-form targets, keep-alive
  (HTTP/1.1 unless ``Connection: close``; HTTP/1.0 only with ``Connection: keep-alive``),
  pipelined requests answered in order, a ``Content-Length`` request body read and dropped.
* Malformed requests (a bad request line, a header line without a colon, a chunked or
  unreadable body, a head over MAX_HEAD bytes) get a 400 or 431 and the connection is closed.
* The handler is a plain function; it may ask for its answer to go out after a delay (the
  test web's latency), which is a timer, not a task. Until it has gone out the connection reads
  nothing more (pipelined data waits in the buffer; past MAX_HEAD bytes reading pauses).
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # request line + headers
MAX_BODY = 1024 * 1024  # a request body is read and dropped up to this size


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # percent-decoded, as aiohttp's request.path was
    query: str  # the raw query string, without '?'
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    peer: str


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]  # Content-Length and Connection are added
    body: bytes
    delay_s: float = 0.0  # send after this long
    done: Callable[[], None] | None = None  # called once the reply went out or never will


Handler = Callable[[Request], Reply]


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def head_bytes(status: int, headers: tuple[tuple[str, str], ...], length: int,
               keep_alive: bool) -> bytes:
    """The status line and headers of a reply, with its length and connection headers."""
    lines = [f"HTTP/1.1 {status} {_phrase(status)}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append(f"Content-Length: {length}")
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Method, target, version and headers of a request head (without its blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(400, "bad request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadRequest(400, "bad header line")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


def split_target(target: str) -> tuple[str, str]:
    """Decoded path and raw query of an origin-form (or absolute-form) request target."""
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise BadRequest(400, "bad request target")
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    path = path.partition("#")[0]
    return (unquote(path) if "%" in path else path), query.partition("#")[0]


class Connection(asyncio.Protocol):
    """One client connection: requests answered one at a time, in order."""

    def __init__(self, handler: Handler, live: set[Connection]) -> None:
        self._handler = handler
        self._live = live
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._peer = ""
        self._busy = False  # a reply is pending
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._done: Callable[[], None] | None = None
        self._skip = 0  # request body bytes still to drop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else ""
        self._live.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._live.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._finish()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._next()
        elif len(self._buf) > MAX_HEAD and not self._paused and self._transport is not None:
            self._transport.pause_reading()  # a client pipelining without reading answers
            self._paused = True

    def _next(self) -> None:
        while not self._busy and self._transport is not None:
            if self._skip:
                dropped = min(self._skip, len(self._buf))
                del self._buf[:dropped]
                self._skip -= dropped
                if self._skip:
                    return
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self._refuse(431, "request header fields too large")
                return
            if end > MAX_HEAD:
                self._refuse(431, "request header fields too large")
                return
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            try:
                self._request(head)
            except BadRequest as e:
                self._refuse(e.status, str(e))
                return
            except Exception:  # a bug in the handler: the client sees a 500, as from aiohttp
                log.exception("test web handler failed")
                self._refuse(500, "internal server error")
                return

    def _request(self, head: bytes) -> None:
        method, target, version, headers = parse_head(head)
        if "transfer-encoding" in headers:
            raise BadRequest(400, "chunked request bodies are not supported")
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > MAX_BODY:
            raise BadRequest(400, "bad or too large Content-Length")
        self._skip = int(length)
        path, query = split_target(target)
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:
            keep_alive = "keep-alive" in connection
        reply = self._handler(Request(method, path, query, headers, self._peer))
        body = b"" if method == "HEAD" else reply.body
        data = head_bytes(reply.status, reply.headers, len(reply.body), keep_alive) + body
        self._busy = True
        self._done = reply.done
        if reply.delay_s > 0:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(reply.delay_s, self._send, data, keep_alive)
        else:
            self._send(data, keep_alive)

    def _send(self, data: bytes, keep_alive: bool) -> None:
        self._timer = None
        self._finish()
        transport = self._transport
        if transport is None:
            return
        transport.write(data)
        if not keep_alive:
            transport.close()
            return
        self._busy = False
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._buf:
            self._next()

    def _finish(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done()

    def _refuse(self, status: int, reason: str) -> None:
        transport = self._transport
        if transport is None:
            return
        body = f"{reason}\n".encode()
        headers = (("Content-Type", "text/plain; charset=utf-8"),)
        transport.write(head_bytes(status, headers, len(body), False) + body)
        transport.close()
        self._busy = True  # read nothing more
