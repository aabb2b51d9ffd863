"""Where a crawl's output lives (``CRAWLFLEET_OUTPUT``): a local directory or an S3 bucket.

Both stores hold objects under relative names (``results/part-00001.jsonl``) and keep the same
promises: ``put`` creates or replaces an object atomically and durably, so a reader sees the old
bytes or the new ones and never a part, and re-writing identical bytes is harmless; ``list``
never shows a write in progress; ``open_lines`` streams, whatever the size. boto3 is
synchronous, so every S3 call runs in a thread, on one client per store made on first use
(common/s3store.py). Any failure is a :class:`StorageError`: one line naming the object and
what failed, never a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar
from urllib.parse import urlsplit

from .settings import redact_url, shorten

T = TypeVar("T")
TEMP_PREFIX = ".tmp-"  # a write in progress (or a crashed writer's leftover): never listed
READ_CHUNK = 1 << 20  # open_lines reads this much at a time: its memory bound, long lines aside


class StorageError(Exception):
    """A store operation failed; the message names where and what, never a credential."""


class InvalidName(StorageError, ValueError):
    """An object name that could escape the store or hide among temp files."""


class Store(Protocol):
    where: str  # for messages: "/abs/dir" or "s3://bucket/prefix", never a credential

    async def put(self, name: str, data: bytes) -> None: ...
    async def put_file(self, name: str, path: str | os.PathLike[str]) -> None: ...
    async def exists(self, name: str) -> bool: ...
    async def list(self, prefix: str) -> list[str]: ...
    def open_lines(self, name: str) -> AsyncIterator[bytes]: ...
    async def delete(self, name: str) -> None: ...
    async def size(self, name: str) -> int | None: ...
    def local_path(self, name: str) -> Path | None: ...


def open_store(output: str) -> Store:
    """The store ``output`` names: ``s3://bucket[/prefix]`` or a directory (made on first
    write)."""
    if "://" not in output:
        return LocalStore(output)
    parts = urlsplit(output)
    if parts.scheme.lower() != "s3" or parts.query or parts.fragment:
        raise StorageError(f"unsupported output {shorten(redact_url(output))!r}: "
                           "must be a directory or s3://bucket[/prefix]")
    if "@" in parts.netloc:  # keys in the URL would end up in logs and process listings
        raise StorageError(f"output {shorten(redact_url(output))!r} carries credentials: set "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket or not all(c.isascii() and (c.isalnum() or c in ".-_") for c in bucket):
        raise StorageError(f"output {shorten(output)!r} names no valid bucket")
    if prefix:
        check_name(prefix)
    from .s3store import S3Store  # boto3 is imported only by crawls that write to S3

    return S3Store(bucket, prefix)


def check_name(name: str) -> str:
    """``name`` if it is a relative object name that stays inside the store, else InvalidName:
    no absolute path, ``.``/``..``/empty segment, backslash, control character (NUL included),
    or segment that looks like a temp file."""
    segments = name.split("/")
    if (not name or "\\" in name or any(ord(c) < 32 or ord(c) == 127 for c in name)
            or any(s in ("", ".", "..") or s.startswith(TEMP_PREFIX) for s in segments)):
        raise InvalidName(f"bad object name {shorten(name)!r}: must be a relative path without "
                          "'.' or '..' segments, backslashes or control characters")
    return name


def check_prefix(prefix: str) -> str:
    """A list() prefix: the start of a valid name ("", "results/", "results/part-")."""
    check_name(prefix + "x")
    return prefix


def is_valid_name(name: str) -> bool:
    try:
        check_name(name)
    except InvalidName:
        return False
    return True


async def split_lines(read: Callable[[], Awaitable[bytes]]) -> AsyncIterator[bytes]:
    """Lines of a stream read chunk by chunk, split on b"\\n" only (not on \\r, as
    ``bytes.splitlines`` and botocore's ``iter_lines`` do); a last line without b"\\n" too."""
    parts: list[bytes] = []
    while chunk := await read():
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            parts.append(chunk[start:end])
            yield b"".join(parts)
            parts.clear()
            start = end + 1
        if start < len(chunk):
            parts.append(chunk[start:])
    if parts:
        yield b"".join(parts)


class LocalStore:
    """Objects as files under a directory; a write goes to a temp file in the same directory,
    fsynced, renamed over the name, and the directory fsynced (the rename is the commit)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.where = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({self.where!r})"

    def local_path(self, name: str) -> Path:
        return self.root / check_name(name)

    async def put(self, name: str, data: bytes) -> None:
        path = self.local_path(name)
        await self._run("write", path, _write_atomically, path, lambda out: out.write(data))

    async def put_file(self, name: str, path: str | os.PathLike[str]) -> None:
        target = self.local_path(name)
        await self._run("write", target, _copy_atomically, Path(path), target)

    async def exists(self, name: str) -> bool:
        return await self.size(name) is not None

    async def size(self, name: str) -> int | None:
        path = self.local_path(name)
        return await self._run("stat", path, _file_size, path)

    async def delete(self, name: str) -> None:
        path = self.local_path(name)
        await self._run("delete", path, path.unlink, True)

    async def list(self, prefix: str) -> list[str]:
        return await self._run("list", self.root, _list_files, self.root, check_prefix(prefix))

    async def open_lines(self, name: str) -> AsyncGenerator[bytes, None]:
        path = self.local_path(name)
        stream = await self._run("read", path, _open_binary, path)
        try:
            async for line in split_lines(lambda: self._run("read", path, stream.read,
                                                             READ_CHUNK)):
                yield line
        finally:
            stream.close()

    async def _run(self, action: str, path: Path, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise StorageError(f"cannot {action} {path}: {exc}") from exc


def _list_files(root: Path, prefix: str) -> list[str]:
    base = root / prefix.rpartition("/")[0]
    if not base.is_dir():
        return []
    names = []
    for folder, dirs, files in os.walk(base, onerror=_raise):
        rel = Path(folder).relative_to(root).as_posix()
        rel = "" if rel == "." else rel + "/"
        # Only descend where names can still start with the prefix.
        dirs[:] = [d for d in dirs if (rel + d + "/").startswith(prefix)
                   or prefix.startswith(rel + d + "/")]
        names += [rel + f for f in files if (rel + f).startswith(prefix) and is_valid_name(rel + f)]
    return sorted(names)


def _raise(exc: OSError) -> None:
    raise exc


def _open_binary(path: Path) -> BinaryIO:
    return path.open("rb")


def _file_size(path: Path) -> int | None:
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _copy_atomically(source: Path, target: Path) -> None:
    with source.open("rb") as src:  # opened first: a missing source fails before any write
        _write_atomically(target, lambda out: shutil.copyfileobj(src, out, READ_CHUNK))


def _write_atomically(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    made = _make_dirs(path.parent)
    temp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    # os.open rather than mkstemp: the file gets the usual 0666 & ~umask, not 0600.
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    for folder in [path.parent, *(d.parent for d in made)]:
        _fsync_dir(folder)


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` with its parents; the ones created, whose entries need an fsync."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    if missing:
        missing[0].mkdir(parents=True, exist_ok=True)
    return missing


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
