"""``crawlfleet check``: count the crawl's real structures in Redis and compare them with its
counters.

``crawlfleet status`` compares counters with counters (``seen = pages + failed + skipped +
queued + in_flight + quarantined``), which every script keeps true by updating them together.
``check`` counts what the counters stand for: the fingerprints in ``seen``, the results, every
host queue and lease entry, the counted quarantine entries, and the lease bookkeeping, and it
lists every place where the two disagree.

Two parts:

* ``collect(redis, keys)`` reads everything (SCAN, SSCAN, HSCAN, ZSCAN, LRANGE and XRANGE in
  pages, never KEYS) into a ``Snapshot``. Memory is O(URLs): one fingerprint per URL.
  Anything malformed (an entry that is not a QueuedURL, a result that is not a PageResult, a
  counter that is not an integer, a key of the wrong type) is recorded, never raised.
* ``compare(snapshot)`` is pure: the list of ``Problem``s, empty when everything agrees.

A running crawl moves while it is counted: the reads are not one transaction, so a crawl with
a scheduler and workers at work shows differences that are only motion. Check a finished or
stopped crawl for exact answers.

How the structures count:

* ``pages``/``skipped``/``failed``: results whose ``error`` is null / ``"robots"`` / anything
  else. An unreadable result is counted in none of them (and reported).
* ``queued``: queue entries whose fingerprint has no result yet, plus unreadable queue entries
  (still counted in ``queued`` until dispatch quarantines them; they are reported). An entry
  whose result exists is *stale*: dispatch drops it, and ``queued`` no longer counts it. Stale
  entries are counted and shown, but they are not a problem.
* ``in_flight``: every entry of every host's lease hash (readable or not).
* ``quarantined``: quarantine entries with ``counted`` = ``"1"``.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from .keys import HOST_KINDS, HOST_PREFIX, Keys
from .messages import decode_entry, decode_result
from .stats import COUNTERS, DISCARDS

# Counters that must hold an integer (``finished_at`` is a float time and is not checked).
INTEGER_COUNTERS: tuple[str, ...] = (
    *COUNTERS, *DISCARDS, "leases_expired", "batches_unclaimed", "retries",
    "quarantined_events", "quarantined_other", "duplicate_results",
)
EXAMPLES = 5  # example keys/fps shown per problem
PAGE = 1000  # SCAN/HSCAN/SSCAN/LRANGE/XRANGE page size

_INTEGER = re.compile(r"-?\d+")  # what the Lua scripts accept ('^%-?%d+$')
_FP = re.compile(r"[0-9a-fA-F]{16}")
_UNESCAPE = {"%25": "%", "%7B": "{", "%7D": "}"}
_DATA_SAMPLE = 120  # characters of a malformed value kept for the report


@dataclass(frozen=True, slots=True)
class Malformed:
    """Something ``collect`` could not read. ``kind`` is one of ``queue``, ``lease``,
    ``result``, ``dead``, ``counter``, ``quarantine``, ``key``."""

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
    dead: set[str] = field(default_factory=set)
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


@dataclass(frozen=True, slots=True)
class Problem:
    """One kind of disagreement, with how many and a few examples."""

    kind: str
    message: str
    count: int = 1
    examples: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = f"{self.kind}: {self.message}"
        if self.examples:
            more = f" (+{self.count - len(self.examples)} more)" if self.count > len(
                self.examples) else ""
            text += f"; e.g. {', '.join(self.examples)}{more}"
        return text

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["examples"] = list(self.examples)
        return d


# ---------------------------------------------------------------------------------------------
# Reading

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


def classify_result(data: bytes | str) -> str:
    """``pages``, ``skipped`` or ``failed`` for a PageResult; raises ValueError if unreadable."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        result = decode_result(raw)
    except (msgspec.MsgspecError, ValueError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from exc
    if result.error is None:
        return "pages"
    if result.error == "robots":
        return "skipped"
    return "failed"


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


def _sample(data: bytes | str) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text if len(text) <= _DATA_SAMPLE else text[:_DATA_SAMPLE] + "..."


def _wrong_type(snap: Snapshot, key: str, exc: ResponseError) -> None:
    if "WRONGTYPE" not in str(exc):
        raise exc
    snap.malformed.append(Malformed("key", key, "wrong type for its role", str(exc)[:_DATA_SAMPLE]))


async def collect(redis: Any, keys: Keys, *, page: int = PAGE) -> Snapshot:
    """Read the crawl's structures into a Snapshot, in pages. Not atomic: a running crawl moves
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

    async def read_seen() -> None:
        async for fp in redis.sscan_iter(keys.seen, count=page):
            snap.seen.add(_text(fp))

    async def read_results() -> None:
        async for fp_raw, data in redis.hscan_iter(keys.results, count=page):
            fp = _text(fp_raw)
            try:
                snap.results[fp] = classify_result(data)
            except ValueError as exc:
                snap.results[fp] = "unreadable"
                snap.malformed.append(Malformed("result", f"{keys.results} {fp}", str(exc),
                                                _sample(data)))

    async def read_dead() -> None:
        async for fp_raw, data in redis.hscan_iter(keys.dead_letter, count=page):
            fp = _text(fp_raw)
            snap.dead.add(fp)
            try:
                classify_result(data)
            except ValueError as exc:
                snap.malformed.append(Malformed("dead", f"{keys.dead_letter} {fp}", str(exc),
                                                _sample(data)))

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
                        else "no 'counted' field", _sample(repr(fields))))
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
                                                    _sample(raw)))
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
                snap.malformed.append(Malformed("lease", f"{key} {fp}", str(exc), _sample(raw)))
                continue
            if inner != fp:
                snap.malformed.append(Malformed(
                    "lease", f"{key} {fp}", f"the entry's fp is {inner}", _sample(raw)))

    async def read_fetching(host: str, key: str) -> None:
        fps = snap.fetching.setdefault(host, set())
        async for fp in redis.sscan_iter(key, count=page):
            fps.add(_text(fp))

    await guarded(keys.stats, read_stats)
    await guarded(keys.seen, read_seen)
    await guarded(keys.results, read_results)
    await guarded(keys.dead_letter, read_dead)
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


# ---------------------------------------------------------------------------------------------
# Comparing

def counter_values(snap: Snapshot) -> dict[str, int | None]:
    """The counters as integers (a missing one is 0, a non-integer one is None)."""
    values: dict[str, int | None] = {}
    for name in COUNTERS:
        raw = snap.stats.get(name)
        values[name] = 0 if raw is None else int(raw) if _INTEGER.fullmatch(raw) else None
    return values


def _live_and_stale(snap: Snapshot) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    live: list[tuple[str, str]] = []
    stale: list[tuple[str, str]] = []
    for host, fps in snap.queues.items():
        for fp in fps:
            (stale if fp in snap.results else live).append((fp, host))
    return live, stale


def structure_counts(snap: Snapshot) -> dict[str, int]:
    """What the structures hold, named after the counters they stand for, and the rest."""
    outcomes = Counter(snap.results.values())
    live, stale = _live_and_stale(snap)
    unreadable_queue = sum(snap.queue_unreadable.values())
    return {
        "seen": len(snap.seen),
        "pages": outcomes["pages"],
        "failed": outcomes["failed"],
        "skipped": outcomes["skipped"],
        "queued": len(live) + unreadable_queue,
        "in_flight": sum(len(fps) for fps in snap.leases.values()),
        "quarantined": len(snap.quarantine_counted),
        "results": len(snap.results),
        "results_unreadable": outcomes["unreadable"],
        "queue_entries": len(live) + len(stale) + unreadable_queue,
        "queue_entries_stale": len(stale),
        "queue_entries_unreadable": unreadable_queue,
        "dead": len(snap.dead),
        "quarantine_entries": snap.quarantine_entries,
        "hosts_queued": sum(1 for h, fps in snap.queues.items()
                            if fps or snap.queue_unreadable.get(h)),
        "hosts_lease_batch": len(snap.lease_batch),
        "hosts_leased": len(snap.leased),
        "hosts_waiting": len(snap.waiting),
        "hosts_ready": len(snap.ready),
        "fetching": sum(len(fps) for fps in snap.fetching.values()),
    }


def stale_entries(snap: Snapshot) -> list[str]:
    """``fp@host`` of each stale queue entry (its result exists; dispatch drops it)."""
    return [f"{fp}@{host}" for fp, host in _live_and_stale(snap)[1]]


_COUNTER_MEANING = {
    "seen": "fps in seen",
    "pages": "results with no error",
    "failed": "results with an error other than robots",
    "skipped": "results with error 'robots'",
    "queued": "live queue entries (result not stored yet)",
    "in_flight": "lease entries",
    "quarantined": "quarantine entries with counted=1",
}


def _problem(kind: str, message: str, items: list[str]) -> Problem:
    return Problem(kind, message, len(items), tuple(items[:EXAMPLES]))


def compare(snap: Snapshot) -> list[Problem]:
    """Every disagreement between the counters and the structures, and within the structures.
    Empty when the crawl is consistent. Pure: reads nothing but the snapshot."""
    problems: list[Problem] = []
    counts = structure_counts(snap)
    values = counter_values(snap)
    unreadable_results = counts["results_unreadable"]

    # Malformed things, grouped by kind.
    by_kind: dict[str, list[Malformed]] = {}
    for m in snap.malformed:
        by_kind.setdefault(m.kind, []).append(m)
    for name, raw in snap.stats.items():
        if name in INTEGER_COUNTERS and not _INTEGER.fullmatch(raw):
            by_kind.setdefault("counter", []).append(
                Malformed("counter", f"stats.{name}", "not an integer", _sample(raw)))
    malformed_text = {
        "counter": "counter(s) are not integers",
        "queue": "queue entries are not readable QueuedURLs",
        "lease": "lease entries are not readable QueuedURLs (or disagree with their field)",
        "result": "results are not readable PageResults",
        "dead": "dead letters are not readable PageResults",
        "quarantine": "quarantine entries have no valid 'counted' field",
        "key": "keys have the wrong Redis type",
    }
    for kind, items in by_kind.items():
        problems.append(_problem(
            f"malformed_{kind}", f"{len(items)} {malformed_text.get(kind, kind)}",
            [f"{m.where} ({m.reason}: {m.data!r})" if m.data else f"{m.where} ({m.reason})"
             for m in items]))
    if snap.other_keys:
        problems.append(_problem(
            "unknown_key", f"{len(snap.other_keys)} per-host keys of no known kind "
            f"({', '.join(HOST_KINDS)})", snap.other_keys))

    # Counters against structures.
    for name in COUNTERS:
        value, real = values[name], counts[name]
        if value is None or value == real:
            continue  # a non-integer counter is reported above
        note = ""
        if name in ("pages", "failed", "skipped") and unreadable_results:
            note = f" ({unreadable_results} unreadable results are in none of them)"
        problems.append(Problem(
            "counter_mismatch",
            f"stats.{name} = {value} but {_COUNTER_MEANING[name]} = {real} "
            f"(counter {value - real:+d}){note}"))

    # The whole: every fp in seen is in exactly one place.
    places = counts["results"] + counts["queued"] + counts["in_flight"] + counts["quarantined"]
    if counts["seen"] != places:
        located = set(snap.results)
        located.update(fp for fps in snap.queues.values() for fp in fps)
        located.update(fp for fps in snap.leases.values() for fp in fps)
        nowhere = sorted(snap.seen - located)
        problems.append(_problem(
            "seen_unaccounted",
            f"SCARD seen = {counts['seen']} but results {counts['results']} + queued "
            f"{counts['queued']} + in flight {counts['in_flight']} + counted quarantine "
            f"{counts['quarantined']} = {places} ({counts['seen'] - places:+d}); "
            f"{len(nowhere)} fps of seen are in no result, queue or lease (counted "
            f"quarantine entries, whose fps may be unreadable, account for "
            f"{counts['quarantined']})", nowhere))

    # Every fp somewhere is in seen.
    def not_in_seen(kind: str, what: str, items: list[str]) -> None:
        if items:
            problems.append(_problem(kind, f"{len(items)} {what} not in seen", items))

    not_in_seen("result_not_in_seen", "results' fps are",
                sorted(fp for fp in snap.results if fp not in snap.seen))
    not_in_seen("queued_not_in_seen", "queue entries' fps are",
                [f"{fp}@{host}" for host, fps in snap.queues.items() for fp in fps
                 if fp not in snap.seen])
    not_in_seen("lease_not_in_seen", "lease entries' fps are",
                [f"{fp}@{host}" for host, fps in snap.leases.items() for fp in fps
                 if fp not in snap.seen])
    dead_missing = sorted(fp for fp in snap.dead if fp not in snap.results)
    if dead_missing:
        problems.append(_problem(
            "dead_not_in_results", f"{len(dead_missing)} dead letters have no result",
            dead_missing))

    # No fp in two places (a result, a live queue entry, a lease entry).
    where: dict[str, list[str]] = {fp: ["result"] for fp in snap.results}
    live, _ = _live_and_stale(snap)
    for fp, host in live:
        where.setdefault(fp, []).append(f"queue {host}")
    for host, fps in snap.leases.items():
        for fp in fps:
            where.setdefault(fp, []).append(f"lease {host}")
    doubled = sorted(f"{fp} in {' + '.join(p)}" for fp, p in where.items() if len(p) > 1)
    if doubled:
        problems.append(_problem(
            "fp_in_two_places", f"{len(doubled)} fps are in more than one place", doubled))

    # Leases.
    held = set(snap.leased) | set(snap.waiting)
    no_batch = sorted(h for h in held if h not in snap.lease_batch)
    if no_batch:
        problems.append(_problem(
            "lease_without_batch",
            f"{len(no_batch)} hosts in leases/waiting have no lease:batch entry", no_batch))
    orphan_batch = sorted(f"{h} ({b})" for h, b in snap.lease_batch.items() if h not in held)
    if orphan_batch:
        problems.append(_problem(
            "batch_without_lease",
            f"{len(orphan_batch)} lease:batch hosts are in neither leases nor waiting",
            orphan_batch))
    both = sorted(set(snap.leased) & set(snap.waiting))
    if both:
        problems.append(_problem(
            "leased_and_waiting", f"{len(both)} hosts are in both leases and waiting", both))
    stray = sorted(f"{h} ({len(fps)} entries)" for h, fps in snap.leases.items()
                   if fps and h not in snap.lease_batch)
    if stray:
        problems.append(_problem(
            "lease_entries_without_batch",
            f"{len(stray)} hosts have lease entries but no lease:batch entry", stray))
    fetching = sorted(f"{fp}@{h}" for h, fps in snap.fetching.items()
                      for fp in fps - set(snap.leases.get(h, ())))
    if fetching:
        problems.append(_problem(
            "fetching_not_in_lease",
            f"{len(fetching)} fetching marks are for no entry of the host's lease", fetching))
    stuck = sorted(h for h in snap.queues
                   if (snap.queues[h] or snap.queue_unreadable.get(h))
                   and h not in snap.ready and h not in snap.lease_batch)
    if stuck:
        problems.append(_problem(
            "queue_not_ready",
            f"{len(stuck)} hosts have queued URLs but are neither ready nor leased "
            "(nothing will dispatch them)", stuck))
    return problems


# ---------------------------------------------------------------------------------------------
# Reporting

def report(snap: Snapshot, problems: list[Problem] | None = None) -> dict[str, Any]:
    """The ``--json`` object: ``{ok, counters, structures, problems}`` (and ``stale``, the stale
    queue entries, and ``scheduler_running``)."""
    problems = compare(snap) if problems is None else problems
    stale = stale_entries(snap)
    return {
        "ok": not problems,
        "counters": counter_values(snap),
        "structures": structure_counts(snap),
        "problems": [p.as_dict() for p in problems],
        "stale": {"count": len(stale), "examples": stale[:EXAMPLES]},
        "scheduler_running": snap.scheduler_running,
    }


def format_report(snap: Snapshot, problems: list[Problem] | None = None) -> str:
    """The table of counters against structures, one line per problem, and the verdict."""
    problems = compare(snap) if problems is None else problems
    values = counter_values(snap)
    counts = structure_counts(snap)
    rows = [("counter", "stats", "structures", "")]
    for name in COUNTERS:
        value = values[name]
        shown = "?" if value is None else str(value)
        rows.append((name, shown, str(counts[name]),
                     "" if value == counts[name] else "<- differs"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}  {d}".rstrip() for a, b, c, d in rows]
    places = counts["results"] + counts["queued"] + counts["in_flight"] + counts["quarantined"]
    lines.append(f"seen {counts['seen']} {'=' if places == counts['seen'] else '!='} results "
                 f"{counts['results']} + queued {counts['queued']} + in flight "
                 f"{counts['in_flight']} + quarantined {counts['quarantined']}")
    lines.append(f"hosts: lease:batch {counts['hosts_lease_batch']}, leased "
                 f"{counts['hosts_leased']}, waiting {counts['hosts_waiting']}, ready "
                 f"{counts['hosts_ready']}; dead letters {counts['dead']}; quarantine entries "
                 f"{counts['quarantine_entries']}")
    stale = stale_entries(snap)
    if stale:
        more = f" (+{len(stale) - EXAMPLES} more)" if len(stale) > EXAMPLES else ""
        lines.append(f"stale queue entries: {len(stale)} (their results exist; dispatch drops "
                     f"them; not a problem), e.g. {', '.join(stale[:EXAMPLES])}{more}")
    if snap.scheduler_running:
        lines.append("note: a scheduler holds the lock, so the crawl may be running and moving "
                     "while it is counted; check a finished or stopped crawl for exact answers")
    lines.extend(str(p) for p in problems)
    lines.append("check: OK" if not problems else f"check: {len(problems)} problem(s)")
    return "\n".join(lines)


async def check(redis: Any, keys: Keys) -> tuple[Snapshot, list[Problem]]:
    """collect, then compare."""
    snap = await collect(redis, keys)
    return snap, compare(snap)
