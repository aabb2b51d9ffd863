"""Tests for crawlfleet.workers.warc: records, offsets, names, rotation, failures.

Pages are fetched for real (fetch() with ``capture``) from an in-process aiohttp server on
127.0.0.1, so the request headers, the decoded bodies and the redirect hops are aiohttp's own;
records are read back with warcio's ArchiveIterator and checked with warcio's own ``check``.
"""

from __future__ import annotations

import errno
import gzip
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from warcio.archiveiterator import ArchiveIterator

from crawlfleet.common import storage
from crawlfleet.common.settings import Settings
from crawlfleet.workers import warc
from crawlfleet.workers.fetch import NON_HTML_BYTES, fetch
from crawlfleet.workers.warc import (
    Exchange,
    PageCapture,
    WarcRef,
    WarcSeries,
    WarcWriter,
    open_warc,
    safe_worker_id,
)
from crawlfleet.workers.worker import worker_session

HOST = "127.0.0.1"
PAGE = b"<!doctype html><html lang=en><title>t</title><a href=/x>x</a>" + b"w" * 2000
BIG = 200 * 1024  # a PDF this large is read only to NON_HTML_BYTES
CAP = 100 * 1024  # max_body_bytes here
WARCIO = str(Path(sys.executable).with_name("warcio"))
NOISE = random.Random(7).randbytes(6000)  # incompressible: sizes on disk as on the wire
NAME = re.compile(r"crawlfleet-\d{14}-(?P<worker>[A-Za-z0-9_.-]+)-(?P<seq>\d{5})\.warc\.gz")


