"""The test web's bare HTTP/1.1 server (testweb/wire.py), spoken to over raw sockets on
127.0.0.1: keep-alive, pipelining, HEAD, delayed answers, and what malformed requests get."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from crawlfleet.testweb.wire import (
    BadRequest,
    Connection,
    Reply,
    Request,
    parse_head,
    split_target,
)


class App:
    """A handler that echoes the request; ``/slow`` answers after 100 ms, ``/boom`` raises."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.done = 0
        self.ended = asyncio.Event()  # set at every done()

    def __call__(self, request: Request) -> Reply:
        self.requests.append(request)
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        body = f"{request.method} {request.path} ?{request.query}".encode()
        delay = 0.1 if request.path == "/slow" else 0.0
        return Reply(200, (("Content-Type", "text/plain"), ("X-Test", "1")), body, delay,
                     self._done)

    def _done(self) -> None:
        self.done += 1
        self.ended.set()

    async def wait_done(self, count: int) -> None:
        while self.done < count:
            self.ended.clear()
            await asyncio.wait_for(self.ended.wait(), 5)


@pytest.fixture
async def served() -> AsyncIterator[tuple[App, int]]:
    app = App()
    live: set[Connection] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: Connection(app, live), "127.0.0.1", 0)
    try:
        yield app, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for conn in list(live):
            conn.close()
        await server.wait_closed()


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), 5) == b""


def get(path: str, *extra: str, method: str = "GET", version: str = "HTTP/1.1") -> bytes:
    return "\r\n".join([f"{method} {path} {version}", "Host: a.test", *extra, "", ""]).encode()


async def test_keep_alive_answers_requests_in_order_and_pipelined(
    served: tuple[App, int],
) -> None:
    app, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/one?x=1"))
    assert await read_reply(reader) == (
        200, {"content-type": "text/plain", "x-test": "1", "content-length": "13"},
        b"GET /one ?x=1")
    # Three at once, the first one slow: the answers still come in request order.
    writer.write(get("/slow") + get("/two") + get("/three"))
    bodies = [(await read_reply(reader))[2] for _ in range(3)]
    assert bodies == [b"GET /slow ?", b"GET /two ?", b"GET /three ?"]
    assert [r.path for r in app.requests] == ["/one", "/slow", "/two", "/three"]
    assert app.done == 4
    writer.close()


async def test_connection_close_and_http_1_0_close_after_the_answer(
    served: tuple[App, int],
) -> None:
    _, port = served
    for request in (get("/a", "Connection: close"), get("/a", version="HTTP/1.0")):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        status, headers, _ = await read_reply(reader)
        assert (status, headers["connection"]) == (200, "close")
        assert await closed(reader)
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/a", "Connection: keep-alive", version="HTTP/1.0") + get("/b"))
    assert [(await read_reply(reader))[2] for _ in range(2)] == [b"GET /a ?", b"GET /b ?"]
    writer.close()


async def test_head_has_the_length_of_get_and_no_body(served: tuple[App, int]) -> None:
    _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/h", method="HEAD") + get("/h"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"Content-Length: 9\r\n" in head  # the length of "HEAD /h ?"
    # No body follows: the next bytes are the GET's answer.
    assert await read_reply(reader) == (
        200, {"content-type": "text/plain", "x-test": "1", "content-length": "8"}, b"GET /h ?")
    writer.close()


async def test_a_delayed_answer_waits_and_a_client_gone_meanwhile_still_ends_it(
    served: tuple[App, int],
) -> None:
    app, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(get("/slow"))
    await read_reply(reader)
    assert time.monotonic() - start >= 0.1
    writer.write(get("/slow"))
    writer.close()  # gone before the answer
    await app.wait_done(2)
    assert app.done == 2


async def test_a_request_body_is_dropped_and_the_connection_goes_on(
    served: tuple[App, int],
) -> None:
    app, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(get("/post", "Content-Length: 11", method="POST") + b"hello world" + get("/b"))
    assert [(await read_reply(reader))[2] for _ in range(2)] == [b"POST /post ?", b"GET /b ?"]
    assert [r.method for r in app.requests] == ["POST", "GET"]
    writer.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n Host: folded\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 400),
        (b"GET ftp://x/ HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000, 431),  # no end of head in sight
        (b"GET /boom HTTP/1.1\r\n\r\n", 500),
    ],
)
async def test_a_malformed_request_gets_one_error_and_the_connection_closes(
    served: tuple[App, int], request_bytes: bytes, status: int
) -> None:
    app, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes + get("/never"))
    got, headers, _ = await read_reply(reader)
    assert (got, headers["connection"]) == (status, "close")
    assert await closed(reader)
    assert "/never" not in [r.path for r in app.requests]
    writer.close()


def test_parse_head_and_split_target() -> None:
    assert parse_head(b"GET /a HTTP/1.1\r\nHost: A.test\r\nX-Y:  z \r\nhost: b.test") == (
        "GET", "/a", "HTTP/1.1", {"host": "b.test", "x-y": "z"})
    assert split_target("/p/1?q=a%20b#frag") == ("/p/1", "q=a%20b")
    assert split_target("/a%20b/%2e") == ("/a b/.", "")
    assert split_target("http://site0.test:8080/p/2?x") == ("/p/2", "x")
    assert split_target("HTTPS://site0.test") == ("/", "")
    for bad in ("*", "p/1", "ftp://x/"):
        with pytest.raises(BadRequest):
            split_target(bad)
