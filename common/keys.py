"""Every Redis key crawlfleet uses, under one namespace prefix (``CRAWLFLEET_NAMESPACE``).

Two key spaces, built so that no host name can ever produce a fixed key:

* fixed keys, ``{ns}:{name}``, where no name starts with ``h:`` (a test checks it);
* per-host keys, ``{ns}:h:{{host}}:{kind}``. The host is escaped (``%``, ``{``, ``}``), so the
  braces hold exactly the host: the key is injective in (host, kind), and in Redis Cluster all of
  a host's keys share one hash slot.

arq fixes its own prefixes (``arq:job:``, ``arq:in-progress:``, ``arq:retry:``) in front of a job
id; crawlfleet's job ids start with the namespace (``{ns}:b{n}``), so those keys are
``arq:job:{ns}:b{n}`` and are named and purged here too.
"""

from __future__ import annotations

from dataclasses import dataclass

CONSUMER_GROUP = "frontier"  # the scheduler's consumer group on the events stream
HOST_PREFIX = "h:"
HOST_KINDS = ("q", "lease", "fetching")  # per-host key kinds, see Keys.host_*
ARQ_PREFIXES = ("arq:job:", "arq:in-progress:", "arq:retry:")


# The seen set's buckets stay intsets (Redis's set-max-intset-entries, 512 by default) while they
# hold fewer members than that; aiming at 384 on average leaves room for the spread between
# buckets (a few standard deviations of a Poisson count at that mean).
INTSET_LIMIT = 512
BUCKET_FILL = 384


def seen_digits(expected_urls: int) -> int:
    """Hex digits of the fingerprint that name its seen bucket, for a crawl of about
    ``expected_urls`` URLs: the fewest (at least 3, so the member fits a Lua number exactly)
    that keep buckets at BUCKET_FILL members on average. 3 digits (4,096 buckets) stay compact
    up to ~1.6 M URLs, 4 up to ~25 M, 5 up to ~400 M; past that buckets turn into hash tables,
    still exact, at ~60 bytes a member instead of 8."""
    digits = 3
    while digits < 8 and expected_urls > BUCKET_FILL * 16**digits:
        digits += 1
    return digits


def escape_host(host: str) -> str:
    """The host as it stands between the braces of its keys (``%``, ``{`` and ``}`` escaped)."""
    return host.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


