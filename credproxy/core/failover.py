"""Several accounts of one provider: profiles, bucket health and failover, sans I/O.

Theory of operation
-------------------

A *profile* is an ordered list of buckets of one provider that a session may
use: ``[providers.NAME] buckets = ["work", "personal"]`` or a grant
``NAME:work,personal``. ``get_token`` without a bucket serves the profile's
current bucket; with a bucket it serves exactly that one, as before.

A bucket's state, as the daemon sees it, is one of::

    ok ──(429 reported)──────────────> quota-exhausted ──(until passes)──> ok
    ok ──(refresh failed)────────────> expired-refresh-failed ──(refresh or login)──> ok
    ok ──(refresh token refused)─────> reauth-failed ──(login)──> ok
    (no token stored) ───────────────> no-token ──(login)──> ok

and ``skipped`` names a bucket that was not tried because an earlier one
served. :func:`classify` says, from plain values, whether a bucket can be
served now, must be refreshed first, or why not.

Failover is three passes (:class:`Walk`), run by the shell for one request:

1. classify the current bucket; serve it, or refresh it first;
2. walk the remaining buckets in profile order, refreshing expired ones
   (under the per-key lock, like any refresh);
3. if none serves, ask for a foreground re-auth of every bucket that needs
   one, at once (one prompt on the host, not one per bucket), and answer
   ``ALL_BUCKETS_EXHAUSTED`` with each bucket's reason and the soonest
   ``retryAfter``.

A healthy bucket is never refreshed or re-authenticated because another one
failed: the walk stops at the first bucket that serves.

Selection is one of three strategies:

- *fill-first* (the default): the first bucket in profile order that can
  serve. People list their preferred account first and expect it back when
  its quota hold ends, so the walk always starts at the first bucket; a bucket
  that failed is passed over while it is held or its failure stands.
- *sticky*: stay on the bucket that served until it fails.
- *round-robin*: after each serve, move on to the next bucket.

Quota holds have an owner. A hold a sandbox reported (``report_failure``)
holds the bucket for that session only; a 429 the daemon saw itself (answered
through the API proxy) holds it for every session. Either is capped at
``max_quota_hold``, and the host can end them (``credproxy release``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

from credproxy.core import serving
from credproxy.core.config import Renewal
from credproxy.errors import CredproxyError, NotFound, ReauthRequired

__all__ = [
    "QUOTA",
    "REASONS",
    "BucketMarks",
    "Exhausted",
    "Profile",
    "Walk",
    "classify",
    "later",
    "next_current",
    "quota_hold",
    "refresh_failure_reason",
    "retry_after",
    "walk_start",
]

Reason = Literal[
    "quota-exhausted", "expired-refresh-failed", "no-token", "reauth-failed", "skipped"
]
REASONS: tuple[Reason, ...] = (
    "quota-exhausted",
    "expired-refresh-failed",
    "no-token",
    "reauth-failed",
    "skipped",
)
QUOTA: Reason = "quota-exhausted"
#: Reasons a foreground re-auth (a new login on the host) can cure.
NEEDS_LOGIN = frozenset({"expired-refresh-failed", "no-token", "reauth-failed"})
Strategy = Literal["fill-first", "sticky", "round-robin"]


class Profile(NamedTuple):
    """The ordered buckets of one provider that a session may use."""

    provider: str
    buckets: tuple[str, ...]
    strategy: Strategy = "fill-first"


@dataclass(slots=True)
class BucketMarks:
    """What the daemon holds against one bucket besides its token: a quota hold."""

    quota_until: float | None = None  # wall-clock instant until which it is quota-exhausted
    reports: int = 0  # failures reported by sandboxes or seen upstream

    def held(self, now: float) -> bool:
        return self.quota_until is not None and now < self.quota_until

    def hold(self, until: float) -> float:
        """Count a report and hold until *until* (a later report may extend, never shorten)."""
        self.reports += 1
        self.quota_until = max(until, self.quota_until or until)
        return self.quota_until


def later(a: BucketMarks | None, b: BucketMarks | None) -> BucketMarks | None:
    """The hold of the two that ends later (what applies when both hold a bucket)."""
    if a is None or a.quota_until is None:
        return b
    if b is None or b.quota_until is None:
        return a
    return a if a.quota_until >= b.quota_until else b


def quota_hold(retry_after: float | None, default: float, cap: float) -> float:
    """Seconds a quota-exhausted bucket is held: the reported ``retry-after``, else *default*.

    Bounded to [1, *cap*]; a value that is not a finite number counts as absent.
    """
    if retry_after is None or not math.isfinite(retry_after):
        retry_after = default
    return min(cap, max(1.0, retry_after))


def classify(
    facts: serving.TokenFacts | None,
    reauth_required: bool,
    marks: BucketMarks | None,
    now: float,
    cfg: Renewal,
) -> serving.Serve | serving.Refresh | Reason:
    """Serve this bucket, refresh it first, or the reason it cannot serve now."""
    if facts is None:
        return "no-token"
    if marks is not None and marks.held(now):
        return QUOTA
    if reauth_required:
        return "reauth-failed"
    decision = serving.on_get(facts, now, cfg)
    if isinstance(decision, serving.Reauth):
        return "expired-refresh-failed"
    return decision


@dataclass(frozen=True, slots=True)
class Exhausted:
    """No bucket of the profile could serve."""

    reasons: dict[str, Reason]  # every bucket with its reason
    retry_after: int | None  # seconds until the soonest quota hold ends, if any
    login: tuple[str, ...]  # buckets a new login would cure (pass 3)


class Walk:
    """The three passes of failover for one request (see the module docstring).

    The shell asks :meth:`next` for the bucket to try, tries it (classify,
    maybe refresh), and reports with :meth:`served` or :meth:`failed`; when
    :meth:`next` returns None every bucket failed and :meth:`exhausted` says
    why.
    """

    __slots__ = ("_order", "_pos", "reasons", "served_bucket")

    def __init__(self, profile: Profile, current: int) -> None:
        n = len(profile.buckets)
        start = current % n if n else 0
        # Pass 1 is the current bucket; pass 2 the others in profile order.
        self._order = [profile.buckets[start]] + [
            b for i, b in enumerate(profile.buckets) if i != start
        ]
        self._pos = 0
        self.reasons: dict[str, Reason] = {}
        self.served_bucket: str | None = None

    def next(self) -> str | None:
        if self.served_bucket is not None or self._pos >= len(self._order):
            return None
        bucket = self._order[self._pos]
        self._pos += 1
        return bucket

    def failed(self, bucket: str, reason: Reason) -> None:
        self.reasons[bucket] = reason

    def served(self, bucket: str) -> None:
        self.served_bucket = bucket
        for other in self._order[self._pos :]:
            self.reasons[other] = "skipped"

    def exhausted(self, holds: Mapping[str, BucketMarks], now: float) -> Exhausted:
        """Pass 3: what to tell the sandbox, and which buckets need a login."""
        return Exhausted(
            reasons=dict(self.reasons),
            retry_after=retry_after(holds.values(), now),
            login=tuple(b for b in self._order if self.reasons.get(b) in NEEDS_LOGIN),
        )


def retry_after(marks: Iterable[BucketMarks], now: float) -> int | None:
    """Whole seconds until the soonest quota hold ends (at least 1), or None without one."""
    ends = [m.quota_until for m in marks if m.quota_until is not None and m.quota_until > now]
    if not ends:
        return None
    return max(1, math.ceil(min(ends) - now))


def refresh_failure_reason(error: CredproxyError, *, servable: bool) -> Reason | None:
    """Why a bucket whose refresh (or first mint) failed with *error* cannot serve.

    None when it still can: a transient failure while its old token is
    *servable* (unexpired) serves that token. A rejected refresh token is
    ``reauth-failed``, a token removed meanwhile ``no-token``, anything else
    with nothing to serve ``expired-refresh-failed``.
    """
    if isinstance(error, ReauthRequired):
        return "reauth-failed"
    if isinstance(error, NotFound):
        return "no-token"
    return None if servable else "expired-refresh-failed"


def next_current(profile: Profile, served: str) -> int:
    """The profile index of the current bucket after *served* served.

    Fill-first and sticky stay on the bucket that served (fill-first's walk
    starts at the first bucket all the same: :func:`walk_start`); round-robin
    moves past it.
    """
    index = profile.buckets.index(served)
    if profile.strategy == "round-robin":
        return (index + 1) % len(profile.buckets)
    return index


def walk_start(profile: Profile, current: int) -> int:
    """Where a failover walk starts: the first bucket for fill-first, else the current one."""
    return 0 if profile.strategy == "fill-first" else current
