"""Settings, messages, scope and seed parsing: pure logic, no sockets."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from crawlfleet.cli.seed import parse_seed_lines
from crawlfleet.common.messages import (
    HostBatch,
    MessageVersionError,
    QueuedURL,
    Seeds,
    batch_from_job,
    decode_entry,
    decode_event,
    encode,
    job_deserializer,
    job_serializer,
)
from crawlfleet.common.scope import (
    ScopeRules,
    host_allowed,
    out_of_scope,
    query_variant_key,
    repeated_segments,
)
from crawlfleet.common.settings import Settings, SettingsError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_settings_read_every_type_from_the_environment() -> None:
    s = Settings.from_env({
        "CRAWLFLEET_MAX_IN_FLIGHT": "128",
        "CRAWLFLEET_FETCH_TIMEOUT": "2.5",
        "CRAWLFLEET_ALLOW_PRIVATE": "yes",
        "CRAWLFLEET_DNS_NAMESERVERS": "127.0.0.1:5353, 10.0.0.2",
        "CRAWLFLEET_MAX_DEPTH": "3",
        "CRAWLFLEET_MAX_PAGES": "",
    })
    assert (s.max_in_flight, s.fetch_timeout, s.allow_private) == (128, 2.5, True)
    assert s.dns_nameservers == ("127.0.0.1:5353", "10.0.0.2")
    assert (s.max_depth, s.max_pages) == (3, None)


def test_the_old_name_of_a_renamed_setting_still_works() -> None:
    assert Settings.from_env({"CRAWLFLEET_REQUEST_TIMEOUT": "7"}).fetch_timeout == 7.0
    both = {"CRAWLFLEET_REQUEST_TIMEOUT": "7", "CRAWLFLEET_FETCH_TIMEOUT": "9"}
    assert Settings.from_env(both).fetch_timeout == 9.0  # the new name wins


def test_flags_override_the_environment_and_none_is_ignored() -> None:
    s = Settings.from_env({"CRAWLFLEET_NAMESPACE": "env"},
                          overrides={"namespace": "flag", "redis_url": None})
    assert s.namespace == "flag" and s.redis_url == Settings().redis_url


@pytest.mark.parametrize(("variable", "value"), [
    ("CRAWLFLEET_MAX_IN_FLIGHT", "lots"),
    ("CRAWLFLEET_MAX_IN_FLIGHT", "0"),
    ("CRAWLFLEET_ALLOW_PRIVATE", "maybe"),
    ("CRAWLFLEET_FETCH_TIMEOUT", "-1"),
    ("CRAWLFLEET_READ_TIMEOUT", "0"),
    ("CRAWLFLEET_DNS_NAMESERVERS", "dns.example:53"),
    ("CRAWLFLEET_DNS_NAMESERVERS", "127.0.0.1:99999"),
    ("CRAWLFLEET_LOG_FORMAT", "xml"),
    ("CRAWLFLEET_NAMESPACE", "a:b"),
    ("CRAWLFLEET_CRAWL_DELAY", "nan"),
    ("CRAWLFLEET_LEASE_SECONDS", "inf"),
    ("CRAWLFLEET_LOG_LEVEL", "loud"),
    ("CRAWLFLEET_REDIS_URL", "notaurl"),
])
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


def test_every_setting_is_documented_in_the_readme() -> None:
    documented = set(re.findall(r"`(CRAWLFLEET_[A-Z_]+)`", README.read_text()))
    variables = {row[0] for row in Settings().describe()}
    assert variables <= documented, variables - documented


def test_messages_round_trip_as_json_with_a_version() -> None:
    entry = QueuedURL(fp="0123456789abcdef", url="http://a.test/", depth=2, tries=1)
    assert decode_entry(encode(entry)) == entry
    # An object, read by name (the Lua commands too), whatever the field order.
    assert msgspec.json.decode(encode(entry))["fp"] == "0123456789abcdef"
    assert decode_entry(b'{"url":"http://a.test/","depth":2,"fp":"0123456789abcdef",'
                        b'"tries":1,"v":1}') == entry
    seeds = Seeds(urls=["http://a.test/"])
    assert decode_event(encode(seeds)) == seeds
    assert msgspec.json.decode(encode(seeds))["type"] == "seeds"


def test_the_stream_carries_only_seeds() -> None:
    """Workers admit their links themselves (progress.lua): an old worker's link report on
    the stream is refused, and the scheduler quarantines it."""
    old_report = (b'{"type":"links","v":1,"batch_id":"b1","host":"a.test","worker":"w",'
                  b'"groups":[[1,["http://a.test/x"]]],"pages":1,"failed":0,"final":true}')
    with pytest.raises(msgspec.ValidationError):
        decode_event(old_report)


def test_a_newer_message_version_is_refused() -> None:
    with pytest.raises(MessageVersionError):
        decode_event(b'{"type":"seeds","v":2,"urls":[]}')
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"type":"seeds","v":1}')


def test_arq_jobs_are_json_not_pickle() -> None:
    batch = HostBatch(batch_id="ns:b1", host="a.test", crawl="c0ffee")
    job = {"t": 1, "f": "fetch_batch", "a": [msgspec.to_builtins(batch)], "k": {}, "et": 1}
    wire = job_serializer(job)
    assert wire.startswith(b"{") and b"fetch_batch" in wire
    assert batch_from_job(job_deserializer(wire)["a"][0]) == batch


def test_scope_host_and_depth() -> None:
    hosts = {"a.test"}
    rules = ScopeRules(max_depth=2)
    assert out_of_scope("http://a.test/", "a.test", 2, allowed_hosts=hosts, rules=rules) is None
    assert out_of_scope("http://b.test/", "b.test", 0, allowed_hosts=hosts, rules=rules) == "host"
    assert out_of_scope("http://a.test/", "a.test", 3, allowed_hosts=hosts, rules=rules) == "depth"


def test_scope_subdomains_and_allowed_domains() -> None:
    seeds = {"example.org"}
    strict = ScopeRules.from_settings(Settings(allowed_domains=("other.net",)))
    loose = ScopeRules.from_settings(Settings(include_subdomains=True))
    assert host_allowed("other.net", seeds, strict)
    assert not host_allowed("docs.example.org", seeds, strict)
    assert host_allowed("docs.example.org", seeds, loose)
    assert not host_allowed("badexample.org", seeds, loose)  # a suffix, not a subdomain


def test_scope_patterns_length_and_repeated_segments() -> None:
    rules = ScopeRules.from_settings(Settings(deny_pattern=r"/logout|\.zip$",
                                              allow_pattern=r"^https?://a\.test/",
                                              max_url_length=40, max_repeated_segments=2))
    def check(url: str) -> str | None:
        return out_of_scope(url, "a.test", 0, allowed_hosts={"a.test"}, rules=rules)
    assert check("http://a.test/docs/page") is None
    assert check("http://a.test/logout") == "pattern"
    assert check("http://a.test/files/x.zip") == "pattern"
    assert check("http://a.test/" + "x" * 40) == "too_long"
    assert check("http://a.test/a/b/a/b/a") == "repeated_segments"
    assert check("http://a.test/a/b/a/b") is None
    assert repeated_segments("http://a.test/") == 0
    assert query_variant_key("http://a.test/s?id=1") == "http://a.test/s"
    assert query_variant_key("http://a.test/s") is None


def test_a_bad_pattern_names_its_variable() -> None:
    with pytest.raises(SettingsError, match="CRAWLFLEET_DENY_PATTERN"):
        Settings.from_env({"CRAWLFLEET_DENY_PATTERN": "(unclosed"})


def test_seed_lines_are_canonicalised_and_bad_ones_numbered() -> None:
    lines = ["https://Example.ORG:443/a#x", "", "# comment", "mailto:x@example.org",
             "example.org/no-scheme", "http://", "http://b.example/  "]
    seeds, errors = parse_seed_lines(lines)
    assert seeds == ["https://example.org/a", "http://b.example/"]
    assert [(e.line, e.text) for e in errors] == [
        (4, "mailto:x@example.org"), (5, "example.org/no-scheme"), (6, "http://")]
    assert all(e.reason for e in errors)


def test_a_seed_the_guard_refuses_on_its_face_is_refused_by_line() -> None:
    lines = ["http://127.0.0.1:8080/", "http://[::ffff:10.0.0.1]/", "http://a.test/",
             "http://169.254.169.254/latest/meta-data/"]
    seeds, errors = parse_seed_lines(lines, settings=Settings())
    assert seeds == ["http://a.test/"]
    assert [e.line for e in errors] == [1, 2, 4]
    assert all(e.reason.startswith("blocked_address") for e in errors)
    allowed, none = parse_seed_lines(lines, settings=Settings(allow_private=True))
    assert len(allowed) == 4 and not none
