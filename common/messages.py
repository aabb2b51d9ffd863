"""The messages that cross Redis, as versioned msgspec structs encoded as JSON (never pickle).

Every struct carries ``v``; a reader that meets a newer version it cannot read fails loudly
instead of misreading it.
"""

from __future__ import annotations

from typing import Any

import msgspec

VERSION = 1
FETCH_BATCH_JOB = "fetch_batch"  # the arq function the scheduler enqueues and workers run


class QueuedURL(msgspec.Struct, kw_only=True, frozen=True):
    """One URL waiting in a host queue or out in a batch (a JSON object, read by name by the
    frontier's scripts too)."""

    v: int = VERSION
    fp: str
    url: str
    depth: int
    tries: int = 0  # batches of this URL that lost their worker while it was being fetched
    retries: int = 0  # transient failures so far (timeouts, 5xx, 429 ...)


class HostBatch(msgspec.Struct, kw_only=True, frozen=True):
    """The arq job's argument: a pointer to one host's lease. The URLs themselves stay in the
    lease (the frontier's truth) and come back from the claim.

    Written by ``common/commands/dispatch.lua``; ``tests`` decode that output with this struct.
    """

    v: int = VERSION
    batch_id: str
    host: str
    crawl: str  # the crawl marker's id: a batch of a crawl whose state was lost is refused


class PageResult(msgspec.Struct, kw_only=True, frozen=True):
    """What one fetch produced; exported as one JSON line per URL."""

    v: int = VERSION
    url: str
    final_url: str | None
    status: int | None
    content_type: str | None
    depth: int
    title: str | None
    links: int
    bytes: int
    elapsed_ms: float
    fetched_at: float
    error: str | None
    canonical: str | None = None
    noindex: bool = False
    nofollow: bool = False
    encoding: str | None = None
    worker: str | None = None
    redirects: list[str] = []
    # CRAWLFLEET_WARC (workers/warc.py): the WARC file holding the page's final response
    # record (its name in the output, "warc/..."), and that record's offset and length there.
    warc_file: str | None = None
    warc_offset: int | None = None
    warc_length: int | None = None
    # CRAWLFLEET_TEXT (workers/parse.py): the visible text, and the page's language tag.
    text: str | None = None
    lang: str | None = None
    dead: bool = False  # out of retries (a dead letter): `crawlfleet export --dead`


class Seeds(msgspec.Struct, tag="seeds", kw_only=True, frozen=True):
    v: int = VERSION
    urls: list[str]


class ForeignLink(msgspec.Struct, kw_only=True, frozen=True):
    """A link found on one shard for a host another shard owns (common/cluster.py)."""

    host: str
    entry: QueuedURL
    variant: str = ""  # fingerprint of the URL without its query, when it has one


class Links(msgspec.Struct, tag="links", kw_only=True, frozen=True):
    """An outbox entry: links for other shards' hosts, kept on the shard where they were found
    while their own shard could not take them; its scheduler forwards them when it can."""

    v: int = VERSION
    links: list[ForeignLink]


# The events stream carries seeds; workers admit the links they find themselves (progress.lua).
Event = Seeds

_event_decoder = msgspec.json.Decoder(Event)
_result_decoder = msgspec.json.Decoder(PageResult)
_entry_decoder = msgspec.json.Decoder(QueuedURL)
_links_decoder = msgspec.json.Decoder(Links)
_encoder = msgspec.json.Encoder()


class MessageVersionError(ValueError):
    pass


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def _checked(message: Any) -> Any:
    if message.v > VERSION:
        raise MessageVersionError(
            f"{type(message).__name__} has version {message.v}; "
            f"this crawlfleet reads up to {VERSION}"
        )
    return message


def decode_event(data: bytes) -> Event:
    return _checked(_event_decoder.decode(data))  # type: ignore[no-any-return]


def decode_result(data: bytes) -> PageResult:
    return _checked(_result_decoder.decode(data))  # type: ignore[no-any-return]


def decode_entry(data: bytes) -> QueuedURL:
    return _checked(_entry_decoder.decode(data))  # type: ignore[no-any-return]


def decode_links(data: bytes) -> Links:
    return _checked(_links_decoder.decode(data))  # type: ignore[no-any-return]


def batch_from_job(payload: Any) -> HostBatch:
    """The arq job carries the batch as plain JSON data (see ``job_serializer``)."""
    return _checked(msgspec.convert(payload, HostBatch))  # type: ignore[no-any-return]


def job_serializer(obj: Any) -> bytes:
    """arq's job serializer: JSON instead of arq's default, pickle."""
    return _encoder.encode(obj)


def job_deserializer(data: bytes) -> Any:
    return msgspec.json.decode(data)
