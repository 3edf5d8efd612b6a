"""The bounds on log lines a sandbox can cause (pure: no trio, no I/O)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from credproxy.core.throttle import ServeAudit, Throttle


def test_the_same_token_is_counted_and_only_the_first_count_starts_an_interval() -> None:
    """Serves of one token after the first are counted; only the first of a run asks for a count line."""
    audit = ServeAudit("fp1", 100.0, 1.0)
    assert not audit.is_new("fp1")
    assert audit.count(2.0) is True
    assert [audit.count(2.0) for _ in range(4)] == [False] * 4
    assert audit.take() == 5
    assert audit.take() == 0
    assert audit.count(2.0) is True, "after a count line, the next serve starts a new interval"


def test_a_new_token_is_new() -> None:
    """A different fingerprint is a new token, to be logged at once."""
    assert ServeAudit("fp1", None, 1.0).is_new("fp2")


def test_every_serve_of_a_key_counts_for_its_stats_whatever_the_token() -> None:
    """The bucket stats count every serve, across a token change; the audit counts per token."""
    audit = ServeAudit("fp1", None, 1.0)  # the first serve of fp1, logged at once
    audit.count(2.0)
    audit.count(3.0)
    assert audit.take() == 2
    audit.renew("fp2", 50.0, 4.0)  # the first serve of fp2, logged at once
    assert (audit.fp, audit.expiry, audit.pending) == ("fp2", 50.0, 0)
    assert not audit.is_new("fp2")
    audit.count(5.0)
    assert (audit.total, audit.last) == (5, 5.0)


def test_throttle_lets_one_through_per_interval_and_reports_the_rest() -> None:
    """Within an interval only the first event passes; the next one to pass says how many were dropped."""
    t = Throttle(10.0)
    assert t.allow(0.0) == 0
    assert [t.allow(x) for x in (1.0, 2.0, 9.9)] == [None, None, None]
    assert t.allow(10.0) == 3
    assert t.allow(10.5) is None
    assert t.allow(25.0) == 1


@given(st.lists(st.floats(min_value=0, max_value=1000), min_size=1, max_size=200))
def test_throttle_bounds_the_lines_and_loses_no_count(times: list[float]) -> None:
    """However events arrive, at most one line per interval passes, and passed lines plus reported drops account for every event but the trailing drops."""
    t = Throttle(10.0)
    passed: list[float] = []
    reported = trailing = 0
    for now in sorted(times):
        got = t.allow(now)
        if got is None:
            trailing += 1
        else:
            passed.append(now)
            reported += got
            trailing = 0
    assert all(b - a >= 10.0 for a, b in itertools.pairwise(passed))
    assert len(passed) + reported + trailing == len(times)