# The names of the fixed keys, relative to the namespace. Keys.fixed() lists them for tests.
_FIXED = {
    "events": "events",  # STREAM: seeds, read by the scheduler's consumer group
    "crawl": "crawl",  # HASH: the crawl marker (id, created_at, state_lost_at, lost_id)
    # Prefix of the seen set's buckets: SETs of integers, {ns}:seen:{first digits of the fp}
    # -> the fp's other digits as an integer (intset-encoded while small; see seen_slot).
    "seen": "seen:",
    "scope_hosts": "scope:hosts",  # SET of host names in scope (the seeds' hosts)
    "scope_ports": "scope:ports",  # SET of the ports the seeds name (allowed besides 80, 443)
    "ready": "ready",  # ZSET host -> earliest time its next batch may go out
    "not_before": "host:not-before",  # HASH host -> earliest next request (delay, backoff)
    "lease_batch": "lease:batch",  # HASH host -> id of the batch that holds its lease
    "waiting": "waiting",  # ZSET host -> dispatch time, while its batch waits for a worker
    # STRING, short expiry: how many more hosts a worker with nothing to do would take (its
    # empty polls set it); progress.lua hands it hosts of workers short of fetch slots.
    "hungry": "workers:hungry",
    "leases": "leases",  # ZSET host -> lease expiry, once a worker has claimed the batch
    # STREAM: every result as it leaves the frontier (fields f: fingerprint, r: PageResult
    # JSON, with "dead":true for a URL out of retries), in the order they finished. Export reads
    # it; with an output set, the sink drains it (common/sink.py) and trims what it wrote.
    "results": "results:log",
    # HASH claim's first entry id -> "last id|owner|expiry": ranges of the results log a sink
    # is writing out as one part (sink_take.lua, sink_done.lua).
    "sink_claims": "sink:claims",
    "sink_cursor": "sink:claimed",  # STRING: the last results-log id handed to a claim
    "output": "output",  # STRING: where the sinks write (a directory or s3://...), for export
    # HASH file key -> "last id|bytes": how far `crawl --out FILE` has written the results log.
    "out_files": "out:files",
    "stats": "stats",  # HASH of counters, see common.stats
    "rate": "rate",  # HASH unix second -> URLs finished in it
    "host_pages": "host:pages",  # HASH host -> URLs admitted (the per-host page budget)
    "query_variants": "query:variants",  # HASH fp of URL-without-query -> URLs admitted
    "robots": "robots",  # HASH origin -> cached robots.txt (JSON), shared by all workers
    "sitemaps": "sitemaps",  # SET of Sitemap: URLs found in robots.txt files
    "quarantine": "quarantine",  # STREAM: malformed entries (source, reason, data)
    "quarantine_logged": "quarantine:logged",  # STRING: last quarantine id the scheduler logged
    "scheduler_lock": "scheduler:lock",  # STRING: the leading scheduler's id, short expiry
    # STRING, short expiry: the id of a scheduler that leads no shard and would take one; a
    # scheduler leading several shards hands one back when it sees it (scheduler/sharded.py).
    "scheduler_standby": "scheduler:standby",
    "batch_seq": "batch:seq",  # STRING: counter for batch ids
    "arq_queue": "arq:queue",  # ZSET: arq's job queue (job id -> score)
    # Pub/sub channel, not a key: dispatch.lua publishes on it when it queues jobs, so that
    # workers whose polls have slowed down (nothing to take for a while) look at once.
    "arq_wake": "arq:wake",
    # Pub/sub channel: the scheduler's wake-up. A script publishes when the scheduler has work
    # it could not have foreseen (a host newly ready, a lease released, room for a batch, new
    # seeds); otherwise it sleeps until the next ready time or housekeeping pass.
    "scheduler_wake": "scheduler:wake",
    # STRING, 1 s expiry: a wake-up is on its way (set with the message, cleared by dispatch.lua
    # at each pass): a hundred turns ending between two passes send one message, not a hundred.
    "scheduler_woken": "scheduler:woken",
    # STRING "index/count": which shard of how many this Redis is for the namespace, written
    # by the first process of a sharded crawl and checked by every later one (cluster.py).
    "shard": "shard",
    # STREAM: links found here for other shards' hosts while those shards were unreachable
    # (field m: a Links message); this shard's scheduler forwards them (cluster.py).
    "outbox": "outbox",
    # STRING, for a minute: a token `crawlfleet reshard` writes to tell whether two URLs of
    # its lists reach one Redis server (cli/reshard.py).
    "server_probe": "reshard:probe",
}


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str

    def _k(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    @property
    def prefix(self) -> str:
        """``{ns}:``, for Lua scripts that derive per-host keys themselves."""
        return self._k("")

    @classmethod
    def fixed_names(cls) -> dict[str, str]:
        return dict(_FIXED)

    # Per-host keys.
    def host_key(self, host: str, kind: str) -> str:
        return f"{self.namespace}:{HOST_PREFIX}{{{escape_host(host)}}}:{kind}"

    def host_queue(self, host: str) -> str:  # LIST of the host's queued URL entries
        return self.host_key(host, "q")

    def host_lease(self, host: str) -> str:  # HASH fp -> entry: the host's URLs out in a batch
        return self.host_key(host, "lease")

    def host_fetching(self, host: str) -> str:  # SET of fps being fetched under the lease
        return self.host_key(host, "fetching")

    @property
    def host_pattern(self) -> str:
        """SCAN pattern of every per-host key (``check``, ``purge``)."""
        return f"{self.namespace}:{HOST_PREFIX}*"

    # arq's keys for one of our jobs.
    def batch_id(self, seq: int) -> str:
        return f"{self.namespace}:b{seq}"

    def arq_job(self, job_id: str) -> str:
        return ARQ_PREFIXES[0] + job_id

    def arq_in_progress(self, job_id: str) -> str:
        return ARQ_PREFIXES[1] + job_id

    def arq_retry(self, job_id: str) -> str:
        return ARQ_PREFIXES[2] + job_id

    def arq_health_check(self, worker_id: str) -> str:
        """One health-check key per worker (arq's default is one per queue, shared by all)."""
        return f"{self.arq_queue}:health-check:{worker_id}"

    @property
    def purge_patterns(self) -> tuple[str, ...]:
        """SCAN patterns that together match every key of this crawl."""
        return (f"{self.namespace}:*", *(p + f"{self.namespace}:*" for p in ARQ_PREFIXES))

    # Fixed keys, one property each so that a typo is an AttributeError, not a new key.
    @property
    def events(self) -> str:
        return self._k(_FIXED["events"])

    @property
    def crawl(self) -> str:
        return self._k(_FIXED["crawl"])

    @property
    def seen(self) -> str:
        """The prefix of the seen set's buckets (see :func:`seen_slot`)."""
        return self._k(_FIXED["seen"])

    @property
    def seen_pattern(self) -> str:
        return self.seen + "*"

    def seen_slot(self, fp: str, digits: int) -> tuple[str, int]:
        """The bucket key and member of fingerprint ``fp`` (16 hex digits): its first
        ``digits`` hex digits name the bucket, the rest is the member. lib.lua splits alike."""
        return self.seen + fp[:digits], int(fp[digits:], 16)

    def seen_fp(self, bucket_key: str, member: int | str) -> str:
        """The fingerprint back from a bucket key and one of its members."""
        head = bucket_key[len(self.seen):]
        return f"{head}{int(member):0{16 - len(head)}x}"

    @property
    def scope_hosts(self) -> str:
        return self._k(_FIXED["scope_hosts"])

    @property
    def scope_ports(self) -> str:
        return self._k(_FIXED["scope_ports"])

    @property
    def ready(self) -> str:
        return self._k(_FIXED["ready"])

    @property
    def not_before(self) -> str:
        return self._k(_FIXED["not_before"])

    @property
    def lease_batch(self) -> str:
        return self._k(_FIXED["lease_batch"])

    @property
    def waiting(self) -> str:
        return self._k(_FIXED["waiting"])

    @property
    def hungry(self) -> str:
        return self._k(_FIXED["hungry"])

    @property
    def leases(self) -> str:
        return self._k(_FIXED["leases"])

    @property
    def results(self) -> str:
        return self._k(_FIXED["results"])

    @property
    def sink_claims(self) -> str:
        return self._k(_FIXED["sink_claims"])

    @property
    def sink_cursor(self) -> str:
        return self._k(_FIXED["sink_cursor"])

    @property
    def output(self) -> str:
        return self._k(_FIXED["output"])

    @property
    def out_files(self) -> str:
        return self._k(_FIXED["out_files"])

    @property
    def stats(self) -> str:
        return self._k(_FIXED["stats"])

    @property
    def rate(self) -> str:
        return self._k(_FIXED["rate"])

    @property
    def host_pages(self) -> str:
        return self._k(_FIXED["host_pages"])

    @property
    def query_variants(self) -> str:
        return self._k(_FIXED["query_variants"])

    @property
    def robots(self) -> str:
        return self._k(_FIXED["robots"])

    @property
    def sitemaps(self) -> str:
        return self._k(_FIXED["sitemaps"])

    @property
    def quarantine(self) -> str:
        return self._k(_FIXED["quarantine"])

    @property
    def quarantine_logged(self) -> str:
        return self._k(_FIXED["quarantine_logged"])

    @property
    def scheduler_lock(self) -> str:
        return self._k(_FIXED["scheduler_lock"])

    @property
    def batch_seq(self) -> str:
        return self._k(_FIXED["batch_seq"])

    @property
    def arq_queue(self) -> str:
        return self._k(_FIXED["arq_queue"])

    @property
    def shard(self) -> str:
        return self._k(_FIXED["shard"])

    @property
    def outbox(self) -> str:
        return self._k(_FIXED["outbox"])

    @property
    def scheduler_standby(self) -> str:
        return self._k(_FIXED["scheduler_standby"])

    @property
    def arq_wake(self) -> str:
        return self._k(_FIXED["arq_wake"])

    @property
    def scheduler_wake(self) -> str:
        return self._k(_FIXED["scheduler_wake"])

    @property
    def scheduler_woken(self) -> str:
        return self._k(_FIXED["scheduler_woken"])

    @property
    def server_probe(self) -> str:
        return self._k(_FIXED["server_probe"])
