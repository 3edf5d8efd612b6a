"""What to do when a sandbox asks for a token: pure decisions (docs/design.md section 3.5).

Theory of operation
-------------------

Three questions are asked at serve time, each answered here from plain values
(the token's expiry, whether it can be refreshed, the lifetime last observed
for its key, the current wall-clock time and the renewal settings); the shell
(:mod:`credproxy.shell.tokens`) does what the answer says.

1. ``get_token`` (:func:`on_get`): serve the stored token, refresh it first
   (less than ``serve_margin`` left), or say that a re-login is needed (it has
   expired and there is nothing to refresh it with).
2. A refresh for serving failed (:func:`after_failed_refresh`): the old token is
   served while it is still valid; otherwise the failure is the answer.
3. The sandbox's ``refresh_token`` op (:func:`on_refresh_request`): refresh,
   unless the key was tried upstream less than ``refresh_cooldown`` ago; inside
   the cooldown the current token is served while valid, else ``RATE_LIMITED``.
   The cooldown counts attempts, not successes, so a failing identity provider
   is not hammered by a sandbox that keeps asking.

And one for the fast path (:func:`serve_until`): until which wall-clock instant
may an answer of "serve" be reused without asking again? That is the moment
:func:`on_get` would change its mind (the serve margin is reached), bounded by
``recheck`` seconds so that a token changed on disk behind the daemon's back
(another daemon, a hand edit) is noticed within that time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from credproxy.core.config import Renewal

__all__ = [
    "RateLimit",
    "Reauth",
    "Refresh",
    "Serve",
    "TokenFacts",
    "after_failed_refresh",
    "cooldown_left",
    "on_get",
    "on_refresh_request",
    "serve_margin",
    "serve_until",
    "true_expiry",
]


@dataclass(frozen=True, slots=True)
class TokenFacts:
    """What the decisions need to know of a stored token."""

    expiry: float | None  # epoch seconds; None: the token does not say
    refreshable: bool  # has a refresh token and an expiry
    lifetime: float | None  # the longest lifetime observed for this key, if known
    # The instant the token expires on a clock that wall-clock steps cannot move
    # and that counts suspend (CLOCK_BOOTTIME): when the daemon first saw it,
    # plus the seconds it had left then. None when unknown.
    boot_deadline: float | None = None

    def at(self, now: float, boot_now: float) -> TokenFacts:
        """These facts with the expiry a clock step cannot stretch (see :func:`true_expiry`)."""
        expiry = true_expiry(self, now, boot_now)
        if expiry == self.expiry:
            return self
        return TokenFacts(expiry, self.refreshable, self.lifetime, self.boot_deadline)


def true_expiry(facts: TokenFacts, now: float, boot_now: float) -> float | None:
    """The earlier of the stored (wall-clock) expiry and the one the boot clock implies.

    A token received while the wall clock was an hour ahead carries an expiry an
    hour too late; once the clock is put back, the wall clock alone would claim
    an hour more than the token has. The boot clock counted the real seconds
    since the daemon saw it, so ``now + (boot_deadline - boot_now)`` is the
    expiry in today's wall-clock terms. A step forward only makes the wall
    expiry earlier, which is safe. Either way the result is never later than
    the real end of the token's life.
    """
    if facts.expiry is None or facts.boot_deadline is None:
        return facts.expiry
    return min(facts.expiry, now + (facts.boot_deadline - boot_now))


@dataclass(frozen=True, slots=True)
class Serve:
    """Serve the stored token as it is."""


@dataclass(frozen=True, slots=True)
class Refresh:
    """Refresh the token, then serve the result."""


@dataclass(frozen=True, slots=True)
class Reauth:
    """The token cannot be served or refreshed: the person must log in again."""

    why: str


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Refused for now; ask again in ``retry_after`` seconds (at least 1)."""

    retry_after: int


SERVE = Serve()
REFRESH = Refresh()


def serve_margin(facts: TokenFacts, cfg: Renewal) -> float:
    """Seconds before expiry at which ``get_token`` stops serving a token as is.

    ``serve_margin``, capped at half of the observed lifetime: a token that only
    ever lives 60 s would otherwise be "about to expire" for its whole life and
    be refreshed on every call.
    """
    margin = float(cfg.serve_margin)
    if facts.lifetime is not None:
        margin = min(margin, facts.lifetime / 2)
    return margin


def on_get(facts: TokenFacts, now: float, cfg: Renewal) -> Serve | Refresh | Reauth:
    """``get_token``: serve, refresh first, or ask for a re-login."""
    if facts.expiry is None:
        return SERVE  # nothing says it expires: serve it as stored
    if not facts.refreshable:
        if facts.expiry <= now:
            return Reauth("has expired and there is no refresh token")
        return SERVE
    if facts.expiry - now < serve_margin(facts, cfg):
        return REFRESH
    return SERVE


def after_failed_refresh(facts: TokenFacts, now: float) -> Serve | None:
    """After a refresh for serving failed: serve the old token while it is valid, else None."""
    if facts.expiry is not None and facts.expiry > now:
        return SERVE
    return None


def cooldown_left(last_attempt: float | None, now: float, cfg: Renewal) -> float:
    """Seconds until the ``refresh_token`` op may go upstream again for this key.

    Never more than the cooldown itself, so a wall clock stepped backwards
    cannot lock a key out for longer.
    """
    if last_attempt is None:
        return 0.0
    left = last_attempt + cfg.refresh_cooldown - now
    return min(float(cfg.refresh_cooldown), max(0.0, left))


def on_refresh_request(
    facts: TokenFacts, last_attempt: float | None, now: float, cfg: Renewal
) -> Serve | Refresh | Reauth | RateLimit:
    """The sandbox's ``refresh_token`` op (cooldown first, then whether it can be refreshed)."""
    left = cooldown_left(last_attempt, now, cfg)
    if left > 0:
        if facts.expiry is None or facts.expiry > now:
            return SERVE
        return RateLimit(max(1, math.ceil(left)))
    if not facts.refreshable:
        return Reauth("cannot be refreshed (no refresh token or no expiry stored)")
    return REFRESH


def serve_until(facts: TokenFacts, now: float, cfg: Renewal, recheck: float) -> float:
    """The wall-clock instant until which a "serve" decision made at *now* stays right.

    At most *recheck* seconds ahead; never before *now* (the caller then asks
    :func:`on_get` again on the next request).
    """
    until = now + recheck
    if facts.expiry is not None:
        flip = facts.expiry - serve_margin(facts, cfg) if facts.refreshable else facts.expiry
        until = min(until, flip)
    return max(now, until)
