"""The event loop: uvloop when it is installed (a dependency on Linux), asyncio's own otherwise.

uvloop runs aiohttp's and redis-py's callbacks in C; the worker's per-page event-loop overhead
is a measurable part of its CPU (see docs/benchmarks.md). ``CRAWLFLEET_UVLOOP=0`` keeps
asyncio's loop, for a comparison or a platform where uvloop misbehaves.
"""

from __future__ import annotations

import asyncio


def use_uvloop(enabled: bool = True) -> bool:
    """Make every loop created from now on a uvloop loop; False when it is not available or
    turned off."""
    if not enabled:
        return False
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def use_configured_loop() -> bool:
    """The loop every crawlfleet command runs on, test web included: uvloop unless
    CRAWLFLEET_UVLOOP turns it off. Call it before any loop exists; a value that is not a
    boolean raises SettingsError."""
    from .settings import setting_from_env  # settings is large; the loop is chosen once

    return use_uvloop(setting_from_env("uvloop"))
