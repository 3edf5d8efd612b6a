"""The renewal of one key for one session, as a state machine (sans I/O).

Theory of operation
-------------------

Every transition of a renewal timer lives here (h11's rule); the trio task in
:mod:`credproxy.shell.tokens` only sleeps until :attr:`RenewalTimer.deadline`,
reads the store, calls the identity provider, and reports back::

                 on_fire: renewed elsewhere -> Wait(new deadline)
                 +-------------------------------+
                 v                               |
    new --> SCHEDULED --on_fire: due--> REFRESHING --on_success--> SCHEDULED
                 |                           |  \
                 |                           |   on_failure(TRANSIENT) --> SCHEDULED (backoff)
          on_fire: gone / not             on_failure(REAUTH | GONE), or
          refreshable                     the key's max_failures reached
                 |                           |
                 +-----------> ENDED <-------+

A timer is created the first time its session serves a refreshable token,
with a deadline of ``remaining - lead + jitter``. When it fires it looks at
the token as stored *now*: gone or no longer refreshable ends it (a logout);
another stored expiry than the one it was set for (a token that still lives)
means someone else renewed it, so it waits for the new expiry; otherwise it
asks for a refresh. Success schedules the next renewal; a transient failure backs off,
``min(retry_cap, retry_base * 2**(n-1))`` after the n-th failure in a row,
and gives up at ``max_failures``; a refusal (``invalid_grant``,
``invalid_client``, HTTP 401) or a removed token ends it at once. The rules
are those of ``docs/design.md`` section 3.

Failures are counted once per key, in :class:`KeyHealth`, whoever tried the
refresh (this timer, another session's, or a ``get_token`` that refreshed on
demand): a key that fails is backed off as one key, and ``status`` shows one
count. The timer reads that count; it keeps none of its own.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from credproxy.core import policy
from credproxy.core.config import Renewal

__all__ = [
    "End",
    "Failure",
    "KeyHealth",
    "Refresh",
    "RenewalTimer",
    "State",
    "Wait",
]


@dataclass(slots=True)
class KeyHealth:
    """The one record of a key's refreshes, shared by every session (what ``status`` shows)."""

    failures: int = 0  # consecutive failed refreshes
    last_error: str | None = None
    reauth_required: bool = False
    last_refresh: float | None = None  # wall time of the last successful refresh
    last_attempt: float | None = None  # wall time of the last request upstream
    refreshes: int = 0
    # Wall time since when the key's newest token (and its rotated refresh
    # token) exists only in the daemon's memory: its durable write failed.
    unsaved_since: float | None = None
    save_failures: int = 0  # failed attempts to write it since then

    @property
    def unsaved(self) -> bool:
        return self.unsaved_since is not None

    def attempted(self, now: float) -> None:
        self.last_attempt = now

    def not_durable(self, error: str, now: float) -> None:
        """The newest token could not be written; it lives in memory only, for now."""
        if self.unsaved_since is None:
            self.unsaved_since = now
        self.save_failures += 1
        self.last_error = f"the renewed token is not on disk yet (kept in memory): {error}"

    def saved(self) -> None:
        """The newest token is on disk (or was superseded by a new login)."""
        if self.unsaved_since is not None and (self.last_error or "").startswith(
            "the renewed token is not on disk"
        ):
            self.last_error = None
        self.unsaved_since = None
        self.save_failures = 0

    def succeeded(self, now: float) -> None:
        self.failures = 0
        self.last_error = None
        self.reauth_required = False
        self.last_refresh = now
        self.refreshes += 1

    def failed(self, error: str, *, reauth: bool) -> None:
        self.failures += 1
        self.last_error = error
        if reauth:
            self.reauth_required = True


class State(enum.Enum):
    SCHEDULED = "scheduled"
    REFRESHING = "refreshing"
    ENDED = "ended"


