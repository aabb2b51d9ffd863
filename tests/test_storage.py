"""common/storage.py's local store, name checks and open_store; the S3 store against a real
(moto) server is in tests/integration/test_s3.py."""

from __future__ import annotations

import os
import traceback
import tracemalloc
from contextlib import aclosing
from pathlib import Path

import pytest

from crawlfleet.common import storage
from crawlfleet.common.s3store import S3Store
from crawlfleet.common.storage import InvalidName, LocalStore, StorageError, check_name, open_store


async def lines(store: storage.Store, name: str) -> list[bytes]:
    return [line async for line in store.open_lines(name)]


async def test_put_replace_exists_size_delete(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out" / "deep")  # made on first write, parents too
    assert not await store.exists("a.jsonl") and await store.size("a.jsonl") is None
    assert await store.list("") == []
    await store.put("a.jsonl", b"one\n")
    await store.put("a.jsonl", b"two\nlines\n")  # replaced
    await store.put("a.jsonl", b"two\nlines\n")  # and again, identical: harmless
    assert await store.exists("a.jsonl") and await store.size("a.jsonl") == 10
    assert await lines(store, "a.jsonl") == [b"two", b"lines"]
    assert store.local_path("a.jsonl") == tmp_path / "out" / "deep" / "a.jsonl"
    await store.delete("a.jsonl")
    await store.delete("a.jsonl")  # missing is fine
    assert not await store.exists("a.jsonl") and await store.list("") == []


async def test_list_sorted_by_prefix_nested_without_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for name in ("results/part-2.jsonl", "results/part-10.jsonl", "warc/a/b.warc.gz",
                 "results-x", "results/old/part-1.jsonl", "top"):
        await store.put(name, b"x")
    (tmp_path / "results" / ".tmp-deadbeef").write_bytes(b"a crashed writer's leftover")
    (tmp_path / "results" / "sub").mkdir()  # an empty folder is not an object
    assert await store.list("") == ["results-x", "results/old/part-1.jsonl",
                                    "results/part-10.jsonl", "results/part-2.jsonl", "top",
                                    "warc/a/b.warc.gz"]
    assert await store.list("results/") == ["results/old/part-1.jsonl",
                                            "results/part-10.jsonl", "results/part-2.jsonl"]
    assert await store.list("results/part-") == ["results/part-10.jsonl", "results/part-2.jsonl"]
    assert await store.list("results") == ["results-x", "results/old/part-1.jsonl",
                                           "results/part-10.jsonl", "results/part-2.jsonl"]
    assert await store.list("nothing/here") == []
    assert temp_files(tmp_path) == [tmp_path / "results" / ".tmp-deadbeef"]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-")]


async def test_open_lines_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    body = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 20) for i in range(200_000))
    await store.put("big.jsonl", body)
    path = store.local_path("big.jsonl")
    # Lazily: a line appended after the first one was read still comes out at the end.
    async with aclosing(store.open_lines("big.jsonl")) as stream:
        first = await anext(stream)
        with path.open("ab") as f:
            f.write(b"appended\n")
        rest = [line async for line in stream]
    assert first == b'{"n": 0, "pad": "xxxxxxxxxxxxxxxxxxxx"}'
    assert len(rest) == 200_000 and rest[-1] == b"appended"
    # Memory bounded by the chunk, not the file (~8 MB).
    monkeypatch.setattr(storage, "READ_CHUNK", 64 << 10)
    tracemalloc.start()
    try:
        count = 0
        async for _ in store.open_lines("big.jsonl"):
            count += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 200_001 and peak < len(body) // 8, peak


async def test_open_lines_splits_on_newline_only(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "READ_CHUNK", 3)  # lines span chunks
    store = LocalStore(tmp_path)
    await store.put("x", b"a\rb\r\n\nlong line here\nlast")
    assert await lines(store, "x") == [b"a\rb\r", b"", b"long line here", b"last"]
    await store.put("empty", b"")
    assert await lines(store, "empty") == []
    with pytest.raises(StorageError, match=r"cannot read .*/missing: "):
        await lines(store, "missing")


