"""The SSRF guard's pure decisions (common/addresses.py): every refused range by an address in
it, the IPv6 forms that embed an IPv4 address (with a private and a public one inside), mixed
answers, CRAWLFLEET_ALLOW_NETWORKS, CRAWLFLEET_ALLOW_PRIVATE, ports, schemes and redaction.
No sockets: nothing here connects anywhere."""

from __future__ import annotations

import re

import pytest

from crawlfleet.common.addresses import (
    OUTSIDE_ALLOWED,
    address_rule,
    blocked_rule,
    literal_block,
    literal_host_refusal,
    parse_networks,
    port_allowed,
    port_of,
    refusal_detail,
    split_url,
    url_port,
)
from crawlfleet.common.settings import Settings, SettingsError, redact_url

REFUSED = [
    # IPv4
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("100.64.0.1", "shared address space"),
    ("100.127.255.254", "shared address space"),
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.0.0.9", "reserved"),  # Python's is_global calls this one public
    ("192.0.2.1", "documentation"),
    ("192.88.99.1", "reserved"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "benchmarking"),
    ("198.19.255.255", "benchmarking"),
    ("198.51.100.7", "documentation"),
    ("203.0.113.7", "documentation"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    # IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("100::1", "reserved"),
    ("2001:db8::1", "documentation"),
    ("3fff::1", "documentation"),
    ("2001:2::1", "reserved"),  # benchmarking, inside the IETF block
    ("2001:10::1", "reserved"),  # ORCHID
    ("5f00::1", "reserved"),
    ("1::1", "reserved"),  # outside 2000::/3
    # The forms that reach an IPv4 address, with a private one inside.
    ("::ffff:127.0.0.1", "IPv4-mapped to 127.0.0.1 (loopback)"),
    ("::ffff:169.254.169.254", "IPv4-mapped to 169.254.169.254 (link-local)"),
    ("::10.0.0.1", "IPv4-compatible to 10.0.0.1 (private)"),
    ("64:ff9b::a00:1", "NAT64 to 10.0.0.1 (private)"),
    ("64:ff9b::7f00:1", "NAT64 to 127.0.0.1 (loopback)"),
    ("64:ff9b:1::a00:1", "NAT64 local-use"),
    ("64:ff9b:1::808:808", "NAT64 local-use"),  # where its IPv4 sits is unknowable: all refused
    ("2002:a00:1::1", "6to4 to 10.0.0.1 (private)"),
    ("2002:a9fe:a9fe::1", "6to4 to 169.254.169.254 (link-local)"),
    # Teredo: server 65.54.227.120, client 192.168.1.1 (stored inverted: 3f57:fefe).
    ("2001:0:4136:e378:8000:63bf:3f57:fefe", "Teredo client to 192.168.1.1 (private)"),
    # Teredo: server 10.0.0.1, client 8.8.8.8 (inverted: f7f7:f7f7).
    ("2001:0:a00:1::f7f7:f7f7", "Teredo server to 10.0.0.1 (private)"),
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "100.63.255.255",  # just below the shared address space
    "100.128.0.0",  # just above
    "172.32.0.1",
    "198.20.0.1",
    "223.255.255.255",
    "2001:4860:4860::8888",
    "2606:4700:4700::1111",
    # The forms that reach an IPv4 address, with a public one inside.
    "::ffff:8.8.8.8",
    "::8.8.8.8",
    "64:ff9b::808:808",  # what DNS64 answers for a public IPv4-only site
    "2002:808:808::1",
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # Teredo: server 65.54.227.120, client 8.8.8.8
]


@pytest.mark.parametrize(("address", "rule"), REFUSED)
def test_every_refused_range(address: str, rule: str) -> None:
    assert address_rule(address) == rule
    assert blocked_rule(address, allow_private=False) == rule
    assert blocked_rule(address, allow_private=True) is None  # CRAWLFLEET_ALLOW_PRIVATE=1


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert blocked_rule(address) is None


def test_not_an_address_raises() -> None:
    with pytest.raises(ValueError):
        blocked_rule("example.com")


def test_mixed_answers_refuse_the_name() -> None:
    assert refusal_detail(["8.8.8.8", "1.1.1.1"]) is None
    assert refusal_detail(["8.8.8.8", "10.0.0.1"]) == (
        "10.0.0.1 is private (beside 1 allowed address)")
    assert refusal_detail(["127.0.0.1", "127.0.0.1"]) == "127.0.0.1 is loopback"
    many = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "8.8.8.8", "1.1.1.1"]
    assert refusal_detail(many) == (
        "10.0.0.1 is private, 10.0.0.2 is private, 10.0.0.3 is private (and 1 more)"
        " (beside 2 allowed addresses)")
    assert refusal_detail(["8.8.8.8", "10.0.0.1"], allow_private=True) is None


