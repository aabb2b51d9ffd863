"""Rendezvous hashing of hosts over shards (common/shards.py)."""

from __future__ import annotations

import random
import string
from collections import Counter

import pytest

from crawlfleet.common.shards import ShardConfigError, owner, parse_redis_urls, weight


def hosts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12))) + ".example"
            for _ in range(n)]


def test_one_shard_owns_everything() -> None:
    assert {owner(h, 1) for h in hosts(100)} == {0}


def test_owner_is_the_highest_weight_and_stable() -> None:
    for host in hosts(200):
        best = max(range(5), key=lambda s: weight(s, host))
        assert owner(host, 5) == best == owner(host, 5)


def test_hosts_spread_evenly() -> None:
    counts = Counter(owner(h, 4) for h in hosts(20_000))
    assert set(counts) == {0, 1, 2, 3}
    for n in counts.values():
        assert abs(n - 5_000) < 5 * 5_000**0.5  # within 5 sigma of a fair split


@pytest.mark.parametrize("before", [1, 2, 3, 7])
def test_adding_a_shard_moves_about_one_in_n_and_only_to_it(before: int) -> None:
    sample = hosts(20_000, seed=before)
    changes = [(h, owner(h, before), owner(h, before + 1)) for h in sample
               if owner(h, before) != owner(h, before + 1)]
    assert all(new == before for _, _, new in changes)  # only the new shard gains hosts
    share = len(changes) / len(sample)
    expected = 1 / (before + 1)
    assert abs(share - expected) < 0.02, (share, expected)


def test_odd_host_names_have_an_owner() -> None:
    for host in ["", "[::1]", "xn--bcher-kva.example", "a" * 300, "127.0.0.1", "ho{st}%"]:
        assert 0 <= owner(host, 3) < 3


def test_parse_redis_urls_keeps_order() -> None:
    urls = parse_redis_urls(" redis://127.0.0.1:7001/0, redis://127.0.0.1:7002/0 ")
    assert urls == ["redis://127.0.0.1:7001/0", "redis://127.0.0.1:7002/0"]


@pytest.mark.parametrize(("value", "words"), [
    ("", "is empty"),
    (" , ", "is empty"),
    ("redis://a:1/0, ", "entry 2 is empty"),
    ("redis://a:1/0,,redis://b:1/0", "entry 2 is empty"),
    ("redis://a:1/0,http://b/", "entry 2"),
    ("redis://:hunter2@a:1/0,redis://:hunter2@a:1/0", "are the same server"),
])
def test_parse_redis_urls_refuses_in_one_line(value: str, words: str) -> None:
    with pytest.raises(ShardConfigError) as info:
        parse_redis_urls(value)
    message = str(info.value)
    assert words in message and "\n" not in message
    assert "hunter2" not in message
