"""The hostile side of the test web: one raw asyncio HTTP server on loopback that misbehaves.

A crawler must survive every server on the internet, so this one does what real ones do by
mistake or by malice: it drips, never ends, lies about sizes, sends compression bombs, loops
redirects, resets connections, never answers, speaks broken HTTP and serves odd documents. Each
behaviour is one path (see ``PATHS``); the root ``/`` links every one of them, so a crawl of
``http://hostile.test:PORT/`` meets them all. It is written on raw asyncio streams, not
aiohttp's server, because a real HTTP server cannot be made to send a malformed status line,
a header without a colon or a 1 MB header line.

Every answer is ``Connection: close`` (one request per connection), so the server knows exactly
when a client hung up: per path it records the requests, how many ended with the peer closing
the connection before the answer was complete (``closed_early``), how many were sent in full
(``completed``) and the most body bytes any one answer got onto the wire (``max_sent``). That is
what ``GET /__hostile__/stats`` returns and what tests assert on ("the crawler stopped reading
the 50 MB robots.txt early"). ``POST /__hostile__/reset`` clears it.

Bodies are generated while sending (the bombs are compressed on the fly), so the server's own
memory stays small whatever it claims to send. It binds to 127.0.0.0/8 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import struct
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .loopback import require_loopback

HOSTILE_HOST = "hostile.test"
STATS_PATH = "/__hostile__/stats"
RESET_PATH = "/__hostile__/reset"

KB = 1024
MB = 1024 * KB
GB = 1024 * MB
CHUNK = 64 * KB

ROBOTS_SIZE = 50 * MB
HUGE_LENGTH = 10 * GB  # the Content-Length /huge-length claims
BOMB_SIZE = 4 * GB  # what a bomb decompresses to
HEADER_SIZE = 1 * MB  # the one header line of /huge-header
DEEP_LEVELS = 100_000
LONG_URL_CHARS = 10_000
CHAIN_HOPS = 12  # /redirect-chain/12: more hops than CRAWLFLEET_MAX_REDIRECTS' default (10)
DRIP_BYTES = 3_600  # an hour at one byte a second: no client should wait for the end
SILENT_HOLD_S = 600.0  # how long /silent holds a connection the client does not close
IMAGE_SIZE = 9 * MB  # under the default 10 MiB body cap, so only the non-HTML rule stops it
RETRY_AFTER_S = 1

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# path -> what it does. The root links every one of them (redirect-loop with its first query).
PATHS: dict[str, str] = {
    "/drip": "HTML at one byte a second (Content-Length 3600)",
    "/endless": "chunked HTML that never ends, sent as fast as the client reads",
    "/huge-length": "Content-Length: 10 GiB, a body sent until the client hangs up",
    "/bomb.gzip": "Content-Encoding: gzip, 4 GiB of spaces decompressed, ~4 MB on the wire",
    "/bomb.deflate": "Content-Encoding: deflate (zlib), 4 GiB decompressed",
    "/bomb.br": "Content-Encoding: br, 4 GiB decompressed (a gzip body if `brotli` is missing)",
    "/redirect-loop": "302 to /redirect-loop?n=N+1, forever: a loop that mints new URLs",
    "/redirect-cycle/a": "302 to /redirect-cycle/b, which redirects back: a true cycle",
    "/redirect-chain/12": "302 to /redirect-chain/11 ... /redirect-chain/0 (a page): 12 hops",
    "/short-chain/3": "302 to /short-chain/2 ... /short-chain/0 (a page): within the limit",
    "/reset": "Content-Length 1 MiB, 32 KiB of it, then a TCP reset (RST)",
    "/silent": "reads the request and never answers, holding the connection open",
    "/bad-status": "a malformed status line",
    "/bad-header": "a header line without a colon",
    "/huge-header": "one header line of 1 MiB",
    "/deep": "HTML nested 100,000 elements deep",
    "/wrong-charset": "windows-1252 bytes declared as charset=utf-8",
    "/unknown-charset": "charset=x-no-such-charset",
    "/binary-as-html": "PNG bytes served as text/html",
    "/weird-links": "javascript:, data:, mailto:, empty and 10,000-character links, and /ok",
    "/ratelimited": "429 with Retry-After: 1, every time",
    "/binary.bin": "application/octet-stream, chunked and endless",
    "/image.png": "image/png, Content-Length 9 MiB (under the body cap)",
    "/ok": "a plain page",
    "/robots.txt": "50 MiB: `Allow: /` then comments",
}
ROOT_LINKS = [p if p != "/redirect-loop" else "/redirect-loop?n=0"
              for p in PATHS if p != "/robots.txt"]


@dataclass
class PathStats:
    requests: int = 0
    closed_early: int = 0
    completed: int = 0
    max_sent: int = 0

    def as_json(self) -> dict[str, int]:
        return {"requests": self.requests, "closed_early": self.closed_early,
                "completed": self.completed, "max_sent": self.max_sent}


class _Answer:
    """One response on one connection: counts body bytes, knows whether it was cut short."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 path: str) -> None:
        self.reader = reader
        self.writer = writer
        self.path = path
        self.sent = 0

    async def raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self, status: str, headers: list[tuple[str, str]]) -> None:
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers), "Connection: close"]
        await self.raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def body(self, data: bytes) -> None:
        await self.raw(data)
        self.sent += len(data)

    async def chunk(self, data: bytes) -> None:
        if data:
            await self.raw(b"%x\r\n%s\r\n" % (len(data), data))
            self.sent += len(data)

    async def end_chunks(self) -> None:
        await self.raw(b"0\r\n\r\n")

    async def page(self, body: bytes, *, status: str = "200 OK",
                   content_type: str = "text/html; charset=utf-8",
                   headers: list[tuple[str, str]] | None = None) -> None:
        await self.head(status, [("Content-Type", content_type),
                                 ("Content-Length", str(len(body))), *(headers or [])])
        await self.body(body)

    def small_send_buffer(self) -> None:
        """Bound what the kernel buffers, so ``sent`` is close to what the peer read."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK)


Handler = Callable[[_Answer, str], Awaitable[None]]


def _html(title: str, body: str) -> bytes:
    return (f"<!doctype html><html><head><title>{title}</title></head>"
            f"<body>{body}</body></html>").encode()


def _filler(size: int, unit: bytes) -> Iterator[bytes]:
    block = unit * (CHUNK // len(unit))
    left = size
    while left > 0:
        piece = block[:left]
        left -= len(piece)
        yield piece


BOMB_BLOCK = 16 * MB


@functools.cache
def _deflate_pieces(wbits: int) -> tuple[bytes, bytes, bytes]:
    """(first, repeat, final block) of a deflate stream of BOMB_BLOCK-sized blocks of spaces.

    After a full flush the compressor forgets its window, so every further block of the same
    input compresses to the same bytes: a bomb of any size costs one block's compression."""
    z = zlib.compressobj(9, zlib.DEFLATED, wbits)
    raw = b" " * BOMB_BLOCK
    first = z.compress(raw) + z.flush(zlib.Z_FULL_FLUSH)
    repeat = z.compress(raw) + z.flush(zlib.Z_FULL_FLUSH)
    tail = z.flush()
    final_block = tail[: -(8 if wbits == 31 else 4)]  # the trailer is computed per bomb
    return first, repeat, final_block


