"""The SSRF guard's decisions, as pure functions: which addresses, ports and schemes a worker may
connect to (a proxy URL is shown with common.settings.redact_url).

Nothing here does I/O. ``workers/fetch.py`` applies :func:`blocked_rule` to every address its
resolver returns and to IP-literal hosts; ``crawlfleet seed`` can refuse a seed early with
:func:`literal_host_refusal`.

Addresses are decided with explicit networks, not with ``ipaddress``' ``is_global`` (which calls
6to4, Teredo and NAT64 addresses public whatever IPv4 address they lead to). The IPv6 forms
that embed an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo) are decided by
the IPv4 address inside: ``64:ff9b::a00:1`` reaches 10.0.0.1 and is refused, while
``64:ff9b::808:808`` is what DNS64 answers for a public IPv4-only site and is allowed. NAT64's
local-use prefix 64:ff9b:1::/48 hides where the IPv4 address sits, so all of it is refused.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

if TYPE_CHECKING:
    from .settings import Settings

# or an error. One helper for the whole project; it lives in common/settings.py.
__all__ = [
    "DEFAULT_PORTS", "SCHEMES", "address_rule", "allowed_port_numbers", "blocked_rule",
    "literal_block", "literal_block_of", "literal_host_refusal", "parse_networks",
    "port_allowed", "port_of", "proxy_host_of", "refusal_detail", "split_url", "url_port",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS = frozenset({80, 443})
OUTSIDE_ALLOWED = "outside CRAWLFLEET_ALLOW_NETWORKS"


def _nets(*rows: tuple[str, str]) -> tuple[tuple[Network, str], ...]:
    return tuple((ipaddress.ip_network(cidr), rule) for cidr, rule in rows)


# Order matters: the first match names the rule (broadcast before reserved 240/4, 0.0.0.0
# before 0/8). Everything not listed is public.
IPV4_BLOCKED = _nets(
    ("0.0.0.0/32", "unspecified"),
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),  # 169.254.169.254: cloud metadata
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),  # the old 6to4 relay anycast
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)

# IPv6 forms whose last 32 bits (or, for 6to4, bits 16-48) are an IPv4 address.
IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
# RFC 8215's local-use prefix: the operator picks the prefix length inside it, so where the IPv4
# address sits is unknowable; the whole range is refused.
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
TEREDO = ipaddress.ip_network("2001::/32")
GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")

IPV6_BLOCKED = _nets(
    ("fc00::/7", "private"),  # unique-local
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("100::/64", "reserved"),  # discard-only
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("2001::/23", "reserved"),  # IETF protocol assignments (Teredo, inside it, is decided first)
    ("5f00::/16", "reserved"),  # SRv6 SIDs
)


def _embedded(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address leads to, each with the form's name."""
    if ip in IPV4_MAPPED:
        return [("IPv4-mapped", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))]
    if ip in NAT64:
        return [("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))]
    if ip in SIX_TO_FOUR:
        return [("6to4", ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))]
    if ip in TEREDO:
        server, client = ip.teredo or (None, None)
        assert server is not None and client is not None
        return [("Teredo server", server), ("Teredo client", client)]
    if ip in IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 have rules of their own
        return [("IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))]
    return []


def address_rule(address: str | Address) -> str | None:
    """The guard's rule against ``address`` whatever the settings (``"loopback"``,
    ``"NAT64 to 10.0.0.1 (private)"`` ...), or None for a public address. Raises ValueError
    for a string that is not an IP address."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv4Address):
        return next((rule for net, rule in IPV4_BLOCKED if ip in net), None)
    if int(ip) <= 1:  # :: and ::1, before ::/96 (IPv4-compatible) takes them
        return "unspecified" if int(ip) == 0 else "loopback"
    if ip in NAT64_LOCAL:
        return "NAT64 local-use"
    for form, inner in _embedded(ip):
        rule = address_rule(inner)
        if rule is not None:
            return f"{form} to {inner} ({rule})"
    if _embedded(ip):
        return None  # every IPv4 address it leads to is public
    rule = next((rule for net, rule in IPV6_BLOCKED if ip in net), None)
    if rule is None and ip not in GLOBAL_UNICAST:
        return "reserved"  # outside 2000::/3 nothing is allocated for unicast use
    return rule


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """``CRAWLFLEET_ALLOW_NETWORKS`` entries as networks; ValueError names the bad entry."""
    networks: list[Network] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not a network (CIDR such as 10.1.0.0/16): {exc}") \
                from None
    return tuple(networks)


def _in_networks(ip: Address, networks: tuple[Network, ...]) -> bool:
    candidates: list[Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)  # the same host as its IPv4 address
    return any(c.version == n.version and c in n for c in candidates for n in networks)


def blocked_rule(
    address: str,
    *,
    allow_private: bool = False,
    allow_networks: tuple[Network, ...] = (),
) -> str | None:
    """Why a worker must not connect to ``address``, or None if it may.

    ``allow_private`` (``CRAWLFLEET_ALLOW_PRIVATE=1``) turns the guard off. With
    ``allow_networks`` (``CRAWLFLEET_ALLOW_NETWORKS``) only addresses in those networks are
    allowed, private ones included, and everything else is ``outside ...``."""
    ip = ipaddress.ip_address(address)
    if allow_private:
        return None
    if allow_networks:
        return None if _in_networks(ip, allow_networks) else OUTSIDE_ALLOWED
    return address_rule(ip)


def refusal_detail(
    addresses: Iterable[str],
    *,
    allow_private: bool = False,
    allow_networks: tuple[Network, ...] = (),
) -> str | None:
    """One name's answers: None if every address is allowed, else which are refused and why
    (``"127.0.0.1 is loopback"``). One refused address refuses the name: a mixed answer is not
    filtered, since the name's owner can steer the connection to either."""
    distinct = list(dict.fromkeys(addresses))
    refused = [(a, r) for a in distinct
               if (r := blocked_rule(a, allow_private=allow_private,
                                     allow_networks=allow_networks)) is not None]
    if not refused:
        return None
    shown = ", ".join(f"{a} is {r}" for a, r in refused[:3])
    if len(refused) > 3:
        shown += f" (and {len(refused) - 3} more)"
    allowed = len(distinct) - len(refused)
    if allowed:
        shown += f" (beside {allowed} allowed address{'es' if allowed > 1 else ''})"
    return shown


def split_url(url: str) -> SplitResult | None:
    """``urlsplit`` of a URL, or None when it cannot be split or its port is not a number in
    0..65535. The checks below take its parts, so that a hop is split once."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    return parts


def proxy_host_of(proxy: str) -> str | None:
    """The host name of a proxy URL (``CRAWLFLEET_PROXY``), lower case."""
    parts = split_url(proxy)
    return parts.hostname if parts is not None else None


# An http(s) URL whose authority is a plain name or IPv4 address and an optional port, as a
# canonical link is: urlsplit would find the same scheme and port, so it is not called (the
# scope check of every new link asks). Anything else (userinfo, brackets, upper case, escapes,
# an empty port) is split.
_PLAIN_ORIGIN = re.compile(r"(https?)://[a-z0-9.\-]+(?::([0-9]{1,5}))?(?:[/?#]|\Z)")


def url_port(url: str) -> int | None:
    """The port a URL connects to (its scheme's default when it names none), or None for a URL
    that is not http(s) or has a bad port."""
    m = _PLAIN_ORIGIN.match(url)
    if m is not None:
        scheme, port = m.groups()
        number = int(port) if port else 0
        if number <= 65535:
            return number or (443 if scheme == "https" else 80)  # ':0' as urlsplit reads it
    return port_of(split_url(url))


def port_of(parts: SplitResult | None) -> int | None:
    """``url_port`` of a URL split already (``split_url``)."""
    if parts is None or parts.scheme.lower() not in SCHEMES:
        return None
    return parts.port or (443 if parts.scheme.lower() == "https" else 80)


def allowed_port_numbers(allowed_ports: Iterable[str | int]) -> frozenset[int]:
    """``CRAWLFLEET_ALLOWED_PORTS`` as numbers; ValueError for anything outside 1..65535."""
    numbers = set()
    for port in allowed_ports:
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError(f"port {port!r} is outside 1..65535")
        numbers.add(number)
    return frozenset(numbers)


def port_allowed(url: str, allowed_ports: Iterable[str | int], seed_ports: Collection[int]) -> bool:
    """Whether a URL's port may be fetched. With ``allowed_ports`` set, only those; unset (the
    default), 80, 443 and the ports the crawl's seeds name (``seed_ports``)."""
    port = url_port(url)
    if port is None:
        return False
    allowed = allowed_port_numbers(allowed_ports)
    if allowed:
        return port in allowed
    return port in DEFAULT_PORTS or port in seed_ports


def literal_block(
    url: str, *, allow_private: bool = False, allow_networks: tuple[Network, ...] = ()
) -> str | None:
    """``"127.0.0.1 is loopback"`` for a URL whose host is a refused IP literal, else None
    (names are the resolver's business). aiohttp never resolves an IP literal, so this check is
    the only one such a URL meets."""
    return literal_block_of(split_url(url), allow_private=allow_private,
                            allow_networks=allow_networks)


def literal_block_of(
    parts: SplitResult | None, *, allow_private: bool = False,
    allow_networks: tuple[Network, ...] = (),
) -> str | None:
    """``literal_block`` of a URL split already (``split_url``)."""
    host = (parts.hostname or "") if parts is not None else ""
    if not _could_be_ip(host):
        return None
    try:
        rule = blocked_rule(host, allow_private=allow_private, allow_networks=allow_networks)
    except ValueError:
        return None
    return None if rule is None else f"{host} is {rule}"


def _could_be_ip(host: str) -> bool:
    """Whether ``ipaddress`` might read ``host`` as an address: an IPv6 one has a colon, an
    IPv4 one only digits and dots. Any other host is a name, and skipping the ValueError that
    ipaddress would raise for it was most of the cost of a fetch's guard check."""
    return ":" in host or host.replace(".", "").isdigit()


def literal_host_refusal(url: str, settings: Settings) -> str | None:
    """Why a seed can be refused before anything is fetched, or None: a scheme other than
    http(s), a port outside ``CRAWLFLEET_ALLOWED_PORTS`` (when set; unset, a seed may name any
    port, and that port joins the crawl's allowed ones), or an IP-literal host the guard
    refuses. Names are not resolved here: the workers' resolver decides them."""
    parts = split_url(url)
    if parts is None:
        return "not a valid URL"
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        return f"scheme {scheme or '(none)'!r} is not fetched: only http and https"
    port = url_port(url)
    if port is None or not port_allowed(url, settings.allowed_ports, seed_ports=(port,)):
        return f"port {port} is not in CRAWLFLEET_ALLOWED_PORTS"
    return literal_block(url, allow_private=settings.allow_private,
                         allow_networks=parse_networks(settings.allow_networks))
