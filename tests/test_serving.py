"""Serve-time decisions as pure functions (docs/design.md section 3.5, "On demand").

``get_token`` (:func:`on_get`), the fallback after a failed refresh
(:func:`after_failed_refresh`), the sandbox's ``refresh_token`` op and its
cooldown (:func:`on_refresh_request`, :func:`cooldown_left`), and how long a
"serve" answer may be reused (:func:`serve_until`).
"""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st

from credproxy.core.config import Renewal
from credproxy.core.serving import (
    RateLimit,
    Reauth,
    Refresh,
    Serve,
    TokenFacts,
    after_failed_refresh,
    cooldown_left,
    on_get,
    on_refresh_request,
    serve_margin,
    serve_until,
    true_expiry,
)

CFG = Renewal()  # serve_margin 60, refresh_cooldown 30
NOW = 1_700_000_000.0


def refreshable(expiry: float, lifetime: float | None = None) -> TokenFacts:
    return TokenFacts(expiry=expiry, refreshable=True, lifetime=lifetime)


def fixed(expiry: float | None) -> TokenFacts:
    """A token without a refresh token (or, with ``None``, without an expiry)."""
    return TokenFacts(expiry=expiry, refreshable=False, lifetime=None)


# -- get_token --------------------------------------------------------------------------------


def test_a_token_without_expiry_is_served_as_stored() -> None:
    """Nothing says it expires, so it is served, however long ago it was stored."""
    assert on_get(fixed(None), NOW, CFG) == Serve()


def test_a_valid_token_without_refresh_token_is_served() -> None:
    """A token that cannot be refreshed is served while it is valid, even inside the margin."""
    assert on_get(fixed(NOW + 3600), NOW, CFG) == Serve()
    assert on_get(fixed(NOW + 1), NOW, CFG) == Serve()


def test_an_expired_token_without_refresh_token_needs_a_login() -> None:
    """Expired with nothing to refresh it with: re-authentication, saying why."""
    assert on_get(fixed(NOW - 1), NOW, CFG) == Reauth("has expired and there is no refresh token")
    assert isinstance(on_get(fixed(NOW), NOW, CFG), Reauth)


def test_serve_refreshes_inside_the_margin() -> None:
    """With 59 s left and the default 60 s margin, get_token refreshes first."""
    assert on_get(refreshable(NOW + 59), NOW, CFG) == Refresh()
    assert on_get(refreshable(NOW + 61), NOW, CFG) == Serve()


def test_exactly_the_margin_left_is_still_served() -> None:
    """The margin is "less than 60 s left": 60 s exactly is served as is."""
    assert on_get(refreshable(NOW + 60), NOW, CFG) == Serve()


def test_serve_margin_is_capped_at_half_the_observed_lifetime() -> None:
    """A token that lives 60 s is not refreshed on every call, only in its second half."""
    assert on_get(refreshable(NOW + 45, lifetime=60), NOW, CFG) == Serve()
    assert on_get(refreshable(NOW + 29, lifetime=60), NOW, CFG) == Refresh()


def test_serve_refreshes_an_expired_token() -> None:
    """An expired refreshable token always needs a refresh before it is served."""
    assert on_get(refreshable(NOW - 1, lifetime=5), NOW, CFG) == Refresh()


def test_serve_margin_values() -> None:
    """The margin is serve_margin unless half the observed lifetime is shorter."""
    assert serve_margin(refreshable(NOW), CFG) == 60
    assert serve_margin(refreshable(NOW, lifetime=60), CFG) == 30
    assert serve_margin(refreshable(NOW, lifetime=3600), CFG) == 60
    assert serve_margin(refreshable(NOW), Renewal(serve_margin=0)) == 0


def test_the_configured_serve_margin_is_honoured() -> None:
    """A 300 s serve margin refreshes a token with 299 s left."""
    cfg = Renewal(serve_margin=300)
    assert on_get(refreshable(NOW + 299), NOW, cfg) == Refresh()
    assert on_get(refreshable(NOW + 300), NOW, cfg) == Serve()


# -- after a failed refresh ------------------------------------------------------------------


def test_a_failed_refresh_serves_the_old_token_while_it_is_valid() -> None:
    """The identity provider is down but the old token has 30 s left: serve it."""
    assert after_failed_refresh(refreshable(NOW + 30), NOW) == Serve()


def test_a_failed_refresh_of_an_expired_token_is_the_answer() -> None:
    """Nothing valid to fall back on: the failure itself is the answer."""
    assert after_failed_refresh(refreshable(NOW - 1), NOW) is None
    assert after_failed_refresh(refreshable(NOW), NOW) is None
    assert after_failed_refresh(fixed(None), NOW) is None


