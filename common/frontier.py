"""The one owner of every frontier state change: a typed call per script in ``commands/``.

The scheduler and the workers both change the frontier only through this class, and this class
only through the Lua commands, so the state machine is what ``common/commands/`` says it is.
A URL admitted to the crawl is in exactly one place at a time: a host queue (``queued``), a
host's lease (``in_flight``), the results (``pages``/``failed``/``skipped``) or the quarantine
(``quarantined``). ``crawlfleet check`` counts those places and compares them with the counters.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from .commands import COMMANDS, source
from .connections import as_text
from .keys import CONSUMER_GROUP, Keys, seen_digits
from .messages import (
    FETCH_BATCH_JOB,
    VERSION,
    HostBatch,
    PageResult,
    QueuedURL,
    decode_entry,
    encode,
)
from .scope import query_variant_key
from .urls import fingerprint

# What a progress call says of each URL (progress.lua's outcomes).
PAGE, FAILED, SKIPPED, DEAD, RETRY, ALIAS = "p", "f", "s", "d", "r", "a"
ADMIT_CHUNK = 250  # admissions per script call: keeps one script well under ~10 ms
JOB_EXPIRY_MS = 86_400_000  # arq's default job expiry

# The result of a URL given up on after its batches kept losing their worker (expire.lua fills
# in url, depth and fetched_at): one schema for every result, the PageResult struct's.
WORKER_LOST_TEMPLATE = encode(PageResult(
    url="", final_url=None, status=None, content_type=None, depth=0, title=None, links=0,
    bytes=0, elapsed_ms=0.0, fetched_at=0.0, error="worker_lost",
))


class StateLost(Exception):
    """The crawl marker is gone or changed: Redis lost the frontier's state (a restart without
    persistence, a flush). Nothing was written."""


@dataclass(frozen=True, slots=True)
class Admission:
    """One URL that passed scope, on its way into the seen set and its host queue."""

    fp: str
    host: str
    entry: bytes
    variant: str = ""  # fingerprint of the URL without its query, when it has one

    @classmethod
    def of(cls, canonical: str, host: str, depth: int, fp: str | None = None) -> Admission:
        fp = fp or fingerprint(canonical)
        variant = query_variant_key(canonical)
        return cls(fp, host, encode(QueuedURL(v=VERSION, fp=fp, url=canonical, depth=depth)),
                   fingerprint(variant) if variant else "")


@dataclass(frozen=True, slots=True)
class Limits:
    max_pages: int | None = None
    max_pages_per_host: int | None = None
    max_query_variants: int = 100


@dataclass(frozen=True, slots=True)
class StoredResult:
    fp: str
    outcome: str  # one of the outcomes above
    data: bytes  # the encoded PageResult; for RETRY, the URL's next encoded QueuedURL


@dataclass(frozen=True, slots=True)
class Progress:
    """What a worker sends in one progress.lua call."""

    results: Sequence[StoredResult] = ()
    marks: Sequence[str] = ()  # fps about to be fetched
    admissions: Sequence[Admission] = ()
    discarded_scope: int = 0
    discarded_invalid: int = 0
    want: int = 0  # URLs wanted from the host queue
    mark_refill: int = 0  # of those, how many to mark too (the next to start)
    yield_to_others: bool = False  # refill only while no other host is ready
    # The worker's fetch slots are all taken (its hosts wait for each other): no refill when
    # a worker with nothing to do has asked for hosts (Keys.hungry); the host goes to it.
    short_of_slots: bool = False
    final: bool = False
    wait_s: float = 0.0  # before the host's next lease, when final


@dataclass(frozen=True, slots=True)
class ProgressOutcome:
    lease_held: bool
    stored: int
    handed_back: int
    admitted: int
    refill: list[QueuedURL]
    # The host goes to an idle worker (Keys.hungry): refill no more, drain the lease, end.
    handed_over: bool = False


@dataclass(frozen=True, slots=True)
class Dispatched:
    batches: int  # batches sent out as arq jobs
    # Seconds until the earliest ready host is due, when there is room to send it; None when
    # no host is ready, or when no room is left (``full``: a claim makes room and wakes the
    # scheduler).
    next_due_s: float | None
    full: bool = False


@dataclass(frozen=True, slots=True)
class Claim:
    urls: list[QueuedURL]
    seen_digits: int
    scope_size: int  # hosts and ports in scope (re-read them when this changes)


@dataclass(frozen=True, slots=True)
class Expired:
    leases: int  # claimed leases past their expiry
    requeued: int
    given_up: int  # failed as worker_lost
    unclaimed: int  # batches returned because no worker claimed them in time


@dataclass(frozen=True, slots=True)
class SinkClaim:
    """A range of the results log a sink writes as one part (sink_take.lua): ``lines`` are
    the results, in log order, ``first`` and ``last`` the range's entry ids."""

    first: str
    last: str
    lines: list[bytes]