async def test_put_file(tmp_path: Path) -> None:
    source = tmp_path / "src.warc.gz"
    source.write_bytes(os.urandom(3 << 20))
    store = LocalStore(tmp_path / "out")
    await store.put_file("warc/one.warc.gz", source)
    await store.put_file("warc/one.warc.gz", str(source))  # a re-upload replaces
    assert (tmp_path / "out" / "warc" / "one.warc.gz").read_bytes() == source.read_bytes()
    assert await store.size("warc/one.warc.gz") == 3 << 20
    with pytest.raises(StorageError, match="No such file"):
        await store.put_file("warc/two.warc.gz", tmp_path / "absent")
    assert await store.list("") == ["warc/one.warc.gz"]


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/abs", "a\\b", "a\0b", "", "a//b",
                                  "./a", "a/", "a/.tmp-1", "line\nbreak"])
async def test_hostile_names_refused(tmp_path: Path, name: str) -> None:
    store = LocalStore(tmp_path / "root")
    with pytest.raises(InvalidName):
        await store.put(name, b"x")
    with pytest.raises(ValueError):  # InvalidName is both a StorageError and a ValueError
        store.local_path(name)
    with pytest.raises(StorageError):
        S3Store("bucket")._key(name)
    assert not (tmp_path / "x").exists() and not (tmp_path / "root").exists()


async def test_hostile_prefixes_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for prefix in ("../", "/", "a\\", ".tmp-"):
        with pytest.raises(InvalidName):
            await store.list(prefix)
    assert check_name("results/part-2024-01-01T00:00:00.jsonl")


async def test_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    store = LocalStore(tmp_path / "file")  # the root is a file: nothing can go under it
    with pytest.raises(StorageError, match=f"cannot write {tmp_path}/file/a: "):
        await store.put("a", b"x")


def test_open_store_dispatch(tmp_path: Path) -> None:
    local = open_store(str(tmp_path / "out"))
    assert isinstance(local, LocalStore) and local.where == str(tmp_path / "out")
    assert open_store("relative/dir").where == str(Path.cwd() / "relative" / "dir")
    s3 = open_store("s3://my-bucket/crawls/one/")
    assert isinstance(s3, S3Store) and s3.where == "s3://my-bucket/crawls/one"
    assert s3._key("results/a") == "crawls/one/results/a" and s3.local_path("a") is None
    assert open_store("s3://my-bucket").where == "s3://my-bucket"
    assert open_store("s3://my-bucket")._key("a") == "a"  # type: ignore[attr-defined]
    for bad in ("gs://bucket/x", "s3://", "s3://bucket/../up", "s3://bu cket/x"):
        with pytest.raises(StorageError):
            open_store(bad)
    with pytest.raises(StorageError) as caught:
        open_store("s3://AKIAEXAMPLE:hunter2secret@bucket/x")
    assert "hunter2secret" not in str(caught.value)
    assert repr(s3) == "S3Store('s3://my-bucket/crawls/one')"


class EchoingS3:
    """A client whose server echoes the secret in its error text (or a library's text does)."""

    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

    def _refuse(self, operation: str) -> None:
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": "SignatureDoesNotMatch",
                                     "Message": f"expected secret {self.secret}"},
                           "ResponseMetadata": {"HTTPStatusCode": 403}}, operation)

    def put_object(self, **_: object) -> None:
        self._refuse("PutObject")

    def upload_file(self, *_: object, **__: object) -> None:
        from boto3.exceptions import S3UploadFailedError

        try:
            self._refuse("CreateMultipartUpload")
        except Exception as exc:  # as boto3 does: the ClientError's text in its own
            raise S3UploadFailedError(f"Failed to upload: {exc}")  # noqa: B904


async def test_s3_errors_carry_only_the_code(tmp_path: Path) -> None:
    store = S3Store("bucket", "crawl")
    store._client = EchoingS3()
    source = tmp_path / "f"
    source.write_bytes(b"x")
    for attempt, action in ((store.put("a", b"x"), "write"), (store.put_file("a", source),
                                                              "upload")):
        with pytest.raises(StorageError) as caught:
            await attempt
        assert str(caught.value) == (f"cannot {action} s3://bucket/crawl/a: "
                                     "SignatureDoesNotMatch (HTTP 403)")
        assert caught.value.__context__ is None and caught.value.__cause__ is None
        assert EchoingS3.secret not in "".join(traceback.format_exception(caught.value))


async def test_failed_write_keeps_the_old_object(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    await store.put("a", b"old\n")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def crash(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match=f"cannot write {tmp_path}/a: .*No space left"):
        await store.put("a", b"new\n")
    assert await lines(store, "a") == [b"old"] and temp_files(tmp_path) == []
