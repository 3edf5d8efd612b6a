"""Several accounts per provider as pure functions (issue 11; docs/design.md section 3.6): no trio, no store.

Classification of one bucket (:func:`classify`), the three passes of failover
driven through :class:`Walk`, what the sandbox is told when every bucket failed
(:meth:`Walk.exhausted`, :func:`retry_after`), how long a quota hold lasts
(:func:`quota_hold`), where the next request starts (:func:`next_current`), and
the ``PROVIDER:B1,B2`` grant that gives a session its profile
(:meth:`Grants.parse`).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from credproxy.core.config import Renewal
from credproxy.core.failover import (
    NEEDS_LOGIN,
    QUOTA,
    REASONS,
    BucketMarks,
    Profile,
    Walk,
    classify,
    next_current,
    quota_hold,
    refresh_failure_reason,
    retry_after,
)
from credproxy.core.grants import Grants
from credproxy.core.serving import Refresh, Serve, TokenFacts
from credproxy.errors import UsageError

CFG = Renewal()  # serve_margin 60
NOW = 1_700_000_000.0
FAILURES = tuple(r for r in REASONS if r != "skipped")
LOGIN_CURES = {"reauth-failed", "no-token", "expired-refresh-failed"}


def fresh() -> TokenFacts:
    """A refreshable token with an hour left."""
    return TokenFacts(expiry=NOW + 3600, refreshable=True, lifetime=3600)


def held(until: float) -> BucketMarks:
    return BucketMarks(quota_until=until)


def walk_all(walk: Walk) -> list[str]:
    """Every bucket :meth:`Walk.next` offers, failing none of them."""
    out = []
    while (bucket := walk.next()) is not None:
        out.append(bucket)
    return out


THREE = Profile("dev", ("a", "b", "c"))


# -- classify ---------------------------------------------------------------------------------


def test_no_stored_token_is_no_token() -> None:
    """A bucket without a stored token is ``no-token``, whatever else is known of it."""
    assert classify(None, False, None, NOW, CFG) == "no-token"
    assert classify(None, True, held(NOW + 60), NOW, CFG) == "no-token"


def test_an_active_quota_hold_is_quota_exhausted() -> None:
    """A bucket held for quota is ``quota-exhausted`` even though its token is fresh."""
    assert classify(fresh(), False, held(NOW + 60), NOW, CFG) == QUOTA == "quota-exhausted"


def test_a_quota_hold_wins_over_reauth_required() -> None:
    """While held for quota, a bucket is reported as quota-exhausted before anything else."""
    assert classify(fresh(), True, held(NOW + 60), NOW, CFG) == "quota-exhausted"


def test_an_expired_quota_hold_serves_again() -> None:
    """Once the hold's instant has passed (or is reached), the bucket is served as before."""
    assert classify(fresh(), False, held(NOW - 1), NOW, CFG) == Serve()
    assert classify(fresh(), False, held(NOW), NOW, CFG) == Serve()
    assert classify(fresh(), False, BucketMarks(), NOW, CFG) == Serve()


def test_reauth_required_is_reauth_failed() -> None:
    """A bucket whose refresh token was refused is ``reauth-failed``, even with a fresh token."""
    assert classify(fresh(), True, None, NOW, CFG) == "reauth-failed"


def test_expired_without_refresh_token_is_expired_refresh_failed() -> None:
    """An expired token with nothing to refresh it with is ``expired-refresh-failed``."""
    facts = TokenFacts(expiry=NOW - 1, refreshable=False, lifetime=None)
    assert classify(facts, False, None, NOW, CFG) == "expired-refresh-failed"


def test_expired_with_refresh_token_is_refreshed_first() -> None:
    """An expired refreshable token is refreshed first (pass 1 or 2), not given up on."""
    facts = TokenFacts(expiry=NOW - 1, refreshable=True, lifetime=3600)
    assert classify(facts, False, None, NOW, CFG) == Refresh()


def test_inside_the_serve_margin_is_refreshed_first() -> None:
    """A token with less than the serve margin left is refreshed before it is served."""
    facts = TokenFacts(expiry=NOW + 30, refreshable=True, lifetime=3600)
    assert classify(facts, False, None, NOW, CFG) == Refresh()


def test_a_fresh_token_is_served() -> None:
    """A fresh token, no hold, no re-auth needed: served as stored."""
    assert classify(fresh(), False, None, NOW, CFG) == Serve()
    no_expiry = TokenFacts(expiry=None, refreshable=False, lifetime=None)
    assert classify(no_expiry, False, None, NOW, CFG) == Serve()


def test_bucket_marks_hold_is_half_open() -> None:
    """A hold is active strictly before its instant and never without one."""
    assert held(NOW + 1).held(NOW)
    assert not held(NOW).held(NOW)
    assert not BucketMarks().held(NOW)