class Failure(enum.Enum):
    """How a refresh asked for by a timer failed."""

    TRANSIENT = "transient"  # network, 5xx, timeout: retry with backoff
    REAUTH = "reauth"  # the refresh token was refused: only a new login helps
    GONE = "gone"  # the token was removed (logout)


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep until the wall-clock instant ``deadline``; ``event`` names the log line."""

    deadline: float
    event: str


@dataclass(frozen=True, slots=True)
class Refresh:
    """Refresh now, unless the stored expiry is already later than ``seen_expiry``."""

    seen_expiry: float


@dataclass(frozen=True, slots=True)
class End:
    """The timer is done; ``why`` says it in words, ``event`` names the log line."""

    why: str
    event: str


class RenewalTimer:
    """One session's renewal of one key. See the module docstring for the transitions.

    Args:
        expiry: the stored expiry of the token that was served (what tells it
            from a newer token).
        now: the current wall-clock time.
        cfg: the renewal settings.
        rng: the source of jitter.
        health: the key's record of failures (shared with other timers of the key).
        mints: the key's provider mints its tokens with a key on the host (a
            signing grant): its tokens need no refresh token to be renewed.
        lives_until: when the token really expires, in today's wall-clock
            terms, if a clock step since it was received makes that earlier
            than *expiry* (``serving.true_expiry``); what the deadline is
            counted from.
    """

    __slots__ = ("_rng", "cfg", "deadline", "ended", "expiry", "health", "mints", "state")

    def __init__(
        self,
        expiry: float,
        now: float,
        cfg: Renewal,
        rng: random.Random,
        health: KeyHealth,
        *,
        mints: bool = False,
        lives_until: float | None = None,
    ) -> None:
        self.mints = mints
        self.cfg = cfg  # (a reload hands a running timer new settings here)
        self._rng = rng
        self.health = health
        self.expiry = expiry
        self.state = State.SCHEDULED
        self.deadline: float | None = policy.renewal_deadline(
            _earlier(expiry, lives_until), now, cfg, rng
        )
        self.ended: End | None = None

    def _schedule(self, expiry: float, lives_until: float | None, now: float, event: str) -> Wait:
        self.expiry = expiry
        self.state = State.SCHEDULED
        self.deadline = policy.renewal_deadline(
            _earlier(expiry, lives_until), now, self.cfg, self._rng
        )
        return Wait(self.deadline, event)

    def _end(self, why: str, event: str) -> End:
        self.state = State.ENDED
        self.deadline = None
        self.ended = End(why, event)
        return self.ended

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise RuntimeError(f"renewal timer is {self.state.value}, not {state.value}")

    def on_fire(
        self, stored: Mapping[str, Any] | None, now: float, lives_until: float | None = None
    ) -> Wait | Refresh | End:
        """The deadline has passed; *stored* is the token as read from the store now.

        *lives_until* is when it really expires, if a clock step makes that
        earlier than its stored expiry (see the constructor). Which token is
        stored is told by its stored expiry; when to renew it, by the earlier.
        """
        self._expect(State.SCHEDULED)
        if stored is None:
            return self._end("token removed", "renewal_stopped")
        refresh_token = stored.get("refresh_token")
        expiry = policy.token_expiry(stored)
        renewable = self.mints or (isinstance(refresh_token, str) and bool(refresh_token))
        if not renewable or expiry is None:
            # Timers exist only for tokens that have both; a token
            # replaced by one without them is left to the on-demand path.
            return self._end("token removed or not refreshable", "renewal_stopped")
        if policy.renewed_since(expiry, self.expiry, _earlier(expiry, lives_until), now):
            # Renewed elsewhere. One whose new expiry has also passed (a long
            # suspend) is refreshed instead: rescheduling would fire at once.
            return self._schedule(expiry, lives_until, now, "renewal_rescheduled")
        self.state = State.REFRESHING
        return Refresh(self.expiry)

    def on_success(
        self, expiry: float | None, now: float, lives_until: float | None = None
    ) -> Wait | End:
        """The refresh succeeded (here or elsewhere); *expiry* is the new token's stored one.

        *lives_until*: as for :meth:`on_fire` (a token renewed elsewhere while
        the clock was ahead).
        """
        self._expect(State.REFRESHING)
        if expiry is None:
            return self._end("the renewed token has no expiry", "renewal_stopped")
        return self._schedule(expiry, lives_until, now, "renewal_scheduled")

    def on_failure(self, kind: Failure, now: float) -> Wait | End:
        """The refresh failed; the key's :class:`KeyHealth` already counts this failure."""
        self._expect(State.REFRESHING)
        if kind is Failure.GONE:
            return self._end("token removed", "renewal_stopped")
        if kind is Failure.REAUTH:
            return self._end("re-authentication required", "renewal_gave_up")
        failures = max(1, self.health.failures)
        if policy.gives_up(failures, self.cfg):
            return self._end(f"{failures} failures in a row", "renewal_gave_up")
        self.state = State.SCHEDULED
        self.deadline = now + policy.retry_delay(failures, self.cfg)
        return Wait(self.deadline, "renewal_retry")

    def cancel(self) -> None:
        """The session closed or the token was logged out: nothing more to do."""
        if self.state is not State.ENDED:
            self._end("cancelled", "renewal_cancelled")

    @property
    def gave_up(self) -> bool:
        return self.ended is not None and self.ended.event == "renewal_gave_up"


def _earlier(expiry: float, lives_until: float | None) -> float:
    return expiry if lives_until is None or lives_until > expiry else lives_until
