"""Renewal policy: pure functions of (token, now, config, rng).

The timer's transitions (what to do on firing, after success or failure) are
tested in test_renewal_machine.py; serve-time decisions in test_serving.py.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from credproxy.core import policy
from credproxy.core.config import Renewal

CFG = Renewal()
NOW = 1_700_000_000.0


class _FixedRandom(random.Random):
    """A Random whose ``random()`` always returns one value, to pin the jitter."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self._value = value

    def random(self) -> float:
        return self._value


LOWEST = _FixedRandom(0.0)
HIGHEST = _FixedRandom(1.0 - 2**-53)  # the largest value random() can return


# -- lead -------------------------------------------------------------------------


def test_lead_of_an_hour_long_token_is_ten_percent() -> None:
    """A 3600 s token is renewed max(300, 360) = 360 s before expiry."""
    assert policy.lead(3600, CFG) == 360


def test_lead_has_a_floor_of_min_lead() -> None:
    """A 1000 s token gets min_lead (300 s) rather than 10 % (100 s)."""
    assert policy.lead(1000, CFG) == 300


def test_lead_floors_the_fraction() -> None:
    """The fractional lead is rounded down to whole seconds."""
    assert policy.lead(3605, CFG) == 360


def test_lead_of_a_short_token_is_half_its_life() -> None:
    """A 60 s token renews at half-life instead of being due at once."""
    assert policy.lead(60, CFG) == 30


def test_lead_of_an_expired_token_is_zero() -> None:
    """Nothing is left to lead for an expired token."""
    assert policy.lead(0, CFG) == 0
    assert policy.lead(-5, CFG) == 0


# -- renewal deadline --------------------------------------------------------------


def test_hour_long_token_fires_between_3240_and_3270_seconds() -> None:
    """A 3600 s token fires 3240-3270 s after it is served."""
    earliest = policy.renewal_deadline(NOW + 3600, NOW, CFG, LOWEST)
    latest = policy.renewal_deadline(NOW + 3600, NOW, CFG, HIGHEST)
    assert earliest - NOW == 3240
    # <= rather than <: at epoch magnitude a float cannot resolve the open end.
    assert 3269.9 < latest - NOW <= 3270


def test_sixty_second_token_fires_at_about_half_life() -> None:
    """A 60 s token fires 30 s (+ at most 3 s jitter) after now."""
    assert policy.renewal_deadline(NOW + 60, NOW, CFG, LOWEST) - NOW == 30
    assert policy.renewal_deadline(NOW + 60, NOW, CFG, HIGHEST) - NOW <= 33


def test_five_second_token_fires_at_about_two_and_a_half_seconds() -> None:
    """A 5 s token fires 2.5 s (+ at most 0.25 s jitter) after now."""
    assert policy.renewal_deadline(NOW + 5, NOW, CFG, LOWEST) - NOW == 2.5
    assert policy.renewal_deadline(NOW + 5, NOW, CFG, HIGHEST) - NOW <= 2.75


def test_expired_token_is_renewed_at_once() -> None:
    """A token whose expiry has passed gets the deadline "now"."""
    assert policy.renewal_deadline(NOW - 10, NOW, CFG, HIGHEST) == NOW
    assert policy.renewal_deadline(NOW, NOW, CFG, HIGHEST) == NOW


def test_jitter_is_spread_by_the_rng() -> None:
    """Different random draws give different deadlines within the jitter window."""
    rng = random.Random(42)
    deadlines = {policy.renewal_deadline(NOW + 3600, NOW, CFG, rng) for _ in range(50)}
    assert len(deadlines) > 40
    assert all(3240 <= d - NOW < 3270 for d in deadlines)


def test_configured_renewal_constants_are_honoured() -> None:
    """A config without jitter and a 50 % fraction renews an hour token at half-life."""
    cfg = Renewal(min_lead=0, lead_fraction=0.5, max_jitter=0)
    assert policy.renewal_deadline(NOW + 3600, NOW, cfg, HIGHEST) == NOW + 1800


epochs = st.floats(min_value=0, max_value=4e9, allow_nan=False)
lifetimes = st.floats(min_value=1e-3, max_value=1e7, allow_nan=False)
renewals = st.builds(
    Renewal,
    min_lead=st.floats(min_value=0, max_value=3600),
    lead_fraction=st.floats(min_value=0, max_value=0.99),
    max_jitter=st.floats(min_value=0, max_value=600),
)


