"""``crawlfleet export``: every result once, from wherever it is, streamed.

The results log in Redis when no output is set; the output's parts (and what the sinks have
not drained yet) when one is. JSON lines are passed through as stored; CSV decodes each result.
``--failed`` keeps the results with an error (robots.txt refusals are skipped, not failed) and
``--dead`` those that ran out of retries.
"""

from __future__ import annotations

import csv
import io
import sys
from typing import IO, Any

import msgspec

from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import PageResult, decode_result
from crawlfleet.common.resultlog import current_crawl, iter_results, output_store

FORMATS = ("jsonl", "csv")
# CSV columns: every PageResult field but the version, in the struct's order.
CSV_COLUMNS = tuple(f for f in PageResult.__struct_fields__ if f != "v")


def _keep(result: PageResult, *, failed: bool, dead: bool) -> bool:
    if dead and not result.dead:
        return False
    return not (failed and (result.error is None or result.error == "robots"))


def _csv_row(result: PageResult) -> list[Any]:
    row = []
    for name in CSV_COLUMNS:
        value = getattr(result, name)
        if isinstance(value, list):
            value = " ".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        row.append("" if value is None else value)
    return row


async def write_results(redis: Any, keys: Keys, out: IO[bytes], *, output: str | None = None,
                        fmt: str = "jsonl", failed: bool = False, dead: bool = False) -> int:
    """Stream every result that passes the filters to ``out``; the count. A result this
    version cannot read is left out with a one-line note (``check`` lists it)."""
    store = await output_store(redis, keys, output)
    crawl_id = await current_crawl(redis, keys)
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True) \
        if fmt == "csv" else None
    writer = csv.writer(text) if text is not None else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    count = 0
    try:
        async for stored in iter_results(redis, keys, store, crawl_id):
            try:
                result = decode_result(stored.data)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                print(f"crawlfleet export: result at {stored.where} left out, unreadable: "
                      f"{exc}", file=sys.stderr)
                continue
            if not _keep(result, failed=failed, dead=dead):
                continue
            if writer is None:
                out.write(stored.data + b"\n")
            else:
                writer.writerow(_csv_row(result))
            count += 1
    finally:
        if text is not None:
            text.detach()  # the caller owns ``out``
    return count