def _compressed(encoding: str, size: int) -> Iterator[bytes]:
    """``size`` bytes of spaces (a multiple of BOMB_BLOCK), compressed with ``encoding``, a
    piece at a time, with a correct trailer should a client ever read that far."""
    raw = b" " * BOMB_BLOCK
    blocks = size // BOMB_BLOCK
    if encoding == "br":
        try:
            import brotli  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            brotli = None
        if brotli is not None:
            comp = brotli.Compressor(quality=1)
            for _ in range(blocks):
                yield comp.process(raw)
            yield comp.finish()
            return
        encoding = "gzip"  # labelled br all the same: a client without brotli cannot decode it
    gzip = encoding == "gzip"
    first, repeat, final_block = _deflate_pieces(31 if gzip else 15)
    check = 0 if gzip else 1  # crc32 / adler32 start values
    for i in range(blocks):
        yield first if i == 0 else repeat
        check = zlib.crc32(raw, check) if gzip else zlib.adler32(raw, check)
    if gzip:
        yield final_block + struct.pack("<II", check, size & 0xFFFFFFFF)
    else:
        yield final_block + struct.pack(">I", check)


class HostileServer:
    """``async with HostileServer() as srv``: serves ``PATHS`` on ``srv.port`` (loopback)."""

    def __init__(self, *, bind: str = "127.0.0.1", port: int = 0) -> None:
        self.bind = require_loopback(bind)
        self._port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats: dict[str, PathStats] = {}
        self.handlers: dict[str, Handler] = {
            "/": self._root,
            "/robots.txt": self._robots,
            "/drip": self._drip,
            "/endless": self._endless,
            "/huge-length": self._huge_length,
            "/bomb.gzip": self._bomb,
            "/bomb.deflate": self._bomb,
            "/bomb.br": self._bomb,
            "/redirect-loop": self._redirect_loop,
            "/reset": self._reset,
            "/silent": self._silent,
            "/bad-status": self._bad_status,
            "/bad-header": self._bad_header,
            "/huge-header": self._huge_header,
            "/deep": self._deep,
            "/wrong-charset": self._wrong_charset,
            "/unknown-charset": self._unknown_charset,
            "/binary-as-html": self._binary_as_html,
            "/weird-links": self._weird_links,
            "/ratelimited": self._ratelimited,
            "/binary.bin": self._binary_bin,
            "/image.png": self._image_png,
            "/ok": self._ok,
        }

    @property
    def port(self) -> int:
        return self._port

    @property
    def seed(self) -> str:
        return f"http://{HOSTILE_HOST}:{self.port}/"

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("server already started")
        self._server = await asyncio.start_server(self._connection, self.bind, self._port,
                                                  reuse_address=True)
        self._port = int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> HostileServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {p: s.as_json() for p, s in sorted(self.stats.items())}

    # --- the connection -------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
            method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError, ValueError):
            return
        path, _, query = target.partition("?")
        answer = _Answer(reader, writer, path)
        if path in (STATS_PATH, RESET_PATH):
            if path == RESET_PATH and method == "POST":
                self.stats = {}
                body = b'{"ok": true}'
            else:
                body = json.dumps(self.snapshot()).encode()
            with contextlib.suppress(ConnectionError):
                await answer.page(body, content_type="application/json")
            return
        st = self.stats.setdefault(path, PathStats())
        st.requests += 1
        handler = self.handlers.get(path)
        if handler is None and path.startswith("/redirect-cycle/"):
            handler = self._redirect_cycle
        elif handler is None and path.startswith(("/redirect-chain/", "/short-chain/")):
            handler = self._redirect_chain
        try:
            if method not in ("GET", "HEAD"):
                await answer.page(b"method not allowed\n", status="405 Method Not Allowed",
                                  content_type="text/plain")
            elif handler is None:
                await answer.page(b"not found\n", status="404 Not Found",
                                  content_type="text/plain")
            else:
                await handler(answer, query)
            if path == "/reset":  # the reset is the point: it never completes
                st.closed_early += 1
            else:
                st.completed += 1
        except (ConnectionError, OSError):
            st.closed_early += 1
        finally:
            st.max_sent = max(st.max_sent, answer.sent)

    # --- the paths ------------------------------------------------------------------------

    async def _root(self, a: _Answer, query: str) -> None:
        items = "".join(f'<li><a href="{p}">{PATHS.get(p.partition("?")[0], p)}</a></li>'
                        for p in ROOT_LINKS)
        await a.page(_html("hostile", f"<h1>hostile</h1><ul>{items}</ul>"))

    async def _ok(self, a: _Answer, query: str) -> None:
        await a.page(_html("ok", "<p>a plain page</p>"))

    async def _robots(self, a: _Answer, query: str) -> None:
        a.small_send_buffer()
        start = b"User-agent: *\nAllow: /\n"
        await a.head("200 OK", [("Content-Type", "text/plain"),
                                ("Content-Length", str(ROBOTS_SIZE))])
        await a.body(start)
        for piece in _filler(ROBOTS_SIZE - len(start), b"# padding, padding, padding\n"[:16]):
            await a.body(piece)

    async def _drip(self, a: _Answer, query: str) -> None:
        await a.head("200 OK", [("Content-Type", "text/html"),
                                ("Content-Length", str(DRIP_BYTES))])
        for _ in range(DRIP_BYTES):
            await a.body(b" ")
            await asyncio.sleep(1.0)

    async def _endless(self, a: _Answer, query: str) -> None:
        a.small_send_buffer()
        await a.head("200 OK", [("Content-Type", "text/html"),
                                ("Transfer-Encoding", "chunked")])
        await a.chunk(b"<!doctype html><html><body>")
        block = b"<p>more</p>" * (CHUNK // 11)
        while True:  # ends when the client hangs up (ConnectionError)
            await a.chunk(block)

    async def _huge_length(self, a: _Answer, query: str) -> None:
        a.small_send_buffer()
        await a.head("200 OK", [("Content-Type", "text/html"),
                                ("Content-Length", str(HUGE_LENGTH))])
        for piece in _filler(HUGE_LENGTH, b" "):
            await a.body(piece)

    async def _bomb(self, a: _Answer, query: str) -> None:
        a.small_send_buffer()
        enc = a.path.rpartition(".")[2]
        await a.head("200 OK", [("Content-Type", "text/html"), ("Content-Encoding", enc),
                                ("Transfer-Encoding", "chunked")])
        for piece in _compressed(enc, BOMB_SIZE):
            await a.chunk(piece)
        await a.end_chunks()

    async def _redirect_loop(self, a: _Answer, query: str) -> None:
        n = 0
        with contextlib.suppress(ValueError):
            n = int(query.partition("n=")[2] or 0)
        await a.page(b"", status="302 Found", headers=[("Location", f"/redirect-loop?n={n + 1}")])

    async def _redirect_cycle(self, a: _Answer, query: str) -> None:
        other = "b" if a.path.endswith("/a") else "a"
        await a.page(b"", status="302 Found", headers=[("Location", f"/redirect-cycle/{other}")])

    async def _redirect_chain(self, a: _Answer, query: str) -> None:
        prefix, _, last = a.path.rpartition("/")
        try:
            n = int(last)
        except ValueError:
            n = 0
        if n <= 0:
            await a.page(_html("end of the chain", "<p>arrived</p>"))
        else:
            await a.page(b"", status="302 Found",
                         headers=[("Location", f"{prefix}/{n - 1}")])

    async def _reset(self, a: _Answer, query: str) -> None:
        await a.head("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(MB))])
        await a.body(b"<!doctype html><html><body>" + b" " * (32 * KB))
        sock = a.writer.get_extra_info("socket")
        # SO_LINGER 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.writer.transport.abort()

    async def _silent(self, a: _Answer, query: str) -> None:
        # Wait for the client to hang up (EOF), or give up after a long while.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(a.reader.read(), timeout=SILENT_HOLD_S)
        raise ConnectionResetError("the client gave up")  # recorded as closed_early

    async def _bad_status(self, a: _Answer, query: str) -> None:
        await a.raw(b"HTTP/1.1 two hundred OKAY\r\nContent-Length: 2\r\n\r\nhi")

    async def _bad_header(self, a: _Answer, query: str) -> None:
        await a.raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nThis is not a header\r\n"
                    b"Content-Length: 2\r\nConnection: close\r\n\r\nhi")

    async def _huge_header(self, a: _Answer, query: str) -> None:
        a.small_send_buffer()
        await a.raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nX-Huge: ")
        for piece in _filler(HEADER_SIZE, b"a"):
            await a.raw(piece)
        await a.raw(b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")

    async def _deep(self, a: _Answer, query: str) -> None:
        body = (b"<!doctype html><html><head><title>deep</title></head><body>"
                + b"<div>" * DEEP_LEVELS + b'<a href="/ok">bottom</a>'
                + b"</div>" * DEEP_LEVELS + b"</body></html>")
        await a.page(body, content_type="text/html")

    async def _wrong_charset(self, a: _Answer, query: str) -> None:
        body = "<html><head><title>caf\u00e9 cr\u00e8me</title></head><body>\u00e0 la</body></html>"
        await a.page(body.encode("cp1252"), content_type="text/html; charset=utf-8")

    async def _unknown_charset(self, a: _Answer, query: str) -> None:
        await a.page(_html("unknown charset", "<p>plain ASCII</p>"),
                     content_type="text/html; charset=x-no-such-charset")

    async def _binary_as_html(self, a: _Answer, query: str) -> None:
        body = PNG_SIGNATURE + bytes(range(256)) * 64
        await a.page(body, content_type="text/html")

    async def _weird_links(self, a: _Answer, query: str) -> None:
        long_url = "/long/" + "x" * LONG_URL_CHARS
        links = ["javascript:alert(1)", "JavaScript:void(0)", "data:text/html,<p>hi</p>",
                 "mailto:someone@example.org", "", "#top", long_url,
                 f"http://{HOSTILE_HOST}/{'y' * LONG_URL_CHARS}", "/ok"]
        body = "".join(f'<a href="{h}">link</a>' for h in links)
        await a.page(_html("weird links", body))

    async def _ratelimited(self, a: _Answer, query: str) -> None:
        await a.page(b"slow down\n", status="429 Too Many Requests", content_type="text/plain",
                     headers=[("Retry-After", str(RETRY_AFTER_S))])

    async def _binary_bin(self, a: _Answer, query: str) -> None:
        a.small_send_buffer()
        await a.head("200 OK", [("Content-Type", "application/octet-stream"),
                                ("Transfer-Encoding", "chunked")])
        block = bytes(range(256)) * (CHUNK // 256)
        while True:
            await a.chunk(block)

    async def _image_png(self, a: _Answer, query: str) -> None:
        a.small_send_buffer()
        await a.head("200 OK", [("Content-Type", "image/png"),
                                ("Content-Length", str(IMAGE_SIZE))])
        await a.body(PNG_SIGNATURE)
        for piece in _filler(IMAGE_SIZE - len(PNG_SIGNATURE), b"\x00"):
            await a.body(piece)

