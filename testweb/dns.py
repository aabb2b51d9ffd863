"""An authoritative-only DNS server for the ``.test`` names of a synthetic web.

Crawler workers resolve ``siteN.test`` only through this server (via aiodns), so it answers
exactly those names with a loopback address, says NXDOMAIN for the rest of ``.test`` and
REFUSED for everything else: it never forwards, so no query ever leaves the machine.

Two names (and every name under them) play a broken nameserver, whatever the web's names:

- ``servfail.test``, ``*.servfail.test``: SERVFAIL, a resolver's "try again later";
- ``silent.test``, ``*.silent.test``: no answer at all, the query is dropped, so the client
  times out (UDP; over TCP the connection is closed without a reply).

Use a fresh subdomain (``a1.servfail.test``) when a resolver's cache must not be involved.
"""

from __future__ import annotations

import socketserver
import threading
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from dnslib import QTYPE, RCODE, RR, SOA, A
from dnslib.dns import DNSError
from dnslib.server import DNSHandler, DNSLogger

from .loopback import require_loopback

ZONE = "test"
SERVFAIL_NAME = "servfail.test"
SILENT_NAME = "silent.test"
NEGATIVE_TTL = 5  # SOA minimum: how long resolvers may cache NXDOMAIN / no-data answers


class _Zone:
    """The dnslib resolver (duck-typed: dnslib only calls ``resolve``); thread-safe counters."""

    def __init__(self, names: Iterable[str], answer: str, ttl: int) -> None:
        self.names = frozenset(n.lower().rstrip(".") for n in names)
        self.answer = answer
        self.ttl = ttl
        self.soa = RR(
            ZONE + ".",
            QTYPE.SOA,
            rdata=SOA("ns.test.", "hostmaster.test.", (1, 3600, 600, 86400, NEGATIVE_TTL)),
            ttl=NEGATIVE_TTL,
        )
        self.lock = threading.Lock()
        self.queries = 0
        self.answered = 0

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        reply.header.ra = 0  # we never recurse
        q = request.q
        name = str(q.qname).lower().rstrip(".")
        found = False
        if _under(name, SILENT_NAME):
            with self.lock:
                self.queries += 1
            # dnslib's handler sends nothing when the resolver raises its DNSError.
            raise DNSError(f"dropped query for {name}")
        if _under(name, SERVFAIL_NAME):
            reply.header.aa = 0
            reply.header.rcode = RCODE.SERVFAIL
        elif name != ZONE and not name.endswith("." + ZONE):
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
        elif name in self.names and q.qtype in (QTYPE.A, QTYPE.ANY):
            # Echo the question's spelling of the name: some resolvers randomise its case.
            reply.add_answer(RR(q.qname, QTYPE.A, rdata=A(self.answer), ttl=self.ttl))
            found = True
        elif name == ZONE and q.qtype == QTYPE.SOA:
            reply.add_answer(self.soa)
        else:
            # Known name but no record of that type (e.g. AAAA) is NODATA, not NXDOMAIN:
            # an NXDOMAIN for AAAA would make dual-stack lookups fail the whole name.
            if name not in self.names and name != ZONE:
                reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self.soa)
        with self.lock:
            self.queries += 1
            self.answered += found
        return reply


def _under(name: str, parent: str) -> bool:
    return name == parent or name.endswith("." + parent)


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    # Off for UDP: on Linux SO_REUSEADDR lets two UDP sockets share a port (e.g. with mDNS
    # on 5353), which would silently split our queries with someone else.
    allow_reuse_address = False
    resolver: _Zone
    logger: Any

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a malformed packet is the client's problem; keep stderr quiet


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True  # rebind right after stop() despite TIME_WAIT connections
    resolver: _Zone
    logger: Any

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def _bind_pair(address: str, port: int) -> tuple[_UDPServer, _TCPServer]:
    """Bind UDP and TCP to the same port; with port 0, retry until one is free for both."""
    attempts = 20 if port == 0 else 1
    for attempt in range(attempts):
        udp = _UDPServer((address, port), DNSHandler)
        try:
            return udp, _TCPServer((address, int(udp.socket.getsockname()[1])), DNSHandler)
        except OSError:
            udp.server_close()  # the free UDP port was taken for TCP
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class DnsServer:
    """UDP and TCP DNS on one loopback port, served from background threads.

    ``port=0`` picks a free port (the same number for UDP and TCP); ``start()`` returns it.
    ``stop()`` shuts both servers down and closes their sockets, so the port is free again.
    """

    def __init__(
        self,
        names: Iterable[str],
        *,
        address: str = "127.0.0.1",
        port: int = 0,
        answer: str = "127.0.0.1",
        ttl: int = 60,
    ) -> None:
        self.address = require_loopback(address)
        self._zone = _Zone(names, require_loopback(answer), ttl)
        self._requested_port = port
        self.port = port
        self._servers: list[_UDPServer | _TCPServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def names(self) -> frozenset[str]:
        return self._zone.names

    @property
    def queries(self) -> int:
        """Every query received, whatever the answer."""
        with self._zone.lock:
            return self._zone.queries

    @property
    def answered(self) -> int:
        """Queries answered with an address."""
        with self._zone.lock:
            return self._zone.answered

    def start(self) -> int:
        if self._servers:
            raise RuntimeError("DNS server already started")
        udp, tcp = _bind_pair(self.address, self._requested_port)
        port = int(udp.socket.getsockname()[1])
        quiet = DNSLogger(log="-request,-reply,-truncated,-error", logf=lambda *_: None)
        for server in (udp, tcp):
            server.resolver = self._zone
            server.logger = quiet
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},  # bounds how long stop() waits
                name=f"testweb-dns-{type(server).__name__}-{port}",
                daemon=True,
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.port = port
        return port

    def stop(self) -> None:
        # dnslib's DNSServer.stop() only calls shutdown(), which leaves the socket bound;
        # server_close() is what releases the port.
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