@given(now=epochs, remaining=lifetimes, cfg=renewals, seed=st.integers())
def test_deadline_lies_between_now_and_expiry(
    now: float, remaining: float, cfg: Renewal, seed: int
) -> None:
    """For any live token and any config, the timer fires no earlier than now and before expiry."""
    expiry = now + remaining
    deadline = policy.renewal_deadline(expiry, now, cfg, random.Random(seed))
    assert now <= deadline <= expiry


@given(remaining=lifetimes, cfg=renewals)
def test_lead_never_exceeds_half_the_remaining_life(remaining: float, cfg: Renewal) -> None:
    """The lead is at most remaining / 2 and never negative."""
    assert 0 <= policy.lead(remaining, cfg) <= remaining / 2


@given(remaining=st.floats(min_value=1, max_value=1e7), cfg=renewals, seed=st.integers())
def test_jitter_stays_within_its_bounds(remaining: float, cfg: Renewal, seed: int) -> None:
    """Jitter is in [0, min(max_jitter, lead / 10)) on top of remaining - lead."""
    now = 1000.0
    lead = policy.lead(remaining, cfg)
    deadline = policy.renewal_deadline(now + remaining, now, cfg, random.Random(seed))
    jitter = deadline - (now + remaining - lead)
    bound = min(cfg.max_jitter, lead / 10)
    assert -1e-6 <= jitter <= bound + 1e-6
    if bound > 1e-3:
        assert jitter < bound


# -- backoff ------------------------------------------------------------------------


def test_backoff_doubles_from_thirty_seconds_up_to_the_cap() -> None:
    """Retries wait 30, 60, 120, ... seconds, capped at 1800."""
    delays = [policy.retry_delay(n, CFG) for n in range(1, 11)]
    assert delays == [30, 60, 120, 240, 480, 960, 1800, 1800, 1800, 1800]


def test_backoff_survives_absurd_failure_counts() -> None:
    """Ten thousand failures still give the cap, not an overflow."""
    assert policy.retry_delay(10_000, CFG) == 1800


def test_backoff_treats_counts_below_one_as_the_first_failure() -> None:
    """A zero or negative failure count waits retry_base."""
    assert policy.retry_delay(0, CFG) == 30
    assert policy.retry_delay(-3, CFG) == 30


@given(failures=st.integers(min_value=1, max_value=5000))
def test_backoff_is_capped_and_monotonic(failures: int) -> None:
    """Every delay is within [retry_base, retry_cap] and never shorter than the previous one."""
    delay = policy.retry_delay(failures, CFG)
    assert CFG.retry_base <= delay <= CFG.retry_cap
    assert delay >= policy.retry_delay(failures - 1, CFG)


def test_gives_up_after_max_failures() -> None:
    """The tenth consecutive failure is the last one with the default config."""
    assert not policy.gives_up(9, CFG)
    assert policy.gives_up(10, CFG)
    assert policy.gives_up(1, Renewal(max_failures=1))


# -- token expiry ------------------------------------------------------------------------


def test_a_token_without_expiry_has_none() -> None:
    """No ``expiry`` field: the token does not say when it expires."""
    assert policy.token_expiry({"access_token": "AT"}) is None
    assert not policy.expiry_is_invalid({"access_token": "AT"})


@pytest.mark.parametrize("value", [12, 12.5, 0, 1_800_000_000, 10**15])
def test_a_finite_expiry_is_read_as_float_seconds(value: float) -> None:
    """A finite non-negative number is the expiry, as a float."""
    assert policy.token_expiry({"expiry": value}) == float(value)
    assert not policy.expiry_is_invalid({"expiry": value})


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        "soon",
        "1800000000",
        None,
        float("nan"),
        float("inf"),
        float("-inf"),
        -1,
        10**400,
        [],
        {},
    ],
    ids=[
        "true",
        "false",
        "soon",
        "numeric-string",
        "null",
        "nan",
        "inf",
        "-inf",
        "negative",
        "huge-int",
        "list",
        "object",
    ],
)
def test_an_invalid_expiry_counts_as_expired(value: object) -> None:
    """A present ``expiry`` that is not a finite non-negative number reads as the epoch (long expired).

    So a refreshable token is refreshed before it is served, and one without a
    refresh token asks for a login, instead of being served as if it never expired.
    """
    token = {"access_token": "AT", "refresh_token": "RT", "expiry": value}
    assert policy.token_expiry(token) == policy.INVALID_EXPIRY == 0.0
    assert policy.expiry_is_invalid(token)