# -- the three passes -------------------------------------------------------------------------


def test_a_multi_bucket_profile_rotates_through_every_bucket_on_failure() -> None:
    """Each bucket is offered once, current first then profile order, and each reason is kept."""
    walk = Walk(THREE, 0)
    seen = []
    reasons = {"a": "quota-exhausted", "b": "expired-refresh-failed", "c": "no-token"}
    while (bucket := walk.next()) is not None:
        seen.append(bucket)
        walk.failed(bucket, reasons[bucket])  # type: ignore[arg-type]
    assert seen == ["a", "b", "c"]
    assert walk.served_bucket is None
    assert walk.exhausted({}, NOW).reasons == reasons


def test_a_served_bucket_skips_the_rest_and_never_asks_for_them() -> None:
    """Once a bucket serves, the walk ends and the untried buckets are ``skipped``."""
    walk = Walk(Profile("dev", ("a", "b", "c", "d")), 0)
    assert walk.next() == "a"
    walk.failed("a", "quota-exhausted")
    assert walk.next() == "b"
    walk.served("b")
    assert walk.next() is None
    assert walk.next() is None
    assert walk.served_bucket == "b"
    assert walk.reasons == {"a": "quota-exhausted", "c": "skipped", "d": "skipped"}


def test_the_current_bucket_serving_at_once_skips_every_other() -> None:
    """Pass 1 serving means pass 2 never starts: every other bucket is skipped, none tried."""
    walk = Walk(THREE, 1)
    assert walk.next() == "b"
    walk.served("b")
    assert walk.next() is None
    assert walk.reasons == {"a": "skipped", "c": "skipped"}


@pytest.mark.parametrize(
    ("current", "order"),
    [
        (0, ["a", "b", "c"]),
        (1, ["b", "a", "c"]),
        (2, ["c", "a", "b"]),
        (3, ["a", "b", "c"]),  # taken modulo the profile's length
        (-1, ["c", "a", "b"]),
    ],
)
def test_the_walk_starts_at_the_current_bucket_then_profile_order(
    current: int, order: list[str]
) -> None:
    """Pass 1 is the current bucket; pass 2 the others in profile order, not from current on."""
    assert walk_all(Walk(THREE, current)) == order


def test_a_single_bucket_profile_walks_exactly_that_bucket() -> None:
    """A one-bucket profile tries its bucket once and nothing else, as without profiles."""
    profile = Profile("dev", ("only",))
    walk = Walk(profile, 0)
    assert walk.next() == "only"
    walk.served("only")
    assert walk.next() is None
    assert walk.reasons == {}
    assert next_current(profile, "only") == 0

    walk = Walk(profile, 5)
    assert walk.next() == "only"
    walk.failed("only", "reauth-failed")
    assert walk.next() is None
    out = walk.exhausted({}, NOW)
    assert out.reasons == {"only": "reauth-failed"}
    assert out.login == ("only",)


def test_exhausted_lists_every_bucket_with_its_reason_and_the_soonest_retry() -> None:
    """The error names every bucket with its reason and the soonest end of a quota hold."""
    walk = Walk(THREE, 0)
    for bucket, reason in zip(
        walk_all(walk), ["quota-exhausted", "quota-exhausted", "reauth-failed"], strict=True
    ):
        walk.failed(bucket, reason)  # type: ignore[arg-type]
    holds = {"a": held(NOW + 120.2), "b": held(NOW + 30.4), "c": BucketMarks()}
    out = walk.exhausted(holds, NOW)
    assert out.reasons == {"a": "quota-exhausted", "b": "quota-exhausted", "c": "reauth-failed"}
    assert out.retry_after == 31  # rounded up
    assert out.login == ("c",)


def test_exhausted_without_quota_holds_has_no_retry_after() -> None:
    """Without a quota hold there is no instant to retry at, so ``retryAfter`` is absent."""
    walk = Walk(THREE, 0)
    for bucket in walk_all(walk):
        walk.failed(bucket, "no-token")
    out = walk.exhausted({"a": BucketMarks(), "b": held(NOW - 5)}, NOW)
    assert out.retry_after is None
    assert set(out.reasons) == {"a", "b", "c"}


def test_foreground_reauth_is_asked_once_for_several_buckets() -> None:
    """Pass 3 names, once and in walk order, exactly the buckets a login would cure."""
    profile = Profile("dev", ("q", "r", "n", "e"))
    reasons = {
        "q": "quota-exhausted",
        "r": "reauth-failed",
        "n": "no-token",
        "e": "expired-refresh-failed",
    }
    walk = Walk(profile, 2)
    for bucket in walk_all(walk):
        walk.failed(bucket, reasons[bucket])  # type: ignore[arg-type]
    out = walk.exhausted({"q": held(NOW + 10)}, NOW)
    assert out.login == ("n", "r", "e")  # current ("n") first, then profile order
    assert out.retry_after == 10
    assert NEEDS_LOGIN == LOGIN_CURES


