"""What ``crawlfleet crawl`` shows while it runs, and the summary it prints at the end.

On a terminal: a rich live panel, redrawn at most every REFRESH_S, with log lines printed above
it (common/logs.py writes bytes to stderr's buffer, which rich cannot intercept, so the display
takes the lines through ``set_log_writer`` while it is up). Anywhere else (a pipe, a CI log):
one plain line every PROGRESS_EVERY_S, nothing in between.

The frontier's counters (the status dict of common/stats.py) give the counts; the Tally
(cli/tally.py) gives what the fetches returned. ``update``'s ``elapsed_s`` is the display's
only clock, so tests drive time through it.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from crawlfleet.common.logs import set_log_writer

from .tally import Tally

PROGRESS_EVERY_S = 5.0  # plain mode: one line this often
REFRESH_S = 0.25  # live mode: ~4 redraws a second, however often update is called
RATE_WINDOW_S = 10.0  # pages/s over this much of the recent past, not the whole run
RATE_SAMPLE_S = 0.5  # the rate window keeps one sample this often (20 in all)
TOP_HOSTS = 5

DISCARD_LABELS = {
    "discarded_scope": "out of scope",
    "discarded_invalid": "invalid",
    "discarded_max_pages": "over max pages",
    "discarded_host_budget": "over host budget",
    "discarded_query_variants": "query variants",
}


class RecentRate:
    """Counts a second over the last ``window_s``, from (time, running total) samples."""

    def __init__(self, window_s: float = RATE_WINDOW_S, sample_s: float = RATE_SAMPLE_S) -> None:
        self.window_s = window_s
        self.sample_s = sample_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, t: float, total: int) -> float:
        samples = self._samples
        if not samples or t - samples[-1][0] >= self.sample_s:
            samples.append((t, total))
        # Keep the newest sample at or before the window's start: the span stays ~window_s.
        while len(samples) >= 2 and samples[1][0] <= t - self.window_s:
            samples.popleft()
        t0, total0 = samples[0]
        return (total - total0) / (t - t0) if t > t0 else 0.0


class ProgressDisplay:
    """``with ProgressDisplay(sys.stderr) as view: ... view.update(status, tally, elapsed_s)``.

    ``tty`` defaults to whether ``stream`` is a terminal rich can drive (not TERM=dumb);
    ``console`` replaces the rich console built on ``stream`` (tests render to a StringIO).
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None,
                 console: Console | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            tty = console.is_terminal if console is not None else _drivable(self.stream)
        self.tty = tty
        self._console = console
        self._live: Live | None = None
        self._rate = RecentRate()
        self._next_line = PROGRESS_EVERY_S
        self._next_refresh = 0.0
        self._closed = False

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # A crawl that ends normally prints its summary instead of the last frame; one that
        # fails (or is interrupted) leaves the frame on screen, above the traceback.
        self.close(keep=exc_type is not None)

    def update(self, status: Mapping[str, Any], tally: Tally, elapsed_s: float) -> None:
        if self._closed:
            return
        rate = self._rate.add(elapsed_s, _fetched(status))
        if not self.tty:
            if elapsed_s >= self._next_line:
                self._next_line = elapsed_s + PROGRESS_EVERY_S
                self.stream.write(progress_line(status, rate, elapsed_s) + "\n")
                self.stream.flush()
            return
        if self._live is not None and elapsed_s < self._next_refresh:
            return
        # On a fixed cadence, not REFRESH_S after this call: updates every 0.2 s still redraw
        # ~4 times a second, not every other one.
        self._next_refresh = max(self._next_refresh + REFRESH_S, elapsed_s)
        frame = live_panel(status, tally, rate, elapsed_s)
        if self._live is None:
            self._start(frame)
        else:
            self._live.update(frame, refresh=True)

    def close(self, *, keep: bool = False) -> None:
        """Stop the live display (erasing it unless ``keep``) and give stderr back to the logs.
        Safe to call twice, and on a display that never showed anything."""
        self._closed = True
        live, self._live = self._live, None
        if live is None:
            return
        set_log_writer(None)
        live.transient = not keep
        live.stop()

    def _start(self, frame: RenderableType) -> None:
        console = self._console or Console(file=self.stream, force_terminal=True)
        # No refresh thread (update redraws; a stalled loop shows a stalled frame, honestly) and
        # no stdout redirection: stdout may be the results file (--out -).
        live = Live(frame, console=console, auto_refresh=False, transient=True,
                    redirect_stdout=False, redirect_stderr=True)
        live.start(refresh=True)
        self._live = live
        set_log_writer(self._print_log)

    def _print_log(self, line: str) -> None:
        live = self._live
        if live is None:  # closed between the check in common/logs.py and here
            self.stream.write(line + "\n")
            return
        # Above the live area, as one line (soft_wrap: the terminal wraps it, rich inserts no
        # newlines into a JSON line); console-format lines keep their colours.
        live.console.print(Text.from_ansi(line), soft_wrap=True)


def progress_line(status: Mapping[str, Any], rate: float, elapsed_s: float) -> str:
    return (f"progress: {_done(status)} done ({status['pages']} pages, {status['failed']} failed"
            f", {status['skipped']} skipped), {rate:.1f} pages/s, {status['queued']} queued, "
            f"{status['in_flight']} in flight, {clock(elapsed_s)}")


