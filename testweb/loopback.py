"""The test web's one network rule: it only ever binds to, and points names at, loopback."""

from __future__ import annotations

import ipaddress

LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")


def require_loopback(address: str) -> str:
    """Return ``address`` if it is an IPv4 address in 127.0.0.0/8, else raise ValueError."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"{address!r} is not an IP address; use one in 127.0.0.0/8") from None
    if ip.version != 4 or ip not in LOOPBACK_NET:
        raise ValueError(f"refusing to use {address}: the test web stays inside 127.0.0.0/8")
    return str(ip)
