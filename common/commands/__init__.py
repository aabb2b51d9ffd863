"""The frontier's state machine: one Lua file per state change, loaded here.

Open this folder to see every way a URL moves (the README's "frontier" section draws it):

    crawl.lua       open the crawl; notice that its state was lost
    admit.lua       seeds and links join the crawl (dedup, budgets, host queues)
    dispatch.lua    a ready host gets a batch under a lease, as an arq job
    claim.lua       a worker starts the batch; the lease's clock starts
    progress.lua    the worker's one call while it holds the host: results, retries, dead
                    letters, the next fetches marked in flight, links admitted, the lease
                    refilled from the host queue; the final one hands back and releases
    renew.lua       a worker keeps its lease
    expire.lua      leases of vanished workers, and batches nobody claimed, come back
    finish.lua      is the crawl finished?
    quarantine.lua  something unreadable goes aside
    lock.lua, unlock.lua  the scheduler's leader lock
    sink_take.lua   a sink takes a range of the results log to write as one part
    sink_done.lua   that part is durable: its range leaves Redis
    reshard_in.lua, reshard_out.lua  `crawlfleet reshard`: a host's URLs arrive on its new
                    shard, then leave its old one (each URL once, safe to run again)

Each file's header names its ARGV, the keys it touches and what it guarantees. ``lib.lua`` is
included at the top of each, after the constants below, which come from ``common/keys.py`` and
``common/messages.py`` so that the names live in one place.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from ..keys import CONSUMER_GROUP, Keys
from ..messages import VERSION

COMMANDS = ("crawl", "admit", "dispatch", "claim", "progress", "renew", "expire",
            "finish", "quarantine", "lock", "unlock", "sink_take", "sink_done",
            "reshard_in", "reshard_out")


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _constants() -> str:
    fixed = ", ".join(f"{name} = '{rel}'" for name, rel in sorted(Keys.fixed_names().items()))
    return (f"local FIXED_KEYS = {{{fixed}}}\n"
            f"local MESSAGE_VERSION = {VERSION}\n"
            f"local GROUP = '{CONSUMER_GROUP}'\n")


@cache
def preamble() -> str:
    """What every command runs before its own text: the constants, then lib.lua."""
    return f"{_constants()}{_read('lib')}\n"


@cache
def source(name: str) -> str:
    """The full text Redis runs for one command: the preamble, then the command."""
    if name not in COMMANDS:
        raise KeyError(name)
    return preamble() + _read(name)
