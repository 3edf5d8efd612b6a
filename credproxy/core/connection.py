"""One client connection with its limits, sans I/O: bytes in, requests and bytes out.

Theory of operation
-------------------

:class:`Connection` wraps the protocol state machine
(:class:`~credproxy.core.protocol.ServerConnection`) with the limits of every
connection (``docs/design.md`` section 7, ``docs/protocol.md`` section 8), as
pure bookkeeping over a ``now`` that the caller passes in (trio's clock, or
``time.monotonic`` in the fast path's thread):

* a per-connection request rate (:class:`TokenBucket`); a request over it is
  answered ``RATE_LIMITED`` at once and never reaches a handler;
* a body deadline: a frame's body must arrive within 5 s of its header;
* an idle timeout: with nothing in flight, ``idle_timeout`` seconds without a
  complete frame closes the connection;
* encoding once: a handler returns JSON data or raises; :meth:`answer` and
  :meth:`fail` turn that into the reply frame, clear the request's in-flight
  id, and hide internal errors (their text goes to the daemon log, never to
  the peer).

The caller (a driver: :mod:`credproxy.shell.servingloop` for sandbox sockets,
:mod:`credproxy.shell.streams` for the control socket) reads bytes, calls
:meth:`receive_data` and :meth:`next_event` until :data:`NEED_DATA`, writes
what it is given, calls :meth:`after_read` once per read, and closes the
connection when :meth:`expired` says why. A driver may give a read to
:meth:`take` first: a read that is one whole request (the usual one) is its
event at once, with nothing stored and no :meth:`after_read` to call (a whole
frame arms no body deadline); any other read is stored, and the driver goes
on with :meth:`next_event` as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from credproxy.core.config import Limits
from credproxy.core.protocol import (
    BODY_DEADLINE,
    CLOSED,
    HEADER_SIZE,
    MAX_FRAME,
    NEED_DATA,
    OPEN,
    Event,
    Request,
    Send,
    ServerConnection,
    unpack_header,
)
from credproxy.errors import AllBucketsExhausted, CredproxyError, RateLimited

__all__ = ["GENERIC_ERROR", "NEED_DATA", "Connection", "Request", "Send", "TokenBucket"]

GENERIC_ERROR = "internal error; see the daemon log"


class TokenBucket:
    """A request-rate limit: ``rate`` per second sustained, ``burst`` at once; 0 disables it."""

    __slots__ = ("_burst", "_last", "_level", "_rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate, self._burst = rate, float(burst)
        self._level, self._last = float(burst), now

    def take(self, now: float) -> float:
        """Spend one request; 0.0 if allowed, else the seconds until one is."""
        if self._rate <= 0:
            return 0.0
        level = min(self._burst, self._level + (now - self._last) * self._rate)
        self._last = now
        if level >= 1.0:
            self._level = level - 1.0
            return 0.0
        self._level = level
        return (1.0 - level) / self._rate

    def rebase(self, then: float, now: float) -> None:
        """Go on on another clock: *then* on the old clock is *now* on the new one."""
        self._last += now - then


class Connection:
    """Protocol state, rate limit and deadlines of one connection (see the module docstring)."""

    __slots__ = (
        "_body_deadline",
        "_idle",
        "_idle_deadline",
        "_in_flight",
        "_limited",
        "_rate",
        "_reader",
        "protocol",
        "receive_data",
    )

    def __init__(self, limits: Limits, now: float, *, capability: bytes | None = None) -> None:
        self.protocol = ServerConnection(capability=capability, max_in_flight=limits.max_in_flight)
        # The protocol's parts that every request touches, held here so that
        # the hot path does not go through two layers of calls to reach them.
        self._reader = self.protocol.reader
        self._in_flight = self.protocol.in_flight_ids
        #: Store bytes from the peer (the frame reader's own ``feed``).
        self.receive_data: Callable[[bytes], None] = self._reader.feed
        self._rate = TokenBucket(limits.requests_per_second, limits.request_burst, now)
        self._limited = limits.requests_per_second > 0
        self._idle = limits.idle_timeout
        self._idle_deadline = now + limits.idle_timeout
        self._body_deadline = math.inf

    # -- input --

    def next_event(self, now: float) -> Event:
        """The next :class:`Send` or :class:`Request`, or :data:`NEED_DATA`.

        Raises:
            ProtocolError: the peer broke framing; close without replying.
        """
        protocol = self.protocol
        reader = self._reader
        if not reader.data and not reader.buf and protocol.state is not CLOSED:
            return NEED_DATA  # (what the protocol would say, without asking it)
        event = protocol.next_event()
        if event is NEED_DATA:
            return event
        return self._completed(event, now)

    def take(self, data: bytes, now: float) -> Event | None:
        """The event of *data* if it is one whole request frame, else None.

        The usual read (a request whole in one read, nothing buffered before
        it, the handshake done) is answered without storing and splitting
        it: same checks, same event as :meth:`receive_data` then
        :meth:`next_event` would give. Anything else is stored and None
        returned: the caller goes on with :meth:`next_event`.

        Raises:
            ProtocolError: the peer broke framing; close without replying.
        """
        reader = self._reader
        size = len(data) - HEADER_SIZE
        if (
            reader.data
            or reader.buf
            or reader.need is not None
            or self.protocol.state is not OPEN
            or not 0 <= size <= MAX_FRAME
            or unpack_header(data, 0)[0] != size
        ):
            reader.feed(data)
            return None
        return self._completed(self.protocol.request(data[HEADER_SIZE:]), now)

    def _completed(self, event: Event, now: float) -> Event:
        """*event* came from a whole frame: the deadlines move, and a request spends its rate."""
        self._idle_deadline = now + self._idle
        self._body_deadline = math.inf
        return self._limit(event, now) if self._limited else event

    def _limit(self, event: Event, now: float) -> Event:
        """*event*, or the ``RATE_LIMITED`` answer if it is a request over the rate."""
        if isinstance(event, Request):
            wait = self._rate.take(now)
            if wait:
                limited = RateLimited(
                    "too many requests on this connection; slow down", max(1, math.ceil(wait))
                )
                return Send(self.fail(event.id, limited, now))
        return event

    def after_read(self, now: float) -> bool:
        """Arm the body deadline if a header arrived without its whole body.

        Returns True if it armed it: the one way a read brings :meth:`deadline`
        earlier (a frame or an answer only moves the idle deadline later).
        """
        if self._reader.need is not None and self._body_deadline == math.inf:
            self._body_deadline = now + BODY_DEADLINE
            return True
        return False

    def hold_body(self) -> None:
        """The driver stops reading (its peer has replies to take): no body deadline runs.

        When it reads again, :meth:`after_read` gives a body still on its way a
        whole deadline.
        """
        self._body_deadline = math.inf

    @property
    def has_frame(self) -> bool:
        """True if a whole frame is buffered (at the peer's end of input, the rest is dropped)."""
        return self._reader.has_frame

    # -- output --

    def answer(self, rid: str, data_json: bytes, now: float) -> bytes:
        """The reply frame for request *rid*: ``data_json`` is an encoded JSON value."""
        protocol = self.protocol
        out = protocol.reply_ok_raw(rid, data_json)
        if not self._in_flight:  # (what _answered does, inline: this is the hot path)
            self._idle_deadline = now + self._idle
        return out

    def fail(self, rid: str, exc: CredproxyError, now: float | None = None) -> bytes:
        """The error frame for request *rid*; an internal error's text is never sent."""
        message = GENERIC_ERROR if exc.code == "INTERNAL_ERROR" else str(exc)
        retry = exc.retry_after if isinstance(exc, RateLimited | AllBucketsExhausted) else None
        extra = (
            {"bucketFailureReasons": exc.reasons} if isinstance(exc, AllBucketsExhausted) else None
        )
        out = self.protocol.reply_error(rid, exc.code, message, retry, extra)
        if now is not None:
            self._answered(now)
        return out

    def share(self, rid: str) -> None:
        self.protocol.share(rid)

    def _answered(self, now: float) -> None:
        if self.protocol.in_flight == 0:
            # The idle clock starts again now that nothing is in flight.
            self._idle_deadline = now + self._idle

    # -- time --

    @property
    def in_flight(self) -> int:
        return self.protocol.in_flight

    @property
    def buffered(self) -> bool:
        """True if bytes from the peer wait to be parsed (a driver that paused resumes)."""
        return self.protocol.buffered > 0

    def deadline(self) -> float:
        """The earliest instant at which :meth:`expired` may say something (or inf)."""
        body = self._body_deadline
        if self.protocol.in_flight or body < self._idle_deadline:
            return body
        return self._idle_deadline

    def expired(self, now: float) -> str | None:
        """Why the connection must close at *now*, or None."""
        if now >= self._body_deadline:
            return "frame body did not arrive within 5 s"
        if not self.protocol.in_flight and now >= self._idle_deadline:
            return "idle timeout"
        return None
