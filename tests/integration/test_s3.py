"""common/storage.py's S3 store against a real S3-compatible server (moto, a subprocess on a
free loopback port): the local store's behaviours, pagination, multipart and redaction."""

from __future__ import annotations

import asyncio
import os
import traceback
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from crawlfleet.common import storage
from crawlfleet.common.s3store import S3Store
from crawlfleet.common.storage import StorageError, open_store

from ..conftest import free_port
from ..moto_server import (  # noqa: F401  (fixtures)
    MotoServer,
    make_bucket,
    moto_factory_fixture,
    moto_server_fixture,
    s3_client,
    s3_objects,
    s3_output_fixture,
    use_s3,
)

pytestmark = pytest.mark.integration


async def test_put_replace_exists_size_delete(s3_output: str) -> None:
    store = open_store(s3_output)
    assert isinstance(store, S3Store) and store.where == s3_output
    assert not await store.exists("results/a.jsonl")
    assert await store.size("results/a.jsonl") is None
    await store.put("results/a.jsonl", b"one\n")
    await store.put("results/a.jsonl", b"two\nlines\n")
    await store.put("results/a.jsonl", b"two\nlines\n")  # identical re-write: harmless
    assert await store.exists("results/a.jsonl") and await store.size("results/a.jsonl") == 10
    assert [line async for line in store.open_lines("results/a.jsonl")] == [b"two", b"lines"]
    assert store.local_path("results/a.jsonl") is None
    await store.delete("results/a.jsonl")
    await store.delete("results/a.jsonl")  # missing is fine
    assert await store.list("") == []
    with pytest.raises(StorageError, match=r"cannot read s3://t-\w+/crawl/absent: NoSuchKey"):
        [line async for line in store.open_lines("absent")]


async def test_list_pages_sorted_under_the_prefix(s3_output: str,
                                                  moto_server: MotoServer) -> None:
    store = open_store(s3_output)
    names = [f"results/part-{i:05d}.jsonl" for i in range(1100)]  # more than a page of 1,000
    gate = asyncio.Semaphore(32)

    async def put(name: str) -> None:
        async with gate:
            await store.put(name, b"{}\n")

    await asyncio.gather(*(put(n) for n in [*names, "warc/a.warc.gz", "results-x"]))
    bucket = s3_output.removeprefix("s3://").partition("/")[0]
    await S3Store(bucket, "crawl2").put("results/elsewhere", b"")  # a sibling prefix
    # A console's "folder" marker, which no valid name can be.
    s3_client(moto_server.endpoint).put_object(Bucket=bucket, Key="crawl/folder/", Body=b"")
    first = s3_client(moto_server.endpoint).list_objects_v2(Bucket=bucket, Prefix="crawl/")
    assert first["IsTruncated"] and first["KeyCount"] == 1000  # so list() had to page
    listed = await store.list("results/")
    assert listed == sorted(names) and len(listed) == 1100
    assert await store.list("results") == ["results-x", *sorted(names)]  # "-" sorts before "/"
    assert await store.list("") == ["results-x", *sorted(names), "warc/a.warc.gz"]
    assert await store.list("results/part-0109") == names[1090:1100]
    assert set(s3_objects(s3_output, moto_server.endpoint)) >= {f"crawl/{n}" for n in names}


async def test_open_lines_streams_a_large_object(s3_output: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(s3_output)
    body = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"y" * 40) for i in range(100_000))
    await store.put("big.jsonl", body + b"no newline at the end")
    monkeypatch.setattr(storage, "READ_CHUNK", 64 << 10)
    tracemalloc.start()
    try:
        count, last = 0, b""
        async for line in store.open_lines("big.jsonl"):
            count, last = count + 1, line
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 100_001 and last == b"no newline at the end"
    assert peak < len(body) // 4, f"{peak} bytes held for a {len(body)}-byte object"


async def test_put_file_multipart(s3_output: str, moto_server: MotoServer,
                                  tmp_path: Path) -> None:
    source = tmp_path / "big.warc.gz"
    source.write_bytes(os.urandom(20 << 20))
    store = open_store(s3_output)
    await store.put_file("warc/big.warc.gz", source)
    assert await store.size("warc/big.warc.gz") == 20 << 20
    head = s3_objects(s3_output, moto_server.endpoint)["crawl/warc/big.warc.gz"]
    assert head["ETag"].endswith('-3"'), head["ETag"]  # three 8 MiB parts
    with pytest.raises(StorageError, match="No such file"):
        await store.put_file("warc/none.warc.gz", tmp_path / "absent")


async def test_endpoint_variable_for_s3_wins(moto_server: MotoServer, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    use_s3(monkeypatch, tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    bucket = make_bucket(moto_server.endpoint)
    store = open_store(f"s3://{bucket}")
    with pytest.raises(StorageError, match=rf"cannot write s3://{bucket}/a: "
                                           r"EndpointConnectionError \(endpoint http://127"):
        await store.put("a", b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint)
    store = open_store(f"s3://{bucket}")
    await store.put("a", b"x")
    assert await store.list("") == ["a"]


async def test_wrong_secret_never_shown(moto_factory: Callable[[], MotoServer], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    server = moto_factory()
    use_s3(monkeypatch, tmp_path, server.endpoint)
    bucket = make_bucket(server.endpoint)
    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
    iam.create_user(UserName="crawler")
    iam.put_user_policy(UserName="crawler", PolicyName="all", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": '
        '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'))
    key = iam.create_access_key(UserName="crawler")["AccessKey"]
    server.require_auth()  # from here on every request is signed and checked
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    await open_store(f"s3://{bucket}/ok").put("a", b"x")  # the right secret works

    wrong = "WRONG" + key["SecretAccessKey"][5:]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    store = open_store(f"s3://{bucket}/ok")
    source = tmp_path / "upload"
    source.write_bytes(b"x" * 100)
    failures: list[StorageError] = []
    for attempt in (lambda: store.put("a", b"x"), lambda: store.list(""),
                    lambda: store.size("a"), lambda: store.put_file("b", source),
                    lambda: anext(aiter(store.open_lines("a")))):
        with pytest.raises(StorageError) as caught:
            await attempt()
        failures.append(caught.value)
    assert str(failures[0]) == f"cannot write s3://{bucket}/ok/a: SignatureDoesNotMatch (HTTP 403)"
    assert str(failures[2]) == f"cannot stat s3://{bucket}/ok/a: HTTP 403 Forbidden"
    assert all("403" in str(exc) for exc in failures), failures
    for exc in failures:
        shown = "".join(traceback.format_exception(exc)) + repr(exc) + repr(store)
        assert wrong not in shown and key["SecretAccessKey"] not in shown, shown
        assert "\n" not in str(exc) and exc.__context__ is None and exc.__cause__ is None
