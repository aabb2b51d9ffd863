"""The SSRF guard, as the worker's session applies it: no fetch reaches a private, loopback or
link-local address, or an odd port, unless the settings allow it.

The decisions themselves are pure functions in ``common/addresses.py``; here they are wired in
where aiohttp cannot go around them: the resolver (every name, every hop, every retry), and a
per-session check of what the resolver never sees (IP literals, ports, targets behind a proxy).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import weakref
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import ResolveResult
from yarl import URL

from crawlfleet.common import addresses
from crawlfleet.common.addresses import Network


class BlockedAddressError(OSError):
    """The host resolved only to addresses a crawler must not reach (SSRF guard)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail or message


PrivateAddressError = BlockedAddressError  # the old name


def blocked_rule(
    address: str, *, allow_private: bool = False, allow_networks: tuple[Network, ...] = ()
) -> str | None:
    """The rule that forbids ``address`` (``loopback``, ``private`` ...), or None if allowed.
    The decision is :func:`crawlfleet.common.addresses.blocked_rule`."""
    return addresses.blocked_rule(address, allow_private=allow_private,
                                  allow_networks=allow_networks)


def is_private_address(address: str) -> bool:
    return blocked_rule(address) is not None


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """What the guard allows: off with ``allow_private``; with ``allow_networks``, only those."""

    allow_private: bool = False
    allow_networks: tuple[Network, ...] = ()

    def refusal(self, answers: list[str]) -> str | None:
        return addresses.refusal_detail(answers, allow_private=self.allow_private,
                                        allow_networks=self.allow_networks)


class GuardedResolver(aiohttp.AsyncResolver):
    """aiodns resolution that refuses a name if any of its answers is a blocked address.

    The check sits in the resolver so that it also covers every redirect hop and every retry:
    there is no way to open a connection to a name without passing through it. A mixed answer
    (one public, one private address) refuses the name: filtering it would still connect where
    the name's owner chose. ``exempt_hosts`` are resolved unchecked: the configured proxy, the
    one host an operator names on purpose (with a proxy the connector resolves only the proxy;
    :class:`SessionGuard` checks the targets). ``timeout`` and ``tries`` are c-ares' own, per
    nameserver try (its defaults when None).
    """

    def __init__(
        self,
        *,
        allow_private: bool,
        allow_networks: tuple[Network, ...] = (),
        exempt_hosts: tuple[str, ...] = (),
        nameservers: list[str] | None = None,
        timeout: float | None = None,
        tries: int | None = None,
    ) -> None:
        options: dict[str, Any] = {
            k: v for k, v in (("timeout", timeout), ("tries", tries)) if v is not None
        }
        super().__init__(nameservers=nameservers or None, **options)
        self.policy = AddressPolicy(allow_private, allow_networks)
        self.exempt_hosts = frozenset(h.lower().rstrip(".") for h in exempt_hosts)

    @property
    def allow_private(self) -> bool:
        return self.policy.allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower().rstrip(".") in self.exempt_hosts:
            return await super().resolve(host, port, family)
        return await self.checked(host, port, family)

    async def checked(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """``resolve`` with the guard applied, exempt host or not."""
        answers = await super().resolve(host, port, family)
        detail = self.policy.refusal([a["host"] for a in answers])
        if detail is not None:
            raise BlockedAddressError(f"{host} resolves to blocked addresses: {detail}", detail)
        return answers


class SessionGuard:
    """The guard's checks that aiohttp's connector cannot make, for one session.

    - IP literals: aiohttp never resolves them, so each hop's host is checked here.
    - Ports and schemes: only http(s); with ``allowed_ports``, only those ports, otherwise 80,
      443 and the port of the URL the fetch started from (a redirect may not move elsewhere).
    - Through a proxy the connector resolves the proxy, never the target, so each hop's target
      name is resolved with the worker's resolver and checked (``via_proxy``) before the
      request. The proxy resolves it again on its own: a name that changes its answer in
      between (DNS rebinding) is the proxy's to refuse.
    """

    def __init__(
        self,
        resolver: GuardedResolver,
        *,
        allowed_ports: frozenset[int] = frozenset(),
        via_proxy: bool = False,
        cache_ttl: float = 0.0,
    ) -> None:
        self.resolver = resolver
        self.allowed_ports = allowed_ports
        self.via_proxy = via_proxy
        self.cache_ttl = cache_ttl
        self._passed: dict[str, float] = {}  # target name -> when its pass expires

    @property
    def policy(self) -> AddressPolicy:
        return self.resolver.policy

    def refusal(self, url: str, first_url: str, allow_private: bool) -> str | None:
        """Why ``url`` (a hop of a fetch that started at ``first_url``) may not be requested,
        without I/O. ``allow_private`` False (the fetch's own flag) keeps the literal check on
        even when the session's resolver allows private addresses."""
        return hop_refusal(url, first_url, allow_private, self)

    async def check_target(self, url: str) -> None:
        """Through a proxy: resolve the target's name and raise BlockedAddressError if the
        guard refuses it (DNS failures raise as they would without a proxy)."""
        if not self.via_proxy or self.policy.allow_private:
            return
        host = (URL(url).host or "").lower().rstrip(".")
        if not host or _is_ip(host):
            return  # literals are decided by refusal()
        loop = asyncio.get_running_loop()
        if self._passed.get(host, 0.0) > loop.time():
            return
        await self.resolver.checked(host, addresses.url_port(url) or 0, socket.AF_UNSPEC)
        if self.cache_ttl > 0:
            if len(self._passed) > 10_000:
                self._passed.clear()
            self._passed[host] = loop.time() + self.cache_ttl


# Sessions built by the worker (workers/worker.py) register their guard here; fetch() finds it.
_GUARDS: weakref.WeakKeyDictionary[aiohttp.ClientSession, SessionGuard] = (
    weakref.WeakKeyDictionary()
)


def guard_session(session: aiohttp.ClientSession, guard: SessionGuard) -> None:
    _GUARDS[session] = guard


def session_guard(session: aiohttp.ClientSession) -> SessionGuard | None:
    return _GUARDS.get(session)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def hop_refusal(
    url: str, first_url: str, allow_private: bool, guard: SessionGuard | None
) -> str | None:
    policy = guard.policy if guard is not None else AddressPolicy(allow_private=True)
    parts = addresses.split_url(url)  # once: every fetch pays for this check
    literal = addresses.literal_block_of(
        parts, allow_private=allow_private and policy.allow_private,
        allow_networks=policy.allow_networks,
    )
    if literal is not None or guard is None:
        return literal
    port = addresses.port_of(parts)
    if port is None:
        return "only http and https URLs with a valid port are fetched"
    if guard.allowed_ports:
        if port not in guard.allowed_ports:
            return f"port {port} is not in CRAWLFLEET_ALLOWED_PORTS"
    elif (port not in addresses.DEFAULT_PORTS and url != first_url
          and port != addresses.url_port(first_url)):
        return f"port {port} is not allowed (only 80, 443 and the port the fetch started on)"
    return None


def literal_private_host(url: str) -> bool:
    """URLs with an IP literal never reach the resolver, so they are checked here."""
    return _literal_block(url) is not None


def _literal_block(url: str) -> str | None:
    """``"127.0.0.1 is loopback"`` for a URL whose host is a blocked IP literal, else None."""
    return addresses.literal_block(url)
