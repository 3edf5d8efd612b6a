"""The renewal timer as a state machine, without trio (the rules of docs/design.md section 3).

Every test drives :class:`~credproxy.core.renewal.RenewalTimer` with plain
numbers for the wall clock and a token as the store would hold it; the trio
task in ``credproxy.shell.tokens`` only sleeps and does the I/O these
decisions ask for.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from credproxy.core import policy
from credproxy.core.config import Renewal
from credproxy.core.renewal import End, Failure, KeyHealth, Refresh, RenewalTimer, State, Wait

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


def _token(expiry: float | int | str, refresh_token: str | None = "rt") -> dict[str, object]:
    token: dict[str, object] = {"access_token": "at", "expiry": expiry, "token_type": "Bearer"}
    if refresh_token is not None:
        token["refresh_token"] = refresh_token
    return token


def _timer(
    expiry: float = NOW + 60,
    now: float = NOW,
    cfg: Renewal = CFG,
    rng: random.Random = LOWEST,
    health: KeyHealth | None = None,
) -> RenewalTimer:
    return RenewalTimer(expiry, now, cfg, rng, KeyHealth() if health is None else health)


# -- the first deadline (design.md 3.2) -----------------------------------------------------


def test_hour_long_token_first_fires_between_3240_and_3270_seconds() -> None:
    """A timer for a 3600 s token is first due 3240-3270 s after it is created."""
    earliest = _timer(NOW + 3600, rng=LOWEST)
    latest = _timer(NOW + 3600, rng=HIGHEST)
    assert earliest.state is State.SCHEDULED
    assert earliest.deadline is not None
    assert latest.deadline is not None
    assert earliest.deadline - NOW == 3240
    assert 3269.9 < latest.deadline - NOW <= 3270


def test_timer_for_an_expired_token_is_due_at_once() -> None:
    """A timer created for a token that has already expired fires immediately."""
    assert _timer(NOW - 10, rng=HIGHEST).deadline == NOW


epochs = st.floats(min_value=0, max_value=4e9, allow_nan=False)
lifetimes = st.floats(min_value=1e-3, max_value=1e7, allow_nan=False)
renewals = st.builds(
    Renewal,
    min_lead=st.floats(min_value=0, max_value=3600),
    lead_fraction=st.floats(min_value=0, max_value=0.99),
    max_jitter=st.floats(min_value=0, max_value=600),
)


@given(now=epochs, remaining=lifetimes, cfg=renewals, seed=st.integers())
def test_every_scheduled_deadline_lies_between_now_and_expiry(
    now: float, remaining: float, cfg: Renewal, seed: int
) -> None:
    """For any live token and config, the first deadline and the one after a success are in [now, expiry]."""
    rng = random.Random(seed)
    timer = _timer(now + remaining, now, cfg, rng)
    assert timer.deadline is not None
    assert now <= timer.deadline <= now + remaining
    step = timer.on_fire(_token(now + remaining), timer.deadline)
    assert isinstance(step, Refresh)
    later = timer.deadline
    wait = timer.on_success(later + remaining, later)
    assert isinstance(wait, Wait)
    assert later <= wait.deadline <= later + remaining


# -- on fire (design.md 3.3) ----------------------------------------------------------------


def test_fire_after_logout_stops() -> None:
    """A token removed from the store stops its timer."""
    timer = _timer(NOW + 60)
    assert timer.on_fire(None, NOW + 30) == End("token removed", "renewal_stopped")
    assert timer.state is State.ENDED
    assert timer.deadline is None
    assert not timer.gave_up


@pytest.mark.parametrize("refresh_token", [None, ""])
def test_fire_without_refresh_token_stops(refresh_token: str | None) -> None:
    """A token that can no longer be refreshed stops its timer."""
    timer = _timer(NOW + 60)
    step = timer.on_fire(_token(NOW + 60, refresh_token), NOW + 30)
    assert isinstance(step, End)
    assert step.event == "renewal_stopped"
    assert timer.state is State.ENDED


def test_fire_without_expiry_stops() -> None:
    """A token replaced by one without an expiry has nothing to schedule against."""
    timer = _timer(NOW + 60)
    step = timer.on_fire({"access_token": "at", "refresh_token": "rt"}, NOW + 30)
    assert step == End("token removed or not refreshable", "renewal_stopped")
    assert timer.deadline is None


def test_fire_on_an_invalid_expiry_refreshes() -> None:
    """A token whose expiry is not a number counts as expired: it is refreshed (issue 16, item 13)."""
    timer = _timer(NOW + 60)
    step = timer.on_fire({"access_token": "at", "refresh_token": "rt", "expiry": "soon"}, NOW + 30)
    assert step == Refresh(NOW + 60)


def test_fire_after_renewal_elsewhere_reschedules_for_the_new_expiry() -> None:
    """A token renewed by another process is rescheduled, not refreshed again."""
    timer = _timer(NOW + 60, rng=LOWEST)
    step = timer.on_fire(_token(NOW + 3630), NOW + 30)
    # 3600 s left at NOW + 30: due 3240 s later, with no jitter from LOWEST.
    assert step == Wait(NOW + 30 + 3240, "renewal_rescheduled")
    assert timer.state is State.SCHEDULED
    assert timer.expiry == NOW + 3630
    assert timer.deadline == NOW + 3270


def test_fire_on_the_scheduled_token_refreshes() -> None:
    """The token the timer was set for is refreshed, naming the expiry it saw."""
    timer = _timer(NOW + 60)
    assert timer.on_fire(_token(NOW + 60), NOW + 30) == Refresh(NOW + 60)
    assert timer.state is State.REFRESHING


def test_fire_after_long_suspend_refreshes_even_if_renewed_elsewhere() -> None:
    """A newer expiry that has also passed is refreshed at once, not rescheduled."""
    timer = _timer(NOW + 60)
    assert timer.on_fire(_token(NOW + 120), NOW + 7200) == Refresh(NOW + 60)


# -- a wall clock put back: the stored expiry names the token, the true one times it --------

HOUR = 3600.0


def test_a_token_stored_an_hour_late_is_timed_by_its_true_expiry() -> None:
    """A token received while the clock was an hour ahead is renewed before its true end, not an hour later."""
    timer = RenewalTimer(NOW + 2 * HOUR, NOW, CFG, LOWEST, KeyHealth(), lives_until=NOW + HOUR)
    assert timer.deadline == NOW + HOUR - 360  # 3600 s truly left: a lead of 360 s
    # It fires; the same token is stored (its stored expiry is the one seen): refresh it.
    assert timer.on_fire(_token(NOW + 2 * HOUR), NOW + 3240, NOW + HOUR) == Refresh(NOW + 2 * HOUR)


def test_a_token_renewed_elsewhere_while_ahead_is_rescheduled_by_its_true_expiry() -> None:
    """Renewed elsewhere while the clock was ahead: the timer waits for the new token's true end, not its stored one."""
    timer = _timer(NOW + 60)
    step = timer.on_fire(_token(NOW + 2 * HOUR), NOW + 30, NOW + 30 + HOUR)
    assert step == Wait(NOW + 30 + 3240, "renewal_rescheduled")
    assert timer.expiry == NOW + 2 * HOUR  # what tells this token from the next


