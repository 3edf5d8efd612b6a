"""Bounds on how fast a sandbox can make the daemon write its log (sans I/O).

Two things a sandbox can repeat as fast as it likes must not cost a log line
each: being served a token, and being refused a connection.

:class:`ServeAudit` turns serves into audit lines per session and key: the
first serve of a token (a new fingerprint) is logged at once, later serves of
the same token are counted and logged as one line with ``count`` at most once
per ``interval``. :class:`Throttle` lets one line through per ``interval`` and
counts the rest, which the next line reports as ``suppressed``.

So a session with K keys writes at most ``K * (1 + refreshes) + K`` audit lines
per interval, and at most one refusal line per interval, however busy it is.
"""

from __future__ import annotations

__all__ = ["AUDIT_INTERVAL", "ServeAudit", "Throttle"]

AUDIT_INTERVAL = 60.0  # seconds between the count lines of one session and key


class ServeAudit:
    """The serves of one session and key: counted for ``get_bucket_stats`` and for the audit.

    ``total`` and ``last`` (wall clock) count every serve of the key, whatever
    its token. For the audit lines it keeps the token last logged and the
    serves not yet logged: the caller logs a serve at once when :meth:`is_new`
    says the token changed (after logging :meth:`take` of the old one, then
    :meth:`renew`), else calls :meth:`count`, and logs :meth:`take` when the
    interval that the first count started ends.
    """

    __slots__ = ("expiry", "fp", "last", "pending", "total")

    def __init__(self, fp: str, expiry: float | None, wall: float) -> None:
        self.fp = fp
        self.expiry = expiry
        self.pending = 0
        self.total = 1  # made by a token's first serve, which is logged at once
        self.last = wall

    def is_new(self, fp: str) -> bool:
        return fp != self.fp

    def count(self, wall: float) -> bool:
        """Count one serve of the same token at *wall*; True if it starts an interval."""
        self.total += 1
        self.last = wall
        self.pending += 1
        return self.pending == 1

    def renew(self, fp: str, expiry: float | None, wall: float) -> None:
        """Count the first serve of a new token (logged at once, after :meth:`take`)."""
        self.fp = fp
        self.expiry = expiry
        self.total += 1
        self.last = wall

    def take(self) -> int:
        """The serves not yet logged (and forget them)."""
        pending, self.pending = self.pending, 0
        return pending


class Throttle:
    """At most one event per ``interval`` seconds gets through; the others are counted."""

    __slots__ = ("_interval", "_next", "_suppressed")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = float("-inf")
        self._suppressed = 0

    def allow(self, now: float) -> int | None:
        """None to drop this event; else the number dropped since the last one let through."""
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self._interval
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
