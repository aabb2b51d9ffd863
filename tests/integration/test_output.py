"""Where the pages go: sinks draining Redis exactly once, resumable crawls, --out protection,
and export streaming a big crawl in bounded memory."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from warcio.archiveiterator import ArchiveIterator

from ..conftest import CRAWLFLEET, Fleet, RedisServer, WebUnderTest, wait_for
from ..moto_server import (  # noqa: F401  (fixtures)
    MotoServer,
    moto_server_fixture,
    s3_client,
    s3_environ,
    s3_objects,
    s3_output_fixture,
)

pytestmark = pytest.mark.integration


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def urls_in(path: Path) -> list[str]:
    return [json.loads(line)["url"] for line in lines_of(path)]


def assert_once_each(urls: list[str], web: WebUnderTest) -> None:
    duplicated = [u for u, n in Counter(urls).items() if n > 1]
    assert not duplicated, f"{len(duplicated)} results twice, e.g. {duplicated[:3]}"
    assert sorted(urls) == web.reachable()


def test_a_fleet_with_sinks_leaves_no_result_in_redis(
    redis_server: RedisServer, testweb: WebUnderTest, fleet_factory: Callable[..., Fleet],
    tmp_path: Path,
) -> None:
    out = tmp_path / "output"
    fleet = fleet_factory(redis_server.url, testweb, CRAWLFLEET_OUTPUT=str(out),
                          CRAWLFLEET_OUTPUT_PART_RESULTS="25",
                          CRAWLFLEET_OUTPUT_PART_SECONDS="0.5")
    fleet.start(*testweb.seeds, workers=2)
    fleet.spawn("sink-a", "sink")
    fleet.spawn("sink-b", "sink")
    fleet.wait_finished()
    # Every result leaves Redis once a part holds it.
    wait_for(lambda: fleet.status()["results_in_redis"] == 0, timeout=30,
             what="the sinks to drain the results log")
    parts = sorted(out.glob("results/*/*/part-*.jsonl"))
    assert len(parts) >= 2
    assert_once_each([json.loads(line)["url"] for p in parts for line in lines_of(p)], testweb)
    fleet.check()  # counts the parts: no URL twice, none missing
    # export finds the parts without CRAWLFLEET_OUTPUT (the sinks recorded it), as CSV too.
    exported = fleet.run("export", CRAWLFLEET_OUTPUT="").stdout
    assert_once_each([json.loads(line)["url"] for line in exported.splitlines()], testweb)
    csv_lines = fleet.run("export", "--format", "csv").stdout.splitlines()
    assert csv_lines[0].startswith("url,final_url,status") and len(csv_lines) == len(
        testweb.reachable()) + 1
    failed = [json.loads(x) for x in fleet.run("export", "--failed").stdout.splitlines()]
    assert failed and all(r["error"] not in (None, "robots") for r in failed)
    for name in ("sink-a", "sink-b"):
        assert fleet.stop(name) == 0
    assert '"part_written"' in fleet.log("sink-a") + fleet.log("sink-b")


def test_a_sink_killed_again_and_again_writes_each_result_once(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet], tmp_path: Path,
) -> None:
    web = testweb_factory("--hosts", "4", "--pages", "80", "--latency-ms", "60")
    out = tmp_path / "output"
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_OUTPUT=str(out),
                          CRAWLFLEET_PER_HOST_CONCURRENCY="1",  # ~5 s: room for kills
                          CRAWLFLEET_OUTPUT_PART_RESULTS="10",
                          CRAWLFLEET_OUTPUT_PART_SECONDS="0.2",
                          CRAWLFLEET_LEASE_SECONDS="1")  # a lost sink's claim returns fast
    fleet.start(*web.seeds, workers=2)
    kills = 0
    fleet.spawn("sink", "sink")

    def kill_sink_until_finished() -> bool:
        nonlocal kills
        if fleet.status()["finished"]:
            return True
        fleet.stop("sink", signal.SIGKILL)
        kills += 1
        fleet.spawn("sink", "sink")
        return False

    wait_for(kill_sink_until_finished, timeout=120, what="the crawl to finish", every=0.8)
    wait_for(lambda: fleet.status()["results_in_redis"] == 0, timeout=60,
             what="the last sink to drain the log")
    assert kills >= 3
    fleet.check()
    exported = fleet.run("export").stdout
    assert_once_each([json.loads(line)["url"] for line in exported.splitlines()], web)


def interrupt_after(command: list[str], env: dict[str, str], out: Path,
                    lines: int) -> subprocess.CompletedProcess[str]:
    """Start a crawl, SIGINT it once ``out`` has ``lines`` results, and wait for its exit."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for(lambda: len(lines_of(out)) >= lines or process.poll() is not None,
                 timeout=60, what=f"{lines} results in {out}")
        assert process.poll() is None, "the crawl ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("backend", ["embedded", "redis"])