def test_a_token_renewed_elsewhere_whose_true_life_has_ended_is_refreshed() -> None:
    """A newer stored expiry that is only alive on a clock put back counts as expired."""
    timer = _timer(NOW + 60)
    assert timer.on_fire(_token(NOW + HOUR), NOW + 120, NOW + 100) == Refresh(NOW + 60)


def test_success_schedules_by_the_new_tokens_true_expiry() -> None:
    """A refresh answered while the clock was ahead is timed by the token's real life."""
    timer = _timer(NOW + 60)
    assert isinstance(timer.on_fire(_token(NOW + 60), NOW + 30), Refresh)
    step = timer.on_success(NOW + 30 + 2 * HOUR, NOW + 30, NOW + 30 + HOUR)
    assert step == Wait(NOW + 30 + 3240, "renewal_scheduled")


def test_a_token_renewed_after_the_step_back_counts_as_renewed_elsewhere() -> None:
    """A timer set for a token stored an hour late finds a newer one stored with an earlier expiry (renewed after the clock was put back): it waits for that one, not refresh again."""
    timer = RenewalTimer(NOW + 2 * HOUR, NOW, CFG, LOWEST, KeyHealth(), lives_until=NOW + HOUR)
    fire_at = NOW + HOUR - 360
    newer = fire_at + HOUR  # received after the step back: stored and true expiry agree
    step = timer.on_fire(_token(newer), fire_at, newer)
    assert step == Wait(fire_at + 3240, "renewal_rescheduled")


def test_renewed_since_needs_the_stored_token_alive_by_its_true_expiry() -> None:
    """The refresher's double-check: a newer token whose true life has ended is refreshed."""
    assert policy.renewed_since(NOW + HOUR, NOW + 60, NOW + HOUR, NOW)
    assert not policy.renewed_since(NOW + HOUR, NOW + 60, NOW - 1, NOW)
    assert not policy.renewed_since(NOW + 60, NOW + 60, NOW + 60, NOW)