def test_allow_networks_allows_only_those() -> None:
    nets = parse_networks(["10.1.0.0/16", "fd00:1::/32", "127.0.0.1/32"])
    assert blocked_rule("10.1.2.3", allow_networks=nets) is None  # private, but listed
    assert blocked_rule("127.0.0.1", allow_networks=nets) is None
    assert blocked_rule("::ffff:10.1.2.3", allow_networks=nets) is None  # the same host
    assert blocked_rule("fd00:1::5", allow_networks=nets) is None
    assert blocked_rule("10.2.0.1", allow_networks=nets) == OUTSIDE_ALLOWED
    assert blocked_rule("8.8.8.8", allow_networks=nets) == OUTSIDE_ALLOWED  # public, not listed
    assert blocked_rule("127.0.0.2", allow_networks=nets) == OUTSIDE_ALLOWED
    assert blocked_rule("64:ff9b::a01:203", allow_networks=nets) == OUTSIDE_ALLOWED
    assert refusal_detail(["10.1.0.1", "8.8.8.8"], allow_networks=nets) == (
        f"8.8.8.8 is {OUTSIDE_ALLOWED} (beside 1 allowed address)")
    # allow_private still turns the guard off altogether.
    assert blocked_rule("8.8.8.8", allow_private=True, allow_networks=nets) is None


def test_parse_networks_names_the_bad_entry() -> None:
    assert parse_networks(["10.1.2.3/16"])[0].with_prefixlen == "10.1.0.0/16"  # host bits ok
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/33'")):
        parse_networks(["10.0.0.0/8", "10.0.0.0/33"])


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("http://127.0.0.1:8080/x", "127.0.0.1 is loopback"),
        ("http://[::1]/", "::1 is loopback"),
        ("http://[::ffff:a00:1]/", "::ffff:a00:1 is IPv4-mapped to 10.0.0.1 (private)"),
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is link-local"),
        ("http://8.8.8.8/", None),
        ("http://example.com/", None),  # names are the resolver's business
    ],
)
def test_literal_block(url: str, detail: str | None) -> None:
    assert literal_block(url) == detail
    assert literal_block(url, allow_private=True) is None


def _literal_block_reference(url: str, allow_private: bool) -> str | None:
    """literal_block as it was before its shortcut for names: ipaddress tries every host."""
    parts = split_url(url)
    host = (parts.hostname or "") if parts is not None else ""
    try:
        rule = blocked_rule(host, allow_private=allow_private)
    except ValueError:
        return None
    return None if rule is None else f"{host} is {rule}"


ODD_HOSTS = [
    "127.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "0177.0.0.1", "127.0.0.1.", "1.2.3.4.5",
    "[::1]", "[::ffff:7f00:1]", "[::1%25eth0]", "[fe80::1%25lo]", "[0:0:0:0:0:0:0:1]",
    "\u0661\u0662\u0667.0.0.1", "\uff11\uff12\uff17.0.0.1", "127.0.0.1:80", "10.0.0.1",
    "169.254.169.254", "a.test", "1.test", "...", "", "[::]", "[::ffff:10.0.0.1]", "localhost",
]


def test_the_literal_check_decides_as_ipaddress_would_for_any_host() -> None:
    """literal_block skips ipaddress for hosts that cannot be addresses (a hop's check is
    cheaper so): for odd hosts and every URL of the WHATWG conformance data, its answer is the
    answer of trying ipaddress on each host."""
    from .test_urls import CASES

    urls = [f"{scheme}://{host}/p" for host in ODD_HOSTS for scheme in ("http", "https")]
    urls += [u for case in CASES for u in (case.get("input"), case.get("href"))
             if isinstance(u, str)]
    blocked = 0
    for url in urls:
        for allow_private in (False, True):
            expected = _literal_block_reference(url, allow_private)
            assert literal_block(url, allow_private=allow_private) == expected, url
            blocked += expected is not None
    assert blocked >= 10  # the odd hosts' literals are refused, not skipped


ODD_PORTS = [
    "", ":80", ":0", ":00080", ":8080", ":65535", ":65536", ":99999", ":123456", ":", ":x",
    ":-1", ":\u0661\u0662", ":8080:9", "@h:1", ".:1", "\t:1", ":1\t",
]


