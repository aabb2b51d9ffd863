"""The worker's link filter (workers/links.py): scope, and the links it sent recently."""

from __future__ import annotations

import pytest

from crawlfleet.common import frontier as frontier_module
from crawlfleet.common.settings import Settings
from crawlfleet.common.urls import fingerprint
from crawlfleet.workers.links import LinkFilter, RecentLinks

NAV = [f"http://a.test/doc/{i}.html" for i in range(20)]


def link_filter(**settings: object) -> LinkFilter:
    f = LinkFilter(Settings(redis_url="embedded://links", **settings))  # type: ignore[arg-type]
    f.set_scope(["a.test"], [], 1)
    return f


def test_a_link_is_sent_once_until_its_report_is_lost() -> None:
    f = link_filter()
    sent, refused, invalid = f.filter([*NAV, "http://elsewhere.test/x"], 1)
    assert [a.fp for a in sent] == [fingerprint(u) for u in NAV]
    assert (refused, invalid) == (1, 0)
    again, refused, _ = f.filter([*NAV, "http://elsewhere.test/x"], 2)
    assert again == []
    assert refused == 1  # a refusal is counted each time the link comes
    # Their report did not reach Redis: the next page that has them sends them again.
    f.forget(sent[:5])
    resent, _, _ = f.filter([u[:-5] + ".html" for u in NAV], 1)  # equal strings, new objects
    assert [a.fp for a in resent] == [a.fp for a in sent[:5]]


def test_a_link_sent_before_costs_no_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    f = link_filter()
    f.filter(NAV, 1)
    calls: list[str] = []

    def counting(url: str) -> str:
        calls.append(url)
        return fingerprint(url)

    monkeypatch.setattr(frontier_module, "fingerprint", counting)  # Admission.of's
    fresh = "http://a.test/doc/new.html"
    sent, _, _ = f.filter([*NAV, fresh], 1)
    assert [a.fp for a in sent] == [fingerprint(fresh)]
    assert calls == [fresh]


def test_the_cache_is_bounded_and_forgets_the_oldest_half() -> None:
    recent = RecentLinks(10)
    for key in range(12):
        recent.add(key)
    assert len(recent) <= 10
    assert 11 in recent and 0 not in recent
    f = link_filter(link_cache_size=10)
    assert len(f.filter(NAV, 1)[0]) == 20
    assert len(f.recent) <= 10
    # The oldest were dropped and would be sent again; the newest would not.
    assert f.filter([NAV[0]], 1)[0] and not f.filter([NAV[-1]], 1)[0]