def test_fire_accepts_integer_expiry() -> None:
    """Stores written by other tools hold integer expiries; those count too."""
    timer = _timer(NOW + 60, rng=LOWEST)
    step = timer.on_fire(_token(int(NOW) + 3600), NOW)
    assert isinstance(step, Wait)
    assert step.event == "renewal_rescheduled"
    assert timer.expiry == NOW + 3600
    assert step.deadline == NOW + 3240


# -- success (design.md 3.3) ----------------------------------------------------------------


def test_success_schedules_for_the_new_expiry() -> None:
    """After a refresh the timer waits for the renewed token's own lead time."""
    timer = _timer(NOW + 60, rng=LOWEST)
    assert isinstance(timer.on_fire(_token(NOW + 60), NOW + 30), Refresh)
    step = timer.on_success(NOW + 30 + 3600, NOW + 30)
    assert step == Wait(NOW + 30 + 3240, "renewal_scheduled")
    assert timer.state is State.SCHEDULED
    assert timer.expiry == NOW + 3630
    assert timer.deadline == step.deadline


def test_success_with_a_token_without_expiry_stops() -> None:
    """A renewed token that says nothing of its expiry leaves nothing to schedule."""
    timer = _timer(NOW + 60)
    timer.on_fire(_token(NOW + 60), NOW + 30)
    assert timer.on_success(None, NOW + 30) == End(
        "the renewed token has no expiry", "renewal_stopped"
    )
    assert timer.state is State.ENDED


# -- failure (design.md 3.4) ----------------------------------------------------------------


def _fail_until_end(
    timer: RenewalTimer, health: KeyHealth, start: float
) -> tuple[list[float], End]:
    """Fire and fail transiently until the timer ends; the delays it asked for, and the end."""
    stored = _token(timer.expiry)
    now, delays = start, list[float]()
    for _ in range(1000):
        assert timer.on_fire(stored, now) == Refresh(timer.expiry)
        health.attempted(now)
        health.failed("identity provider answered 503", reauth=False)
        step = timer.on_failure(Failure.TRANSIENT, now)
        if isinstance(step, End):
            return delays, step
        assert step.event == "renewal_retry"
        assert timer.deadline == step.deadline
        delays.append(step.deadline - now)
        now = step.deadline
    raise AssertionError("the timer never gave up")


def test_transient_failures_back_off_and_give_up_at_max_failures() -> None:
    """Retries wait 30, 60, 120, ... capped at 1800, and the tenth failure ends it."""
    health = KeyHealth()
    timer = _timer(NOW + 3600, health=health)
    first = timer.deadline
    assert first is not None
    delays, end = _fail_until_end(timer, health, first)
    assert delays == [30, 60, 120, 240, 480, 960, 1800, 1800, 1800]
    assert end == End("10 failures in a row", "renewal_gave_up")
    assert timer.gave_up
    assert timer.deadline is None
    assert health.failures == 10


def test_backoff_follows_the_configured_base_cap_and_limit() -> None:
    """retry_base, retry_cap and max_failures from the config shape the retries."""
    health = KeyHealth()
    cfg = Renewal(retry_base=10, retry_cap=25, max_failures=5)
    timer = _timer(NOW + 3600, cfg=cfg, health=health)
    delays, end = _fail_until_end(timer, health, NOW + 3000)
    assert delays == [10, 20, 25, 25]
    assert end == End("5 failures in a row", "renewal_gave_up")


def test_max_failures_of_one_gives_up_at_the_first_failure() -> None:
    """With max_failures = 1 a single transient failure ends the timer."""
    health = KeyHealth()
    timer = _timer(NOW + 3600, cfg=Renewal(max_failures=1), health=health)
    delays, end = _fail_until_end(timer, health, NOW + 3000)
    assert delays == []
    assert end.event == "renewal_gave_up"


def test_a_failure_not_yet_counted_backs_off_as_the_first() -> None:
    """A failure reported before KeyHealth counted it still waits retry_base, not zero."""
    timer = _timer(NOW + 60)
    timer.on_fire(_token(NOW + 60), NOW + 30)
    assert timer.on_failure(Failure.TRANSIENT, NOW + 30) == Wait(NOW + 60, "renewal_retry")


