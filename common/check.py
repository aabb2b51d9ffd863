"""``crawlfleet check``: count the crawl's real structures in Redis and compare them with its
counters.

``crawlfleet status`` compares counters with counters (``seen = pages + failed + skipped +
queued + in_flight + quarantined``), which every script keeps true by updating them together.
``check`` counts what the counters stand for: the fingerprints in ``seen``, the results, every
host queue and lease entry, the counted quarantine entries, and the lease bookkeeping, and it
lists every place where the two disagree.

Two parts:

* ``collect(redis, keys)`` (``common/snapshot.py``) reads everything into a ``Snapshot``;
  anything malformed is recorded there, never raised.
* ``compare(snapshot)``, here, is pure: the list of ``Problem``s, empty when all agrees.

A running crawl moves while it is counted: the reads are not one transaction, so a crawl with
a scheduler and workers at work shows differences that are only motion. Check a finished or
stopped crawl for exact answers.

How the structures count:

* ``pages``/``skipped``/``failed``: results whose ``error`` is null / ``"robots"`` / anything
  else, read by the reader ``export`` uses (the results log, and the output's parts when an
  output is set), so a URL with two results is a problem. An unreadable result is counted in
  none of them (and reported).
* ``queued``: queue entries, readable or not (an unreadable one stays counted in ``queued``
  until dispatch quarantines it; they are reported). An entry whose result exists too is an fp
  in two places: results are stored only as an fp leaves its lease, so that is a problem.
* ``in_flight``: every entry of every host's lease hash (readable or not).
* ``quarantined``: quarantine entries with ``counted`` = ``"1"``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from .keys import HOST_KINDS, Keys
from .snapshot import (
    PAGE,
    Malformed,
    Snapshot,
    collect,
    entry_fp,
    parse_host_key,
    sample,
)
from .stats import COUNTERS, DISCARDS
from .storage import Store

__all__ = ["PAGE", "Malformed", "Problem", "Snapshot", "check", "collect",
           "compare", "entry_fp", "format_report", "parse_host_key", "report"]

# Counters that must hold an integer (``finished_at`` is a float time and is not checked).
INTEGER_COUNTERS: tuple[str, ...] = (
    *COUNTERS, *DISCARDS, "leases_expired", "batches_unclaimed", "retries",
    "quarantined_events", "quarantined_other", "dead",
)
EXAMPLES = 5  # example keys/fps shown per problem
_INTEGER = re.compile(r"-?\d+")  # what the Lua scripts accept ('^%-?%d+$')


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
# Comparing

def counter_values(snap: Snapshot) -> dict[str, int | None]:
    """The counters as integers (a missing one is 0, a non-integer one is None)."""
    values: dict[str, int | None] = {}
    for name in (*COUNTERS, "dead"):
        raw = snap.stats.get(name)
        values[name] = 0 if raw is None else int(raw) if _INTEGER.fullmatch(raw) else None
    return values


def _queued(snap: Snapshot) -> list[tuple[str, str]]:
    return [(fp, host) for host, fps in snap.queues.items() for fp in fps]


def structure_counts(snap: Snapshot) -> dict[str, int]:
    """What the structures hold, named after the counters they stand for, and the rest."""
    outcomes = Counter(snap.results.values())
    live = _queued(snap)
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
        "queue_entries": len(live) + unreadable_queue,
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
                Malformed("counter", f"stats.{name}", "not an integer", sample(raw)))
    malformed_text = {
        "counter": "counter(s) are not integers",
        "queue": "queue entries are not readable QueuedURLs",
        "lease": "lease entries are not readable QueuedURLs (or disagree with their field)",
        "result": "results are not readable PageResults",
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

    dead_counter = values.get("dead")
    if dead_counter is not None and dead_counter != counts["dead"]:
        problems.append(Problem(
            "counter_mismatch", f"stats.dead = {dead_counter} but results marked dead = "
            f"{counts['dead']} (counter {dead_counter - counts['dead']:+d})"))

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
    if snap.duplicates:
        problems.append(_problem(
            "duplicate_result", f"{len(snap.duplicates)} URLs have more than one result "
            "(in the results log or the output's parts)", sorted(snap.duplicates)))

    # No fp in two places (a result, a queue entry, a lease entry).
    where: dict[str, list[str]] = {fp: ["result"] for fp in snap.results}
    for fp, host in _queued(snap):
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
    """The ``--json`` object: ``{ok, counters, structures, problems, scheduler_running}``."""
    problems = compare(snap) if problems is None else problems
    return {
        "ok": not problems,
        "counters": counter_values(snap),
        "structures": structure_counts(snap),
        "problems": [p.as_dict() for p in problems],
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
    if snap.scheduler_running:
        lines.append("note: a scheduler holds the lock, so the crawl may be running and moving "
                     "while it is counted; check a finished or stopped crawl for exact answers")
    lines.extend(str(p) for p in problems)
    lines.append("check: OK" if not problems else f"check: {len(problems)} problem(s)")
    return "\n".join(lines)


async def check(redis: Any, keys: Keys,
                store: Store | None = None) -> tuple[Snapshot, list[Problem]]:
    """collect (with ``store``, the output's parts too), then compare."""
    snap = await collect(redis, keys, store=store)
    return snap, compare(snap)