@given(
    reasons=st.lists(st.sampled_from(FAILURES), min_size=1, max_size=8),
    current=st.integers(-20, 20),
)
def test_any_failing_walk_visits_each_bucket_once_and_reports_them_all(
    reasons: list[str], current: int
) -> None:
    """Whatever each bucket fails with, every bucket is tried once and named with its reason."""
    buckets = tuple(f"b{i}" for i in range(len(reasons)))
    assigned = dict(zip(buckets, reasons, strict=True))
    walk = Walk(Profile("dev", buckets), current)
    seen = []
    while (bucket := walk.next()) is not None:
        seen.append(bucket)
        walk.failed(bucket, assigned[bucket])  # type: ignore[arg-type]
    start = buckets[current % len(buckets)]
    assert seen == [start] + [b for b in buckets if b != start]
    out = walk.exhausted({}, NOW)
    assert out.reasons == assigned
    assert out.login == tuple(b for b in seen if assigned[b] in LOGIN_CURES)
    assert out.retry_after is None


@given(
    reasons=st.lists(st.sampled_from(FAILURES), min_size=0, max_size=6),
    extra=st.integers(0, 6),
    current=st.integers(0, 12),
)
def test_any_walk_that_serves_skips_exactly_the_untried_buckets(
    reasons: list[str], extra: int, current: int
) -> None:
    """Buckets failing before the one that serves keep their reason; the rest are skipped."""
    n = len(reasons) + 1 + extra
    buckets = tuple(f"b{i}" for i in range(n))
    walk = Walk(Profile("dev", buckets), current)
    tried = []
    for reason in reasons:
        bucket = walk.next()
        assert bucket is not None
        tried.append(bucket)
        walk.failed(bucket, reason)  # type: ignore[arg-type]
    server = walk.next()
    assert server is not None
    walk.served(server)
    assert walk.next() is None
    assert set(walk.reasons) | {server} == set(buckets)
    assert server not in walk.reasons
    assert [walk.reasons[b] for b in tried] == reasons
    assert all(walk.reasons[b] == "skipped" for b in buckets if b not in tried and b != server)


# -- retry_after and quota holds --------------------------------------------------------------


def test_retry_after_is_the_soonest_hold_rounded_up_and_at_least_one() -> None:
    """``retryAfter`` is whole seconds to the soonest live hold, never 0; None without one."""
    assert retry_after([held(NOW + 0.01)], NOW) == 1
    assert retry_after([held(NOW + 2.5), held(NOW + 1.2)], NOW) == 2
    assert retry_after([held(NOW - 3), BucketMarks(), held(NOW + 7)], NOW) == 7
    assert retry_after([held(NOW), BucketMarks()], NOW) is None
    assert retry_after([], NOW) is None


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), max_size=6))
def test_retry_after_is_ceil_of_the_soonest_future_hold(offsets: list[float]) -> None:
    """For any set of holds, ``retryAfter`` is the ceiling of the soonest future one, at least 1."""
    marks = [held(NOW + o) for o in offsets]
    future = [
        m.quota_until - NOW for m in marks if m.quota_until is not None and m.quota_until > NOW
    ]
    got = retry_after(marks, NOW)
    if not future:
        assert got is None
    else:
        assert got is not None and got >= 1
        assert got == max(1, math.ceil(min(future)))


def test_quota_hold_uses_the_default_when_no_usable_retry_after() -> None:
    """Absent, NaN or infinite ``retry-after`` counts as absent: the default hold applies."""
    for value in (None, math.nan, math.inf, -math.inf):
        assert quota_hold(value, 60, 86_400) == 60


def test_quota_hold_is_bounded_to_one_second_and_the_cap() -> None:
    """A reported ``retry-after`` is held at least 1 s and at most the configured cap."""
    assert quota_hold(0, 60, 3600) == 1
    assert quota_hold(-5, 60, 3600) == 1
    assert quota_hold(0.2, 60, 3600) == 1
    assert quota_hold(120, 60, 3600) == 120
    assert quota_hold(10**9, 60, 3600) == 3600
    assert quota_hold(None, 7200, 3600) == 3600  # the default is capped too


