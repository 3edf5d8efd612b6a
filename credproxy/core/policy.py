"""Renewal decisions as pure functions (the rules of docs/design.md section 3).

Theory of operation
-------------------

Every function here takes the current wall-clock time (``now``, Unix epoch
seconds) and, where chance is involved, a :class:`random.Random` as arguments.
Nothing here reads a clock, sleeps, or touches a file. These are the formulas;
the state machine that applies them to one timer is
:class:`credproxy.core.renewal.RenewalTimer`, and serve-time decisions are in
:mod:`credproxy.core.serving`.

1. *When do I fire?*  :func:`renewal_deadline` turns a token's expiry into a
   wall-clock instant: ``remaining - lead + jitter`` from now. The lead is a
   fraction of the remaining lifetime with a floor (:func:`lead`), but never
   more than half of it, otherwise a token living less than ``2 * min_lead``
   would be "due" the moment it arrives and we would refresh in a loop.
   The jitter spreads the refreshes of many sessions sharing one account.

2. *Is it time yet?*  Deadlines are wall-clock instants, but trio sleeps on a
   monotonic clock that stops while a laptop is suspended. So the clocks are
   looked at every :data:`SLICE` seconds while a timer sleeps (one look for
   all of them: ``Tokens.sleep_until``): a suspend or a clock jump is noticed
   within 30 s instead of after the full (now meaningless) monotonic sleep.

3. *How long after a failure?*  Failures back off exponentially
   (:func:`retry_delay`) and give up after ``max_failures`` in a row
   (:func:`gives_up`).

Tokens are plain mappings as stored: ``access_token``, ``refresh_token``,
``expiry`` (epoch seconds, int or float), ``token_type``, optional ``scope``,
and any unknown fields. An ``expiry`` that is present but not a finite,
non-negative number (``"soon"``, ``null``, ``true``, NaN, infinity) is
invalid: :func:`token_expiry` reports such a token as expired (the epoch), so
it is refreshed before it is served, never served as if it lived forever.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

from credproxy.core.config import Renewal

__all__ = [
    "CLOCK_STEP",
    "INVALID_EXPIRY",
    "SLICE",
    "expiry_is_invalid",
    "expiry_value",
    "gives_up",
    "lead",
    "renewal_deadline",
    "retry_delay",
    "token_expiry",
]

#: Seconds between two looks at the clocks while a renewal timer sleeps.
SLICE = 30.0
#: Seconds two clocks (wall, boot, trio's) must move apart to count as a step
#: or a suspend; NTP's slewing parts them by a few parts per million.
CLOCK_STEP = 1.0


#: What :func:`token_expiry` says of a present but invalid ``expiry``: the
#: epoch, long past, so the token counts as expired and is refreshed first.
INVALID_EXPIRY = 0.0


def expiry_value(value: object) -> float | None:
    """*value* as seconds if it is a usable ``expiry`` or ``expires_in``, else None.

    Usable: a JSON number (``int`` or ``float``, not a ``bool``) that is finite
    and not negative. ``bool`` is refused although it is an ``int`` subclass:
    ``"expiry": true`` is a broken token, not an expiry one second after the
    epoch. An integer beyond float range is refused too.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def expiry_is_invalid(token: Mapping[str, Any]) -> bool:
    """True when *token* has an ``expiry`` that is not usable (see :func:`expiry_value`)."""
    return "expiry" in token and expiry_value(token["expiry"]) is None


def token_expiry(token: Mapping[str, Any]) -> float | None:
    """The token's ``expiry`` in epoch seconds; None only when the token has none.

    A present but invalid ``expiry`` (a string such as ``"soon"``, ``null``, a
    ``bool``, NaN, infinity, a negative number) gives :data:`INVALID_EXPIRY`:
    the token is treated as expired, so a refreshable one is refreshed before
    it is served and one without a refresh token asks for a new login.
    """
    if "expiry" not in token:
        return None
    value = expiry_value(token["expiry"])
    return INVALID_EXPIRY if value is None else value


def renewed_since(
    stored: float | None, seen: float | None, lives_until: float | None, now: float
) -> bool:
    """True if the stored token (expiry *stored*) replaced the one seen (*seen*) and still lives.

    "Renewed elsewhere" (another session's timer, another daemon, a login):
    the one rule both the renewal timer (before it refreshes) and the
    refresher (under the key's lock) go by. Tokens are told apart by their
    stored expiries, as written: another one means another token. Not by
    their order: a token renewed after the wall clock was put back has an
    earlier stored expiry than one received while it was ahead. Whether the
    stored one still lives is told by *lives_until*, its true expiry
    (``serving.true_expiry``: earlier than the stored one after a wall clock
    put back). A newer token that has expired too (a long suspend) does not
    count: it is renewed again.
    """
    return (
        stored is not None
        and seen is not None
        and lives_until is not None
        and stored != seen
        and lives_until > now
    )


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
