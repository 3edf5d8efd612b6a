"""Renewal decisions as pure functions (PRODUCT.md section 6, seeds R16.1-R16.7).

Theory of operation
-------------------

Every function here takes the current wall-clock time (``now``, Unix epoch
seconds) and, where chance is involved, a :class:`random.Random` as arguments.
Nothing here reads a clock, sleeps, or touches a file; the trio shell
(``renewal.py``) does that and asks this module what to do. That is what lets
the tests run ten virtual hours of renewals in a fraction of a second.

A renewal timer goes through three questions:

1. *When do I fire?*  :func:`renewal_deadline` turns a token's expiry into a
   wall-clock instant: ``remaining - lead + jitter`` from now. The lead is a
   fraction of the remaining lifetime with a floor (:func:`lead`), but never
   more than half of it, otherwise a token living less than ``2 * min_lead``
   would be "due" the moment it arrives and we would refresh in a loop.
   The jitter spreads the refreshes of many sessions sharing one account.

2. *Is it time yet?*  Deadlines are wall-clock instants, but trio sleeps on a
   monotonic clock that stops while a laptop is suspended. So timers sleep in
   slices of at most :data:`SLICE` seconds (:func:`sleep_slice`) and compare
   the wall clock after each slice: a suspend or a clock jump is noticed
   within 30 s instead of after the full (now meaningless) monotonic sleep.

3. *What do I do when I fire?*  :func:`decide_on_fire` looks at the token as
   stored *now*, not as it was when the timer was set: gone means logout
   (:class:`Stop`), a later expiry means someone else renewed it
   (:class:`Reschedule`), otherwise :class:`Refresh`.

Failures back off exponentially (:func:`retry_delay`) and give up after
``max_failures`` in a row (:func:`gives_up`). ``invalid_grant`` and friends
never get here as retries: the shell marks the key re-auth required instead.

Tokens are plain mappings as stored: ``access_token``, ``refresh_token``,
``expiry`` (epoch seconds, int or float), ``token_type``, optional ``scope``,
and any unknown fields.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from credproxy.core.config import Renewal

__all__ = [
    "SLICE",
    "Decision",
    "Refresh",
    "Reschedule",
    "Stop",
    "cooldown_left",
    "decide_on_fire",
    "gives_up",
    "lead",
    "needs_refresh_on_serve",
    "renewal_deadline",
    "retry_delay",
    "sleep_slice",
    "token_expiry",
]

#: The longest a renewal timer sleeps before it looks at the wall clock again.
SLICE = 30.0


def token_expiry(token: Mapping[str, Any]) -> float | None:
    """The token's ``expiry`` as a float, or None when it is absent or not a finite number.

    ``bool`` is refused although it is an ``int`` subclass: ``"expiry": true``
    is a broken token, not an expiry one second after the epoch.
    """
    value = token.get("expiry")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def lead(remaining: float, cfg: Renewal) -> float:
    """How long before expiry to renew a token that has *remaining* seconds left.

    ``max(min_lead, floor(remaining * lead_fraction))``, capped at half of
    *remaining* so that short-lived tokens renew at half-life. Zero for a token
    that has already expired.
    """
    if remaining <= 0:
        return 0.0
    wanted = max(cfg.min_lead, math.floor(remaining * cfg.lead_fraction))
    return min(float(wanted), remaining / 2)


def renewal_deadline(expiry: float, now: float, cfg: Renewal, rng: random.Random) -> float:
    """The wall-clock instant at which to renew a token expiring at *expiry*.

    ``now + remaining - lead + jitter`` with jitter uniform in
    ``[0, min(max_jitter, lead / 10))``; *now* itself for a token that has
    already expired (refresh at once). The result always lies in
    ``[now, expiry]``.
    """
    remaining = expiry - now
    if remaining <= 0:
        return now
    lead_s = lead(remaining, cfg)
    # The jitter is bounded by a tenth of the lead as well as by max_jitter, so
    # that it can never push a short-lived token's renewal past its expiry.
    jitter = rng.random() * min(cfg.max_jitter, lead_s / 10)
    deadline = now + (remaining - lead_s) + jitter
    # Clamp against float rounding with epoch-sized operands; mathematically
    # the deadline is already inside the interval.
    return min(expiry, max(now, deadline))


def retry_delay(failures: int, cfg: Renewal) -> float:
    """Seconds to wait after the *failures*-th consecutive failure (counting from 1).

    ``min(retry_cap, retry_base * 2 ** (failures - 1))``: 30, 60, 120, ...
    capped at 1800 with the defaults. A count below 1 is treated as 1.
    """
    if cfg.retry_base <= 0:
        return 0.0
    exponent = max(1, failures) - 1
    try:
        delay = cfg.retry_base * 2.0**exponent
    except OverflowError:
        # Thousands of failures: the exact power does not fit a float, but the
        # answer is the cap either way.
        return float(cfg.retry_cap)
    return float(min(cfg.retry_cap, delay))


def gives_up(failures: int, cfg: Renewal) -> bool:
    """True once *failures* consecutive failures reach ``max_failures``."""
    return failures >= cfg.max_failures


def sleep_slice(deadline: float, now: float) -> float:
    """How long a timer should sleep before looking at the wall clock again.

    ``min(SLICE, max(0, deadline - now))``; zero means "fire now". A wall
    clock that jumped past the deadline (suspend, NTP step) gives zero.
    """
    return min(SLICE, max(0.0, deadline - now))


# -- the on-fire decision ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop renewing: the token was removed (logout) or can no longer be refreshed."""