@dataclass(frozen=True, slots=True)
class CrawlMarker:
    id: str
    state: str  # "new", "ok" or "lost"
    state_lost_at: float | None
    seen_digits: int = 3
    shard: str = ""  # this Redis's shard record ("index/count"), "" when it has none


def _none(limit: int | None) -> int:
    return -1 if limit is None else limit


class Frontier:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis: Any = redis
        self.keys = keys
        self._scripts = {name: redis.register_script(source(name)) for name in COMMANDS}

    async def _run(self, name: str, crawl: str, *args: Any, client: Any = None) -> Any:
        return await self._scripts[name](keys=[], args=[self.keys.prefix, crawl, *args],
                                         client=client)

    @staticmethod
    def _word(raw: Any) -> str:
        return Frontier._answer(raw)[0]  # type: ignore[no-any-return]

    @staticmethod
    def _answer(raw: Any) -> list[Any]:
        """Scripts answer a list whose first item is a word; 'state_lost' raises."""
        word = as_text(raw[0])
        if word == "state_lost":
            raise StateLost("the crawl's state in Redis is gone (restart without persistence, "
                            "or a flush)")
        return [word, *raw[1:]]

    # -- the crawl marker ---------------------------------------------------------------
    async def open_crawl(self, known: str = "", *, expected_urls: int = 1_000_000,
                         shard: str = "") -> CrawlMarker:
        """crawl.lua; ``shard``: this Redis's shard record in a sharded crawl, written with a
        new marker (common/cluster.py shard_record)."""
        word, crawl_id, lost_at, digits, record = await self._run(
            "crawl", known, secrets.token_hex(8), seen_digits(expected_urls), shard)
        lost = as_text(lost_at)
        return CrawlMarker(as_text(crawl_id), as_text(word), float(lost) if lost else None,
                           int(digits), as_text(record))

    # -- scheduler ----------------------------------------------------------------------
    def admit_args(
        self, admissions: Sequence[Admission], limits: Limits, *, event_id: str = "",
        ack: bool = False, discarded_scope: int = 0, discarded_invalid: int = 0,
        quarantine_reason: str = "",
    ) -> list[Any]:
        args: list[Any] = [
            CONSUMER_GROUP, event_id, "1" if ack else "0", _none(limits.max_pages),
            _none(limits.max_pages_per_host), limits.max_query_variants, discarded_scope,
            discarded_invalid, quarantine_reason,
        ]
        for a in admissions:
            args += (a.fp, a.host, a.entry, a.variant)
        return args

    async def admit(self, crawl: str, admissions: Sequence[Admission], limits: Limits,
                    **kw: Any) -> int:
        """Admit URLs (dedup against the seen set); with ``ack``, acknowledge their event."""
        raw = await self._run("admit", crawl, *self.admit_args(admissions, limits, **kw))
        return int(self._answer(raw)[1])

    async def admit_in(self, pipe: Any, crawl: str, admissions: Sequence[Admission],
                       limits: Limits, **kw: Any) -> None:
        """Queue an admit on a pipeline (many events, one round trip). The pipeline's replies
        go through ``answers``."""
        await self._run("admit", crawl, *self.admit_args(admissions, limits, **kw), client=pipe)

    def answers(self, replies: Sequence[Any]) -> int:
        """Admitted URLs of a pipeline of admits; StateLost if any said so."""
        return sum(int(self._answer(r)[1]) for r in replies if isinstance(r, list))

    async def dispatch(self, crawl: str, *, batch_size: int, max_waiting: int) -> int:
        """Lease ready hosts, up to ``batch_size`` URLs each, while fewer than ``max_waiting``
        batches wait for a worker; each batch is an arq job. Returns how many went out."""
        return (await self.dispatch_ready(crawl, batch_size=batch_size,
                                          max_waiting=max_waiting)).batches

    async def dispatch_ready(self, crawl: str, *, batch_size: int,
                             max_waiting: int) -> Dispatched:
        """``dispatch``, with when the next ready host is due."""
        raw = await self._run("dispatch", crawl, batch_size, max_waiting, FETCH_BATCH_JOB,
                              JOB_EXPIRY_MS)
        _, batches, due = self._answer(raw)
        due = as_text(due)
        if due == "full":
            return Dispatched(int(batches), None, full=True)
        return Dispatched(int(batches), float(due) if due else None)

    async def expire(self, crawl: str, *, max_losses: int, claim_timeout: float,
                     limit: int = 100) -> Expired:
        raw = await self._run("expire", crawl, limit, max_losses, claim_timeout,
                              WORKER_LOST_TEMPLATE)
        _, leases, requeued, lost, unclaimed = self._answer(raw)
        return Expired(int(leases), int(requeued), int(lost), int(unclaimed))

    async def check_finished(self, crawl: str) -> bool:
        return bool(int(self._answer(await self._run("finish", crawl))[1]))

    async def acquire_lock(self, instance: str, ttl_ms: int) -> bool:
        return bool(await self._run("lock", "", instance, ttl_ms))

    async def release_lock(self, instance: str) -> bool:
        return bool(await self._run("unlock", "", instance))

    # -- workers ----------------------------------------------------------------------
    async def claim(self, batch: HostBatch, *, lease_seconds: float,
                    job_id: str) -> Claim | None:
        """Start a batch: its URLs, or None when its lease is not this batch's any more.
        The arq job leaves arq's queue either way."""
        raw = self._answer(await self._run("claim", batch.crawl, batch.host, batch.batch_id,
                                           lease_seconds, job_id))
        if raw[0] != "ok":
            return None
        return Claim([decode_entry(e) for e in raw[3:]], int(raw[1]), int(raw[2]))

    async def renew(self, batch: HostBatch, *, lease_seconds: float) -> bool:
        raw = await self._run("renew", batch.crawl, batch.host, batch.batch_id, lease_seconds)
        return self._word(raw) == "ok"

    def progress_args(self, batch: HostBatch, p: Progress, limits: Limits) -> list[Any]:
        args: list[Any] = [
            batch.host, batch.batch_id, "1" if p.final else "0", max(p.wait_s, 0.0), p.want,
            int(p.yield_to_others) + 2 * int(p.short_of_slots), _none(limits.max_pages),
            _none(limits.max_pages_per_host), limits.max_query_variants, p.discarded_scope,
            p.discarded_invalid, len(p.marks), len(p.results), len(p.admissions),
            p.mark_refill, *p.marks,
        ]
        for r in p.results:
            args += (r.fp, r.outcome, r.data)
        for a in p.admissions:
            args += (a.fp, a.host, a.entry, a.variant)
        return args

    async def progress(self, batch: HostBatch, p: Progress, limits: Limits) -> ProgressOutcome:
        """Report results, mark the next fetches, admit links and refill, in one step."""
        raw = self._answer(await self._run("progress", batch.crawl,
                                           *self.progress_args(batch, p, limits)))
        _, held, stored, handed_back, admitted, *refill = raw
        return ProgressOutcome(bool(held), int(stored), int(handed_back), int(admitted),
                               [decode_entry(e) for e in refill], handed_over=int(held) == 2)

    async def is_seen(self, fp: str, digits: int) -> bool:
        key, member = self.keys.seen_slot(fp, digits)
        return bool(await self.redis.sismember(key, member))

    async def quarantine(self, source_key: str, reason: str, data: bytes, *,
                         delete_source: bool = False, withdraw_job: str = "") -> None:
        await self._run("quarantine", "", source_key, reason, data,
                        "1" if delete_source else "0", withdraw_job)

    # -- sinks --------------------------------------------------------------------------
    async def sink_take(self, crawl: str, owner: str, *, max_results: int, max_bytes: int,
                        min_results: int, max_age_s: float, hold_s: float,
                        ) -> SinkClaim | float | None:
        """A range to write out (an abandoned claim first), the seconds to wait before fewer
        than ``min_results`` are worth a part, or None when the log is empty."""
        raw = self._answer(await self._run("sink_take", crawl, owner, max_results, max_bytes,
                                           min_results, max_age_s, hold_s))
        if raw[0] == "claim":
            return SinkClaim(as_text(raw[1]), as_text(raw[2]), list(raw[3:]))
        if raw[0] == "wait":
            return float(raw[1])
        return None

    async def sink_done(self, crawl: str, claim: SinkClaim) -> int | None:
        """The claim's part is durable: trim the log. The entries trimmed, or None if the
        claim was done already."""
        raw = self._answer(await self._run("sink_done", crawl, claim.first, claim.last))
        return int(raw[1]) if raw[0] == "ok" else None

    # -- resharding (cli/reshard.py) ----------------------------------------------------
    async def reshard_in(self, crawl: str, host: str, urls: Sequence[MovedURL], *,
                         ready: float | None = None,
                         fields: Sequence[tuple[str, str, bytes | str]] = ()) -> int:
        """URLs arrive on their host's new shard (reshard_in.lua): each one only if its fp is
        new to this shard's seen set. ``fields`` are the host's own (key name, field, value)
        to copy. Returns the URLs that arrived."""
        args: list[Any] = [host, "" if ready is None else repr(ready), len(urls)]
        for u in urls:
            args += (u.fp, u.counter, "1" if u.dead else "0", u.variant, u.data)
        for name, name_field, value in fields:
            args += (name, name_field, value)
        return self._moved(await self._run("reshard_in", crawl, *args))

    async def reshard_out(self, crawl: str, host: str, urls: Sequence[MovedURL], *,
                          fields: Sequence[tuple[str, str]] = ()) -> int:
        """URLs leave their host's old shard (reshard_out.lua), each one only if its fp was
        still in this shard's seen set; ``fields`` (key name, field) are deleted. Returns the
        URLs that left."""
        args: list[Any] = [host, len(urls)]
        for u in urls:
            args += (u.fp, u.counter, "1" if u.dead else "0", u.variant, u.where)
        for name, name_field in fields:
            args += (name, name_field)
        return self._moved(await self._run("reshard_out", crawl, *args))

    def _moved(self, raw: Any) -> int:
        answer = self._answer(raw)
        if answer[0] != "ok":
            raise ValueError(f"reshard command refused its arguments: {as_text(answer[1])}")
        return int(answer[1])


@dataclass(frozen=True, slots=True)
class MovedURL:
    """One URL on its way to its host's new shard: a result (``counter`` pages, failed or
    skipped; ``where`` its results-log entry id) or a queue entry (``counter`` queued;
    ``where`` the raw entry). ``data`` is what the new shard stores."""

    fp: str
    counter: str
    data: bytes
    where: bytes | str
    dead: bool = False
    variant: str = ""  # fp of the URL without its query, when it has one