def test_reauth_failure_ends_at_once() -> None:
    """A refused refresh token (invalid_grant) is not retried: the timer gives up."""
    health = KeyHealth()
    timer = _timer(NOW + 60, health=health)
    timer.on_fire(_token(NOW + 60), NOW + 30)
    health.failed("the refresh token was refused", reauth=True)
    step = timer.on_failure(Failure.REAUTH, NOW + 30)
    assert step == End("re-authentication required", "renewal_gave_up")
    assert timer.gave_up
    assert timer.state is State.ENDED
    assert health.reauth_required


def test_gone_failure_ends_at_once() -> None:
    """A token removed while it was being refreshed stops the timer without giving up."""
    timer = _timer(NOW + 60)
    timer.on_fire(_token(NOW + 60), NOW + 30)
    assert timer.on_failure(Failure.GONE, NOW + 30) == End("token removed", "renewal_stopped")
    assert not timer.gave_up


def test_two_timers_of_one_key_share_one_failure_count() -> None:
    """Two sessions' timers of one key back off on the key's count, not their own."""
    health = KeyHealth()
    first = _timer(NOW + 60, health=health)
    second = _timer(NOW + 60, health=health)
    stored = _token(NOW + 60)
    first.on_fire(stored, NOW + 30)
    second.on_fire(stored, NOW + 30)
    health.failed("timeout", reauth=False)
    assert first.on_failure(Failure.TRANSIENT, NOW + 30) == Wait(NOW + 60, "renewal_retry")
    health.failed("timeout", reauth=False)
    # The second failure of the key, whichever timer saw it: 60 s.
    assert second.on_failure(Failure.TRANSIENT, NOW + 30) == Wait(NOW + 90, "renewal_retry")
    assert health.failures == 2


def test_a_success_elsewhere_resets_the_count_a_timer_backs_off_on() -> None:
    """A refresh that succeeded for another session starts this timer's backoff from 30 s again."""
    health = KeyHealth(failures=5, last_error="timeout")
    timer = _timer(NOW + 60, health=health)
    health.succeeded(NOW + 10)
    assert health.failures == 0
    assert health.last_error is None
    assert health.refreshes == 1
    timer.on_fire(_token(NOW + 60), NOW + 30)
    health.failed("timeout", reauth=False)
    assert timer.on_failure(Failure.TRANSIENT, NOW + 30) == Wait(NOW + 60, "renewal_retry")


def test_failures_counted_elsewhere_lengthen_this_timers_backoff() -> None:
    """A key that already failed five times waits 2**5 * 30 s after this timer's failure."""
    health = KeyHealth(failures=5)
    timer = _timer(NOW + 60, health=health)
    timer.on_fire(_token(NOW + 60), NOW + 30)
    health.failed("timeout", reauth=False)
    assert timer.on_failure(Failure.TRANSIENT, NOW + 30) == Wait(NOW + 30 + 960, "renewal_retry")


@given(failures=st.integers(min_value=1, max_value=9), now=epochs)
def test_retry_deadline_is_within_base_and_cap_of_now(failures: int, now: float) -> None:
    """Every retry is scheduled between retry_base and retry_cap after the failure."""
    health = KeyHealth(failures=failures - 1)
    timer = _timer(now + 60, now, health=health)
    timer.on_fire(_token(now + 60), now)
    health.failed("timeout", reauth=False)
    step = timer.on_failure(Failure.TRANSIENT, now)
    assert isinstance(step, Wait)
    assert now + CFG.retry_base <= step.deadline <= now + CFG.retry_cap
    assert step.deadline == now + policy.retry_delay(failures, CFG)


# -- wrong-state calls and cancel --------------------------------------------------------------


def test_a_scheduled_timer_refuses_success_and_failure() -> None:
    """Reporting a refresh that was never asked for is a bug in the caller."""
    timer = _timer()
    with pytest.raises(RuntimeError, match="scheduled, not refreshing"):
        timer.on_success(NOW + 3600, NOW)
    with pytest.raises(RuntimeError, match="scheduled, not refreshing"):
        timer.on_failure(Failure.TRANSIENT, NOW)
    assert timer.state is State.SCHEDULED


def test_a_refreshing_timer_refuses_to_fire_again() -> None:
    """A timer waiting for its refresh's outcome cannot fire a second time."""
    timer = _timer()
    timer.on_fire(_token(NOW + 60), NOW + 30)
    with pytest.raises(RuntimeError, match="refreshing, not scheduled"):
        timer.on_fire(_token(NOW + 60), NOW + 31)


