"""The API proxy's relay in the serving loop's thread: the path of every ordinary request.

Theory of operation
-------------------

The trio side's proxy (:mod:`credproxy.shell.proxy`) pays about a millisecond
of CPU per request in trio's scheduler, httpx's request model and h11 (see
``docs/design.md`` section 9.1). So the serving loop keeps an HTTP connection
in its own epoll set instead of handing it over, and this module relays its
requests there: llhttp (``httptools``) reads the sandbox's request heads
(:func:`read_head`; anything it or the relay's checks do not take goes to the
trio side, whose h11 refuses or reads it) and the upstream's answers, and the
relay writes both sides' heads itself
(:func:`request_head`, :func:`response_head`); non-blocking sockets, TLS
through ``ssl.MemoryBIO``, pooled keep-alive connections to each upstream,
and every deadline in a heap of the loop. No task, cancel scope or scheduler
pass per request.

**What the loop serves, and what it hands over.** At the start of each
request, before anything is spent, :meth:`LoopProxy.plan` checks what the
loop needs: a granted provider with an ``api`` section reached without a
proxy of the environment, no WebSocket or other upgrade, no ``HEAD`` or ``Expect``, no
chunked body and a ``Content-Length`` within ``retry_body_limit``, and, for a
connection that came through ``forward``, its Host and Origin rules and the
capability. A request that fails any of them goes to the trio side with the
connection, unread and unadmitted (:class:`~credproxy.shell.proxy.Handed`):
it is refused, or served, there exactly as before, with the rate the
connection has spent so far. The same happens after admission when the
session's streams are all in flight or the daemon's budget of kept bodies
is spent: the trio side then answers 503, or streams the body without a
copy.

**One request in the loop.** Admitted (the rate, as on the trio side), its
body read whole and kept (it is at most ``retry_body_limit``; a body not
all here with its head is read under
:class:`~credproxy.core.httprules.BodyPace`), its bucket picked by the
serving core as ``get_token`` would, its headers filled from the token the
core has ready for the session (:class:`~credproxy.core.servecore.Ready`) or
the API keys, it goes upstream on a pooled connection. The answer is relayed
event by event as it arrives (server-sent events leave as they come), with
backpressure: while :data:`HIGH_WATER` bytes wait for the client, the
upstream is not read, nor the client, and a request it sent ahead waits.
An upstream that stops taking the body (it answered early, a 413 of a big
upload, and reset the connection) is read before it counts as broken: its
answer is relayed, and that connection is not pooled.

**What waits is the trio side's** (:meth:`HttpConn.wait`): a token that is
not ready or has to be refreshed (``ApiProxy.ready``), a failover walk
(``ApiProxy.key_for``), a new upstream connection (``ApiClient.open``: DNS,
connect, TLS), the token to retry with after a 401 (``Tokens.after_rejection``
through ``ApiProxy.retry_ready``) and the next bucket after a 429. The answer
comes back as a loop command and the request goes on where it stopped. A
401 or 429 that may be retried is held (its body up to
:data:`MAX_HELD_ANSWER`) until the retry is decided, then either dropped or
relayed.

**Deadlines**, as the trio side keeps them: the request head within
``HEAD_TIMEOUT`` of its first byte, ``idle_timeout`` between requests, the
body's pace (``408``), the upstream's ``read_timeout`` (``502`` before the
answer, a cut answer after), and ``SEND_TIMEOUT`` for a client that takes
nothing of its answer. A client that hangs up (``EPOLLHUP``/``EPOLLERR``)
ends its exchange at once: the upstream connection is closed and the audit
line says ``499``.

Everything here runs in the loop's thread; the trio side is reached only by
``to_trio`` and answers only by :meth:`~credproxy.shell.servingloop.ServingLoop.post`.
The two paths count streams in flight and kept bodies together
(:class:`~credproxy.shell.proxy.Ledger`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import itertools
import math
import re
import select
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httptools
import msgspec

from credproxy.core import httprules
from credproxy.core.connection import TokenBucket
from credproxy.core.httprules import HOP_BY_HOP, BodyPace, Preamble, error_answer
from credproxy.core.names import DEFAULT_BUCKET, Key
from credproxy.core.servecore import Ready, SessionState
from credproxy.errors import CredproxyError
from credproxy.shell import logs
from credproxy.shell.http import Tls, _env_proxy, relay_failure
from credproxy.shell.proxy import (
    _NO_API,
    API_MOVED,
    CLIENT_GONE_STATUS,
    HEAD_TIMEOUT,
    SEND_TIMEOUT,
    ApiProxy,
    Handed,
    HttpError,
    NotServed,
    Route,
    allowed,
    fill_headers,
    give_back_memory,
    route_request,
    token_fields,
)

if TYPE_CHECKING:
    from credproxy.shell.servingloop import ServingLoop
    from credproxy.shell.sessions import Session

log = logs.get("credproxy.proxy")

RECV_SIZE = 65_536
HIGH_WATER = 1 << 20  # bytes waiting for a client before its upstream is read no more
POOL_PER_ORIGIN = 64  # idle upstream connections kept per origin
POOL_IDLE = 5.0  # seconds an idle upstream connection is kept (httpx's keep-alive expiry)
TLS_CHUNK = 1 << 16  # plaintext encrypted at a time for an upstream that takes it
MAX_EARLY = 1 << 16  # bytes of later requests read ahead during an exchange
MAX_HELD_ANSWER = 1 << 16  # a 401's or 429's body, held while its retry is decided
MAX_ANSWER_HEAD = 1 << 16  # bytes of an upstream's answer before its head is whole
MAX_FIELDS_MEMO = 1024  # tokens whose header fields are remembered
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR


class Origin:
    """Where a provider's ``base_url`` points, as the relay connects to it."""

    __slots__ = ("authority", "host", "path", "port", "proxied", "scheme", "url")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.authority = parts.netloc.rpartition("@")[2].encode("ascii")
        self.path = parts.path.rstrip("/")
        self.url = base_url
        # A proxy of the environment is the trio side's (httpx's) business.
        self.proxied = parts.scheme not in ("http", "https") or _env_proxy(parts.scheme, self.host)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


