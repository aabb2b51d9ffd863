"""CRAWLFLEET_WARC and CRAWLFLEET_TEXT end to end: real redis-server, test web, scheduler and
two workers; the WARC files are judged by warcio's own command line, and every page result is
looked up in them at the offset it names."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from warcio.archiveiterator import ArchiveIterator

from ..conftest import Fleet, RedisServer, WebUnderTest

pytestmark = pytest.mark.integration

WARCIO = str(Path(sys.executable).with_name("warcio"))
NAME = re.compile(r"crawlfleet-\d{14}-(?P<worker>worker-[01])-\d{5}\.warc\.gz")


def warcio(*args: str) -> str:
    done = subprocess.run([WARCIO, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"warcio {' '.join(args)}: {done.stdout[-2000:]}{done.stderr}"
    return done.stdout


def record_at(path: Path, offset: int) -> dict[str, Any]:
    with path.open("rb") as fh:
        fh.seek(offset)
        record = next(iter(ArchiveIterator(fh, check_digests=True)))
        payload = record.content_stream().read()
        return {"type": record.rec_type, "uri": record.rec_headers.get_header("WARC-Target-URI"),
                "status": record.http_headers.get_statuscode() if record.http_headers else None,
                "payload": payload, "digest_ok": record.digest_checker.passed}


def test_warc_files_hold_every_page_and_results_point_at_them(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet], tmp_path: Path,
) -> None:
    web = testweb_factory("--hosts", "3", "--pages", "15", "--extras")
    out = tmp_path / "out"
    fleet = fleet_factory(
        redis_server.url, web, CRAWLFLEET_WARC="1", CRAWLFLEET_TEXT="1",
        CRAWLFLEET_OUTPUT=str(out), CRAWLFLEET_WARC_MAX_BYTES="30000",  # rotate a few times
        CRAWLFLEET_MAX_RETRIES="2", CRAWLFLEET_RETRY_BASE="0.1", CRAWLFLEET_RETRY_MAX="1",
        CRAWLFLEET_DENY_PATTERN="/calendar/|/session",
    )
    workers = fleet.start(*web.seeds, workers=2)
    fleet.wait_finished(timeout=120)
    for name in workers:  # SIGTERM closes each worker's last file
        assert fleet.stop(name, signal.SIGTERM) == 0, fleet.log(name)[-3000:]
    assert '"warc_write_failed"' not in fleet.log("worker-0") + fleet.log("worker-1")

    files = sorted((out / "warc").iterdir())
    names = [NAME.fullmatch(f.name) for f in files]
    assert files and all(names), files  # no .open left behind
    assert {m["worker"] for m in names if m} <= set(workers)  # one may have done it all
    assert len(files) > len(workers)  # rotated by size
    responses: dict[str, list[dict[str, Any]]] = {}
    kinds: Counter[str] = Counter()
    for path in files:
        check = warcio("check", "-v", str(path))
        assert "digest pass" in check and "fail" not in check.lower(), check[-2000:]
        index = [json.loads(line) for line in warcio("index", str(path)).splitlines()]
        assert index[0]["warc-type"] == "warcinfo"
        kinds.update(r["warc-type"] for r in index)
        responses[f"warc/{path.name}"] = [r for r in index if r["warc-type"] == "response"]
    assert kinds["request"] == kinds["response"] >= kinds["metadata"] > 0  # hops: no metadata

    results = fleet.export()
    pages = [r for r in results if r["status"] == 200]
    assert len(pages) > 40
    for result in pages:
        assert result["warc_file"] in responses, result
        record = record_at(out / result["warc_file"], result["warc_offset"])
        assert record["type"] == "response" and record["digest_ok"] is not False
        assert record["uri"] == (result["final_url"] or result["url"])
        assert len(record["payload"]) == result["bytes"]
        assert f"-{result['worker']}-" in result["warc_file"]  # each worker its own series
        offsets = {int(r["offset"]) for r in responses[result["warc_file"]]}
        assert result["warc_offset"] in offsets
    # Followed redirect chains: the result points at the final hop's record.
    chained = [r for r in pages if r["redirects"] and r["url"].endswith("/redirect/1")]
    assert chained and all(r["final_url"].endswith("/redirected/1") for r in chained)
    archived = {r["warc-target-uri"] for rs in responses.values() for r in rs}
    assert {u for r in chained for u in [r["url"], *r["redirects"]]} <= archived
    # A retried 503 is archived like any response, and so is the 200 that came later.
    flaky = [record_at(out / file, int(r["offset"]))["status"] for file, rs in responses.items()
             for r in rs if r["warc-target-uri"].endswith("/flaky/1")]
    assert "503" in flaky and "200" in flaky

    # CRAWLFLEET_TEXT: the test web's HTML pages say <html lang="en"> and have prose.
    html = [r for r in pages if (r["content_type"] or "").startswith("text/html")]
    assert html and all(r["lang"] == "en" and r["text"] for r in html)
    assert not [r for r in pages if r not in html and r["text"] is not None]
