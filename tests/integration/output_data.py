"""Synthetic results for the export benchmark-like test: the log filled directly, a sink run
for part of it."""

from __future__ import annotations

import asyncio

from crawlfleet.common.connections import open_redis
from crawlfleet.common.frontier import Frontier
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import PageResult, encode
from crawlfleet.common.settings import Settings
from crawlfleet.common.sink import Sink
from crawlfleet.common.storage import open_store
from crawlfleet.common.urls import fingerprint


def fill_results(redis_url: str, namespace: str, output: str, *, results: int,
                 drained: int) -> int:
    """``results`` results of ~1 KB in the results log, the first ``drained`` of them written
    out by a sink; the bytes of JSON in all."""
    return asyncio.run(_fill(redis_url, namespace, output, results, drained))


async def _fill(redis_url: str, namespace: str, output: str, results: int, drained: int) -> int:
    keys = Keys(namespace)
    redis = open_redis(redis_url)
    total = 0
    try:
        await Frontier(redis, keys).open_crawl()
        for start in range(0, results, 5000):
            async with redis.pipeline(transaction=False) as pipe:
                for n in range(start, min(start + 5000, results)):
                    url = f"https://big.test/page/{n}"
                    data = encode(PageResult(
                        url=url, final_url=url, status=200, content_type="text/html", depth=3,
                        title="t" * 900, links=10, bytes=5000, elapsed_ms=1.0, fetched_at=1.0,
                        error=None))
                    total += len(data)
                    pipe.xadd(keys.results, {"f": fingerprint(url), "r": data})
                await pipe.execute()
        settings = Settings(redis_url=redis_url, namespace=namespace, output=output,
                            output_part_results=5000)
        sink = Sink(settings, redis, open_store(output))
        while sink.results < drained:
            assert await sink.step() is None
        return total
    finally:
        await redis.aclose()