_HEAD, _DATA, _END = 0, 1, 2
#: What a request target the relay sends as it came may hold: RFC 3986's
#: unreserved and sub-delims, ``:@/?`` and ``%`` (httpx leaves them as they are).
_TARGET_CHARS = (
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?%"
)
_TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``name: value`` lines; names must be tokens and values free of CR, LF and NUL.

    (Checked on the names and the values joined, at C speed: a regular
    expression over them cost more than writing the lines.)

    Raises:
        ValueError: a header that cannot be sent.
    """
    if not headers:
        return b""
    # (One loop, no comprehensions: on Python 3.11 each one makes and calls a function.)
    lines: list[bytes] = []
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    names = lines[0::4]
    values = b"".join(lines[2::4])
    if (
        b"".join(names).translate(None, _TOKEN_CHARS)  # (a byte left that is not a token's)
        or b"" in names
        or b"\r" in values
        or b"\n" in values
        or b"\x00" in values
    ):
        raise ValueError("a header that cannot be sent")
    return b"".join(lines)


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """An HTTP/1.1 request head (the relay's own writing: no parsing involved).

    Raises:
        ValueError: as :func:`_header_lines`.
    """
    if not headers:  # (never: Host is always there; a head without one would be a bug)
        raise ValueError("a request head without headers")
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (method, target, _header_lines(headers))


def response_head(status: int, headers: list[tuple[bytes, bytes]], keep: bool) -> bytes:
    """A response head as h11 writes one (no reason phrase), ``Connection: close`` unless *keep*.

    Raises:
        ValueError: as :func:`_header_lines`.
    """
    if not keep:
        headers = [*headers, (b"connection", b"close")]
    return b"HTTP/1.1 %d \r\n%s\r\n" % (status, _header_lines(headers))


_HEAD_END = re.compile(rb"\n\r?\n")  # where h11 ends a head (llhttp takes only CRLF lines)


class Req:
    """A request head as :func:`read_head` reads it: what the relay uses of it."""

    __slots__ = ("headers", "http_version", "method", "target")

    def __init__(
        self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], version: bytes
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers  # names lower-cased, values without surrounding blanks
        self.http_version = version


class _HeadParts:
    """llhttp's callbacks for one request head."""

    __slots__ = ("headers", "hosts", "target")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.target = b""
        self.hosts = 0

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes | None) -> None:
        name = name.lower()
        if name == b"host":
            self.hosts += 1
        self.headers.append((name, (value or b"").strip(b" \t")))


def read_head(head: bytes) -> Req | None:
    """*head* (a request head through its blank line) read by llhttp, or None.

    None for anything the loop leaves to the trio side, whose h11 refuses it or
    reads it there: what llhttp refuses (bad syntax, a bare LF, a folded or
    invalid header, a Content-Length twice or with Transfer-Encoding), blank
    lines before the request line, an upgrade, a request line without a
    version, and a Host missing (1.1) or repeated. llhttp is strict by
    default; its lenient modes are not used. A version other than 1.1 is
    served and the connection closed after it, as h11 read it.
    """
    if head.startswith((b"\r", b"\n")):
        return None  # (llhttp skips blank lines before a request line; h11 refuses them)
    parts = _HeadParts()
    parser = httptools.HttpRequestParser(parts)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    version = parser.get_http_version()
    if version == "0.9":  # (a request line without a version)
        return None
    hosts = parts.hosts
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        return None
    return Req(parser.get_method(), parts.target, parts.headers, version.encode())


_REPLAYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})


def _replayable(req: Req) -> bool:
    """Whether *req* may reach the upstream twice: a safe method, or an idempotency key."""
    return req.method in _REPLAYABLE or any(
        name in (b"idempotency-key", b"x-idempotency-key") for name, _ in req.headers
    )


class Answer:
    """An upstream connection's answers as llhttp reads them (``httptools``): what is relayed.

    The upstream is the provider's own API, reached over TLS; its answers are
    read with llhttp, a C parser, and re-framed for the client by the relay
    (:func:`response_head`), which checks what is sent to the sandbox. ``1xx`` answers are skipped.
    One per connection: llhttp reads a kept-alive connection's answers one
    after another, and :meth:`next` starts each. (The parser and this object
    refer to each other; one pair per request was garbage that only the
    cycle collector frees, which then ran every 80 or so requests.)
    """

    __slots__ = (
        "began",
        "done",
        "events",
        "extra",
        "framed",
        "head_bytes",
        "headers",
        "interim",
        "keep",
        "parser",
    )

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.events: collections.deque[tuple[int, Any, Any]] = collections.deque()
        self.next()

    def next(self) -> Answer:
        """The next answer of the connection (the last one was whole, or there was none)."""
        self.events.clear()
        self.headers: list[tuple[bytes, bytes]] = []
        self.framed = False  # a Content-Length or chunked: its end does not need a close
        self.interim = False
        self.keep = False  # whole, and the connection may carry another request
        self.began = False  # its head has come
        self.head_bytes = 0  # read before it came
        self.done = False
        self.extra = False  # bytes came after its end, unasked: the connection is not reused
        return self

    def feed(self, data: bytes | memoryview) -> None:
        """Read *data* (b"": the connection ended).

        Raises:
            httptools.HttpParserError: not an HTTP answer, or cut short.
        """
        if data:
            began = self.began
            self.parser.feed_data(data)
            if not began and not self.began:
                # Still no whole head after these bytes: counted (a read that
                # ends the head, body and all, is not). At most one read more
                # than the limit is ever held.
                self.head_bytes += len(data)
                if self.head_bytes > MAX_ANSWER_HEAD:
                    raise httptools.HttpParserError("the answer's head is too large")
            return
        if self.done:
            return
        if not self.began:
            raise httptools.HttpParserError("closed before an answer")
        if self.framed:
            raise httptools.HttpParserError("closed in the middle of an answer")
        self.done = True  # an answer whose end is the connection's
        self.events.append((_END, None, None))

    def on_message_begin(self) -> None:
        if self.done:  # (in the same read as the end: llhttp reads on)
            self.extra = True

    def on_header(self, name: bytes, value: bytes | None) -> None:
        self.headers.append((name.lower(), value or b""))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers, self.headers = self.headers, []
        if status < 200:
            self.interim = True  # (100 Continue, 103 Early Hints: not passed on)
            return
        self.began = True
        names = {name for name, _ in headers}
        self.framed = b"content-length" in names or b"transfer-encoding" in names
        self.events.append((_HEAD, status, headers))

    def on_body(self, body: bytes) -> None:
        self.events.append((_DATA, body, None))

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.done = True
        self.keep = self.parser.should_keep_alive()
        self.events.append((_END, None, None))


