"""The serving loop of every sandbox connection: one epoll set, answers in batches.

Theory of operation
-------------------

A cached ``get_token`` is most of what a daemon does, and it needs no waiting:
the answer is bytes the daemon already has. So one loop owns an epoll set over
every sandbox connection and answers such requests inline, in fair batches per
wake-up (one read per ready connection, at most :data:`BATCH` requests each,
the rest on the next pass), without a trip through trio's scheduler per
request. Everything that may wait (a refresh, the ``refresh_token`` op) is
handed to the trio side, and its answer comes back to this loop, which writes
it: each connection has exactly one writer.

The loop runs in one of two ways, chosen by measuring (``docs/design.md``):

* in its own thread (``credproxy serve``): it blocks in ``epoll_wait`` with
  the GIL released, and answers at the cost of the system calls and the
  decoding. Hand-offs to trio go through ``TrioToken.run_sync_soon``.
* as one trio task that waits on the epoll file descriptor (the in-process
  tests): the same code, on trio's clock, so ``autojump_clock`` drives every
  deadline.

Per connection the sans-IO :class:`~credproxy.core.connection.Connection`
keeps the protocol state, the rate limit and the body and idle deadlines; this
module adds the send deadline (a reply that cannot be written within
:data:`SEND_TIMEOUT` closes the connection) and backpressure (while a reply is
pending, the connection is not read). Deadlines sit in a heap with lazy
deletion: a connection has an entry only for the earliest instant it may
expire, re-pushed when that instant passes and the connection is still alive.

What the trio side publishes, and when this loop may use it, is decided by
:class:`~credproxy.shell.handlers.SandboxOps`: a session's ``ready`` table
maps a key to the reply bytes and the wall-clock instant after which they
must not be served. Closing a session sets ``session.open = False`` before
anything else; this loop checks it before every reply.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import math
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

import trio

from credproxy.core.config import Limits
from credproxy.core.connection import NEED_DATA, Connection, Request, Send
from credproxy.core.throttle import AUDIT_INTERVAL, ServeAudit
from credproxy.errors import CredproxyError, ProtocolError
from credproxy.shell import logs
from credproxy.shell.faults import NO_FAULTS, Faults
from credproxy.shell.handlers import Defer, Outcome, Ready, SandboxOps

log = logs.get("credproxy.fastpath")

RECV_SIZE = 65_536
BATCH = 64  # requests answered per connection per wake-up before the others get their turn
SEND_TIMEOUT = 10.0  # seconds a reply may wait for a peer that does not read
GET_OPS = frozenset({"get_token", "get_token_profile"})  # deferred serves that share waits
MAX_SHARED = 256  # get_token requests of one key that may wait together on one connection
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


class SandboxConnection:
    """One sandbox connection as the loop sees it."""

    __slots__ = (
        "close_when_flushed",
        "closed",
        "engine",
        "eof",
        "fresh",
        "heap_at",
        "mask",
        "out",
        "paused",
        "send_deadline",
        "session",
        "slow_scopes",
        "sock",
        "waiting",
    )

    def __init__(self, sock: socket.socket, session: Any, engine: Connection) -> None:
        self.sock = sock
        self.session = session
        self.engine = engine
        self.out = bytearray()
        self.send_deadline = math.inf
        self.heap_at = math.inf
        self.closed = False
        self.close_when_flushed = False
        self.eof = False  # the peer shut down its side; answer what is in flight, then close
        self.fresh = True  # nothing read yet: the first byte tells frames from HTTP
        self.paused = False  # MAX_SHARED get_token wait on one answer: parse no more until it comes
        self.mask = _IN  # what the epoll set waits for on this connection
        self.waiting: dict[Any, list[str]] = {}  # key -> get_token ids waiting on one answer
        self.slow_scopes: set[trio.CancelScope] = set()  # touched by the trio side only

    def deadline(self) -> float:
        return min(self.engine.deadline(), self.send_deadline)


class FastPath:
    """The loop over all sandbox connections (see the module docstring).

    Args:
        ops: what the requests mean (fast answers and the slow hand-off).
        limits: per-connection limits.
        to_trio: runs a callable in the trio thread soon (``run_sync_soon``, or
            a direct call when the loop is itself a trio task).
        clock: monotonic seconds for connection deadlines.
    """

    def __init__(
        self,
        ops: SandboxOps,
        limits: Limits,
        *,
        to_trio: Callable[..., None],
        clock: Callable[[], float],
        http: Callable[[Any, socket.socket, bytes], None] | None = None,
        on_crash: Callable[[str], None] | None = None,
        fault: Faults = NO_FAULTS,
    ) -> None:
        self.ops = ops
        self.fault = fault
        self.http = http
        self.on_crash = on_crash
        self.limits = limits
        self.to_trio = to_trio
        self.clock = clock
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _IN)
        self._commands: collections.deque[tuple[Any, ...]] = collections.deque()
        self._conns: dict[int, SandboxConnection] = {}
        self._heap: list[tuple[float, int, SandboxConnection]] = []
        self._audits: list[tuple[float, int, Any, Any]] = []  # (due, seq, session, key)
        self._seq = itertools.count()
        self._backlog: list[SandboxConnection] = []
        self._stopped = False
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        # What the trio side asks of the loop (see add, deliver, revoke).
        self._handlers: dict[str, Callable[..., None]] = {
            "add": self._add,
            "deliver": self._deliver,
            "revoke": self._revoke,
        }

    # -- called from the trio side (thread-safe) -----------------------------

    def add(self, sock: socket.socket, session: Any) -> None:
        """Serve *sock* (an accepted, authorised connection of *session*) from now on."""
        sock.setblocking(False)
        self._command("add", sock, session)

    def deliver(
        self, conn: SandboxConnection, op: str, key: Any, rid: str, outcome: Outcome
    ) -> None:
        """The answer to a request handed to the trio side."""
        self._command("deliver", conn, op, key, rid, outcome)

    def revoke(self, session: Any) -> None:
        """Close every connection of *session* (whose ``open`` is already False)."""
        self._command("revoke", session)

    def _command(self, *command: Any) -> None:
        with self._lock:  # against _shutdown: a command is either run or refused, never lost
            if not self._closed:
                self._commands.append(command)
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._wake_fd, 1)
                return
        self._refused(command)

    def _refused(self, command: tuple[Any, ...]) -> None:
        """A command that came after the loop stopped: a connection handed over is closed."""
        if command[0] == "add":
            sock, session = command[1], command[2]
            sock.close()
            with contextlib.suppress(RuntimeError):  # trio.RunFinishedError: trio is gone too
                self.to_trio(self.ops.connection_closed, session, None)

    # -- running -------------------------------------------------------------

    def start_thread(self) -> None:
        """Run the loop in its own thread until :meth:`stop`."""
        self._thread = threading.Thread(
            target=self._run_thread, name="credproxy-fastpath", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and close every connection (waits for the thread)."""
        self._stopped = True
        if not self._closed:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run_thread(self) -> None:
        try:
            while not self._stopped:
                timeout = self._timeout()
                events = self._epoll.poll(-1 if timeout is None else timeout)
                self._turn(events)
        except Exception as exc:  # a bug: say so, and stop the daemon rather than half-serve
            log.exception("fastpath_crashed")
            if self.on_crash is not None:
                # Nothing is served from here on: the daemon exits non-zero
                # (systemd restarts it) instead of accepting connections that
                # no loop would answer.
                self.to_trio(self.on_crash, f"the serving loop crashed ({type(exc).__name__})")
        finally:
            self._shutdown()

    async def run_in_trio(self) -> None:
        """Run the loop as this trio task until cancelled (or :meth:`stop`)."""
        try:
            while not self._stopped:
                timeout = self._timeout()
                if timeout is None or timeout > 0:
                    deadline = math.inf if timeout is None else trio.current_time() + timeout
                    with trio.move_on_at(deadline):
                        await trio.lowlevel.wait_readable(self._epoll.fileno())
                else:
                    await trio.lowlevel.checkpoint()
                self._turn(self._epoll.poll(0))
        finally:
            self._shutdown()

    def _timeout(self) -> float | None:
        """Seconds the loop may sleep: 0 with a backlog, else until the next deadline."""
        if self._backlog or self._commands:
            return 0.0
        due = min(
            self._heap[0][0] if self._heap else math.inf,
            self._audits[0][0] if self._audits else math.inf,
        )
        if due == math.inf:
            return None
        return max(0.0, due - self.clock())

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
            left, self._commands = list(self._commands), collections.deque()
        for command in left:
            self._refused(command)
        for conn in list(self._conns.values()):
            self._close(conn, "daemon stopping")
        self._flush_audits(None, math.inf)
        self._epoll.close()
        os.close(self._wake_fd)

    # -- one turn of the loop ------------------------------------------------

    def _turn(self, events: list[tuple[int, int]]) -> None:
        self.fault("fastpath-turn")
        now = self.clock()
        conns = self._conns
        if self._backlog:
            backlog, self._backlog = self._backlog, []
            for conn in backlog:
                if not conn.closed:
                    self._guarded(self._process, conn, now)
        for fd, mask in events:
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                continue
            ready = conns.get(fd)
            if ready is None:
                continue
            if mask & _OUT:
                self._guarded(self._flush, ready, now)
            elif mask & (_IN | select.EPOLLHUP | select.EPOLLERR):
                self._guarded(self._read, ready, now)
        while self._commands:
            command = self._commands.popleft()
            try:
                self._run_command(command, now)
            except Exception:  # a bug: logged; the loop and every other connection go on
                log.exception("fastpath_command_failed", command=command[0])
        if self._audits and self._audits[0][0] <= now:
            self._flush_audits(None, now)
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, conn = heapq.heappop(heap)
            if conn.closed or at != conn.heap_at:
                continue  # a stale entry: the connection has an earlier one, or is gone
            conn.heap_at = math.inf
            if now >= conn.send_deadline:
                self._close(conn, "peer does not read its replies")
                continue
            reason = conn.engine.expired(now)
            if reason is not None:
                self._close(conn, reason)
            else:
                self._track(conn)

    def _guarded(
        self, step: Callable[[SandboxConnection, float], None], conn: SandboxConnection, now: float
    ) -> None:
        """Run one connection's step; a bug closes that connection, never the loop."""
        try:
            step(conn, now)
        except Exception:
            log.exception("connection_crashed", conn=conn.session.id)
            self._close(conn, "internal error")

    def _run_command(self, command: tuple[Any, ...], now: float) -> None:
        self._handlers[command[0]](*command[1:], now=now)

    def _add(self, sock: socket.socket, session: Any, *, now: float) -> None:
        if not session.open:
            sock.close()
            self.to_trio(self.ops.connection_closed, session, None)
            return
        engine = Connection(self.limits, now, capability=session.capability)
        conn = SandboxConnection(sock, session, engine)
        self._conns[sock.fileno()] = conn
        self._epoll.register(sock.fileno(), _IN)
        self._track(conn)

    def _deliver(
        self, conn: SandboxConnection, op: str, key: Any, rid: str, outcome: Outcome, *, now: float
    ) -> None:
        if conn.closed:
            return
        if not conn.session.open:
            self._close(conn, "session closed")
            return
        rids = conn.waiting.pop(key, [rid]) if op in GET_OPS else [rid]
        if conn.paused and op in GET_OPS:
            conn.paused = False
            if conn.engine.buffered:
                self._backlog.append(conn)
        self._write(conn, b"".join(self._reply(conn, r, outcome, now) for r in rids), now)
        if conn.eof and not conn.out and conn.engine.in_flight == 0:
            self._close(conn, "closed by peer")

    def _revoke(self, session: Any, *, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.session is session]:
            self._close(conn, "session closed")
        self._flush_audits(session, now)

    # -- reading and answering ---------------------------------------------------

    def _read(self, conn: SandboxConnection, now: float) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close(conn, f"socket error: {type(exc).__name__}")
            return
        if not data:
            if conn.engine.in_flight == 0 and not conn.out:
                self._close(conn, "closed by peer")
                return
            # A half-close (`nc -N`, a script's `shutdown(SHUT_WR)`): answer
            # what is in flight, then close. Nothing more is read.
            conn.eof = True
            self._interest(conn)
            return
        if conn.fresh:
            conn.fresh = False
            # A frame header starts with 0x00 (frames are at most 64 KiB); an
            # HTTP request line with a letter: that connection is the API proxy's.
            if self.http is not None and data[:1].isalpha():
                self._hand_over(conn, data)
                return
        conn.engine.receive_data(data)
        self._process(conn, now)

    def _process(self, conn: SandboxConnection, now: float) -> None:
        """Answer up to :data:`BATCH` buffered requests of *conn*."""
        engine = conn.engine
        out: list[bytes] = []
        close_after = False
        try:
            for _ in range(BATCH):
                if conn.paused:
                    break  # resumed when the answer they wait on is delivered
                event = engine.next_event(now)
                if event is NEED_DATA:
                    break
                if isinstance(event, Request):
                    out.append(self._request(conn, event, now))
                    continue
                assert isinstance(event, Send)
                out.append(event.data)
                if event.close:
                    close_after = True
                    break
            else:
                if engine.buffered:
                    self._backlog.append(conn)  # more may be buffered: next turn
        except ProtocolError as exc:
            self._write(conn, b"".join(out), now)
            self._close(conn, f"protocol error: {exc}")
            return
        engine.after_read(now)
        self._write(conn, b"".join(out), now, close_after=close_after)

    def _request(self, conn: SandboxConnection, req: Request, now: float) -> bytes:
        session = conn.session
        if not session.open:
            return b""  # revoked: the connection is about to close
        try:
            answer = self.ops.fast(session, req)
        except CredproxyError as exc:
            return self._fail(conn, req.id, req.op, exc, now)
        except Exception:
            log.exception("request_failed", session=session.id, op=req.op)
            return conn.engine.fail(req.id, CredproxyError("bug"), now)
        if isinstance(answer, Ready | Defer) and req.op == "get_token":
            waiting = conn.waiting.get(answer.key)
            if waiting is not None:
                # An earlier get_token of this key is still being answered:
                # wait with it, so replies leave in the order requests came
                # (even if the token is ready by now). The first MAX_SHARED
                # cost no in-flight slot; later ones count as usual.
                conn.engine.share(req.id)
                waiting.append(req.id)
                if len(waiting) >= MAX_SHARED:
                    conn.paused = True  # flow control: parse nothing more until they are answered
                return b""
        if isinstance(answer, Ready):
            return self._serve(conn, req.id, answer, now)
        if isinstance(answer, Defer):
            if answer.op in GET_OPS:
                conn.waiting[answer.key] = [req.id]
            self.to_trio(self.ops.defer, self, conn, req.id, answer)
            return b""
        return conn.engine.answer(req.id, answer, now)

    def _reply(self, conn: SandboxConnection, rid: str, outcome: Outcome, now: float) -> bytes:
        if isinstance(outcome, Ready):
            return self._serve(conn, rid, outcome, now)
        if isinstance(outcome, bytes):
            return conn.engine.answer(rid, outcome, now)
        return self._fail(conn, rid, "deferred", outcome, now)

    def _serve(self, conn: SandboxConnection, rid: str, ready: Ready, now: float) -> bytes:
        session = conn.session
        wall = self.ops.wall()
        self.ops.count_serve(session, ready, wall)
        key = ready.key
        audit = session.audit.get(key)
        if audit is None or audit.is_new(ready.fp):
            if audit is not None:
                self._log_count(session, key, audit, wall)
            session.audit[key] = ServeAudit(ready.fp, ready.expiry)
            self._log_served(session, key, ready.fp, ready.expiry, wall, 1)
        elif audit.count():
            heapq.heappush(self._audits, (now + AUDIT_INTERVAL, next(self._seq), session, key))
        return conn.engine.answer(rid, ready.served, now)

    def _log_served(
        self, session: Any, key: Any, fp: str, expiry: float | None, wall: float, count: int
    ) -> None:
        """The audit line of *count* serves of one token (docs/design.md sections 1.3, 2.7)."""
        log.info(
            "token_served",
            session=session.id,
            provider=key.provider,
            bucket=key.bucket,
            fp=fp,
            expires_in=None if expiry is None else int(expiry - wall),
            count=count,
        )

    def _log_count(self, session: Any, key: Any, audit: ServeAudit, wall: float) -> None:
        count = audit.take()
        if count:
            self._log_served(session, key, audit.fp, audit.expiry, wall, count)

    def _flush_audits(self, session: Any | None, now: float) -> None:
        """Log the counted serves that are due (all of *session*'s, or all, when given)."""
        wall = self.ops.wall()
        if session is not None:
            for key, audit in session.audit.items():
                self._log_count(session, key, audit, wall)
            return
        heap = self._audits
        while heap and heap[0][0] <= now:
            _, _, due_session, key = heapq.heappop(heap)
            audit = due_session.audit.get(key)
            if audit is not None:
                self._log_count(due_session, key, audit, wall)

    def _fail(
        self, conn: SandboxConnection, rid: str, op: str, exc: CredproxyError, now: float
    ) -> bytes:
        if exc.code == "INTERNAL_ERROR":
            # Store and other host-side errors: the details (paths, causes) go
            # to the daemon log; the sandbox learns only that it failed.
            log.error("request_failed", session=conn.session.id, op=op, error=str(exc))
        return conn.engine.fail(rid, exc, now)

    # -- writing -----------------------------------------------------------------

    def _write(
        self, conn: SandboxConnection, data: bytes, now: float, *, close_after: bool = False
    ) -> None:
        if conn.closed:
            return
        if conn.out:
            conn.out += data
        elif data:
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._close(conn, f"socket error: {type(exc).__name__}")
                return
            if sent < len(data):
                conn.out += data[sent:]
                conn.send_deadline = now + SEND_TIMEOUT
        if close_after:
            if conn.out:
                conn.close_when_flushed = True
            else:
                self._close(conn, "handshake refused")
                return
        self._interest(conn)
        self._track(conn)

    def _interest(self, conn: SandboxConnection) -> None:
        """Wait for what *conn* needs: room to write pending replies, else requests.

        Backpressure: while replies are pending, or the connection is paused
        or half-closed, nothing more is read.
        """
        if conn.out:
            mask = _OUT
        elif conn.eof or conn.paused:
            mask = 0
        else:
            mask = _IN
        if mask != conn.mask:
            conn.mask = mask
            self._epoll.modify(conn.sock.fileno(), mask)

    def _flush(self, conn: SandboxConnection, now: float) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close(conn, f"socket error: {type(exc).__name__}")
            return
        del conn.out[:sent]
        if conn.out:
            return
        conn.send_deadline = math.inf
        if conn.close_when_flushed:
            self._close(conn, "handshake refused")
            return
        if conn.eof and conn.engine.in_flight == 0:
            self._close(conn, "closed by peer")
            return
        self._interest(conn)
        if conn.engine.buffered and not conn.paused:
            self._backlog.append(conn)
        self._track(conn)

    # -- deadlines and closing -------------------------------------------------

    def _track(self, conn: SandboxConnection) -> None:
        at = conn.deadline()
        if at < conn.heap_at:
            conn.heap_at = at
            heapq.heappush(self._heap, (at, next(self._seq), conn))

    def _hand_over(self, conn: SandboxConnection, data: bytes) -> None:
        """Give an HTTP connection, with what was read of it, to the trio side."""
        conn.closed = True  # for the loop it is gone; the socket lives on over there
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        assert self.http is not None
        self.to_trio(self.http, conn.session, conn.sock, data)

    def _close(self, conn: SandboxConnection, reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        conn.sock.close()
        log.debug("connection_closed", conn=conn.session.id, reason=reason)
        self.to_trio(self.ops.connection_closed, conn.session, conn)