@given(
    value=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    default=st.floats(1, 1e6),
    cap=st.floats(1, 1e7),
)
def test_quota_hold_is_always_within_bounds(
    value: float | None, default: float, cap: float
) -> None:
    """Whatever a sandbox reports, the hold is a finite number of seconds in [1, cap]."""
    hold = quota_hold(value, default, cap)
    assert math.isfinite(hold)
    assert 1 <= hold <= cap


# -- next_current -----------------------------------------------------------------------------


def test_fill_first_stays_on_the_bucket_that_served() -> None:
    """Fill-first starts the next request at the bucket that just served."""
    for i, bucket in enumerate(THREE.buckets):
        assert next_current(THREE, bucket) == i


def test_round_robin_moves_past_the_bucket_that_served_and_wraps() -> None:
    """Round-robin starts the next request at the bucket after the one that served, wrapping."""
    profile = Profile("dev", ("a", "b", "c"), "round-robin")
    assert next_current(profile, "a") == 1
    assert next_current(profile, "b") == 2
    assert next_current(profile, "c") == 0
    assert next_current(Profile("dev", ("only",), "round-robin"), "only") == 0


def test_a_profile_defaults_to_fill_first() -> None:
    """Without a strategy a profile is sticky (fill-first)."""
    assert THREE.strategy == "fill-first"


# -- grants: PROVIDER:B1,B2 -------------------------------------------------------------------


def test_a_profile_grant_keeps_its_order_and_grants_its_buckets() -> None:
    """``dev:work,personal`` grants exactly those buckets, in that order as the profile."""
    g = Grants.parse(["dev:work,personal"])
    assert g.profile("dev") == ("work", "personal")
    assert Grants.parse(["dev:personal,work"]).profile("dev") == ("personal", "work")
    assert g.token_allowed("dev", "work")
    assert g.token_allowed("dev", "personal")
    assert not g.token_allowed("dev", "default")
    assert not g.token_allowed("dev", "other")
    assert not g.token_allowed("other", "work")
    assert g.provider_visible("dev")
    assert not g.provider_visible("other")
    assert g.profile("other") is None


def test_a_single_bucket_grant_gives_no_profile() -> None:
    """``dev:work`` grants one bucket and no profile, as before profiles existed."""
    g = Grants.parse(["dev:work"])
    assert g.profile("dev") is None
    assert g.token_allowed("dev", "work")


@pytest.mark.parametrize(
    "specs",
    [
        ["dev:work,personal"],
        ["dev:work,personal", "dev:spare"],
        ["dev:work", "dev:work,personal"],
        ["*", "key:k", "other", "dev:b,a,c", "zz:x,y"],
    ],
)
def test_profile_grants_round_trip_through_specs(specs: list[str]) -> None:
    """``specs()`` writes the grants back so that parsing them again gives the same grants."""
    g = Grants.parse(specs)
    again = Grants.parse(g.specs())
    assert again == g
    assert again.specs() == g.specs()


@pytest.mark.parametrize(
    "specs",
    [
        ["dev:work,work"],  # a bucket twice
        ["dev:a,b", "dev:c,d"],  # two profiles for one provider
        ["dev:a,b", "dev:b,a"],
        ["dev:work,"],  # an empty name
        ["dev:,work"],
        ["dev:work,.."],
        ["dev:work,per sonal"],
        ["de v:work,personal"],
        [":work,personal"],
        ["key:a,b"],  # key: is never a profile
    ],
)
def test_bad_profile_grants_are_refused(specs: list[str]) -> None:
    """Duplicate buckets, a second profile of a provider, or an invalid name: ``UsageError``."""
    with pytest.raises(UsageError):
        Grants.parse(specs)


NAMES = st.from_regex(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,9}", fullmatch=True)


@given(
    provider=NAMES.filter(lambda p: p != "key"),
    buckets=st.lists(NAMES, min_size=2, max_size=5, unique=True),
)
def test_any_profile_grant_keeps_order_and_round_trips(provider: str, buckets: list[str]) -> None:
    """For any distinct valid bucket names, the profile keeps their order and round-trips."""
    g = Grants.parse([f"{provider}:{','.join(buckets)}"])
    assert g.profile(provider) == tuple(buckets)
    assert all(g.token_allowed(provider, b) for b in buckets)
    assert Grants.parse(g.specs()) == g


def test_a_failed_refresh_gives_the_walk_its_reason_only_when_nothing_can_be_served() -> None:
    from credproxy.errors import NotFound, ReauthRequired, RefreshFailed

    reason = refresh_failure_reason
    assert reason(ReauthRequired("x"), servable=True) == "reauth-failed"
    assert reason(NotFound("x"), servable=True) == "no-token"
    assert reason(RefreshFailed("x"), servable=True) is None  # the old token still serves
    assert reason(RefreshFailed("x"), servable=False) == "expired-refresh-failed"