class Upstream:
    """One connection to an upstream: non-blocking, TLS through memory buffers."""

    __slots__ = (
        "answer",
        "closed",
        "fd",
        "idle_since",
        "lp",
        "mask",
        "origin",
        "out",
        "owner",
        "paused",
        "pending",
        "reader",
        "reused",
        "sock",
        "tls",
        "unwritable",
        "wrote",
    )

    def __init__(self, lp: LoopProxy, sock: socket.socket, origin: Origin, tls: Tls | None):
        sock.setblocking(False)
        self.lp = lp
        self.sock = sock
        self.fd = sock.fileno()
        self.origin = origin
        self.tls = tls
        self.reader = Answer()  # the connection's answers, one after another
        self.answer: Answer | None = None  # the one being read (the reader, while it is)
        self.owner: HttpConn | None = None
        self.out = memoryview(b"")  # bytes the socket has not taken yet
        self.pending: collections.deque[memoryview] = collections.deque()  # not yet encrypted
        self.closed = False
        self.reused = False
        self.wrote = False  # a byte of the request under way has been sent
        self.unwritable = False  # it stopped taking the request: read, never pooled
        self.paused = False
        self.idle_since = 0.0
        self.mask = _IN
        lp.handlers[self.fd] = self
        lp.epoll.register(self.fd, _IN)

    def write(self, *pieces: bytes | bytearray) -> bool:
        """Send *pieces* (encrypted first on TLS); False when the connection broke.

        Not copied: a body goes out from the caller's buffer, encrypted a
        :data:`TLS_CHUNK` at a time as the socket takes it, so no TLS buffer
        ever holds a whole big body.
        """
        pending = self.pending
        for p in pieces:
            if p:
                pending.append(memoryview(p))
        return self.push()

    def push(self) -> bool:
        out, pending = self.out, self.pending
        try:
            while True:
                if out:
                    sent = self.sock.send(out)
                    self.wrote = True
                    out = out[sent:]
                    if out:
                        break  # the socket is full: EPOLLOUT
                if not pending:
                    break
                chunk = pending.popleft()
                if len(chunk) > TLS_CHUNK and self.tls is not None:
                    pending.appendleft(chunk[TLS_CHUNK:])
                    chunk = chunk[:TLS_CHUNK]
                if self.tls is None:
                    out = chunk
                else:
                    obj, _, outgoing = self.tls
                    while chunk:
                        chunk = chunk[obj.write(chunk) :]
                    out = memoryview(outgoing.read())
        except BlockingIOError:
            pass
        except OSError:
            self.out = out
            return False
        self.out = out
        self.interest()
        return True

    def interest(self) -> None:
        waiting = bool(self.out) or bool(self.pending)
        mask = (0 if self.paused else _IN) | (_OUT if waiting else 0)
        if mask != self.mask:
            self.mask = mask
            self.lp.epoll.modify(self.fd, mask)

    def event(self, mask: int, now: float) -> None:
        owner = self.owner
        if mask & _OUT and not self.push():
            # It stopped taking the request (a reset): it may have answered
            # first and closed, as an upstream refusing a big upload with a
            # 413 does. What it sent is read before it counts as broken.
            self.unwritable = True
            self.out, self.pending = memoryview(b""), collections.deque()
            self.interest()
            mask |= _GONE
        if not mask & (_IN | _GONE) or (self.paused and not mask & _GONE):
            return  # (paused: the client has enough to take; an end is read all the same)
        lp = self.lp
        try:
            n = self.sock.recv_into(lp.inbuf)
        except BlockingIOError:
            return
        except OSError:
            self.broke(now)
            return
        if owner is None:
            self.close()  # bytes (or the end) on an idle connection: it is not reused
            return
        answer = self.answer
        assert answer is not None
        # (Read through the loop's own two buffers: nothing allocated per read.
        # llhttp's callbacks copy what they pass on.)
        try:
            if not n:
                answer.feed(b"")
            elif self.tls is None:
                answer.feed(lp.inview[:n])
            else:
                obj, incoming, _ = self.tls
                incoming.write(lp.inview[:n])
                plain, view = lp.tlsbuf, lp.tlsview
                while True:
                    try:
                        # (Into a buffer, read() gives a count, not the bytes typeshed says.)
                        got: int = obj.read(RECV_SIZE, plain)  # type: ignore[assignment]
                    except ssl.SSLWantReadError:
                        break  # (the rest of a record is still on its way)
                    except ssl.SSLZeroReturnError:
                        answer.feed(b"")  # the server's close_notify
                        break
                    answer.feed(view[:got])
                    if got < RECV_SIZE and not incoming.pending:
                        # The record read whole, and no other waits: asking once
                        # more would raise SSLWantReadError, at a cost.
                        break
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, ssl.SSLError):
            if not answer.done:
                self.broke(now)  # (an unasked 101 too: not an answer the relay can pass on)
                return
            # Bytes after a whole answer that are not an answer: that answer
            # stands (h11 reads it so), the connection goes.
            answer.extra = True
        if answer.events:
            owner.upstream_events(self, now)

    def broke(self, now: float) -> None:
        owner = self.owner
        self.close()
        if owner is not None:
            owner.upstream_broke(self, now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.owner = None
        self.lp.handlers.pop(self.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.lp.epoll.unregister(self.fd)
        self.sock.close()


class Exchange:
    """One request the loop relays, and what its audit line says."""

    __slots__ = (
        "body",
        "body_size",
        "close",
        "got_answer",
        "headers",
        "held",
        "kept",
        "key",
        "method",
        "origin",
        "pace",
        "ready",
        "req",
        "route",
        "sent",
        "started",
        "status",
        "target",
        "tried",
        "up",
        "waited_since",
    )

    def __init__(self, req: Req, method: str, route: Route, origin: Origin, now: float):
        self.req = req
        self.method = method
        self.route = route
        self.origin = origin
        self.started = now
        self.key: Key | None = None
        self.ready: Ready | None = None  # the token the request carries (None: API keys only)
        self.headers: list[tuple[bytes, bytes]] = []  # as sent upstream
        self.target = b""
        self.body = b""  # the body, whole (until the answer starts: no retry after)
        self.body_size = 0
        self.kept = 0  # bytes of retry_body_budget held for the body
        self.close = False  # the client asked to close after it (or speaks HTTP/1.0)
        self.pace: BodyPace | None = None  # while its body is read (None: not begun, or whole)
        self.waited_since = now
        self.up: Upstream | None = None
        self.got_answer = False  # the upstream's head has come
        # A 401 or 429 kept until its retry is decided (its body None: cut short).
        self.held: tuple[int, list[tuple[bytes, bytes]], bytearray | None] | None = None
        self.tried: set[str] = set()  # "stale", "401", "429": each retry at most once
        self.status = 0
        self.sent = 0


class HttpConn:
    """One sandbox connection speaking HTTP, served in the loop (see the module docstring)."""

    __slots__ = (
        "again",
        "answered",
        "body_end",
        "buf",
        "chunked",
        "close_when_flushed",
        "closed",
        "deferred",
        "early",
        "eof",
        "fd",
        "head",
        "heap_at",
        "http11",
        "keep",
        "lp",
        "mask",
        "no_body",
        "out",
        "pre",
        "preamble",
        "rate",
        "scanned",
        "session",
        "sock",
        "state",
        "stepping",
        "t_body",
        "t_head",
        "t_idle",
        "t_send",
        "t_up",
        "x",
    )

    def __init__(
        self, lp: LoopProxy, session: Session, state: SessionState, sock: socket.socket, now: float
    ) -> None:
        self.lp = lp
        self.session = session
        self.state = state
        self.sock = sock
        self.fd = sock.fileno()
        cfg = lp.proxy.cfg
        self.preamble: Preamble | None = None  # None: not read yet (then *pre* holds its bytes)
        self.pre = bytearray()
        limits = cfg.limits
        self.rate = TokenBucket(limits.requests_per_second, limits.request_burst, now)
        # The bytes of the request under way from its first (what a hand-over
        # gives the trio side), then of the requests after it.
        self.buf = bytearray()
        self.scanned = 0  # bytes of the buffer searched for a head's end, not found there
        self.head = 0  # the length of the request's head
        self.body_end = 0  # where its body ends in the buffer
        self.out = bytearray()
        self.mask = _IN
        self.x: Exchange | None = None
        self.closed = False
        self.close_when_flushed = False
        self.answered = 0
        self.chunked = self.no_body = False
        self.http11 = self.keep = True
        self.early = 0  # bytes of later requests read during an exchange
        self.eof = False  # the client shut down its side
        self.stepping = False  # inside step(): a request that ends at once loops, not recurses
        self.again = False
        self.deferred = False  # the next request waits until the client has taken its answers
        self.heap_at = math.inf
        self.t_idle = now + limits.idle_timeout
        self.t_head = now + HEAD_TIMEOUT  # its first bytes are here
        self.t_body = math.inf
        self.t_up = math.inf
        self.t_send = math.inf

    # -- the client side ---------------------------------------------------------------

    def event(self, mask: int, now: float) -> None:
        if mask & _OUT:
            self.flush(now)
        if self.closed:
            return
        if mask & _IN and not self.mask & _IN and not mask & _GONE:
            return  # (a stale readiness: not reading now)
        if mask & _GONE and self.x is not None:
            self.gone(now)
            return
        if not mask & (_IN | _GONE):
            return
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self.gone(now)
            return
        self.received(data, now)

    def received(self, data: bytes, now: float) -> None:
        x = self.x
        if not data:  # the client closed (or half-closed) its side
            if self.preamble is None:
                self.close()
            elif x is not None and x.pace is not None:
                self.gone(now)  # in the middle of its body
            else:
                self.eof = True  # (a half-close still gets its answer)
                if x is None:
                    self.step(now)
                else:
                    self.interest()
            return
        if x is not None and x.pace is None:
            # The next request, sent before this one's answer: kept for later
            # (past MAX_EARLY bytes the connection is not read until then).
            self.buf += data
            self.early += len(data)
            if self.early > MAX_EARLY:
                self.interest()
            return
        if self.preamble is None:
            self.pre += data
            pre = self.pre
            marker = httprules.PREAMBLE
            if marker.startswith(pre[: len(marker)]) and b"\r\n" not in pre:
                if len(pre) > httprules.MAX_PREAMBLE:
                    self.hand_over(bytes(pre), None, now)  # the trio side says what is wrong
                else:
                    self.track()
                return
            if pre.startswith(marker):
                line, _, rest = bytes(pre).partition(b"\r\n")
                try:
                    self.preamble = httprules.parse_preamble(line)
                except ValueError:
                    self.hand_over(bytes(pre), None, now)
                    return
                data = rest
            else:
                self.preamble, data = Preamble(), bytes(pre)
            self.pre = bytearray()
            self.buf = bytearray(data)
        else:
            self.buf += data
        if x is not None and x.pace is not None:
            x.pace.record(now - x.waited_since, len(data))
        if x is None:
            self.step(now)
        else:
            self.read_body(x, now)

    def step(self, now: float) -> None:
        """Take the next request of the connection, if it is here.

        A request answered at once (a refusal) ends inside this call: the
        next one is then taken by this loop, not by a deeper call.
        """
        if self.stepping:
            self.again = True
            return
        self.stepping = True
        try:
            self.again = True
            while self.again and not self.closed and self.x is None:
                if len(self.out) > HIGH_WATER:
                    # Answers to pipelined requests that the client does not read:
                    # nothing more is read or started until it has taken them (flush).
                    self.deferred = True
                    self.interest()
                    return
                self.again = False
                self.next_request(now)
        finally:
            self.stepping = False

    def next_request(self, now: float) -> None:
        buf = self.buf
        cfg = self.lp.proxy.cfg
        # (searched from where the last search stopped: a head sent a byte at a
        # time costs no more than one sent whole)
        end = _HEAD_END.search(buf, max(0, self.scanned - 2))
        if end is None:
            self.scanned = len(buf)
            if self.eof and not buf:
                self.close_after_flush()  # the client is done (its answer goes first)
            elif self.eof or len(buf) > cfg.proxy.max_header_bytes:
                self.hand_over(bytes(buf), self.handed(False, now), now)  # 400/431 there
            else:
                if buf and self.t_head == math.inf:
                    self.t_head = now + HEAD_TIMEOUT
                self.t_idle = now + cfg.limits.idle_timeout
                self.interest()
                self.track()
            return
        req = read_head(bytes(buf[: end.end()]))
        if req is None:  # not a head the loop reads: h11 on the trio side says what it is
            self.hand_over(bytes(buf), self.handed(False, now), now)
            return
        self.scanned = 0
        self.begin(req, end.end(), now)

    def begin(self, req: Req, head: int, now: float) -> None:
        lp = self.lp
        method = req.method.decode("ascii", "replace")
        self.t_head = self.t_idle = math.inf
        if not self.state.open:
            self.close()
            return
        x = lp.plan(self, req, method, now)
        if x is None or self.rate.take(now):
            # Not the loop's kind of request, or refused: the trio side serves
            # it, or refuses it, as it did before the loop served any.
            self.hand_over(bytes(self.buf), self.handed(False, now), now)
            return
        proxy = lp.proxy
        cfg = proxy.cfg.proxy
        length = x.kept
        if not proxy.ledger.enter(self.state.id, cfg.max_streams):
            self.hand_over(bytes(self.buf), self.handed(True, now), now)  # 503 there
            return
        if length and not proxy.ledger.keep(length, cfg.retry_body_budget):
            proxy.ledger.leave(self.state.id)
            self.hand_over(bytes(self.buf), self.handed(True, now), now)  # streamed there
            return
        if len(self.buf) < head + length:  # (its body is still on its way)
            x.pace = BodyPace(cfg.body_timeout, cfg.body_min_rate)
        self.x = x
        self.answered = 0  # 1: the head is sent, 2: the whole answer
        self.http11 = req.http_version == b"1.1"
        self.keep = not x.close
        self.head = head
        self.body_end = head + length
        self.read_body(x, now)

    def read_body(self, x: Exchange, now: float) -> None:
        """The body is the *Content-Length* bytes after the head (llhttp checked the header)."""
        buf = self.buf
        end = self.body_end
        if len(buf) < end:
            assert x.pace is not None
            x.waited_since = now
            self.t_body = now + x.pace.allowance()
            self.interest()
            self.track()
            return
        with memoryview(buf) as view:  # (one copy of the body, and a new buffer for the rest:
            x.body = bytes(view[self.head : end])  # the old one's room goes with it)
            x.body_size = len(x.body)
            self.buf = bytearray(view[end:])  # what is left is the next request's
        x.pace = None
        self.t_body = math.inf
        self.pick(x, now)

    # -- the bucket, the token, the headers ------------------------------------------

    def pick(self, x: Exchange, now: float) -> None:
        lp, route = self.lp, x.route
        core = lp.loop.core
        if route.bucket is not None:
            key = Key(route.provider, route.bucket)
        elif core.profile(self.state, route.provider) is None:
            key = Key(route.provider, DEFAULT_BUCKET)
        else:
            try:
                answer = core.pick(self.state.id, route.provider, lp.loop.wall(), lp.loop.boot())
            except CredproxyError:
                self.close()  # the session is gone
                return
            if not isinstance(answer, Ready):
                session = self.session
                self.wait(x, lambda: lp.proxy.key_for(session, route), self.with_key)
                return
            key = answer.key
            x.ready = answer
        self.with_key(key, now)

    def with_key(self, key: Key, now: float) -> None:
        x = self.x
        assert x is not None
        x.key = key
        if not allowed(self.state.grants, key):
            self.lp.loop.to_trio(self.lp.proxy.not_served, self.session, key.provider)
            self.refuse(x, HttpError(404, _NO_API), now)
            return
        prov = self.lp.loop.core.providers.get(key.provider)
        api = None if prov is None else prov.api
        if api is None:  # (a reload took it away meanwhile)
            self.refuse(x, HttpError(404, _NO_API), now)
            return
        if not self.lp.uses_token(key.provider, api):
            self.with_ready(None, now)
            return
        ready = x.ready if x.ready is not None and x.ready.key == key else None
        if ready is None:
            ready = self.state.ready.get(key)
            if ready is None or self.lp.loop.boot() >= ready.until:
                session, proxy = self.session, self.lp.proxy
                self.wait(x, lambda: proxy.ready(session, key), self.with_ready)
                return
        self.with_ready(ready, now)

    def with_ready(self, ready: Ready | None, now: float) -> None:
        """Fill the headers from *ready* (None: the API's headers name no token field)."""
        x = self.x
        assert x is not None
        assert x.key is not None
        x.ready = ready
        lp = self.lp
        prov = lp.loop.core.providers.get(x.key.provider)
        if prov is None or prov.api is None:  # (a reload took it away while the token came)
            self.refuse(x, HttpError(404, _NO_API), now)
            return
        if prov.api.base_url != x.origin.url:  # (or moved it: its headers are not for there)
            self.refuse(x, HttpError(503, API_MOVED, [(b"retry-after", b"1")]), now)
            return
        try:
            filled = lp.filled(self.state.id, x.key, ready, prov.api, self.state.grants)
        except HttpError as exc:
            self.refuse(x, exc, now)
            return
        req = x.req
        headers = httprules.upstream_headers(req.headers, filled, lp.proxy.cfg.proxy.strip_headers)
        if b"accept-encoding" not in [name.lower() for name, _ in headers]:
            headers.append((b"accept-encoding", b"identity"))  # as the trio side sends it
        headers.insert(0, (b"host", x.origin.authority))
        x.target = f"{x.origin.path}/{x.route.rest}{x.route.query}".encode("ascii", "replace")
        x.held = None
        self.connect(x, headers, now)

    # -- upstream ------------------------------------------------------------------------

    def connect(
        self, x: Exchange, headers: list[tuple[bytes, bytes]], now: float, *, fresh: bool = False
    ) -> None:
        """Send *x* on a pooled connection to its origin, else (or when *fresh*) a new one."""
        up = None if fresh else self.lp.pooled(x.origin, now)
        if up is None:
            origin, client = x.origin, self.lp.proxy.client

            def opened(got: tuple[socket.socket, Tls | None], now: float) -> None:
                self.send(x, Upstream(self.lp, got[0], origin, got[1]), headers, now)

            self.wait(x, lambda: client.open(origin.scheme, origin.host, origin.port), opened)
            return
        self.send(x, up, headers, now)

    def send(
        self, x: Exchange, up: Upstream, headers: list[tuple[bytes, bytes]], now: float
    ) -> None:
        up.owner = self
        up.wrote = False
        up.answer = up.reader.next()
        x.up = up
        x.got_answer = False
        try:
            head = request_head(x.req.method, x.target, headers)
        except ValueError:
            self.lp.release(up, now)
            self.refuse(x, HttpError(502, f"the request to {x.origin.host} cannot be sent"), now)
            return
        # The body goes as the client sent it (its Content-Length was checked by
        # llhttp and is among the headers), from the kept copy itself.
        body = x.body
        if len(body) <= TLS_CHUNK:  # (small: one write; a big one is sent from where it is)
            head, body = head + body, b""
        x.headers = headers  # (before the write: a retry sends these again)
        if not up.write(head, body):
            up.broke(now)  # (closed, so that nothing it reports later reaches this exchange)
            return
        self.t_up = now + self.lp.read_timeout
        self.track()

    def upstream_events(self, up: Upstream, now: float) -> None:
        x = self.x
        if x is None or x.up is not up:
            up.close()
            return
        # Later, never sooner: its deadline's heap entry stands (expired() sets the next).
        self.t_up = now + self.lp.read_timeout
        assert up.answer is not None
        events = up.answer.events
        while events:
            kind, a, b = events.popleft()
            if kind == _DATA:
                self.answer_data(x, a)
            elif kind == _HEAD:
                self.answer_head(x, a, b, now)
            else:
                self.answer_end(x, up, now)
                return
            if self.closed or x.up is not up:
                return

    def answer_head(
        self, x: Exchange, status: int, headers: list[tuple[bytes, bytes]], now: float
    ) -> None:
        x.got_answer = True
        key = x.key
        assert key is not None
        if status == 401 and x.ready is not None and "401" not in x.tried:
            x.held = (status, headers, bytearray())
            return
        if status == 429:
            self.lp.loop.to_trio(self.lp.proxy.mark_quota, key, headers)
            if (
                "429" not in x.tried
                and x.route.bucket is None
                and self.lp.loop.core.profile(self.state, key.provider) is not None
            ):
                x.held = (status, headers, bytearray())
                return
        self.answer(x, status, headers)

    def answer(self, x: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
        """Start relaying the answer: no retry from here on, so the kept body goes.

        The head is written here, framed as h11 frames a response: the
        upstream's ``Content-Length`` kept, else chunked for an HTTP/1.1
        client (close-delimited for 1.0); no body after 204 or 304;
        ``Connection: close`` when the connection ends after it. False when a
        header cannot be sent: the exchange has then ended (connection closed).
        """
        self.unkeep(x)
        x.body = b""  # (what is still being sent upstream holds its own view of it)
        x.status = status
        kept = []
        length = False
        for pair in headers:  # (names lower-cased by Answer)
            name = pair[0]
            if name not in HOP_BY_HOP:
                kept.append(pair)
                length = length or name == b"content-length"
        self.no_body = status in (204, 304)
        self.chunked = False
        if not self.no_body and not length:
            if self.http11:
                self.chunked = True
                kept.append((b"transfer-encoding", b"chunked"))
            else:
                self.keep = False  # (its end is the connection's)
        try:
            head = response_head(status, kept, self.keep)
        except ValueError:
            x.status = 502
            self.cut(x, f"{x.origin.host} sent a head that cannot be relayed", self.lp.loop.clock())
            return False
        self.write(head)
        self.answered = 1
        return True

    def answer_data(self, x: Exchange, data: bytes) -> None:
        if x.held is not None:
            body = x.held[2]
            assert body is not None  # (cut short only once its upstream is gone)
            if len(body) + len(data) <= MAX_HELD_ANSWER:
                body += data
                return
            if not self.answer(x, x.held[0], x.held[1]):  # too big to hold: it is the answer
                return
            data, x.held = bytes(body) + data, None
        if data and not self.no_body:
            x.sent += len(data)
            self.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def answer_end(self, x: Exchange, up: Upstream, now: float) -> None:
        self.lp.release(up, now)
        x.up = None
        self.t_up = math.inf
        if x.held is not None:
            self.retry(x, now)
            return
        self.end_answer()
        self.flush(now)  # the answer leaves before its audit line is written
        if self.x is x:  # (else the send found the client gone, which ended it)
            self.finish(x, now)

    def retry(self, x: Exchange, now: float) -> None:
        """A held 401 or 429: send again with a newer token or on the next bucket, or relay it."""
        assert x.held is not None
        assert x.key is not None
        session, proxy, key = self.session, self.lp.proxy, x.key
        if x.held[0] == 401:
            x.tried.add("401")
            assert x.ready is not None
            rejected = x.ready.fp
            self.wait(x, lambda: proxy.retry_ready(session, key, rejected), self.retried)
        else:
            x.tried.add("429")
            self.wait(x, lambda: proxy.next_ready(session, key), self.retried)

    def retried(self, ready: Ready | None, now: float) -> None:
        x = self.x
        assert x is not None
        assert x.held is not None
        if ready is None:  # nothing newer, no other bucket: the held answer is the answer
            status, headers, body = x.held
            x.held = None
            if body is None:  # (cut short: there is no whole answer to relay)
                message = relay_failure(x.origin.url, timed_out=False)
                self.refuse(x, HttpError(502, message), now)
                return
            if not self.answer(x, status, headers):
                return
            self.answer_data(x, bytes(body))
            self.end_answer()
            self.finish(x, now)
            return
        x.key = ready.key
        self.with_ready(ready, now)

    def upstream_broke(self, up: Upstream, now: float) -> None:
        x = self.x
        if x is None or self.closed or x.up is not up:
            return
        x.up = None
        self.t_up = math.inf
        if not x.got_answer:
            if up.reused and "stale" not in x.tried and (not up.wrote or _replayable(x.req)):
                # A pooled connection the upstream had closed: once more on a new
                # one (another pooled one may have been closed as well). Only if
                # nothing of it left, or it may be sent twice (as Go's client
                # decides): a POST the upstream may have read is not sent again.
                x.tried.add("stale")
                self.connect(x, x.headers, now, fresh=True)
                return
            message = relay_failure(x.origin.url, timed_out=False)
            self.refuse(x, HttpError(502, message), now)
            return
        if x.held is not None:
            self.held_cut(x, now)
            return
        self.cut(x, "the upstream broke off its answer", now)

    def held_cut(self, x: Exchange, now: float) -> None:
        """A held 401 or 429 whose body did not come whole: its retry goes on (as on
        the trio side, which retries on the head), and if there is none, a 502."""
        assert x.held is not None
        if x.up is not None:  # (silent past the read timeout: not reused)
            x.up.close()
            x.up = None
        self.t_up = math.inf
        x.held = (x.held[0], x.held[1], None)
        self.retry(x, now)

    def cut(self, x: Exchange, why: str, now: float) -> None:
        """The answer cannot end cleanly: the client's connection closes without its end."""
        log.warning("api_upstream_broke_off", error=why)
        if x.status == 0 and x.held is not None:
            x.status = x.held[0]
        self.finish(x, now, close=True)

    # -- what waits on the trio side -----------------------------------------------

    def wait(
        self,
        x: Exchange,
        make: Callable[[], Awaitable[Any]],
        then: Callable[[Any, float], None],
    ) -> None:
        """Run ``make()`` on the trio side; go on with ``then(result, now)`` in the loop.

        An :class:`HttpError` (or a bug) ends the request with its answer.
        """
        lp = self.lp
        lp.defer(
            self.session,
            make,
            lambda value: lp.guarded(self, lambda: self.resumed(x, then, value)),
        )

    def resumed(self, x: Exchange, then: Callable[[Any, float], None], value: object) -> None:
        if self.closed or self.x is not x:
            if isinstance(value, tuple) and value and isinstance(value[0], socket.socket):
                value[0].close()  # a connection opened for a request that is gone
            return
        now = self.lp.loop.clock()
        if isinstance(value, HttpError):
            self.refuse(x, value, now)
            return
        then(value, now)

    # -- ending --------------------------------------------------------------------------

    def end_answer(self) -> None:
        if self.chunked:
            self.write(b"0\r\n\r\n")
        self.answered = 2

    def refuse(self, x: Exchange, exc: HttpError, now: float) -> None:
        """Answer *x* with an error of the proxy's own (its body was read, or it closes)."""
        x.status = exc.status
        if self.answered == 0:
            close = exc.status in (403, 407) or not self.keep
            whole = x.pace is None
            headers, body = error_answer(whole, exc.status, str(exc), exc.headers, close=close)
            if any(n == b"connection" for n, _ in headers):
                self.keep = False
                headers = [(n, v) for n, v in headers if n != b"connection"]
            with contextlib.suppress(ValueError):
                self.write(response_head(exc.status, headers, self.keep) + body)
                self.answered = 2
        self.finish(x, now)

    def finish(self, x: Exchange, now: float, *, close: bool = False) -> None:
        """The exchange has ended: its audit line, and on to the next request (or close)."""
        if self.x is not x:
            return  # (ended already: one audit line, one leave of the ledger)
        if x.up is not None:
            x.up.close()  # (not whole: never reused)
            x.up = None
        self.unkeep(x)
        self.x = None
        self.t_up = self.t_body = math.inf
        self.audit(x, now)
        x.body = b""  # (freed before the heap is trimmed, not after)
        if self.lp.proxy.ledger.leave(self.state.id):
            give_back_memory()
        if close or not self.keep or self.answered != 2 or x.pace is not None:
            self.close_after_flush()
            return
        # The next request starts with what is left in the buffer.
        if self.early > MAX_EARLY:
            self.early = 0
            self.interest()
        self.early = 0
        self.step(now)

    def unkeep(self, x: Exchange) -> None:
        if x.kept:
            self.lp.proxy.ledger.unkeep(x.kept)
            x.kept = 0

    def audit(self, x: Exchange, now: float) -> None:
        key = x.key
        logs.info_line(  # (one per request: structlog's chain was a fifth of the relay's CPU)
            "api_request",
            {
                "session": self.state.id,
                "provider": None if key is None else key.provider,
                "bucket": None if key is None else key.bucket,
                "method": x.method,
                "path": "/" + x.route.rest,
                "status": x.status,
                "bytes": x.sent,
                "ms": round((now - x.started) * 1000, 1),
            },
        )
        self.lp.proxy.ledger.moved(x.sent + x.body_size)

    def gone(self, now: float) -> None:
        """The client went away (or broke its connection)."""
        x = self.x
        if x is not None:
            x.status = CLIENT_GONE_STATUS
            self.finish(x, now, close=True)
        self.close()

    def handed(self, admitted: bool, now: float) -> Handed:
        assert self.preamble is not None
        return Handed(self.preamble, self.rate, now, admitted)

    def hand_over(self, initial: bytes, handed: Handed | None, now: float) -> None:
        """Give the connection, with the bytes of its request, to the trio side."""
        x = self.x
        if x is not None:
            self.x = None
            self.unkeep(x)
        if self.out and handed is not None:
            # Earlier answers not yet sent: what the socket takes now, the rest
            # is sent by the trio side before anything else.
            with contextlib.suppress(OSError):
                del self.out[: self.sock.send(self.out)]
            handed = dataclasses.replace(handed, unsent=bytes(self.out))
        self.detach()
        self.lp.loop.to_trio(self.lp.start_http, self.session, self.sock, initial, handed)

    # -- writing, deadlines, closing -----------------------------------------------------

    def write(self, data: bytes | None) -> None:
        """Queue *data* for the client: sent once the event being handled is done.

        (One system call for a whole small answer, head, body and end.)
        """
        if not data or self.closed:
            return
        if not self.out:
            self.lp.dirty.append(self)
        self.out += data
        if len(self.out) > HIGH_WATER:
            self.hold_back()

    def hold_back(self) -> None:
        """Backpressure: the upstream is not read while the client has this much to take."""
        x = self.x
        up = None if x is None else x.up
        if up is not None and not up.paused:
            up.paused = True  # resumed by flush() once the client has taken it all
            up.interest()
            self.t_up = math.inf  # (not read, so not timed: the send deadline is the client's)

    def flush(self, now: float) -> None:
        """Send what waits for the client; wait for room (``EPOLLOUT``) if it is full."""
        if self.closed or not self.out:
            return
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.gone(now)
            return
        if sent < len(self.out):
            del self.out[:sent]
            if sent or self.t_send == math.inf:
                self.t_send = now + SEND_TIMEOUT
            if len(self.out) > HIGH_WATER:
                self.hold_back()
            self.interest()
            self.track()
            return
        self.out = bytearray()  # (not the big one's capacity, kept for an idle connection)
        self.t_send = math.inf
        if self.close_when_flushed:
            self.close()
            return
        if self.deferred:
            self.deferred = False
            self.interest()
            self.step(now)  # (what it writes is sent by flush_dirty)
            return
        x = self.x
        if x is not None and x.up is not None and x.up.paused:
            x.up.paused = False
            x.up.interest()
            self.t_up = now + self.lp.read_timeout
            self.track()
        if self.mask & _OUT:
            self.interest()

    def interest(self) -> None:
        """Read unless the client has ended or sent too much ahead; write while bytes wait."""
        reading = not (
            self.eof or self.close_when_flushed or self.deferred or self.early > MAX_EARLY
        )
        mask = (_IN if reading else 0) | (_OUT if self.out and self.t_send != math.inf else 0)
        if mask != self.mask:
            self.mask = mask
            self.lp.epoll.modify(self.fd, mask)

    def deadline(self) -> float:
        return min(self.t_idle, self.t_head, self.t_body, self.t_up, self.t_send)

    def track(self) -> None:
        at = self.deadline()
        if at < self.heap_at:
            self.heap_at = at
            self.lp.schedule(at, self)

    def expired(self, now: float) -> None:
        self.heap_at = math.inf
        x = self.x
        if now >= self.t_send:
            self.gone(now)  # it takes nothing of its answer
        elif x is not None and now >= self.t_body:
            cfg = self.lp.proxy.cfg.proxy
            message = (
                f"the request body arrived too slowly (at least {cfg.body_min_rate:g} "
                f"bytes/s after {cfg.body_timeout:g} s)"
            )
            self.refuse(x, HttpError(408, message), now)
        elif x is not None and now >= self.t_up:
            if x.held is not None:
                self.held_cut(x, now)
            elif x.got_answer:
                self.cut(x, f"{x.origin.host} sent nothing for the read timeout", now)
            else:
                message = relay_failure(x.origin.url, timed_out=True)
                self.refuse(x, HttpError(502, message), now)
        elif x is None and (now >= self.t_head or now >= self.t_idle):
            self.close_after_flush()  # idle, or a request head that does not come
        if not self.closed:
            self.track()

    def close_after_flush(self) -> None:
        if self.out:
            self.close_when_flushed = True
            self.interest()
        else:
            self.close()

    def detach(self) -> None:
        """Out of the loop's sight (the socket itself stays open).

        Its buffers go now: a stale deadline of the heap may hold it a while.
        """
        self.closed = True
        self.buf, self.out, self.pre = bytearray(), bytearray(), bytearray()
        self.lp.handlers.pop(self.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.lp.epoll.unregister(self.fd)

    def close(self) -> None:
        if self.closed:
            return
        x = self.x
        if x is not None:  # (the session closed, or the daemon stops)
            self.x = None
            if x.up is not None:
                x.up.close()
            self.unkeep(x)
            if x.status == 0:
                x.status = CLIENT_GONE_STATUS
            self.audit(x, self.lp.loop.clock())
            if self.lp.proxy.ledger.leave(self.state.id):
                give_back_memory()
        self.detach()
        self.sock.close()
        loop = self.lp.loop
        loop.to_trio(loop.trio_side.connection_closed, self.session, None)


class LoopProxy:
    """The relay's connections, upstream pool and deadlines (in the serving loop's thread).

    Args:
        loop: the serving loop it runs in.
        proxy: the trio side's proxy: configuration, counters, what waits.
        start_http: hands a connection to the trio side (in the trio thread).
    """

    def __init__(
        self,
        loop: ServingLoop[Session],
        proxy: ApiProxy,
        start_http: Callable[[Session, socket.socket, bytes, Handed | None], None],
    ) -> None:
        self.loop = loop
        self.proxy = proxy
        self.start_http = start_http
        self.epoll = loop.epoll
        self.read_timeout = proxy.client.read_timeout  # (the daemon's one client: fixed)
        self.handlers: dict[int, HttpConn | Upstream] = {}
        # Upstream reads land here, then (TLS) their plaintext: one of each for the loop.
        self.inbuf, self.tlsbuf = bytearray(RECV_SIZE), bytearray(RECV_SIZE)
        self.inview, self.tlsview = memoryview(self.inbuf), memoryview(self.tlsbuf)
        self.pool: dict[tuple[str, str, int], list[Upstream]] = {}
        self._origins: dict[str, Origin] = {}
        self._fields: dict[tuple[Key, str], dict[str, str]] = {}
        self.heap: list[tuple[float, int, HttpConn]] = []  # deadlines (lazy deletion)
        self._seq = itertools.count()
        self.dirty: list[HttpConn] = []  # connections with bytes to send once this step ends
        self._uses_token: dict[str, tuple[object, bool]] = {}
        self._filled: dict[tuple[str, Key, str], tuple[object, dict[str, str]]] = {}

    # -- called by the serving loop --------------------------------------------------

    def adopt(
        self, session: Session, state: SessionState, sock: socket.socket, data: bytes, now: float
    ) -> None:
        """Serve *sock*, an HTTP connection whose first bytes are *data*."""
        c: HttpConn = HttpConn(self, session, state, sock, now)
        self.handlers[c.fd] = c
        self.epoll.register(c.fd, _IN)
        self.guarded(c, lambda: c.received(data, now))

    def event(self, fd: int, mask: int, now: float) -> None:
        handler = self.handlers.get(fd)
        if handler is None:
            return
        try:
            handler.event(mask, now)
        except Exception:
            self.crashed(handler if isinstance(handler, HttpConn) else handler.owner)
        if self.dirty:
            self.flush_dirty(now)

    def expire(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now:
            at, _, c = heapq.heappop(heap)
            if c.closed or at != c.heap_at:
                continue  # stale: the connection has an earlier entry, or is gone
            self.guarded(c, lambda c=c: c.expired(now))  # type: ignore[misc]

    def close_session(self, sid: str) -> None:
        for c in [h for h in self.handlers.values() if isinstance(h, HttpConn)]:
            if c.state.id == sid:
                c.close()

    def shutdown(self) -> None:
        for handler in list(self.handlers.values()):
            handler.close()
        self.pool.clear()

    # -- for the connections -----------------------------------------------------------

    def guarded(self, c: HttpConn | None, step: Callable[[], None]) -> None:
        """Run one connection's step; a bug ends that connection, never the loop."""
        try:
            step()
        except Exception:
            self.crashed(c)
        if self.dirty:
            self.flush_dirty(self.loop.clock())

    def flush_dirty(self, now: float) -> None:
        while self.dirty:  # (a flush may start a held-back request, which writes)
            dirty, self.dirty = self.dirty, []
            for c in dirty:
                try:
                    c.flush(now)
                except Exception:
                    self.crashed(c)

    def crashed(self, c: HttpConn | None) -> None:
        """A bug (called in an ``except``): logged; that connection ends, never the loop.

        Its request gets a 500 if the answer has not begun.
        """
        log.exception("api_connection_crashed", session=None if c is None else c.state.id)
        if c is None:
            return
        x = c.x
        if x is not None:
            x.status = 500
            if c.answered == 0:
                with contextlib.suppress(Exception):
                    now = self.loop.clock()
                    c.refuse(x, HttpError(500, "internal error; see the daemon log"), now)
                    c.flush(now)
        c.close()

    def schedule(self, at: float, c: HttpConn) -> None:
        heap = self.heap
        heapq.heappush(heap, (at, next(self._seq), c))
        if len(heap) > 2 * len(self.handlers) + 1024:
            # Entries replaced by earlier ones, of connections still open: dropped
            # now, not when their instant comes (a body's deadline each request).
            self.heap = [e for e in heap if not e[2].closed and e[0] == e[2].heap_at]
            heapq.heapify(self.heap)

    def plan(self, c: HttpConn, req: Req, method: str, now: float) -> Exchange | None:
        """The request as the loop would relay it, or None: the trio side's (module docstring)."""
        proxy = self.proxy
        cfg = proxy.cfg.proxy
        headers = req.headers
        if method == "HEAD":
            return None  # (its answer's framing is h11's business on the trio side)
        if req.target.translate(None, _TARGET_CHARS):
            return None  # (a fragment, or bytes a URL quotes: httpx on the trio side writes it)
        length = 0
        close = False
        for name, value in headers:  # (names lower-cased by read_head)
            if name in (b"transfer-encoding", b"expect", b"upgrade"):
                return None
            if name == b"content-length":
                length = int(value)
                if length > cfg.retry_body_limit:
                    return None
            elif name == b"connection" and b"close" in value.lower():
                # (a token of the list, as h11 reads it: not "x-close")
                close = close or b"close" in [t.strip() for t in value.lower().split(b",")]
        state = c.state
        core = self.loop.core
        try:
            route = route_request(
                core.providers, state.grants, cfg.max_header_bytes, method, req.target, headers
            )
        except (HttpError, NotServed):
            return None
        if (
            route.bucket is None
            and core.profile(state, route.provider) is None
            and not allowed(state.grants, Key(route.provider, DEFAULT_BUCKET))
        ):
            return None
        origin = self._origins.get(route.base_url)
        if origin is None:
            try:
                origin = Origin(route.base_url)
            except ValueError:
                return None
            self._origins[route.base_url] = origin
        if origin.proxied:
            return None
        preamble = c.preamble
        assert preamble is not None
        if preamble.forward_port is not None and httprules.forward_refusal(
            headers, preamble.forward_port
        ):
            return None
        if state.capability is not None and not httprules.capability_ok(
            preamble.capability or httprules.presented_capability(headers), state.capability
        ):
            return None
        x = Exchange(req, method, route, origin, now)
        x.kept = length
        x.close = close or req.http_version != b"1.1"
        return x

    def fields(self, ready: Ready) -> dict[str, str]:
        """What the header templates may name of *ready*'s token."""
        memo = (ready.key, ready.fp)
        got = self._fields.get(memo)
        if got is None:
            if len(self._fields) >= MAX_FIELDS_MEMO:
                self._fields.clear()
            got = self._fields[memo] = token_fields(msgspec.json.decode(ready.served))
        return got

    def uses_token(self, provider: str, api: object) -> bool:
        """``api.uses_token()``, worked out once per configuration of *provider*."""
        got = self._uses_token.get(provider)
        if got is None or got[0] is not api:
            got = self._uses_token[provider] = (api, api.uses_token())  # type: ignore[attr-defined]
        return got[1]

    def filled(
        self, sid: str, key: Key, ready: Ready | None, api: Any, grants: Any
    ) -> dict[str, str]:
        """The session's headers for *key*, filled from *ready* (remembered per token).

        Headers that name an API key are filled anew each time (the key is read
        from the store, as ``get_api_key`` reads it).

        Raises:
            HttpError: as :func:`fill_headers`.
        """
        if ready is None or any("{key:" in t for t in api.headers.values()):
            fields = {} if ready is None else self.fields(ready)
            return fill_headers(api.headers, fields, key, grants, self.read_key)
        memo = (sid, key, ready.fp)
        got = self._filled.get(memo)
        if got is None or got[0] is not api:
            if len(self._filled) >= MAX_FIELDS_MEMO:
                self._filled.clear()
            filled = fill_headers(api.headers, self.fields(ready), key, grants, self.read_key)
            got = self._filled[memo] = (api, filled)
        return got[1]

    def read_key(self, name: str) -> str | None:
        return self.proxy.ops.store.read_key(name)

    def pooled(self, origin: Origin, now: float) -> Upstream | None:
        idle = self.pool.get(origin.key)
        while idle:
            up = idle.pop()
            if up.closed:
                continue
            if now - up.idle_since > POOL_IDLE:
                up.close()
                continue
            up.reused = True
            return up
        return None

    def release(self, up: Upstream, now: float) -> None:
        """*up* has answered whole: back to the pool if it can carry another request."""
        up.owner = None
        if up.paused:
            up.paused = False
            up.interest()
        answer, up.answer = up.answer, None
        # (An answer that came before the whole request was sent: not pooled.)
        sent = not up.out and not up.pending and not up.unwritable
        whole = answer is not None and answer.done and answer.keep and not answer.extra
        if not up.closed and whole and sent:
            idle = self.pool.setdefault(up.origin.key, [])
            while idle and (idle[0].closed or now - idle[0].idle_since > POOL_IDLE):
                idle.pop(0).close()  # (the oldest first: past their time, or closed)
            if len(idle) < POOL_PER_ORIGIN:
                up.idle_since = now
                idle.append(up)
                return
        up.close()

    def defer(
        self, session: Session, make: Callable[[], Awaitable[Any]], done: Callable[[object], None]
    ) -> None:
        """Run ``make()`` in the session's nursery; ``done(result)`` back in the loop."""
        post = self.loop.post

        async def run() -> None:
            try:
                value: object = await make()
            except HttpError as exc:
                value = exc
            except Exception as exc:  # (a bug, or an error no request should see whole)
                if not isinstance(exc, CredproxyError):
                    log.exception("api_request_failed", session=session.id)
                value = HttpError(500, "internal error; see the daemon log")
            post(done, value)

        def start() -> None:
            if not session.open or session.nursery is None:
                post(done, HttpError(503, "the session is closing"))
                return
            session.nursery.start_soon(run)

        self.loop.to_trio(start)