def test_an_ended_timer_refuses_every_event() -> None:
    """Once ended, a timer accepts no fire, success or failure."""
    timer = _timer()
    timer.on_fire(None, NOW + 30)
    with pytest.raises(RuntimeError, match="ended, not scheduled"):
        timer.on_fire(_token(NOW + 60), NOW + 31)
    with pytest.raises(RuntimeError, match="ended, not refreshing"):
        timer.on_success(NOW + 3600, NOW + 31)
    with pytest.raises(RuntimeError, match="ended, not refreshing"):
        timer.on_failure(Failure.GONE, NOW + 31)


def test_cancel_ends_a_scheduled_timer() -> None:
    """A cancelled timer has no deadline and says it was cancelled."""
    timer = _timer()
    timer.cancel()
    assert timer.state is State.ENDED
    assert timer.deadline is None
    assert timer.ended == End("cancelled", "renewal_cancelled")
    assert not timer.gave_up


def test_cancel_ends_a_refreshing_timer_and_a_late_outcome_is_refused() -> None:
    """A session closed mid-refresh ends its timer; the refresh's outcome then has nowhere to go."""
    timer = _timer()
    timer.on_fire(_token(NOW + 60), NOW + 30)
    timer.cancel()
    assert timer.state is State.ENDED
    with pytest.raises(RuntimeError):
        timer.on_success(NOW + 3630, NOW + 31)


def test_cancel_keeps_the_reason_a_timer_already_ended_with() -> None:
    """Cancelling a timer that gave up does not overwrite why it ended."""
    timer = _timer()
    timer.on_fire(_token(NOW + 60), NOW + 30)
    timer.on_failure(Failure.REAUTH, NOW + 30)
    timer.cancel()
    assert timer.ended == End("re-authentication required", "renewal_gave_up")
    assert timer.gave_up


# -- ten virtual hours ----------------------------------------------------------------------------


class _Upstream:
    """A scripted identity provider: hands out hour-long tokens, optionally failing first."""

    def __init__(self, fail_first_attempt: bool) -> None:
        self.fail_first_attempt = fail_first_attempt
        self.attempts = 0
        self._failed_this_round = False

    def refresh(self, now: float) -> float | None:
        """The new token's expiry, or None for a transient failure."""
        self.attempts += 1
        if self.fail_first_attempt and not self._failed_this_round:
            self._failed_this_round = True
            return None
        self._failed_this_round = False
        return now + 3600


def _run_ten_hours(upstream: _Upstream, seed: int) -> tuple[list[float], KeyHealth]:
    """Drive one timer over ten hours of wall time; the margins left at each renewal."""
    health = KeyHealth()
    stored = _token(NOW + 3600)
    timer = RenewalTimer(NOW + 3600, NOW, CFG, random.Random(seed), health)
    margins: list[float] = []
    while timer.deadline is not None and timer.deadline < NOW + 10 * 3600:
        now = timer.deadline
        step = timer.on_fire(stored, now)
        assert isinstance(step, Refresh)
        health.attempted(now)
        expiry = upstream.refresh(now)
        if expiry is None:
            health.failed("identity provider answered 503", reauth=False)
            assert isinstance(timer.on_failure(Failure.TRANSIENT, now), Wait)
            continue
        margins.append(float(stored["expiry"]) - now)  # type: ignore[arg-type]
        stored = _token(expiry)
        health.succeeded(now)
        assert isinstance(timer.on_success(expiry, now), Wait)
    assert timer.state is State.SCHEDULED
    return margins, health


@pytest.mark.parametrize("seed", range(5))
def test_ten_hours_of_an_hour_long_token_are_renewed_before_every_expiry(seed: int) -> None:
    """Over ten virtual hours every renewal lands 330-360 s before the token it replaces expires."""
    upstream = _Upstream(fail_first_attempt=False)
    margins, health = _run_ten_hours(upstream, seed)
    assert len(margins) == 11  # one per ~3240-3270 s
    assert all(330 <= m <= 360 for m in margins), margins
    assert health.refreshes == 11
    assert health.failures == 0
    assert upstream.attempts == 11


def test_ten_hours_with_a_failure_before_each_renewal_still_renew_in_time() -> None:
    """A transient failure before every renewal costs 30 s each time and no expiry is missed."""
    upstream = _Upstream(fail_first_attempt=True)
    margins, health = _run_ten_hours(upstream, seed=3)
    assert len(margins) >= 10
    assert all(300 <= m <= 330 for m in margins), margins
    assert upstream.attempts in (2 * len(margins), 2 * len(margins) + 1)
    assert health.failures in (0, 1)