def live_panel(status: Mapping[str, Any], tally: Tally, rate: float,
               elapsed_s: float) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("elapsed", clock(elapsed_s))
    grid.add_row("done", f"{_done(status):,}  ({status['pages']:,} pages · "
                         f"{status['failed']:,} failed · {status['skipped']:,} skipped)")
    grid.add_row("rate", f"{rate:,.1f} pages/s  (last {RATE_WINDOW_S:.0f} s)")
    grid.add_row("frontier", f"{status['queued']:,} queued · {status['in_flight']:,} in flight"
                             f" · {status.get('hosts_leased', 0):,} hosts leased"
                             f" · {status.get('retries', 0):,} retries")
    grid.add_row("downloaded", human_bytes(tally.bytes))
    errors = " · ".join(f"{name} {n:,}" for name, n in tally.errors.most_common())
    grid.add_row("errors", Text(errors or "none", style="red" if errors else "dim"))
    grid.add_row("busiest hosts", _hosts_grid(tally) or Text("none yet", style="dim"))
    parts: list[RenderableType] = [grid]
    if status.get("state_lost"):
        parts.append(Text("the frontier's state was lost: results will be incomplete",
                          style="bold red"))
    return Panel(Group(*parts), title="crawlfleet crawl", title_align="left", expand=False)


def _hosts_grid(tally: Tally) -> Table | None:
    busiest = tally.busiest_hosts(TOP_HOSTS)
    if not busiest:
        return None
    hosts = Table.grid(padding=(0, 2))
    hosts.add_column(no_wrap=True, overflow="ellipsis", max_width=60)
    hosts.add_column(justify="right")
    about = "" if tally.hosts.exact else "~"  # Space-Saving counts once hosts were evicted
    for host, n in busiest:
        hosts.add_row(host, f"{about}{n:,}")
    return hosts


def summary_table(summary: Mapping[str, Any], tally: Tally, *, where: str) -> str:
    """The end-of-crawl report, plain text: what came back, the frontier, time and output."""
    s = summary
    elapsed = float(s.get("elapsed_s") or 0.0)
    fetched = _fetched(s)
    state = ("state lost: results incomplete" if s.get("state_lost")
             else "finished" if s.get("finished") else "stopped before the end")
    rows: list[tuple[str, str]] = [
        ("pages", f"{s.get('pages', 0):,}"),
        ("failed", f"{s.get('failed', 0):,}  ({s.get('dead', 0):,} out of retries)"),
        ("skipped", f"{s.get('skipped', 0):,}"),
        ("pages/s", f"{fetched / elapsed if elapsed > 0 else 0.0:,.1f}"),
        ("downloaded", f"{human_bytes(tally.bytes)}  ({tally.bytes:,} bytes)"),
    ]
    rows += [(f"status {name}" if name != "none" else "no response", f"{n:,}")
             for name, n in sorted(tally.by_status.items())]
    rows += [(f"error {name}", f"{n:,}") for name, n in tally.errors.most_common()]
    rows += [
        ("URLs seen", f"{s.get('seen', 0):,}"),
        ("queued", f"{s.get('queued', 0):,}"),
        ("in flight", f"{s.get('in_flight', 0):,}"),
        ("quarantined", f"{s.get('quarantined', 0):,}"),
        ("retries", f"{s.get('retries', 0):,}"),
    ]
    rows += [(f"links {label}", f"{s.get(key, 0):,}") for key, label in DISCARD_LABELS.items()]
    about = "" if tally.hosts.exact else "~"
    rows += [(f"host {host}", f"{about}{n:,}") for host, n in tally.busiest_hosts(TOP_HOSTS)]
    if tally.first_fetched_at is not None and tally.last_fetched_at is not None:
        rows.append(("fetches", f"{_utc(tally.first_fetched_at)} to "
                                f"{_utc(tally.last_fetched_at)}"))
    if tally.unreadable:
        rows.append(("unreadable", f"{tally.unreadable:,} result lines not counted above"))
    exported = s.get("exported")
    rows.append(("results", f"{exported:,} lines in {where}" if exported is not None else where))
    width = max(len(label) for label, _ in rows)
    lines = [f"crawl {state} in {duration(elapsed)}"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)


def clock(seconds: float) -> str:
    """'45s', '1m02s', '2h03m04s': elapsed time at a glance."""
    whole = int(max(seconds, 0.0))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 60 else f"{clock(seconds)} ({seconds:,.0f} s)"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n:,} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _done(status: Mapping[str, Any]) -> int:
    """URLs settled: fetched (pages, failed) or recorded without a fetch (skipped)."""
    return int(status.get("pages", 0) + status.get("failed", 0) + status.get("skipped", 0))


def _fetched(status: Mapping[str, Any]) -> int:
    """What pages/s counts, as format_summary in cli/crawl.py does: fetches that ended."""
    return int(status.get("pages", 0) + status.get("failed", 0))


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + " UTC"


def _drivable(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    tty = bool(isatty and isatty())
    return tty and os.environ.get("TERM", "") not in ("dumb", "unknown")