# -- the refresh_token op and its cooldown -----------------------------------------------------


def test_cooldown_is_zero_without_a_previous_refresh() -> None:
    """A key never refreshed may be refreshed at once."""
    assert cooldown_left(None, NOW, CFG) == 0


def test_cooldown_counts_down_thirty_seconds() -> None:
    """Ten seconds after a refresh, twenty remain; after thirty, none."""
    assert cooldown_left(NOW, NOW + 10, CFG) == 20
    assert cooldown_left(NOW, NOW + 30, CFG) == 0
    assert cooldown_left(NOW, NOW + 3000, CFG) == 0


def test_cooldown_is_bounded_when_the_clock_goes_backwards() -> None:
    """A wall clock stepped back an hour does not extend the cooldown past 30 s."""
    assert cooldown_left(NOW, NOW - 3600, CFG) == 30


@given(
    last=st.floats(min_value=0, max_value=4e9),
    now=st.floats(min_value=0, max_value=4e9),
    cooldown=st.floats(min_value=0, max_value=86_400),
)
def test_cooldown_never_exceeds_the_cooldown(last: float, now: float, cooldown: float) -> None:
    """Whatever the clock did, the time left is within [0, refresh_cooldown]."""
    assert 0 <= cooldown_left(last, now, Renewal(refresh_cooldown=cooldown)) <= cooldown


def test_refresh_request_inside_the_cooldown_serves_a_valid_token() -> None:
    """Asked again 10 s after an attempt, the sandbox gets the current token, no upstream call."""
    assert on_refresh_request(refreshable(NOW + 3600), NOW - 10, NOW, CFG) == Serve()
    assert on_refresh_request(fixed(None), NOW - 10, NOW, CFG) == Serve()


def test_refresh_request_inside_the_cooldown_with_an_expired_token_is_rate_limited() -> None:
    """Nothing valid to serve and too soon to ask upstream: RATE_LIMITED for the seconds left."""
    assert on_refresh_request(refreshable(NOW - 5), NOW - 10, NOW, CFG) == RateLimit(20)
    # Fractions round up: 19.5 s left is "retry after 20".
    assert on_refresh_request(refreshable(NOW - 5), NOW - 10.5, NOW, CFG) == RateLimit(20)


def test_rate_limit_retry_after_is_at_least_one_second() -> None:
    """A cooldown with a fraction of a second left still says "retry after 1"."""
    assert on_refresh_request(refreshable(NOW - 5), NOW - 29.9, NOW, CFG) == RateLimit(1)


@given(elapsed=st.floats(min_value=-1e6, max_value=29.999))
def test_rate_limit_retry_after_is_within_one_and_the_cooldown(elapsed: float) -> None:
    """Every RATE_LIMITED answer asks for between 1 and refresh_cooldown seconds."""
    step = on_refresh_request(refreshable(NOW - 5), NOW - elapsed, NOW, CFG)
    assert isinstance(step, RateLimit)
    assert 1 <= step.retry_after <= CFG.refresh_cooldown


def test_refresh_request_outside_the_cooldown_refreshes() -> None:
    """Never attempted, or attempted 30 s or more ago: go upstream."""
    assert on_refresh_request(refreshable(NOW + 3600), None, NOW, CFG) == Refresh()
    assert on_refresh_request(refreshable(NOW - 5), NOW - 30, NOW, CFG) == Refresh()


def test_refresh_request_for_a_token_that_cannot_be_refreshed_needs_a_login() -> None:
    """Outside the cooldown, a token without refresh token or expiry answers re-auth."""
    assert isinstance(on_refresh_request(fixed(NOW + 3600), None, NOW, CFG), Reauth)
    assert isinstance(on_refresh_request(fixed(None), NOW - 60, NOW, CFG), Reauth)


def test_refresh_request_cooldown_is_bounded_when_the_clock_goes_backwards() -> None:
    """An attempt "in the future" (clock stepped back) rate-limits for at most the cooldown."""
    assert on_refresh_request(refreshable(NOW - 5), NOW + 3600, NOW, CFG) == RateLimit(30)


# -- how long a "serve" answer may be reused ---------------------------------------------------


def test_serve_until_is_bounded_by_recheck() -> None:
    """A token valid for an hour may be served from cache for the recheck interval only."""
    assert serve_until(refreshable(NOW + 3600), NOW, CFG, 5) == NOW + 5


def test_serve_until_stops_at_the_margin_flip() -> None:
    """With 62 s left and a 60 s margin, the cached answer is good for 2 s."""
    assert serve_until(refreshable(NOW + 62), NOW, CFG, 5) == NOW + 2