def test_ctrl_c_and_the_same_command_again_continues_the_crawl(
    backend: str, redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet], tmp_path: Path,
) -> None:
    web = testweb_factory("--hosts", "4", "--pages", "60", "--latency-ms", "20")
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_PER_HOST_CONCURRENCY="1",
                          CRAWLFLEET_CRAWL_DELAY="0.05")
    if backend == "embedded":
        del fleet.env["CRAWLFLEET_REDIS_URL"]
    out = tmp_path / "results.jsonl"
    command = [CRAWLFLEET, "crawl", *web.seeds, "--out", str(out)]
    first = interrupt_after(command, fleet.env, out, lines=20)
    assert first.returncode == 1, first.stderr[-2000:]
    assert "run the same command again to continue" in first.stderr
    state = Path(f"{out}.crawl-state")
    assert state.exists() == (backend == "embedded")
    partial = urls_in(out)
    assert 20 <= len(partial) < len(web.reachable())

    second = subprocess.run(command, env=fleet.env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "crawl finished" in second.stderr
    urls = urls_in(out)
    assert urls[:len(partial)] == partial  # appended, not rewritten
    assert_once_each(urls, web)
    assert not state.exists()  # a finished crawl keeps no state
    # Continued, not started over: each page was fetched about once (a few were in flight at
    # the Ctrl-C; robots.txt once per host per run).
    assert web.stats()["total_requests"] <= len(web.reachable()) + 4 * 2 + 8


def test_an_existing_out_file_is_never_overwritten_silently(
    testweb: WebUnderTest, fleet_factory: Callable[..., Fleet], tmp_path: Path,
) -> None:
    fleet = fleet_factory("unused", testweb)
    del fleet.env["CRAWLFLEET_REDIS_URL"]
    out = tmp_path / "mine.jsonl"
    out.write_text("my own notes\n")
    refused = fleet.run("crawl", *testweb.seeds, "--out", str(out), check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"crawlfleet crawl: {out} exists and is not this crawl's: pass --overwrite to replace "
        "it, or choose another --out")
    assert out.read_text() == "my own notes\n"
    done = fleet.run("crawl", *testweb.seeds, "--out", str(out), "--overwrite")
    assert "crawl finished" in done.stderr
    assert_once_each(urls_in(out), testweb)


def test_export_streams_a_big_crawl_in_bounded_memory(
    redis_server: RedisServer, testweb: WebUnderTest, fleet_factory: Callable[..., Fleet],
    tmp_path: Path,
) -> None:
    """100,000 synthetic results of ~1 KB, half in parts and half still in the results log:
    export prints each once while its memory grows by far less than the data."""
    from tests.integration.output_data import fill_results

    out = tmp_path / "output"
    fleet = fleet_factory(redis_server.url, testweb, CRAWLFLEET_OUTPUT=str(out))
    baseline = _peak_rss_mb(fleet, tmp_path / "empty.jsonl")
    total_bytes = fill_results(redis_server.url, fleet.env["CRAWLFLEET_NAMESPACE"], str(out),
                               results=100_000, drained=50_000)
    target = tmp_path / "all.jsonl"
    peak = _peak_rss_mb(fleet, target)
    with open(target, "rb") as handle:
        count = sum(1 for _ in handle)
    assert count == 100_000
    grown = peak - baseline
    print(f"\nexport: 100000 results, {total_bytes / 1e6:.0f} MB, peak RSS {peak:.0f} MB "
          f"({grown:+.0f} MB over an empty export)")
    assert grown < total_bytes / 1e6 / 4, (peak, baseline, total_bytes)


def _peak_rss_mb(fleet: Fleet, target: Path) -> float:
    """Peak RSS of one ``crawlfleet export`` run, alone among this test's children."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, CRAWLFLEET, "export", "--out", str(target)],
                          env=fleet.env, capture_output=True, text=True, timeout=300,
                          check=True)
    assert resource.RUSAGE_CHILDREN is not None
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def test_a_bucket_receives_the_parts(
    redis_server: RedisServer, testweb: WebUnderTest, fleet_factory: Callable[..., Fleet],
    s3_output: str, moto_server: MotoServer, tmp_path: Path,
) -> None:
    """An S3-compatible bucket on loopback (moto's server mode) as the output: the sinks put
    parts there and the workers their WARC files, export and check read the parts back, every
    page's response record is at its stored offset, and no credential reaches a log."""
    fleet = fleet_factory(redis_server.url, testweb, CRAWLFLEET_OUTPUT=s3_output,
                          CRAWLFLEET_OUTPUT_PART_RESULTS="40", CRAWLFLEET_WARC="1",
                          **s3_environ(moto_server.endpoint))
    fleet.start(*testweb.seeds, workers=1)
    fleet.spawn("sink", "sink")
    fleet.wait_finished()
    wait_for(lambda: fleet.status()["results_in_redis"] == 0, timeout=30,
             what="the sink to drain the log into the bucket")
    objects = s3_objects(s3_output, moto_server.endpoint)
    parts = [key for key in objects if "/results/" in key and key.endswith(".jsonl")]
    assert len(parts) >= 2, sorted(objects)
    fleet.check()
    exported = fleet.run("export").stdout
    assert_once_each([json.loads(line)["url"] for line in exported.splitlines()], testweb)
    assert fleet.stop("sink") == 0
    assert fleet.stop("worker-0") == 0  # closes its WARC file, which goes up to the bucket
    warcs = wait_for(lambda: [k for k in s3_objects(s3_output, moto_server.endpoint)
                              if k.endswith(".warc.gz")], timeout=30,
                     what="the worker's WARC file in the bucket")
    local = tmp_path / "warc"
    local.mkdir()
    client = s3_client(moto_server.endpoint)
    bucket = s3_output.removeprefix("s3://").partition("/")[0]
    for key in warcs:
        client.download_file(bucket, key, str(local / key.rsplit("/", 1)[-1]))
    pages = [json.loads(line) for line in exported.splitlines()]
    for page in (p for p in pages if p["status"] == 200):
        path = local / page["warc_file"].rsplit("/", 1)[-1]
        with open(path, "rb") as handle:
            handle.seek(page["warc_offset"])
            record = next(iter(ArchiveIterator(handle)))
        assert record.rec_type == "response"
        assert record.rec_headers.get_header("WARC-Target-URI") in (page["final_url"],
                                                                    page["url"])
    secret = s3_environ(moto_server.endpoint)["AWS_SECRET_ACCESS_KEY"]
    for name in ("sink", "worker-0", "scheduler"):
        assert secret not in fleet.log(name)
