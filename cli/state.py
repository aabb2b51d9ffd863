"""The embedded backend's state file: how ``crawlfleet crawl`` resumes with no Redis server.

The embedded backend lives in the process's memory. When a crawl on it stops before its end
(Ctrl-C, SIGTERM), every key is written to a state file (msgpack, written beside and renamed
over, so a kill while saving leaves the previous one), and the same command reads it back and
goes on. Keys are saved by type with the ordinary commands, never pickled. The workers have
handed their hosts back by then; a lease that is still there belonged to this stopped process,
so it is expired at once on load instead of after its lease time. Keys that only mean
something to a live process (arq's in-progress markers and health checks, the scheduler's
leader lock) are left out.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import msgspec

from crawlfleet.common.keys import Keys

FORMAT = 1
_SKIP = ("arq:in-progress:",)
_SKIP_CONTAINING = (":health-check", ":scheduler:lock")


class SavedKey(msgspec.Struct, array_like=False):
    name: bytes
    type: str
    value: Any
    ttl_ms: int | None = None
    groups: list[tuple[bytes, bytes]] = []  # streams: (group, last delivered id)


class SavedState(msgspec.Struct):
    format: int
    keys: list[SavedKey]


class StateFileError(Exception):
    pass


def _skipped(name: bytes) -> bool:
    text = name.decode("utf-8", "replace")
    return text.startswith(_SKIP) or any(part in text for part in _SKIP_CONTAINING)


async def _value(redis: Any, name: bytes, kind: str) -> Any:
    if kind == "string":
        return await redis.get(name)
    if kind == "list":
        return await redis.lrange(name, 0, -1)
    if kind == "hash":
        return [[k, v] for k, v in (await redis.hgetall(name)).items()]
    if kind == "set":
        return sorted(await redis.smembers(name))
    if kind == "zset":
        return [[m, s] for m, s in await redis.zrange(name, 0, -1, withscores=True)]
    if kind == "stream":
        return [[entry_id, [[k, v] for k, v in fields.items()]]
                for entry_id, fields in await redis.xrange(name)]
    raise StateFileError(f"key {name!r} has a type the state file cannot keep: {kind}")


def _before(entry_id: bytes) -> bytes:
    ms, _, seq = entry_id.decode().partition("-")
    if int(seq) > 0:
        return f"{ms}-{int(seq) - 1}".encode()
    return f"{int(ms) - 1}-18446744073709551615".encode()


async def save(redis: Any, path: Path) -> int:
    """Every key of the embedded server into ``path``; the number of keys saved."""
    saved: list[SavedKey] = []
    async for name in redis.scan_iter(count=1000):
        if _skipped(name):
            continue
        kind = (await redis.type(name)).decode()
        if kind == "none":
            continue  # expired meanwhile
        ttl = await redis.pttl(name)
        key = SavedKey(name, kind, await _value(redis, name, kind),
                       ttl if ttl and ttl > 0 else None)
        if kind == "stream":
            for group in await redis.xinfo_groups(name):
                # Entries read but not acknowledged are delivered again after the load.
                pending = await redis.xpending(name, group["name"])
                last = (_before(pending["min"]) if pending.get("pending")
                        else group["last-delivered-id"])
                key.groups.append((group["name"], last))
        saved.append(key)
    _write(path, msgspec.msgpack.encode(SavedState(FORMAT, saved)))
    return len(saved)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read(path: Path) -> SavedState:
    try:
        state = msgspec.msgpack.decode(path.read_bytes(), type=SavedState)
    except OSError as exc:
        raise StateFileError(f"cannot read state file {path}: {exc.strerror or exc}") from None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateFileError(f"state file {path} is not a crawlfleet state file: {exc}; "
                             "remove it to start the crawl over") from None
    if state.format > FORMAT:
        raise StateFileError(f"state file {path} has format {state.format}; this crawlfleet "
                             f"reads up to {FORMAT}")
    return state


async def load(redis: Any, path: Path, keys: Keys) -> int:
    """Put the keys of ``path`` back into an empty embedded server; leases of the stopped
    process expire at once. The number of keys loaded."""
    state = _read(path)
    for key in state.keys:
        await _restore(redis, key)
    leases = await redis.zrange(keys.leases, 0, -1)
    if leases:
        await redis.zadd(keys.leases, dict.fromkeys(leases, 0))
    return len(state.keys)


async def _restore(redis: Any, key: SavedKey) -> None:
    name, value = key.name, key.value
    if key.type == "string":
        await redis.set(name, value)
    elif key.type == "list" and value:
        await redis.rpush(name, *value)
    elif key.type == "hash" and value:
        await redis.hset(name, mapping=dict(value))
    elif key.type == "set" and value:
        await redis.sadd(name, *value)
    elif key.type == "zset" and value:
        await redis.zadd(name, {m: s for m, s in value})
    elif key.type == "stream":
        for entry_id, fields in value:
            await redis.xadd(name, dict(fields), id=entry_id)
        for group, last in key.groups:
            await redis.xgroup_create(name, group, id=last, mkstream=True)
    if key.ttl_ms:
        await redis.pexpire(name, key.ttl_ms)


def exists(path: Path) -> bool:
    return path.exists()


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