def test_serve_until_a_fixed_token_stops_at_its_expiry() -> None:
    """A token without refresh token is served until it expires, not until the margin."""
    assert serve_until(fixed(NOW + 3), NOW, CFG, 5) == NOW + 3


def test_serve_until_is_now_once_inside_the_margin() -> None:
    """A token that needs a refresh gets no reuse at all."""
    assert serve_until(refreshable(NOW + 10), NOW, CFG, 5) == NOW


# Integer-valued instants keep the arithmetic exact, so the properties hold to the second.
instants = st.integers(min_value=0, max_value=4_000_000_000).map(float)
offsets = st.integers(min_value=-100_000, max_value=100_000).map(float)
facts = st.builds(
    TokenFacts,
    expiry=st.none() | offsets,  # relative to now; shifted in the tests
    refreshable=st.booleans(),
    lifetime=st.none() | st.integers(min_value=1, max_value=100_000).map(float),
)
rechecks = st.integers(min_value=0, max_value=3600).map(float)
margins = st.integers(min_value=0, max_value=3600).map(float)


def _at(f: TokenFacts, now: float) -> TokenFacts:
    expiry = None if f.expiry is None else now + f.expiry
    return TokenFacts(expiry, f.refreshable and expiry is not None, f.lifetime)


@given(f=facts, now=instants, recheck=rechecks, margin=margins)
def test_serve_until_lies_between_now_and_now_plus_recheck(
    f: TokenFacts, now: float, recheck: float, margin: float
) -> None:
    """The reuse window never starts before now and never ends after now + recheck."""
    t = _at(f, now)
    until = serve_until(t, now, Renewal(serve_margin=margin), recheck)
    assert now <= until <= now + recheck


@given(
    left=offsets,
    lifetime=st.none() | st.integers(min_value=1, max_value=100_000).map(float),
    now=instants,
    recheck=rechecks,
    margin=margins,
)
def test_serve_until_never_passes_the_margin_flip(
    left: float, lifetime: float | None, now: float, recheck: float, margin: float
) -> None:
    """A refreshable token's window ends by expiry - margin (or at now, if that has passed)."""
    t = refreshable(now + left, lifetime)
    cfg = Renewal(serve_margin=margin)
    until = serve_until(t, now, cfg, recheck)
    assert until <= max(now, now + left - serve_margin(t, cfg))


@given(
    f=facts,
    now=instants,
    recheck=rechecks,
    margin=margins,
    frac=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_a_serve_answer_stays_right_until_serve_until(
    f: TokenFacts, now: float, recheck: float, margin: float, frac: float
) -> None:
    """If get_token says serve at now, it still says serve at any instant before serve_until (exclusive)."""
    t = _at(f, now)
    cfg = Renewal(serve_margin=margin)
    assume(on_get(t, now, cfg) == Serve())
    until = serve_until(t, now, cfg, recheck)
    later = now + frac * (until - now)
    assume(later < until)  # the window is half-open; rounding may land on its end
    assert on_get(t, later, cfg) == Serve()


# --- clock steps ---------------------------------------------------------------


def test_true_expiry_is_the_earlier_of_the_wall_and_boot_clock_expiries() -> None:
    """A stored expiry an hour too late (received while the clock ran ahead) gives way to the boot clock's."""
    facts = TokenFacts(
        expiry=NOW + 7200, refreshable=True, lifetime=3600, boot_deadline=500.0 + 3600
    )
    assert true_expiry(facts, NOW, 500.0) == NOW + 3600
    assert facts.at(NOW, 500.0).expiry == NOW + 3600
    # A wall clock put forward only makes the wall expiry the earlier one.
    ahead = TokenFacts(NOW + 1000, True, 3600, boot_deadline=500.0 + 3600)
    assert true_expiry(ahead, NOW, 500.0) == NOW + 1000
    assert ahead.at(NOW, 500.0) is ahead


@given(
    remaining=st.floats(min_value=-1e6, max_value=1e6),
    step=st.floats(min_value=-1e6, max_value=1e6),
    elapsed=st.floats(min_value=0, max_value=1e6),
)
def test_true_expiry_never_outlives_the_token(
    remaining: float, step: float, elapsed: float
) -> None:
    """Whatever step the wall clock took since the token was seen, the true expiry is never later than its real end."""
    boot0 = 1000.0
    facts = TokenFacts(NOW + remaining, True, None, boot_deadline=boot0 + remaining)
    wall_now, boot_now = NOW + elapsed + step, boot0 + elapsed
    expiry = true_expiry(facts, wall_now, boot_now)
    assert expiry is not None
    real_left = remaining - elapsed
    assert expiry - wall_now <= real_left + 1e-6
