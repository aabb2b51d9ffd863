"""``crawl --out FILE``: the results log appended to a file as the crawl goes, resumable.

After each append the file is flushed and fsynced, then Redis records how far it got (the last
log id written and the file's size then, in ``{ns}:out:files``). A crawl that stops anywhere
and is run again truncates the file back to the recorded size (dropping a half-written tail)
and goes on after the recorded id, so each result is in the file once. A file that exists
without such a record belongs to something else: it is refused unless ``--overwrite``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from crawlfleet.common.connections import as_text
from crawlfleet.common.keys import Keys
from crawlfleet.common.resultlog import log_page

from .commands import UsageError

APPEND_PAGE = 5000


def file_key(path: str) -> str:
    """The field of ``{ns}:out:files`` that records how far the file ``path`` got."""
    return "-" if path == "-" else os.path.realpath(path)


class ResultsFile:
    def __init__(self, redis: Any, keys: Keys, path: str, *,
                 on_line: Callable[[bytes], None] | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.path = path
        self.on_line = on_line
        self.handle: IO[bytes] | None = None
        self.after: str | None = None  # the last log id in the file
        self.written = 0  # results written by this run
        self.resumed_at = 0  # results already in the file when this run began
        self.field = file_key(path)

    async def open(self, *, overwrite: bool) -> None:
        """Pick up where a previous run of this crawl left the file, or start it; refuse to
        clobber a file this crawl did not write unless ``overwrite``."""
        if self.path == "-":
            self.handle = sys.stdout.buffer
            return
        record = await self.redis.hget(self.keys.out_files, self.field)
        self.handle, self.after, self.resumed_at = _prepare(
            self.path, as_text(record) if record is not None else None, overwrite=overwrite,
            on_line=self.on_line)
        if self.after is None and self.resumed_at == 0:
            await self.redis.hset(self.keys.out_files, self.field, "|0")

    async def pump(self) -> int:
        """Append what the log holds past the file's end; the results appended."""
        assert self.handle is not None
        appended = 0
        while True:
            entries = await log_page(self.redis, self.keys, after=self.after,
                                     count=APPEND_PAGE)
            if not entries:
                return appended
            chunk = []
            for _, _, data in entries:
                chunk.append(data + b"\n")
                if self.on_line is not None:
                    self.on_line(data)
            last = entries[-1][0]
            _append(self.handle, b"".join(chunk), durable=self.path != "-")
            if self.path != "-":
                await self.redis.hset(self.keys.out_files, self.field,
                                      f"{last}|{self.handle.tell()}")
            self.after = last
            appended += len(chunk)
            self.written += len(chunk)

    def close(self) -> None:
        if self.handle is not None and self.path != "-":
            self.handle.close()
        self.handle = None


def _prepare(path: str, record: str | None, *, overwrite: bool,
             on_line: Callable[[bytes], None] | None) -> tuple[IO[bytes], str | None, int]:
    """The open file, the last log id in it and the results it holds (each shown to
    ``on_line``, so a resumed crawl's tally covers the whole crawl): a recorded file is cut
    back to the size recorded after its last complete append."""
    target = Path(path)
    if target.exists() and not target.is_file():
        raise UsageError(f"cannot write {path}: not a regular file")
    size = target.stat().st_size if target.exists() else None
    if overwrite or size is None:
        record = None
    elif record is None:
        raise UsageError(
            f"{path} exists and is not this crawl's: pass --overwrite to replace it, or choose "
            "another --out")
    last, recorded = (record.partition("|")[::2]) if record is not None else ("", "0")
    if size is not None and record is not None and size < int(recorded):
        raise UsageError(
            f"{path} has {size} bytes but this crawl had written {recorded}: it was changed "
            "since; pass --overwrite to write it again from the start")
    try:
        if record is None:
            return open(target, "wb"), None, 0
        handle = open(target, "r+b")  # noqa: SIM115 - ResultsFile.close
        handle.truncate(int(recorded))
        handle.seek(0)
        lines = 0
        for line in handle:
            lines += 1
            if on_line is not None:
                on_line(line.rstrip(b"\n"))
        handle.seek(0, os.SEEK_END)
        return handle, last or None, lines
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def _append(handle: IO[bytes], data: bytes, *, durable: bool) -> None:
    handle.write(data)
    handle.flush()
    if durable:
        os.fsync(handle.fileno())