@dataclass(frozen=True, slots=True)
class Reschedule:
    """Someone else renewed the token: schedule again for its new *expiry*."""

    expiry: float


@dataclass(frozen=True, slots=True)
class Refresh:
    """Refresh the token now."""


Decision = Stop | Reschedule | Refresh


def decide_on_fire(
    stored: Mapping[str, Any] | None, scheduled_expiry: float, now: float
) -> Decision:
    """What a timer that was set for a token expiring at *scheduled_expiry* does now.

    *stored* is the token as re-read from the store when the timer fires
    (None when it is gone).

    - gone, or without a usable ``refresh_token`` or ``expiry``: :class:`Stop`.
      Timers exist only for tokens that have both (R16.1); a token replaced by
      one without them is left to the on-demand path.
    - a stored expiry later than *scheduled_expiry* that is still in the
      future: :class:`Reschedule` (another process or the on-demand path has
      renewed it since the timer was set).
    - otherwise: :class:`Refresh`. That includes a token "renewed elsewhere"
      whose new expiry has also passed (a long suspend): rescheduling would
      only fire again at once.
    """
    if stored is None:
        return Stop()
    refresh_token = stored.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        return Stop()
    expiry = token_expiry(stored)
    if expiry is None:
        return Stop()
    if expiry > scheduled_expiry and expiry > now:
        return Reschedule(expiry)
    return Refresh()


# -- serve time ----------------------------------------------------------------


def needs_refresh_on_serve(
    expiry: float, now: float, observed_lifetime: float | None, cfg: Renewal
) -> bool:
    """True when ``get_token`` should refresh before serving a token expiring at *expiry*.

    That is when less than ``serve_margin`` is left. The margin is capped at
    half of the lifetime last observed for this key (*observed_lifetime*,
    None when unknown): a token that only ever lives 60 s would otherwise be
    "about to expire" for its whole life and be refreshed on every call.
    """
    margin = cfg.serve_margin
    if observed_lifetime is not None:
        margin = min(margin, observed_lifetime / 2)
    return expiry - now < margin


def cooldown_left(last_refresh_at: float | None, now: float, cfg: Renewal) -> float:
    """Seconds until the sandbox's ``refresh_token`` op may refresh this key again.

    Zero when there was no refresh yet (*last_refresh_at* None) or the
    ``refresh_cooldown`` has passed. Never more than the cooldown itself, so a
    wall clock stepped backwards cannot lock a key out for longer.
    """
    if last_refresh_at is None:
        return 0.0
    left = last_refresh_at + cfg.refresh_cooldown - now
    return min(float(cfg.refresh_cooldown), max(0.0, left))
