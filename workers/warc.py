"""CRAWLFLEET_WARC: what a worker fetched, as gzip WARC 1.1 files (warcio), rotated by size.

Per fetch, for every HTTP response received (each redirect hop included) a ``response`` record
and the ``request`` that got it, linked by WARC-Concurrent-To; then one ``metadata`` record
(depth, outlinks, fetch time, worker, the redirect chain) for the final response. A
``warcinfo`` record opens each file.

One file series per worker process, ``crawlfleet-{UTC time}-{worker}-{seq:05d}.warc.gz``, under
``{output}/warc/``. A file is written as ``NAME.open`` and renamed on close (Heritrix's
convention): when it passes ``CRAWLFLEET_WARC_MAX_BYTES`` and when the worker stops. With an
``s3://`` output it is written in a local spool directory and uploaded on close.

aiohttp hands over bodies with Content-Encoding and chunking undone. Such a record keeps the
decoded body and renames the headers that no longer describe it (``X-Crawler-Content-Encoding``
...), as StormCrawler and others do, so that its HTTP headers, payload and digests agree.

All file work, compression included, runs on one thread per writer (records stay in order and
the event loop is free). A page's records are one write at a known offset, done before its
result leaves the worker; a write that fails is undone (truncated away), logged as
``warc_write_failed``, and the page goes on without WARC fields. No WARC error stops a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from io import BytesIO, FileIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warcio.statusandheaders import StatusAndHeaders, StatusAndHeadersParser
from warcio.timeutils import datetime_to_iso_date
from warcio.warcwriter import WARCWriter

from crawlfleet.common.logs import get_logger
from crawlfleet.common.settings import Settings

if TYPE_CHECKING:
    import aiohttp

    from crawlfleet.common.storage import Store

WARC_DIR = "warc"  # the files' folder in the output, and the prefix of their names in results
# Content-Encodings aiohttp decodes before crawlfleet sees the body (aiohttp's http_parser).
DECODED_ENCODINGS = frozenset({"gzip", "deflate", "br", "zstd"})
RENAMED_PREFIX = "X-Crawler-"
# Never archived: a proxy's credentials (aiohttp puts them on the request it sends).
SECRET_REQUEST_HEADERS = frozenset({"proxy-authorization"})
FAILURE_LOG_EVERY_S = 60.0  # a disk that stays full logs one line a minute, not one a page
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")

log = get_logger("crawlfleet.worker")


@dataclass(slots=True)
class Exchange:
    """One request as sent and the response it got, as fetch.py saw them (CRAWLFLEET_WARC)."""

    url: str  # the URL requested: the records' WARC-Target-URI
    sent_at: float  # time.time() when the request went out: the records' WARC-Date
    method: str
    target: str  # the request-target as sent (path and query)
    version: str  # "HTTP/1.1"
    request_headers: list[tuple[str, str]]
    status: int
    reason: str
    raw_headers: tuple[tuple[bytes, bytes], ...]  # the response's, as received
    body: bytes | None = None  # None: never read whole (the fetch failed): not archived
    truncated: bool = False  # cut at the byte cap (or never read, past it): WARC-Truncated

    @classmethod
    def of(cls, response: aiohttp.ClientResponse, url: str, sent_at: float) -> Exchange:
        info = response.request_info
        v = response.version
        return cls(
            url=url, sent_at=sent_at, method=info.method, target=info.url.raw_path_qs or "/",
            version=f"HTTP/{v.major}.{v.minor}" if v else "HTTP/1.1",
            request_headers=list(info.headers.items()), status=response.status,
            reason=response.reason or "", raw_headers=response.raw_headers,
        )


@dataclass(frozen=True, slots=True)
class PageCapture:
    """What the WARC writer needs of one fetched page."""

    url: str  # as queued (the first request's URL)
    depth: int
    exchanges: list[Exchange]
    elapsed_ms: float = 0.0
    outlinks: int = 0
    redirects: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WarcRef:
    """Where a page's final response record is: file (its name in the output), offset, length
    (of the record's gzip member)."""

    file: str
    offset: int
    length: int


def safe_worker_id(worker_id: str) -> str:
    return _UNSAFE_NAME.sub("_", worker_id)[:64] or "worker"


def archived_headers(exchange: Exchange) -> list[tuple[str, str]]:
    """The response headers as stored: when aiohttp undid the Content-Encoding or the chunking,
    the headers describing the wire form are renamed with ``X-Crawler-`` and a Content-Length
    of the stored body is added (unless it was truncated: then WARC-Truncated says so)."""
    headers = [(_ascii(k), v.decode("latin-1")) for k, v in exchange.raw_headers]
    lower = [k.lower() for k, _ in headers]
    # aiohttp reads the first Content-Encoding, lower-cased (and decodes only those it knows).
    encoding = next((v for low, (_, v) in zip(lower, headers, strict=True)
                     if low == "content-encoding"), "")
    renamed = {"transfer-encoding"} if "transfer-encoding" in lower else set()
    if encoding.lower() in DECODED_ENCODINGS:
        renamed |= {"content-encoding", "content-length"}
    if not renamed:
        return headers
    stored = [(RENAMED_PREFIX + k if low in renamed else k, v)
              for low, (k, v) in zip(lower, headers, strict=True)]
    if not exchange.truncated and exchange.body is not None:
        stored.append(("Content-Length", str(len(exchange.body))))
    return stored


def _ascii(data: bytes) -> str:
    """Header names and the reason phrase go out as ASCII (warcio escapes only values): a
    hostile server's other bytes are escaped (``\\xff``) rather than failing the record."""
    return data.decode("ascii", "backslashreplace")


def _warc_date(ts: float) -> str:
    return str(datetime_to_iso_date(datetime.fromtimestamp(ts, UTC).replace(tzinfo=None),
                                    use_micros=True))


def _software() -> str:
    try:
        return f"crawlfleet/{metadata.version('crawlfleet')} warcio/{metadata.version('warcio')}"
    except metadata.PackageNotFoundError:
        return "crawlfleet"


class WarcSeries:
    """One worker's WARC files, used from one thread only: open, append pages, rotate, close.

    ``closed`` collects the files closed so far (final paths), for the caller to upload."""

    def __init__(self, directory: Path, worker_id: str, max_bytes: int,
                 info: dict[str, str]) -> None:
        self.directory = directory
        self.worker = safe_worker_id(worker_id)
        self.worker_id = worker_id
        self.max_bytes = max_bytes
        self.info = info
        self.seq = 0
        self.file: FileIO | None = None
        self.name = ""
        self.size = 0
        self.warcinfo_id = ""
        self.closed: list[Path] = []
        self._buffer = BytesIO()
        # One writer, pointed at a reused buffer: a page's records are built, then written
        # to the file in one go at an offset known beforehand.
        self._writer = WARCWriter(self._buffer, gzip=True, warc_version="1.1")

    # -- pages ---------------------------------------------------------------------------
    def append(self, page: PageCapture) -> WarcRef | None:
        """Write the page's records; where its final response record is, if it has one.
        Raises what the file system raises, the file as it was before the call."""
        if not any(e.body is not None for e in page.exchanges):
            return None
        if self.file is None:
            self._open()
        data, final = self._page_bytes(page)
        start = self.size
        try:
            _write_all(self._file(), data)
        except BaseException:
            self._undo(start)
            raise
        self.size += len(data)
        ref = None if final is None else WarcRef(f"{WARC_DIR}/{self.name}",
                                                 start + final[0], final[1])
        if self.size >= self.max_bytes:
            self.close()
        return ref

    def _page_bytes(self, page: PageCapture) -> tuple[bytes, tuple[int, int] | None]:
        buf, writer = self._buffer, self._writer
        buf.seek(0)
        buf.truncate()
        written: tuple[int, int] | None = None
        response_id = ""
        for exchange in page.exchanges:
            if exchange.body is None:
                continue
            start = buf.tell()
            response = self._response(exchange)
            writer.write_record(response)
            written = (start, buf.tell() - start)
            response_id = response.rec_headers.get_header("WARC-Record-ID")
            writer.write_record(self._request(exchange, response_id))
        # The page's own response is the last one; if that one was never read whole, the
        # page's result points at no record (the hops before it are archived all the same).
        final = written if page.exchanges[-1].body is not None else None
        last = next(e for e in reversed(page.exchanges) if e.body is not None)
        writer.write_record(self._metadata(page, last, response_id))
        return buf.getvalue(), final

    def _common(self, record_type: str, exchange: Exchange) -> dict[str, str]:
        # In the usual order: type and id first (warcio would append the type last).
        return {"WARC-Type": record_type, "WARC-Record-ID": StatusAndHeadersParser.make_warc_id(),
                "WARC-Date": _warc_date(exchange.sent_at), "WARC-Warcinfo-ID": self.warcinfo_id}

    def _response(self, exchange: Exchange) -> Any:
        body = exchange.body or b""
        warc_headers = self._common("response", exchange)
        if exchange.truncated:
            warc_headers["WARC-Truncated"] = "length"
        reason = _ascii(exchange.reason.encode("latin-1", "replace"))
        statusline = f"{exchange.status} {reason}".rstrip()
        http = StatusAndHeaders(statusline, archived_headers(exchange), protocol=exchange.version)
        return self._writer.create_warc_record(
            exchange.url, "response", payload=BytesIO(body), length=len(body),
            http_headers=http, warc_headers_dict=warc_headers)

    def _request(self, exchange: Exchange, response_id: str) -> Any:
        headers = [(k, v) for k, v in exchange.request_headers
                   if k.lower() not in SECRET_REQUEST_HEADERS]
        http = StatusAndHeaders(f"{exchange.method} {exchange.target} {exchange.version}",
                                headers, is_http_request=True)
        warc_headers = {**self._common("request", exchange), "WARC-Concurrent-To": response_id}
        return self._writer.create_warc_record(exchange.url, "request", http_headers=http,
                                               warc_headers_dict=warc_headers)

    def _metadata(self, page: PageCapture, last: Exchange, response_id: str) -> Any:
        lines = [f"depth: {page.depth}", f"outlinks: {page.outlinks}",
                 f"fetchTimeMs: {page.elapsed_ms}", f"worker: {self.worker_id}"]
        if page.redirects:
            lines.append(f"requested: {page.url}")
            lines += [f"redirect: {hop}" for hop in page.redirects]
        data = "".join(line.replace("\r", " ").replace("\n", " ") + "\r\n"
                       for line in lines).encode()
        warc_headers = {**self._common("metadata", last), "WARC-Concurrent-To": response_id}
        return self._writer.create_warc_record(
            last.url, "metadata", payload=BytesIO(data), length=len(data),
            warc_content_type="application/warc-fields", warc_headers_dict=warc_headers)

    # -- files ---------------------------------------------------------------------------
    def _file(self) -> FileIO:
        assert self.file is not None
        return self.file

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        while True:  # a name no earlier run of this worker id has taken
            name = f"crawlfleet-{stamp}-{self.worker}-{self.seq:05d}.warc.gz"
            self.seq += 1
            if (self.directory / name).exists():
                continue
            try:
                handle = FileIO(self.directory / f"{name}.open", "x")
            except FileExistsError:
                continue
            break
        buf = self._buffer
        buf.seek(0)
        buf.truncate()
        warcinfo = self._writer.create_warcinfo_record(name, self.info)
        self._writer.write_record(warcinfo)
        try:
            _write_all(handle, buf.getvalue())
        except BaseException:
            handle.close()
            with contextlib.suppress(OSError):
                os.unlink(handle.name)
            raise
        self.file, self.name, self.size = handle, name, len(buf.getvalue())
        self.warcinfo_id = warcinfo.rec_headers.get_header("WARC-Record-ID")

    def _undo(self, start: int) -> None:
        """Cut a failed write away, so the file stays valid; if even that fails, the file is
        left as a crashed one would be (``.open``) and the next page starts a new one."""
        handle = self._file()
        try:
            handle.truncate(start)
            handle.seek(start)
        except OSError:
            self.file = None
            with contextlib.suppress(OSError):
                handle.close()

    def close(self) -> Path | None:
        """Close the current file, if any, under its final name."""
        handle, self.file = self.file, None
        if handle is None:
            return None
        handle.close()
        final = self.directory / self.name
        os.rename(self.directory / f"{self.name}.open", final)
        self.closed.append(final)
        return final


def _write_all(handle: FileIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = handle.write(view)
        view = view[n or 0:]


class WarcWriter:
    """A worker's WARC writer, for the event loop: ``write`` a page, ``close`` at shutdown."""

    def __init__(self, settings: Settings) -> None:
        output = settings.output
        assert output is not None, "CRAWLFLEET_WARC needs CRAWLFLEET_OUTPUT (settings check it)"
        self.store: Store | None = None
        self.spool: Path | None = None
        if output.startswith("s3://"):
            from crawlfleet.common.storage import open_store

            self.store = open_store(output)
            self.spool = Path(tempfile.mkdtemp(prefix="crawlfleet-warc-"))
            directory = self.spool
        else:
            directory = Path(output) / WARC_DIR
        info = {
            "software": _software(),
            "format": "WARC File Format 1.1",
            "conformsTo": "https://iipc.github.io/warc-specifications/specifications/"
                          "warc-format/warc-1.1/",
            "hostname": socket.gethostname(),
            "isPartOf": settings.namespace,
            "robots": "obey",
            "http-header-user-agent": settings.user_agent,
        }
        self.series = WarcSeries(directory, settings.worker_id, settings.warc_max_bytes, info)
        self.log = log.bind(worker_id=settings.worker_id)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warc")
        self._uploads: set[asyncio.Task[None]] = set()
        self._last_failure = (0.0, "")
        self._suppressed = 0

    async def write(self, page: PageCapture) -> WarcRef | None:
        """The page's records written (and in the file system's hands) before this returns;
        None if it has no complete response or the write failed (logged)."""
        loop = asyncio.get_running_loop()
        try:
            ref = await loop.run_in_executor(self._executor, self.series.append, page)
        except Exception as exc:  # disk full, permissions, or a bug: never the worker's end
            self._failed("warc_write_failed", exc)
            ref = None
        self._upload_closed()
        return ref

    async def close(self) -> None:
        """Close the current file (after the writes already queued) and finish uploads."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.series.close)
        except Exception as exc:
            self._failed("warc_close_failed", exc)
        finally:
            self._executor.shutdown(wait=False)
        self._upload_closed()
        if self._uploads:
            await asyncio.gather(*self._uploads, return_exceptions=True)
        if self.spool is not None:
            with contextlib.suppress(OSError):
                self.spool.rmdir()  # left with the files that could not be uploaded

    def _upload_closed(self) -> None:
        """Closed files go to the store (s3); in a local output they are in place already."""
        closed = self.series.closed
        while closed:
            path = closed.pop(0)
            if self.store is not None:
                task = asyncio.get_running_loop().create_task(self._upload(path))
                self._uploads.add(task)
                task.add_done_callback(self._uploads.discard)

    async def _upload(self, path: Path) -> None:
        assert self.store is not None
        name = f"{WARC_DIR}/{path.name}"
        try:
            await self.store.put_file(name, path)
        except Exception as exc:
            self.log.error("warc_upload_failed", file=name, kept=str(path),
                           reason=f"{type(exc).__name__}: {exc}")
            return
        with contextlib.suppress(OSError):
            os.unlink(path)  # one unlink of a local file: not worth a thread
        self.log.info("warc_uploaded", file=name)

    def _failed(self, event: str, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        last_at, last_reason = self._last_failure
        if reason == last_reason and now - last_at < FAILURE_LOG_EVERY_S:
            self._suppressed += 1
            return
        self.log.error(event, reason=reason, suppressed=self._suppressed or None)
        self._last_failure, self._suppressed = (now, reason), 0


def open_warc(settings: Settings) -> WarcWriter | None:
    """The worker's writer when CRAWLFLEET_WARC is on, else None."""
    return WarcWriter(settings) if settings.warc else None


