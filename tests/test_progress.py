"""The local crawl's tally, progress display and summary: pure logic, rendered to strings.

Time is whatever ``update`` is told it is; nothing here sleeps.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from rich.console import Console
from rich.text import Text

from crawlfleet.cli.progress import (
    PROGRESS_EVERY_S,
    ProgressDisplay,
    RecentRate,
    human_bytes,
    summary_table,
)
from crawlfleet.cli.tally import Tally, TopK, status_class
from crawlfleet.common import logs
from crawlfleet.common.logs import configure_logging, get_logger
from crawlfleet.common.messages import PageResult, encode


def result(url: str, status: int | None = 200, *, nbytes: int = 1000, at: float = 1_700_000_000.0,
           error: str | None = None) -> PageResult:
    return PageResult(url=url, final_url=url, status=status, content_type="text/html", depth=1,
                      title="t", links=3, bytes=nbytes, elapsed_ms=12.5, fetched_at=at,
                      error=error)


def status(**counts: Any) -> dict[str, Any]:
    """A status dict as common/stats.read_status returns it, every counter 0 unless given."""
    base: dict[str, Any] = {name: 0 for name in (
        "seen", "pages", "failed", "skipped", "queued", "in_flight", "quarantined",
        "discarded_scope", "discarded_invalid", "discarded_max_pages", "discarded_host_budget",
        "discarded_query_variants", "hosts_leased", "batches_waiting", "retries", "dead")}
    base.update(pages_per_s=0.0, finished=False, state_lost=False)
    base.update(counts)
    return base


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


@pytest.fixture
def json_logs() -> Iterator[None]:
    """configure_logging as the crawl does, then structlog and the root logger as they were."""
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging("json", "warning")
    try:
        yield
    finally:
        logs.set_log_writer(None)
        structlog.configure(**saved)
        root.handlers[:], root.level = handlers, level


# --- Tally ---------------------------------------------------------------------------------


def test_status_classes() -> None:
    assert [status_class(s) for s in (200, 301, 404, 503, None, 99, 799)] == [
        "2xx", "3xx", "4xx", "5xx", "none", "other", "other"]


def test_tally_counts_classes_bytes_errors_hosts_and_times() -> None:
    tally = Tally()
    tally.add(result("http://a.test/1", 200, nbytes=100, at=50.0))
    tally.add(result("http://a.test/2", 301, nbytes=10, at=40.0))
    tally.add(result("http://A.test:8080/3", 404, nbytes=5, at=60.0, error="http_4xx"))
    tally.add(result("http://b.test/", None, nbytes=0, at=55.0, error="timeout"))
    tally.add(result("http://b.test/robots-says-no", None, nbytes=0, error="robots", at=45.0))
    assert tally.results == 5
    assert tally.by_status == {"2xx": 1, "3xx": 1, "4xx": 1, "none": 2}
    assert tally.bytes == 115
    assert tally.errors == {"http_4xx": 1, "timeout": 1, "robots": 1}
    # Hosts as the frontier keys them (common/urls.host_key): lower-case, no port.
    assert tally.busiest_hosts() == [("a.test", 3), ("b.test", 2)]
    assert (tally.first_fetched_at, tally.last_fetched_at) == (40.0, 60.0)


def test_add_raw_reads_the_stored_line_like_add() -> None:
    results = [result("http://a.test/", 200, nbytes=7, at=3.0),
               result("http://b.test/x", 503, nbytes=2, at=1.0, error="http_5xx")]
    decoded, raw = Tally(), Tally()
    for r in results:
        decoded.add(r)
        raw.add_raw(encode(r) + b"\n")
    assert vars(raw).keys() == vars(decoded).keys()
    for name in ("results", "by_status", "errors", "bytes", "first_fetched_at",
                 "last_fetched_at", "unreadable"):
        assert getattr(raw, name) == getattr(decoded, name), name
    assert raw.busiest_hosts() == decoded.busiest_hosts()


def test_add_raw_counts_an_unreadable_line_and_goes_on() -> None:
    tally = Tally()
    tally.add_raw(b"{not json")
    tally.add_raw(b'{"status": 200}')  # no url
    tally.add_raw(encode(result("http://a.test/")))
    assert (tally.unreadable, tally.results) == (2, 1)


def test_top_k_is_exact_below_capacity() -> None:
    top = TopK(capacity=10)
    for key in "abacabadab":
        top.add(key)
    assert top.exact and len(top) == 4
    assert top.top(10) == [("a", 5), ("b", 3), ("c", 1), ("d", 1)]
    assert top.top(2) == [("a", 5), ("b", 3)]


def test_top_k_stays_bounded_and_keeps_the_heavy_hitters() -> None:
    capacity, tally = 200, Tally(hosts_tracked=200)
    heavy = {f"heavy{i}.test": 400 - 50 * i for i in range(5)}  # 400, 350, ... 200
    stream: list[str] = []
    for host, n in heavy.items():
        stream += [host] * n
    stream += [f"once{i}.test" for i in range(20_000)]  # a long tail of one-page hosts
    # Interleaved, as a crawl's many hosts are: a heavy host's results spread over the run.
    stream = [stream[(i * 7919) % len(stream)] for i in range(len(stream))]
    assert len(set(stream)) == len(heavy) + 20_000  # 7919 is prime to the length: a permutation
    for host in stream:
        tally.add(result(f"http://{host}/"))
    assert len(tally.hosts) == capacity and not tally.hosts.exact
    # Space-Saving's promise: every key seen more than total / capacity times (109 here) is
    # in the table, its count over by at most that much.
    bound = len(stream) / capacity
    busiest = dict(tally.busiest_hosts(5))
    assert busiest.keys() == heavy.keys()
    for host, n in busiest.items():
        assert heavy[host] <= n <= heavy[host] + bound


def test_top_k_refuses_no_room() -> None:
    with pytest.raises(ValueError):
        TopK(capacity=0)


# --- rate and units ------------------------------------------------------------------------


def test_rate_is_over_the_recent_window_not_the_whole_run() -> None:
    rate = RecentRate(window_s=10.0, sample_s=0.5)
    total = 0
    for tick in range(1, 601):  # 60 s at 10 pages/s ...
        total += 1
        rate.add(tick / 10, total)
    for tick in range(601, 901):  # ... then 30 s at 1 page/s
        total += 1 if tick % 10 == 0 else 0
        last = rate.add(tick / 10, total)
    assert last == pytest.approx(1.0, abs=0.1)  # the whole run's average would be ~6.8


def test_rate_of_a_single_sample_is_zero() -> None:
    assert RecentRate().add(0.0, 5) == 0.0


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 * 1024**2 + 1, 3 * 1024**5)] == [
        "0 B", "1,023 B", "1.0 KiB", "5.0 MiB", "3072.0 TiB"]


# --- the display ---------------------------------------------------------------------------


def test_plain_mode_prints_at_most_one_line_per_interval() -> None:
    out = io.StringIO()
    view = ProgressDisplay(out, tty=False)
    lines_at: list[float] = []
    for tick in range(1, 131):  # 13 s, updated every 0.1 s, 10 pages a second
        elapsed = tick / 10
        before = out.getvalue().count("\n")
        view.update(status(pages=tick, failed=tick // 10, skipped=2, queued=890, in_flight=12),
                    Tally(), elapsed)
        if out.getvalue().count("\n") > before:
            lines_at.append(elapsed)
    view.close()
    assert lines_at == [PROGRESS_EVERY_S, 2 * PROGRESS_EVERY_S]
    first, second = out.getvalue().splitlines()
    assert first == ("progress: 57 done (50 pages, 5 failed, 2 skipped), 11.0 pages/s, "
                     "890 queued, 12 in flight, 5s")
    assert second.startswith("progress: 112 done (100 pages, 10 failed, 2 skipped), 11.0 pages/s")
    assert second.endswith(", 10s")


def test_plain_mode_never_takes_the_logs() -> None:
    with ProgressDisplay(io.StringIO(), tty=False) as view:
        view.update(status(), Tally(), 0.1)
        assert logs._writer is None


def test_tty_mode_shows_counts_rate_errors_and_busiest_hosts() -> None:
    console, out = terminal()
    tally = Tally()
    for k in range(7):  # host0.test has 7 results ... host6.test 1
        for j in range(7 - k):
            tally.add(result(f"http://host{k}.test/{j}", 200, nbytes=1024))
    tally.add(result("http://host0.test/gone", 404, nbytes=0, error="http_4xx"))
    tally.add(result("http://host0.test/gone2", 410, nbytes=0, error="http_4xx"))
    tally.add(result("http://host6.test/slow", None, nbytes=0, error="timeout"))
    with ProgressDisplay(console=console) as view:
        assert view.tty
        view.update(status(pages=0), tally, 0.1)
        view.update(status(pages=1200, failed=34, queued=890, in_flight=12), tally, 10.1)
        screen = Text.from_ansi(out.getvalue()).plain
    frame = screen.split("crawlfleet crawl")[-1]  # the last one drawn
    for text in ("1,234  (1,200 pages · 34 failed · 0 skipped)", "123.4 pages/s",
                 "890 queued · 12 in flight", "http_4xx 2 · timeout 1", "28.0 KiB", "10s"):
        assert text in frame, text
    hosts = [line.split()[-3:-1] for line in frame.splitlines() if ".test" in line]
    assert hosts == [["host0.test", "9"], ["host1.test", "6"], ["host2.test", "5"],
                     ["host3.test", "4"], ["host4.test", "3"]]  # the top 5 only


@pytest.mark.parametrize("every_s", [0.05, 0.1, 0.2])
def test_tty_mode_redraws_about_4_times_a_second(every_s: float) -> None:
    console, out = terminal()
    with ProgressDisplay(console=console) as view:
        for tick in range(1, round(10 / every_s) + 1):  # 10 s of updates
            view.update(status(pages=tick), Tally(), tick * every_s)
        frames = out.getvalue().count("crawlfleet crawl")
    assert 38 <= frames <= 42


def test_log_lines_go_above_the_live_display_whole(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    console, out = terminal()
    with ProgressDisplay(console=console) as view:
        view.update(status(pages=1), Tally(), 0.1)
        get_logger("crawlfleet.workers").warning("lease_renew_failed", url="http://a.test/" * 12)
        logging.getLogger("aiohttp").warning("from the standard library")
        view.update(status(pages=2), Tally(), 1.0)
    screen = out.getvalue()
    own = next(line for line in screen.splitlines() if "lease_renew_failed" in line)
    # The whole JSON line, after the cursor control that lifted the old frame, in one piece.
    assert own.endswith("Z\"}") and own.count("http://a.test/") == 12
    assert '"event":"from the standard library"' in screen
    # The frame is drawn again below the lines, and nothing reached the real stderr.
    assert screen.rindex("crawlfleet crawl") > screen.index("from the standard library")
    assert capsys.readouterr().err == ""
    # Closed: the logs are back on stderr.
    assert logs._writer is None
    get_logger("t").warning("after")
    assert '"event":"after"' in capsys.readouterr().err


def test_a_failing_crawl_closes_the_display_and_keeps_the_frame(json_logs: None) -> None:
    console, out = terminal()
    with pytest.raises(KeyboardInterrupt), ProgressDisplay(console=console) as view:
        view.update(status(pages=7), Tally(), 0.1)
        raise KeyboardInterrupt
    assert logs._writer is None
    assert out.getvalue().rstrip().endswith("\x1b[?25h")  # cursor back, frame not erased
    view.update(status(pages=8), Tally(), 5.0)  # after close: ignored, not an error
    view.close()


def test_a_clean_end_erases_the_frame_for_the_summary() -> None:
    console, out = terminal()
    with ProgressDisplay(console=console) as view:
        view.update(status(pages=7), Tally(), 0.1)
    assert out.getvalue().endswith("\x1b[2K")  # the last frame's lines cleared


# --- summary -------------------------------------------------------------------------------


def test_summary_of_a_typical_crawl() -> None:
    tally = Tally()
    for i in range(741):
        tally.add(result(f"http://site{i % 3}.test/{i}", 200, nbytes=10_000, at=100.0 + i))
    for i in range(121):
        tally.add(result(f"http://site0.test/missing{i}", 404, nbytes=300, at=500.0,
                         error="http_4xx"))
    for i in range(120):
        tally.add(result(f"http://site1.test/private{i}", None, nbytes=0, at=300.0,
                         error="robots"))
    summary = status(seen=982, pages=741, failed=121, skipped=120, discarded_scope=17,
                     discarded_query_variants=3, retries=4, dead=1, finished=True,
                     elapsed_s=2.55, exported=982)
    text = summary_table(summary, tally, where="out.jsonl")
    rows = {line.split("  ")[1].strip(): line.split("  ", 2)[2].strip()
            for line in text.splitlines()[1:]}
    assert text.splitlines()[0] == "crawl finished in 2.55 s"
    assert rows["pages"] == "741" and rows["skipped"] == "120"
    assert rows["failed"] == "121  (1 out of retries)"
    assert rows["pages/s"] == "338.0"  # (741 + 121) / 2.55
    assert rows["status 2xx"] == "741" and rows["status 4xx"] == "121"
    assert rows["no response"] == "120"
    assert rows["downloaded"] == "7.1 MiB  (7,446,300 bytes)"
    assert rows["error http_4xx"] == "121" and rows["error robots"] == "120"
    assert rows["URLs seen"] == "982" and rows["queued"] == "0" and rows["retries"] == "4"
    assert rows["links out of scope"] == "17" and rows["links query variants"] == "3"
    assert rows["host site0.test"] == "368"  # 247 pages + 121 missing
    assert rows["results"] == "982 lines in out.jsonl"
    assert "1970-01-01 00:01:40 UTC to 1970-01-01 00:14:00 UTC" in rows["fetches"]
    assert all(len(line) <= 100 for line in text.splitlines())


def test_summary_of_an_empty_crawl() -> None:
    text = summary_table(status(elapsed_s=0.0, exported=0), Tally(), where="stdout")
    assert text.startswith("crawl stopped before the end in 0.00 s")
    assert "pages/s" in text and "0.0" in text and "0 B" in text
    assert "0 lines in stdout" in text and "\n  host " not in text and "fetches" not in text
    assert summary_table({}, Tally(), where="stdout").endswith("  stdout")


def test_summary_says_when_the_state_was_lost() -> None:
    text = summary_table(status(state_lost=True, elapsed_s=75.0), Tally(), where="x")
    assert text.splitlines()[0] == "crawl state lost: results incomplete in 1m15s (75 s)"