def test_the_port_of_a_plain_url_is_read_as_urlsplit_would() -> None:
    """url_port reads a plain http(s) origin without urlsplit (every new link's scope check
    asks): for odd ports and authorities and every URL of the WHATWG conformance data, its
    answer is the one from urlsplit."""
    from .test_urls import CASES

    urls = [f"{scheme}://{host}{port}{rest}" for scheme in ("http", "https", "HTTP", "ftp")
            for host in ("a.test", "10.0.0.1", "A.test", "[::1]", "a_b.test", "")
            for port in ODD_PORTS for rest in ("", "/", "/p?q", "?q", "#f", "\\x")]
    urls += [u for case in CASES for u in (case.get("input"), case.get("href"))
             if isinstance(u, str)]
    fast = 0
    for url in urls:
        assert url_port(url) == port_of(split_url(url)), url
        fast += url.startswith(("http://a.test:", "https://a.test:"))
    assert fast > 50
    assert url_port("http://a.test:8080/x") == 8080 and url_port("https://a.test/") == 443


@pytest.mark.parametrize(
    ("url", "allowed_ports", "seed_ports", "ok"),
    [
        ("http://example.com/", (), (), True),  # 80
        ("https://example.com/", (), (), True),  # 443
        ("http://example.com:443/", (), (), True),
        ("http://example.com:8080/", (), (), False),
        ("http://example.com:8080/", (), (8080,), True),  # a seed named it
        ("http://example.com:22/", (), (8080,), False),
        ("http://example.com:8080/", ("8080",), (), True),
        ("http://example.com/", ("8080",), (), False),  # set: only those, not even 80
        ("http://example.com:9000/", ("8080", "9000"), (), True),
        ("ftp://example.com/", (), (), False),
        ("http://example.com:99999/", (), (), False),
    ],
)
def test_port_allowed(
    url: str, allowed_ports: tuple[str, ...], seed_ports: tuple[int, ...], ok: bool
) -> None:
    assert port_allowed(url, allowed_ports, seed_ports) is ok


@pytest.mark.parametrize(
    ("url", "settings", "refusal"),
    [
        ("http://example.com:8080/", Settings(), None),  # a seed may name any port...
        ("http://example.com:8080/", Settings(allowed_ports=("80",)),
         "port 8080 is not in CRAWLFLEET_ALLOWED_PORTS"),  # ...unless the ports are set
        ("ftp://example.com/", Settings(), "scheme 'ftp' is not fetched: only http and https"),
        ("http://10.0.0.1/", Settings(), "10.0.0.1 is private"),
        ("http://10.0.0.1/", Settings(allow_private=True), None),
        ("http://10.0.0.1/", Settings(allow_networks=("10.0.0.0/8",)), None),
        ("http://8.8.8.8/", Settings(allow_networks=("10.0.0.0/8",)),
         f"8.8.8.8 is {OUTSIDE_ALLOWED}"),
        ("http://internal.example/", Settings(), None),  # names: decided by the resolver
    ],
)
def test_literal_host_refusal(url: str, settings: Settings, refusal: str | None) -> None:
    assert literal_host_refusal(url, settings) == refusal


def test_redact_url() -> None:
    assert redact_url("http://bob:s3cret@proxy.local:3128") == "http://bob:***@proxy.local:3128"
    assert redact_url("http://proxy.local:3128") == "http://proxy.local:3128"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"allow_networks": ("10.0.0.0/8", "nope")}, "CRAWLFLEET_ALLOW_NETWORKS"),
        ({"allowed_ports": ("0",)}, "CRAWLFLEET_ALLOWED_PORTS"),
        ({"allowed_ports": ("65536",)}, "CRAWLFLEET_ALLOWED_PORTS"),
        ({"allowed_ports": ("http",)}, "CRAWLFLEET_ALLOWED_PORTS"),
        ({"proxy": "https://u:hunter2@proxy:3128"}, "CRAWLFLEET_PROXY"),
        ({"proxy": "socks5://u:hunter2@proxy:1080"}, "CRAWLFLEET_PROXY"),
        ({"proxy": "http://u:hunter2@:3128"}, "CRAWLFLEET_PROXY"),
        ({"proxy": "http://u:hunter2@proxy:99999"}, "CRAWLFLEET_PROXY"),
        ({"proxy": "http://u:hunter2@proxy:3128/path"}, "CRAWLFLEET_PROXY"),
    ],
)
def test_guard_settings_are_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message) as error:
        Settings(**changes)  # type: ignore[arg-type]
    assert "hunter2" not in str(error.value)


def test_guard_settings_from_env() -> None:
    settings = Settings.from_env({
        "CRAWLFLEET_ALLOW_NETWORKS": "10.1.0.0/16, fd00::/8",
        "CRAWLFLEET_ALLOWED_PORTS": "80,443,8080",
        "CRAWLFLEET_PROXY": "http://bob:s3cret@127.0.0.1:3128",
    })
    assert settings.allow_networks == ("10.1.0.0/16", "fd00::/8")
    assert settings.allowed_ports == ("80", "443", "8080")
    assert settings.proxy == "http://bob:s3cret@127.0.0.1:3128"
    assert "s3cret" not in repr(settings)
