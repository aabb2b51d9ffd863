"""Every Redis key crawlfleet uses, under one namespace prefix (``CRAWLFLEET_NAMESPACE``)."""

from __future__ import annotations

from dataclasses import dataclass

CONSUMER_GROUP = "frontier"  # the scheduler's consumer group on the events stream
HOST_QUEUE = "q:"  # + host: LIST of the host's queued URL entries
HOST_LEASE = "lease:"  # + host: HASH fingerprint -> entry, the host's URLs out in a batch

# The same names for the Lua scripts, which derive per-host keys from ``Keys.prefix``.
LUA_HOST_KEYS = f"""
local function host_queue(prefix, host) return prefix .. '{HOST_QUEUE}' .. host end
local function host_lease(prefix, host) return prefix .. '{HOST_LEASE}' .. host end
"""


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str

    def _k(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    # Workers and the seed command append here; the scheduler reads it with a consumer group.
    @property
    def events(self) -> str:
        return self._k("events")

    @property
    def seen(self) -> str:  # SET of URL fingerprints ever admitted
        return self._k("seen")

    @property
    def scope_hosts(self) -> str:  # SET of host names in scope (the seeds' hosts)
        return self._k("scope:hosts")

    @property
    def ready(self) -> str:  # ZSET host -> earliest time its next batch may go out
        return self._k("ready")

    @property
    def not_before(self) -> str:  # HASH host -> earliest next request (crawl delay, backoff)
        return self._k("host:not-before")

    @property
    def leases(self) -> str:  # ZSET host -> lease expiry
        return self._k("leases")

    @property
    def lease_batch(self) -> str:  # HASH host -> id of the batch that holds the lease
        return self._k("lease:batch")

    @property
    def waiting(self) -> str:  # ZSET batch id -> dispatch time, until a worker starts it
        return self._k("waiting")

    @property
    def results(self) -> str:  # HASH fingerprint -> page result JSON
        return self._k("results")

    @property
    def stats(self) -> str:  # HASH of counters, see common.stats
        return self._k("stats")

    @property
    def rate(self) -> str:  # HASH unix second -> pages finished in it
        return self._k("rate")

    @property
    def host_pages(self) -> str:  # HASH host -> URLs admitted (the per-host page budget)
        return self._k("host:pages")

    @property
    def query_variants(self) -> str:  # HASH fingerprint of URL-without-query -> URLs admitted
        return self._k("query:variants")

    @property
    def robots(self) -> str:  # HASH origin -> cached robots.txt (JSON), shared by all workers
        return self._k("robots")

    @property
    def sitemaps(self) -> str:  # SET of Sitemap: URLs found in robots.txt files
        return self._k("sitemaps")

    @property
    def dead_letter(self) -> str:  # HASH fingerprint -> last failure of a URL out of retries
        return self._k("dead")

    @property
    def scheduler_lock(self) -> str:  # the active scheduler's id, with a short expiry
        return self._k("scheduler:lock")

    @property
    def batch_seq(self) -> str:
        return self._k("batch:seq")

    @property
    def arq_queue(self) -> str:
        return self._k("arq:queue")

    def host_queue(self, host: str) -> str:
        return self._k(HOST_QUEUE + host)

    def host_lease(self, host: str) -> str:
        return self._k(HOST_LEASE + host)

    @property
    def prefix(self) -> str:
        """For Lua scripts that derive per-host keys themselves."""
        return self._k("")
