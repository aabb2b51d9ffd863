"""The S3 store: objects as keys under ``prefix/`` in an S3-compatible bucket.

boto3 does the talking and reads its own configuration: the endpoint from AWS_ENDPOINT_URL_S3
or AWS_ENDPOINT_URL, credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile,
or an instance role), the region from AWS_DEFAULT_REGION (us-east-1 when none is set). boto3 is
synchronous and its clients are thread-safe, so each call runs in a thread, on one client per
store. An error says which key, what failed and the error's code, nothing more: a server's or a
library's text is never passed on, so no credential can ride along.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncGenerator, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

from . import storage
from .settings import redact_url
from .storage import StorageError, check_name, check_prefix, is_valid_name, split_lines

T = TypeVar("T")
DEFAULT_REGION = "us-east-1"  # when neither the environment nor ~/.aws/config names one
# Uploads from a file go multipart past 8 MiB; 4 parts in flight keep a worker's share of the
# uplink (and its threads) modest while a 1 GB WARC file goes up.
MULTIPART_BYTES = 8 << 20
UPLOAD_CONCURRENCY = 4


class S3Store:
    """Objects as keys under ``prefix/`` in ``bucket``; ``put`` is one put_object (atomic on
    S3), ``put_file`` boto3's managed (multipart) upload."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.where = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.where!r})"

    def local_path(self, name: str) -> Path | None:
        return None

    async def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        await self._call("write", key, lambda s3: s3.put_object(Bucket=self.bucket, Key=key,
                                                                Body=data))

    async def put_file(self, name: str, path: str | os.PathLike[str]) -> None:
        from boto3.s3.transfer import TransferConfig

        key = self._key(name)
        config = TransferConfig(multipart_threshold=MULTIPART_BYTES,
                                multipart_chunksize=MULTIPART_BYTES,
                                max_concurrency=UPLOAD_CONCURRENCY)
        await self._call("upload", key, lambda s3: s3.upload_file(
            os.fspath(path), self.bucket, key, Config=config))

    async def exists(self, name: str) -> bool:
        return await self.size(name) is not None

    async def size(self, name: str) -> int | None:
        key = self._key(name)

        def head(s3: Any) -> int | None:
            try:
                return int(s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
            except Exception as exc:
                if _is_missing(exc):
                    return None
                raise

        return await self._call("stat", key, head)

    async def delete(self, name: str) -> None:
        key = self._key(name)
        await self._call("delete", key, lambda s3: s3.delete_object(Bucket=self.bucket, Key=key))

    async def list(self, prefix: str) -> list[str]:
        start = self._root + check_prefix(prefix)

        def keys(s3: Any) -> list[str]:  # list_objects_v2 pages hold at most 1,000 keys
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start)
            names = (obj["Key"][len(self._root):] for page in pages
                     for obj in page.get("Contents", ()))
            return sorted(n for n in names if is_valid_name(n))  # no "folder/" markers

        return await self._call("list", start, keys)

    async def open_lines(self, name: str) -> AsyncGenerator[bytes, None]:
        key = self._key(name)
        body = (await self._call("read", key, lambda s3: s3.get_object(
            Bucket=self.bucket, Key=key)))["Body"]
        def read(_: Any) -> bytes:
            return bytes(body.read(storage.READ_CHUNK))

        try:
            async for line in split_lines(lambda: self._call("read", key, read)):
                yield line
        finally:
            body.close()

    def _key(self, name: str) -> str:
        return self._root + check_name(name)

    def client(self) -> Any:
        """The store's boto3 client (thread-safe), made on first use, in a worker thread."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                session = boto3.session.Session()
                config = Config(retries={"mode": "standard", "max_attempts": 5},
                                connect_timeout=10, read_timeout=60, max_pool_connections=16)
                # A bad endpoint's ValueError quotes the URL, userinfo and all: not passed on.
                with contextlib.suppress(ValueError):
                    self._client = session.client(
                        "s3", region_name=session.region_name or DEFAULT_REGION, config=config)
            if self._client is None:
                raise StorageError(f"cannot open {self.where}: AWS_ENDPOINT_URL(_S3) is not a "
                                   "valid URL")
            return self._client

    async def _call(self, action: str, key: str, fn: Callable[[Any], T]) -> T:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(lambda: fn(self.client()))
        except (ClientError, BotoCoreError, Boto3Error, OSError) as exc:
            problem = self._describe(exc)
        # Only the error's code, no text a server or a library wrote; raised out here so that
        # the original is not even attached as __context__ for a traceback to show.
        raise StorageError(f"cannot {action} s3://{self.bucket}/{key}: {problem}")

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, OSError):  # a local file's (upload_file's source): no secret there
            return str(exc)
        cause = exc.__context__ if _error_code(exc) is None else exc  # S3UploadFailedError
        code = _error_code(cause) if cause is not None else None
        if code is not None:
            status = getattr(cause, "response", {}).get("ResponseMetadata", {}).get(
                "HTTPStatusCode")
            if code == str(status) and status in HTTPStatus._value2member_map_:
                return f"HTTP {status} {HTTPStatus(status).phrase}"  # a HEAD's: no body, no code
            return f"{code} (HTTP {status})" if status else code
        endpoint = getattr(getattr(self._client, "meta", None), "endpoint_url", None)
        where = f" (endpoint {redact_url(endpoint)})" if isinstance(endpoint, str) else ""
        if type(exc).__name__ == "NoCredentialsError":
            return "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        return type(exc).__name__ + where


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return str(code) if code else None


def _is_missing(exc: BaseException) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound")
