"""What the results of a crawl add up to, counted as they are written out.

The frontier's counters (common/stats.py) say how many URLs are where; the tally says what the
fetches returned: status classes, bytes, error classes, the busiest hosts. It holds a fixed
amount of memory however many results and hosts pass through it.
"""

from __future__ import annotations

import heapq
from collections import Counter

import msgspec

from crawlfleet.common.messages import PageResult
from crawlfleet.common.urls import host_key

# Hosts the tally follows (~1 MB): below this many hosts the busiest are counted exactly.
TOP_HOSTS_TRACKED = 10_000


class _Fields(msgspec.Struct):
    """The few fields of a result line the tally reads; msgspec skips the rest unparsed."""

    url: str
    status: int | None = None
    bytes: int = 0
    fetched_at: float | None = None
    error: str | None = None


_decode_fields = msgspec.json.Decoder(_Fields).decode


class TopK:
    """Space-Saving (Metwally et al., 2005): the heaviest keys of a stream in ``capacity``
    slots. While no more than ``capacity`` distinct keys have been seen the counts are exact.
    Past that a new key takes the slot of a least-counted one and inherits its count, so a
    count overestimates by at most ``total / capacity`` and every key seen more often than that
    is in the table. Buckets by count keep each step O(1)."""

    def __init__(self, capacity: int = TOP_HOSTS_TRACKED) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.evictions = 0
        self._count: dict[str, int] = {}
        # count -> the keys holding it (a dict as an ordered set), and the smallest count held.
        self._buckets: dict[int, dict[str, None]] = {}
        self._min = 0

    @property
    def exact(self) -> bool:
        return self.evictions == 0

    def __len__(self) -> int:
        return len(self._count)

    def add(self, key: str) -> None:
        count = self._count.get(key)
        if count is None:
            if len(self._count) < self.capacity:
                count = 0
                self._min = 0  # the new key's count of 1 is now the smallest (fixed below)
            else:
                evicted, _ = self._buckets[self._min].popitem()
                del self._count[evicted]
                self.evictions += 1
                count = self._min
                if not self._buckets[count]:
                    del self._buckets[count]
        else:
            bucket = self._buckets[count]
            del bucket[key]
            if not bucket:
                del self._buckets[count]
        self._count[key] = count + 1
        self._buckets.setdefault(count + 1, {})[key] = None
        if self._min not in self._buckets:
            self._min = count + 1

    def top(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` largest counts, largest first (ties in the order they reached the count)."""
        found: list[tuple[str, int]] = []
        # Each bucket holds at least one key: the n largest counts are enough.
        for count in heapq.nlargest(n, self._buckets):
            for key in self._buckets[count]:
                found.append((key, count))
                if len(found) >= n:
                    return found
        return found


def status_class(status: int | None) -> str:
    """'2xx' ... '5xx'; 'none' when no response came back (DNS, timeout, robots, ...)."""
    if status is None:
        return "none"
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class Tally:
    """Fed every result the crawl writes out: ``add`` for a decoded one, ``add_raw`` for the
    JSON line as stored (decodes five fields, not the whole result)."""

    def __init__(self, *, hosts_tracked: int = TOP_HOSTS_TRACKED) -> None:
        self.results = 0
        self.by_status: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.bytes = 0
        self.hosts = TopK(hosts_tracked)
        self.first_fetched_at: float | None = None
        self.last_fetched_at: float | None = None
        self.unreadable = 0  # lines add_raw could not decode: counted, never raised mid-crawl

    def add(self, result: PageResult) -> None:
        self._count(result.url, result.status, result.bytes, result.fetched_at, result.error)

    def add_raw(self, line: bytes) -> None:
        try:
            f = _decode_fields(line)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.unreadable += 1
            return
        self._count(f.url, f.status, f.bytes, f.fetched_at, f.error)

    def busiest_hosts(self, n: int = 5) -> list[tuple[str, int]]:
        """The ``n`` hosts with the most results; approximate once ``hosts.exact`` is False."""
        return self.hosts.top(n)

    def _count(self, url: str, status: int | None, nbytes: int, fetched_at: float | None,
               error: str | None) -> None:
        self.results += 1
        self.by_status[status_class(status)] += 1
        self.bytes += nbytes
        if error:
            self.errors[error] += 1
        try:
            host = host_key(url)
        except ValueError:
            host = "(invalid URL)"
        self.hosts.add(host)
        if fetched_at is not None:
            if self.first_fetched_at is None or fetched_at < self.first_fetched_at:
                self.first_fetched_at = fetched_at
            if self.last_fetched_at is None or fetched_at > self.last_fetched_at:
                self.last_fetched_at = fetched_at
