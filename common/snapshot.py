"""What ``crawlfleet check`` reads: the crawl's real structures in Redis, as a ``Snapshot``.

``collect(redis, keys)`` reads everything (SCAN, SSCAN, HSCAN, ZSCAN, LRANGE and XRANGE in pages,
never KEYS). Memory is O(URLs): one fingerprint per URL. Anything malformed (an entry that is not
a QueuedURL, a result that is not a PageResult, a counter that is not an integer, a key of the
wrong type) is recorded, never raised. ``common/check.py`` compares what was read.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from .keys import HOST_KINDS, HOST_PREFIX, Keys
from .messages import decode_entry, decode_result
from .resultlog import current_crawl, iter_results
from .storage import Store
from .urls import fingerprint

PAGE = 1000  # SCAN/HSCAN/SSCAN/LRANGE/XRANGE page size
_FP = re.compile(r"[0-9a-fA-F]{16}")
_UNESCAPE = {"%25": "%", "%7B": "{", "%7D": "}"}
_DATA_SAMPLE = 120  # characters of a malformed value kept for the report


@dataclass(frozen=True, slots=True)
class Malformed:
    """Something ``collect`` could not read. ``kind`` is one of ``queue``, ``lease``,
    ``result``, ``counter``, ``quarantine``, ``key``."""

    kind: str
    where: str  # the key (and field or index) it was found at
    reason: str
    data: str = ""  # the start of the value


@dataclass(slots=True)
class Snapshot:
    """What ``collect`` read: fingerprints and hosts, not the entries themselves."""

    namespace: str
    stats: dict[str, str] = field(default_factory=dict)  # raw counter values
    seen: set[str] = field(default_factory=set)
    results: dict[str, str] = field(default_factory=dict)  # fp -> pages/skipped/failed/unreadable
    duplicates: list[str] = field(default_factory=list)  # fps whose result was read twice
    dead: set[str] = field(default_factory=set)  # results marked dead (out of retries)
    queues: dict[str, list[str]] = field(default_factory=dict)  # host -> readable entries' fps
    queue_unreadable: dict[str, int] = field(default_factory=dict)  # host -> unreadable entries
    leases: dict[str, list[str]] = field(default_factory=dict)  # host -> lease hash fields (fps)
    fetching: dict[str, set[str]] = field(default_factory=dict)  # host -> fps being fetched
    lease_batch: dict[str, str] = field(default_factory=dict)  # host -> batch id
    leased: dict[str, float] = field(default_factory=dict)  # ZSET leases: host -> expiry
    waiting: dict[str, float] = field(default_factory=dict)  # ZSET waiting: host -> dispatch time
    ready: dict[str, float] = field(default_factory=dict)  # ZSET ready
    quarantine_entries: int = 0
    quarantine_counted: list[str] = field(default_factory=list)  # ids of counted entries
    malformed: list[Malformed] = field(default_factory=list)
    other_keys: list[str] = field(default_factory=list)  # per-host keys of no known kind
    scheduler_running: bool = False  # a scheduler holds the leader lock




def parse_host_key(keys: Keys, key: str) -> tuple[str, str] | None:
    """``(host, kind)`` of a per-host key (``{ns}:h:{<escaped host>}:{kind}``), else None."""
    start = f"{keys.namespace}:{HOST_PREFIX}{{"
    if not key.startswith(start):
        return None
    end = key.find("}:", len(start))  # the escaped host holds no '}'
    if end < 0:
        return None
    escaped, kind = key[len(start):end], key[end + 2:]
    host = re.sub(r"%(?:25|7B|7D)", lambda m: _UNESCAPE[m.group(0)], escaped)
    if keys.host_key(host, kind) != key:  # not in the canonical escaped form
        return None
    return host, kind


def read_result(data: bytes | str) -> tuple[str, str, bool]:
    """(``pages``, ``skipped`` or ``failed``; its URL; dead-lettered?) of a PageResult;
    raises ValueError if unreadable."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        result = decode_result(raw)
    except (msgspec.MsgspecError, ValueError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc
    outcome = ("pages" if result.error is None else
               "skipped" if result.error == "robots" else "failed")
    return outcome, result.url, result.dead



def entry_fp(data: bytes | str) -> str:
    """The fp of a queue/lease entry (QueuedURL, read by name); ValueError if unreadable, by
    the same rules as the Lua scripts' decode_entry."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        entry = decode_entry(raw)
    except (msgspec.MsgspecError, ValueError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc
    if not _FP.fullmatch(entry.fp):
        raise ValueError("bad fp")
    if not entry.url:
        raise ValueError("bad url")
    return entry.fp


def _text(value: bytes | str) -> str:
    """Redis data as text; what is not UTF-8 (a corrupted entry) is shown, not raised."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def sample(data: bytes | str) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text if len(text) <= _DATA_SAMPLE else text[:_DATA_SAMPLE] + "..."


def _wrong_type(snap: Snapshot, key: str, exc: ResponseError) -> None:
    if "WRONGTYPE" not in str(exc):
        raise exc
    snap.malformed.append(Malformed("key", key, "wrong type for its role", str(exc)[:_DATA_SAMPLE]))


async def collect(redis: Any, keys: Keys, *, page: int = PAGE,
                  store: Store | None = None) -> Snapshot:
    """Read the crawl's structures into a Snapshot, in pages (with ``store``, the output's
    result parts too). Not atomic: a running crawl moves
    while it is read (check a finished or stopped crawl). Malformed data is recorded in
    ``Snapshot.malformed``; only connection errors raise."""
    snap = Snapshot(keys.namespace)

    async def guarded(key: str, read: Any) -> None:
        try:
            await read()
        except ResponseError as exc:
            _wrong_type(snap, key, exc)

    async def read_stats() -> None:
        raw = await redis.hgetall(keys.stats)
        snap.stats = {_text(k): _text(v) for k, v in raw.items()}

    async def read_seen_bucket(key: str) -> None:
        async for member in redis.sscan_iter(key, count=page):
            try:
                snap.seen.add(keys.seen_fp(key, int(member)))
            except ValueError:
                snap.malformed.append(Malformed("seen", key, "member is not an integer",
                                                sample(member)))

    async def read_seen() -> None:
        async for key_raw in redis.scan_iter(match=keys.seen_pattern, count=page):
            key = _text(key_raw)
            head = key[len(keys.seen):]
            if not (3 <= len(head) <= 8 and all(c in "0123456789abcdef" for c in head)):
                snap.other_keys.append(key)
                continue
            await guarded(key, lambda k=key: read_seen_bucket(k))

    async def read_results() -> None:
        # The log and, with an output, the parts a sink wrote: each result once, by the same
        # reader as export, so a duplicate here is one in what the user gets.
        async for stored in iter_results(redis, keys, store, await current_crawl(redis, keys)):
            try:
                outcome, url, dead = read_result(stored.data)
            except ValueError as exc:
                fp = stored.fp or f"?{stored.where}#{len(snap.malformed)}"
                snap.results[fp] = "unreadable"
                snap.malformed.append(Malformed("result", f"{keys.results if stored.fp else ''}"
                                                f" {stored.where}".strip(), str(exc),
                                                sample(stored.data)))
                continue
            fp = stored.fp or fingerprint(url)
            if fp in snap.results:
                snap.duplicates.append(fp)
                continue
            snap.results[fp] = outcome
            if dead:
                snap.dead.add(fp)

    async def read_lease_batch() -> None:
        async for host, batch in redis.hscan_iter(keys.lease_batch, count=page):
            snap.lease_batch[_text(host)] = _text(batch)

    def read_zset(key: str, into: dict[str, float]) -> Any:
        async def read() -> None:
            async for member, score in redis.zscan_iter(key, count=page):
                into[_text(member)] = float(score)
        return read

    async def read_quarantine() -> None:
        start = "-"
        while True:
            entries = await redis.xrange(keys.quarantine, min=start, max="+", count=page)
            for entry_id_raw, fields_raw in entries:
                entry_id = _text(entry_id_raw)
                fields = {_text(k): _text(v) for k, v in fields_raw.items()}
                snap.quarantine_entries += 1
                counted = fields.get("counted")
                if counted == "1":
                    snap.quarantine_counted.append(entry_id)
                elif counted != "0":
                    snap.malformed.append(Malformed(
                        "quarantine", f"{keys.quarantine} {entry_id}",
                        "'counted' is neither '1' nor '0'" if counted is not None
                        else "no 'counted' field", sample(repr(fields))))
            if len(entries) < page:
                return
            start = "(" + _text(entries[-1][0])

    async def read_queue(host: str, key: str) -> None:
        fps = snap.queues.setdefault(host, [])
        index = 0
        while True:
            raws = await redis.lrange(key, index, index + page - 1)
            for raw in raws:
                try:
                    fps.append(entry_fp(raw))
                except ValueError as exc:
                    snap.queue_unreadable[host] = snap.queue_unreadable.get(host, 0) + 1
                    snap.malformed.append(Malformed("queue", f"{key} [{index}]", str(exc),
                                                    sample(raw)))
                index += 1
            if len(raws) < page:
                return

    async def read_lease(host: str, key: str) -> None:
        fps = snap.leases.setdefault(host, [])
        async for fp_raw, raw in redis.hscan_iter(key, count=page):
            fp = _text(fp_raw)
            fps.append(fp)
            try:
                inner = entry_fp(raw)
            except ValueError as exc:
                snap.malformed.append(Malformed("lease", f"{key} {fp}", str(exc), sample(raw)))
                continue
            if inner != fp:
                snap.malformed.append(Malformed(
                    "lease", f"{key} {fp}", f"the entry's fp is {inner}", sample(raw)))

    async def read_fetching(host: str, key: str) -> None:
        fps = snap.fetching.setdefault(host, set())
        async for fp in redis.sscan_iter(key, count=page):
            fps.add(_text(fp))

    await guarded(keys.stats, read_stats)
    await read_seen()
    await guarded(keys.results, read_results)
    await guarded(keys.lease_batch, read_lease_batch)
    await guarded(keys.leases, read_zset(keys.leases, snap.leased))
    await guarded(keys.waiting, read_zset(keys.waiting, snap.waiting))
    await guarded(keys.ready, read_zset(keys.ready, snap.ready))
    await guarded(keys.quarantine, read_quarantine)
    with contextlib.suppress(ResponseError):
        snap.scheduler_running = bool(await redis.exists(keys.scheduler_lock))

    readers = {"q": read_queue, "lease": read_lease, "fetching": read_fetching}
    assert set(readers) == set(HOST_KINDS)
    async for key_raw in redis.scan_iter(match=keys.host_pattern, count=page):
        key = _text(key_raw)
        parsed = parse_host_key(keys, key)
        if parsed is None or parsed[1] not in readers:
            snap.other_keys.append(key)
            continue
        host, kind = parsed
        await guarded(key, lambda r=readers[kind], h=host, k=key: r(h, k))
    return snap
