"""Holds: the daemon's own quota holds on buckets, for every session (trio shell).

Theory of operation
-------------------

With several accounts of one provider, a bucket whose quota is spent is held
and failover passes it by until the hold ends (docs/design.md §3.6). A hold
has an owner. What the daemon saw itself (a 429 answered through the API
proxy) holds the bucket for every session: that is :class:`Holds`, one
:class:`~credproxy.core.failover.BucketMarks` per key. What a sandbox reports
holds it for that session only (``Session.holds``). The rules (how long a
hold lasts, that a later report extends and never shortens it, which of two
holds applies) are :mod:`credproxy.core.failover`'s; this keeps the marks, on
the wall clock, in memory only (a hold is a short-lived hint, not written to
disk).

Every change to a hold (set or extended, released, forgotten once ended)
is announced, after it is made, to :attr:`Holds.on_change` with the key and
its marks now (None once removed), so whoever mirrors the holds elsewhere
need not poll. It runs synchronously, and no await is taken here.
"""

from __future__ import annotations

from collections.abc import Callable

from credproxy.core import failover
from credproxy.core.config import Failover
from credproxy.core.failover import BucketMarks
from credproxy.core.names import Key
from credproxy.shell import logs

log = logs.get("credproxy.holds")


def _ignore(key: Key, marks: BucketMarks | None) -> None:
    """The default :attr:`Holds.on_change`: nobody listens."""


class Holds:
    """The daemon's quota holds, per key (see the module docstring).

    Args:
        cfg: ``[failover]``: the default and the longest hold.
        wall_clock: epoch seconds.
        on_change: called with a key and its marks now (None when removed)
            after every change to its hold; may be set later.
    """

    def __init__(
        self,
        cfg: Failover,
        wall_clock: Callable[[], float],
        on_change: Callable[[Key, BucketMarks | None], None] = _ignore,
    ) -> None:
        self.cfg = cfg
        self.wall = wall_clock
        self.on_change = on_change
        self._marks: dict[Key, BucketMarks] = {}

    def marks(self, key: Key) -> BucketMarks | None:
        """The daemon's quota hold on *key*, if it ever had one."""
        return self._marks.get(key)

    def quota_held(self, key: Key) -> bool:
        """True while the daemon holds *key* as quota-exhausted."""
        marks = self._marks.get(key)
        return marks is not None and marks.held(self.wall())

    def hold_until(self, retry_after: float | None) -> float:
        """The wall-clock instant a hold that starts now ends (capped at ``max_quota_hold``)."""
        return self.wall() + failover.quota_hold(
            retry_after, self.cfg.quota_hold, self.cfg.max_quota_hold
        )

    def mark_quota(self, key: Key, retry_after: float | None) -> float:
        """Hold *key* as quota-exhausted for every session; returns when the hold ends."""
        marks = self._marks.get(key)
        if marks is None:
            marks = self._marks[key] = BucketMarks()
        until = marks.hold(self.hold_until(retry_after))
        log.info(
            "bucket_quota_exhausted",
            provider=key.provider,
            bucket=key.bucket,
            source="daemon",
            held_for=round(until - self.wall()),
        )
        self.on_change(key, marks)
        return until

    def daemon_holds(self) -> list[tuple[Key, float]]:
        """Every hold still in force, with its end."""
        now = self.wall()
        return [
            (key, m.quota_until)
            for key, m in sorted(self._marks.items())
            if m.quota_until is not None and m.held(now)
        ]

    def forget_ended_hold(self, key: Key) -> None:
        """Drop the hold on *key* if it has ended."""
        marks = self._marks.get(key)
        if marks is not None and not marks.held(self.wall()):
            del self._marks[key]
            self.on_change(key, None)

    def release(self, provider: str, bucket: str | None) -> int:
        """End the holds on *provider* (one bucket, or all); returns how many were in force."""
        now = self.wall()
        ended = 0
        for key in [k for k in self._marks if k.provider == provider]:
            if bucket is not None and key.bucket != bucket:
                continue
            if self._marks.pop(key).held(now):
                ended += 1
            self.on_change(key, None)
        return ended