def _app() -> web.Application:
    async def page(request: web.Request) -> web.Response:
        return web.Response(body=PAGE, content_type="text/html")

    async def gzipped(request: web.Request) -> web.Response:
        body = gzip.compress(PAGE)
        return web.Response(body=body, headers={"Content-Type": "text/html",
                                                "Content-Encoding": "gzip"})

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(PAGE), 500):
            await response.write(PAGE[i:i + 500])
        await response.write_eof()
        return response

    async def pdf(request: web.Request) -> web.Response:
        return web.Response(body=b"%PDF-" + bytes(BIG), content_type="application/pdf")

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"<html>" + b"x" * (CAP * 2), content_type="text/html")

    async def hop(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        target = "/page" if n >= 2 else f"/hop/{n + 1}"
        return web.Response(status=301 if n == 1 else 302, text="moved",
                            headers={"Location": target})

    app = web.Application()
    for path, handler in (("/page", page), ("/gzip", gzipped), ("/chunked", chunked),
                          ("/doc.pdf", pdf), ("/huge", huge)):
        app.router.add_get(path, handler)
    app.router.add_get("/hop/{n}", hop)
    return app


@pytest.fixture
async def base() -> AsyncIterator[str]:
    runner = web.AppRunner(_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    try:
        yield f"http://{HOST}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with worker_session(Settings(allow_private=True, worker_id="t")) as s:
        yield s


async def captured(session: aiohttp.ClientSession, url: str, depth: int = 0) -> PageCapture:
    exchanges: list[Exchange] = []
    fetched = await fetch(session, url, max_body_bytes=CAP, allow_private=True, deadline=5.0,
                          capture=exchanges)
    return PageCapture(url, depth, exchanges, fetched.elapsed_ms, 1, fetched.redirects)


def series(tmp_path: Path, max_bytes: int = 10**9, worker: str = "w1") -> WarcSeries:
    return WarcSeries(tmp_path / "warc", worker, max_bytes, {"software": "test"})


def records(path: Path, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """The records from ``offset`` on, read by warcio, with their digests checked."""
    out = []
    with path.open("rb") as fh:
        fh.seek(offset)
        for record in ArchiveIterator(fh, check_digests=True):
            content = record.content_stream().read()
            out.append({"type": record.rec_type, "warc": dict(record.rec_headers.headers),
                        "http": list(record.http_headers.headers) if record.http_headers else [],
                        "status": record.http_headers.statusline if record.http_headers else "",
                        "content": content, "digest_ok": record.digest_checker.passed})
            if limit is not None and len(out) >= limit:
                break
    return out


def record_at(tmp_path: Path, ref: WarcRef) -> dict[str, Any]:
    return records(tmp_path / ref.file, ref.offset, limit=1)[0]


def warcio_check(path: Path) -> str:
    done = subprocess.run([WARCIO, "check", "-v", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


async def test_a_page_is_response_request_and_metadata_at_its_offset(
    base: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    s = series(tmp_path)
    first = s.append(await captured(session, f"{base}/page"))
    ref = s.append(await captured(session, f"{base}/page", depth=3))
    assert first is not None and ref is not None and ref.offset > first.offset
    # While written, the file has the .open suffix; its name in results is the final one.
    assert not (tmp_path / ref.file).exists()
    assert (tmp_path / f"{ref.file}.open").exists()
    s.close()
    path = tmp_path / ref.file
    assert path.exists() and not list(path.parent.glob("*.open"))
    assert NAME.fullmatch(path.name)

    response, request, meta = records(path, ref.offset, limit=3)
    assert response["type"] == "response" and response["digest_ok"]
    assert response["warc"]["WARC-Target-URI"] == f"{base}/page"
    assert response["content"] == PAGE
    assert response["status"] == "200 OK"
    assert "WARC-Truncated" not in response["warc"]
    # The request as aiohttp sent it, linked to its response.
    assert request["type"] == "request"
    assert request["warc"]["WARC-Concurrent-To"] == response["warc"]["WARC-Record-ID"]
    assert request["status"] == "/page HTTP/1.1"  # warcio keeps the method apart
    sent = dict(request["http"])
    assert sent["User-Agent"] == Settings().user_agent and sent["Host"].startswith(HOST)
    assert meta["type"] == "metadata"
    assert meta["warc"]["WARC-Concurrent-To"] == response["warc"]["WARC-Record-ID"]
    assert b"depth: 3\r\n" in meta["content"] and b"worker: w1\r\n" in meta["content"]
    # A gzip member each: the length given is the record's.
    with path.open("rb") as fh:
        fh.seek(ref.offset)
        member = fh.read(ref.length)
    assert gzip.decompress(member).startswith(b"WARC/1.1\r\nWARC-Type: response\r\n")

    info = records(path, limit=1)[0]
    assert info["type"] == "warcinfo" and b"software: test" in info["content"]
    assert info["warc"]["WARC-Filename"] == path.name
    assert response["warc"]["WARC-Warcinfo-ID"] == info["warc"]["WARC-Record-ID"]
    assert "digest pass" in warcio_check(path)


async def test_decoded_bodies_rename_the_wire_headers(
    base: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    s = series(tmp_path)
    refs = {p: s.append(await captured(session, f"{base}{p}")) for p in ("/gzip", "/chunked")}
    s.close()
    gz = refs["/gzip"]
    assert gz is not None
    record = record_at(tmp_path, gz)
    headers = dict(record["http"])
    assert record["content"] == PAGE and record["digest_ok"]
    assert headers["X-Crawler-Content-Encoding"] == "gzip"
    assert int(headers["X-Crawler-Content-Length"]) == len(gzip.compress(PAGE))
    assert headers["Content-Length"] == str(len(PAGE))
    assert "Content-Encoding" not in headers
    # aiohttp asked for compression: the request record says so.
    chunked = refs["/chunked"]
    assert chunked is not None
    record = record_at(tmp_path, chunked)
    headers = dict(record["http"])
    assert record["content"] == PAGE
    assert headers["X-Crawler-Transfer-Encoding"] == "chunked"
    assert headers["Content-Length"] == str(len(PAGE)) and "Transfer-Encoding" not in headers
    warcio_check(tmp_path / gz.file)


async def test_cut_bodies_are_marked_truncated(
    base: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    s = series(tmp_path)
    pdf = s.append(await captured(session, f"{base}/doc.pdf"))
    huge = s.append(await captured(session, f"{base}/huge"))  # too_large: headers only
    s.close()
    assert pdf is not None and huge is not None
    record = record_at(tmp_path, pdf)
    assert record["warc"]["WARC-Truncated"] == "length"
    assert len(record["content"]) == NON_HTML_BYTES
    assert dict(record["http"])["Content-Length"] == str(BIG + 5)  # what the server declared
    record = record_at(tmp_path, huge)
    assert record["warc"]["WARC-Truncated"] == "length" and record["content"] == b""
    warcio_check(tmp_path / pdf.file)


async def test_every_redirect_hop_is_archived(
    base: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    s = series(tmp_path)
    page = await captured(session, f"{base}/hop/1")
    ref = s.append(page)
    s.close()
    assert ref is not None and len(page.exchanges) == 3
    path = tmp_path / ref.file
    got = records(path)[1:]  # after the warcinfo
    assert [r["type"] for r in got] == ["response", "request"] * 3 + ["metadata"]
    assert [r["status"] for r in got if r["type"] == "response"] == [
        "301 Moved Permanently", "302 Found", "200 OK"]
    assert [r["warc"]["WARC-Target-URI"] for r in got if r["type"] == "response"] == [
        f"{base}/hop/1", f"{base}/hop/2", f"{base}/page"]
    assert got[0]["content"] == b"moved"
    # The result points at the final response, the one whose body was parsed.
    final = record_at(tmp_path, ref)
    assert final["warc"]["WARC-Target-URI"] == f"{base}/page" and final["content"] == PAGE
    meta = got[-1]["content"].decode()
    assert f"requested: {base}/hop/1\r\n" in meta
    assert f"redirect: {base}/hop/2\r\nredirect: {base}/page\r\n" in meta


def _exchange(body: bytes | None, **changes: Any) -> Exchange:
    fields: dict[str, Any] = {
        "url": "http://a.test/p", "sent_at": time.time(), "method": "GET", "target": "/p",
        "version": "HTTP/1.1", "status": 200, "reason": "OK",
        "request_headers": [("Host", "a.test"), ("Proxy-Authorization", "Basic c2VjcmV0")],
        "raw_headers": ((b"Content-Type", b"text/html"),), "body": body}
    return Exchange(**(fields | changes))


def test_proxy_credentials_never_reach_the_archive(tmp_path: Path) -> None:
    s = series(tmp_path)
    ref = s.append(PageCapture("http://a.test/p", 0, [_exchange(PAGE)]))
    s.close()
    assert ref is not None
    data = b"".join(r["content"] + str(r["http"]).encode() for r in records(tmp_path / ref.file))
    assert b"Proxy-Authorization" not in data and b"c2VjcmV0" not in data


def test_a_hostile_status_line_and_headers_are_archived_escaped(tmp_path: Path) -> None:
    s = series(tmp_path)
    odd = _exchange(PAGE, reason="Ökay", raw_headers=((b"X-\xff", b"caf\xe9"),
                                                      (b"Content-Type", b"text/html")))
    ref = s.append(PageCapture("http://a.test/p", 0, [odd]))
    s.close()
    assert ref is not None
    record = record_at(tmp_path, ref)
    assert record["content"] == PAGE and record["digest_ok"]
    assert record["status"].startswith("200 ") and record["status"].isascii()
    assert dict(record["http"])["X-\\xff"]  # the value percent-encoded by warcio
    warcio_check(tmp_path / ref.file)


def test_nothing_read_whole_is_nothing_archived(tmp_path: Path) -> None:
    s = series(tmp_path)
    assert s.append(PageCapture("http://a.test/p", 0, [_exchange(None)])) is None
    assert s.file is None  # no file opened for nothing
    # A hop archived, its final response never read: archived, but no record for the result.
    hop = _exchange(b"", status=301, raw_headers=((b"Location", b"/q"),))
    assert s.append(PageCapture("http://a.test/p", 0, [hop, _exchange(None)])) is None
    s.close()
    (path,) = (tmp_path / "warc").iterdir()
    assert [r["type"] for r in records(path)] == ["warcinfo", "response", "request", "metadata"]


def test_files_rotate_by_size_with_names_in_sequence(tmp_path: Path) -> None:
    s = series(tmp_path, max_bytes=20_000, worker="host/1:worker é")
    refs = [s.append(PageCapture("http://a.test/p", 0, [_exchange(NOISE)]))
            for _ in range(30)]
    s.close()
    files = sorted((tmp_path / "warc").iterdir())
    assert len(files) > 2 and not [f for f in files if f.suffix == ".open"]
    seqs = []
    for path in files:
        match = NAME.fullmatch(path.name)
        assert match and match["worker"] == "host_1_worker__"
        seqs.append(int(match["seq"]))
        got = records(path)
        assert got[0]["type"] == "warcinfo" and all(r["digest_ok"] is not False for r in got)
        # Rotated once past the limit: by at most one page.
        assert path.stat().st_size < 20_000 + 7_000
    assert seqs == list(range(len(files)))
    for ref in refs:
        assert ref is not None
        assert record_at(tmp_path, ref)["type"] == "response"
    assert {ref.file for ref in refs if ref} == {f"warc/{f.name}" for f in files}


def test_a_name_taken_by_an_earlier_run_is_skipped(tmp_path: Path) -> None:
    first = series(tmp_path)
    first.append(PageCapture("http://a.test/p", 0, [_exchange(PAGE)]))
    second = series(tmp_path)  # same worker id, same second, a new process
    ref = second.append(PageCapture("http://a.test/p", 0, [_exchange(PAGE)]))
    first.close()
    second.close()
    assert ref is not None and len(list((tmp_path / "warc").iterdir())) == 2
    assert record_at(tmp_path, ref)["content"] == PAGE


def test_worker_ids_become_safe_names() -> None:
    assert safe_worker_id("pod-7.a_b") == "pod-7.a_b"
    assert safe_worker_id("../../etc") == ".._.._etc"
    assert safe_worker_id("") == "worker"
    assert len(safe_worker_id("x" * 500)) == 64


def test_off_means_no_writer() -> None:
    assert open_warc(Settings()) is None


async def test_a_failed_write_is_undone_logged_and_the_next_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(output=str(tmp_path), warc=True, worker_id="w1")
    page = PageCapture("http://a.test/p", 0, [_exchange(PAGE)])
    real_write = warc._write_all

    def disk_full(handle: Any, data: bytes) -> None:
        real_write(handle, data[: len(data) // 2])  # half of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with structlog.testing.capture_logs() as logs:
        writer = WarcWriter(settings)
        good = await writer.write(page)
        monkeypatch.setattr(warc, "_write_all", disk_full)
        assert await writer.write(page) is None
        assert await writer.write(page) is None  # the same reason again: counted, not logged
        monkeypatch.setattr(warc, "_write_all", real_write)
        after = await writer.write(page)
        await writer.close()
    failures = [e for e in logs if e["event"] == "warc_write_failed"]
    assert len(failures) == 1 and "No space left" in failures[0]["reason"]
    assert failures[0]["log_level"] == "error"
    assert good is not None and after is not None and after.file == good.file
    # The half-written records were cut away: the file reads through, the last page included.
    path = tmp_path / after.file
    assert [r["type"] for r in records(path)].count("response") == 2
    assert record_at(tmp_path, after)["content"] == PAGE
    warcio_check(path)


async def test_an_output_that_cannot_be_written_fails_pages_not_the_worker(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the output directory should be")
    with structlog.testing.capture_logs() as logs:
        writer = WarcWriter(Settings(output=str(blocker), warc=True, worker_id="w1"))
        page = PageCapture("http://a.test/p", 0, [_exchange(PAGE)])
        assert await writer.write(page) is None
        await writer.close()
    assert [e["event"] for e in logs] == ["warc_write_failed"]


async def test_s3_output_spools_locally_and_uploads_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool-and-upload path, with the local store standing in for the bucket."""
    bucket = tmp_path / "bucket"
    opened: list[str] = []

    def fake_open_store(output: str) -> storage.Store:
        opened.append(output)
        return storage.LocalStore(str(bucket))

    monkeypatch.setattr(storage, "open_store", fake_open_store)
    writer = WarcWriter(Settings(output="s3://bucket/crawl", warc=True, worker_id="w1",
                                 warc_max_bytes=8_000))
    spool = writer.series.directory
    refs = [await writer.write(PageCapture("http://a.test/p", 0, [_exchange(NOISE)]))
            for _ in range(4)]
    await writer.close()
    assert opened == ["s3://bucket/crawl"]
    assert not spool.exists()  # every file uploaded, then the spool removed
    uploaded = sorted(p.name for p in (bucket / "warc").iterdir())
    assert len(uploaded) >= 2 and all(NAME.fullmatch(n) for n in uploaded)
    for ref in refs:
        assert ref is not None and ref.file.removeprefix("warc/") in uploaded
        assert record_at(bucket, ref)["content"] == NOISE
