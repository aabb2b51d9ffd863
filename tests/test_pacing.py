"""The per-host pacer: turns spaced from when requests are really sent."""

from __future__ import annotations

import asyncio
import time

import pytest

from crawlfleet.workers.pacing import Pacer, sending


async def test_the_next_turn_waits_spacing_after_the_previous_request_was_sent() -> None:
    pacer = Pacer(0.05)
    first = await pacer.turn()
    await asyncio.sleep(0.03)  # the request waits for a connection before it is sent
    sent_at = time.monotonic()
    first.sent()
    await pacer.turn()
    assert time.monotonic() - sent_at >= 0.05  # from the send, not from the first turn


async def test_a_turn_ends_once_and_a_failed_request_ends_it_too() -> None:
    pacer = Pacer(0.01)
    turn = await pacer.turn()
    turn.sent()
    turn.done()  # after sent: a no-op, must not release someone else's turn
    second = await pacer.turn()
    third = asyncio.create_task(pacer.turn())
    await asyncio.sleep(0.03)
    assert not third.done()  # the second request holds the turn until it is sent or done
    second.done()  # failed before anything was sent
    await asyncio.wait_for(third, 1.0)


async def test_a_raised_spacing_applies_to_the_wait_already_running() -> None:
    pacer = Pacer(0.01)
    (await pacer.turn()).sent()
    sent_at = time.monotonic()
    pacer.set_spacing(0.08)  # robots.txt said Crawl-delay
    await pacer.turn()
    assert time.monotonic() - sent_at >= 0.08


async def test_no_spacing_means_no_waiting_and_no_serialising() -> None:
    pacer = Pacer(0.0)
    turns = [await pacer.turn() for _ in range(100)]  # none of them is ended
    assert len(turns) == 100 and pacer.last_sent > 0


async def test_a_request_that_never_reaches_the_wire_ends_its_turn_with_the_block() -> None:
    pacer = Pacer(0.05)
    turn = await pacer.turn()
    with pytest.raises(ConnectionRefusedError), sending(turn):
        raise ConnectionRefusedError  # the connection failed: nothing was sent
    # Not stuck behind the failed request's turn (held for ever, this would time out).
    nxt = await asyncio.wait_for(pacer.turn(), timeout=2.0)
    nxt.done()
    assert pacer.last_sent > 0
