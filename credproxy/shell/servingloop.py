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

What a request gets is decided by the serving core
(:class:`~credproxy.core.servecore.ServingCore`), which this loop owns: no
other thread reads or writes it. The trio side changes it only through
commands (:meth:`ServingLoop.command`), applied at the start of the next turn, in
the order they were sent, before anything more is read; it asks about it
through :meth:`ServingLoop.ask`, which runs a function in this loop and hands the
result back. The only things the two threads share are the command queue and
its lock.

Every connection's replies leave in the order its requests came. A request
the trio side must finish holds a place (:class:`Slot`) in the connection's
``pending`` queue; replies that are ready behind it wait there too, and leave
when everything before them has. ``get_token`` requests of the same key wait
on one answer (:class:`Pending`): twenty of them cost one refresh, and one
in-flight slot. While :data:`MAX_PENDING` replies wait, the connection is not
read.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import trio

from credproxy.core.config import Limits
from credproxy.core.connection import NEED_DATA, Connection, Request, Send
from credproxy.core.names import Key
from credproxy.core.servecore import (
    CloseSession,
    Command,
    Defer,
    Outcome,
    Read,
    Ready,
    ServingCore,
    SessionState,
)
from credproxy.core.throttle import AUDIT_INTERVAL, ServeAudit
from credproxy.errors import CredproxyError, ProtocolError
from credproxy.shell import logs
from credproxy.shell.faults import NO_FAULTS, Faults

log = logs.get("credproxy.servingloop")

RECV_SIZE = 65_536
BATCH = 64  # requests answered per connection per wake-up before the others get their turn
_BATCH = range(BATCH)
SEND_TIMEOUT = 10.0  # seconds a reply may wait for a peer that does not read
MAX_EVENTS = 256  # readiness events taken per wait (the rest: at the next, at once)
MAX_PENDING = 256  # replies that may wait for an earlier one on a connection before it is paused
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READABLE = _IN | select.EPOLLHUP | select.EPOLLERR  # (a hang-up or an error: read to learn it)
_T = TypeVar("_T")


class Owner(Protocol):
    """The trio side's session object: the loop keeps it only to hand it back."""

    @property
    def id(self) -> str: ...


S = TypeVar("S", bound=Owner)


class Slot:
    """A reply's place in its connection's order: its bytes once known."""

    __slots__ = ("data", "rid")

    def __init__(self, rid: str, data: bytes | None) -> None:
        self.rid = rid
        self.data = data


class Pending:
    """One answer the trio side is finding, and the requests waiting on it."""

    __slots__ = ("key", "slots")

    def __init__(self, key: Key, slot: Slot) -> None:
        self.key = key  # the key of the requests that share it (get_token), else NO_KEY
        self.slots = [slot]


class SandboxConnection(Generic[S]):
    """One sandbox connection as the loop sees it."""

    __slots__ = (
        "backlogged",
        "close_when_flushed",
        "closed",
        "engine",
        "eof",
        "finishing",
        "fresh",
        "heap_at",
        "mask",
        "out",
        "paused",
        "pending",
        "send_deadline",
        "session",
        "sock",
        "state",
        "waiting",
    )

    def __init__(
        self, sock: socket.socket, session: S, state: SessionState, engine: Connection
    ) -> None:
        self.sock = sock
        self.session = session  # the trio side's, handed back with deferred requests
        self.state = state  # the serving core's
        self.engine = engine
        self.out = bytearray()
        self.send_deadline = math.inf
        self.heap_at = math.inf
        self.closed = False
        self.close_when_flushed = False
        self.backlogged = False  # in the loop's backlog (once, however often it is put there)
        self.eof = False  # the peer shut down its side; answer what it sent, then close
        self.fresh = True  # nothing read yet: the first byte tells frames from HTTP
        self.paused = False  # MAX_PENDING replies wait: parse no more until they leave
        self.mask = _IN  # what the epoll set waits for on this connection
        self.pending: collections.deque[Slot] = collections.deque()  # replies in request order
        self.waiting: dict[Key, Pending] = {}  # get_token key -> the answer its requests share
        self.finishing: set[trio.CancelScope] = set()  # touched by the trio side only

    def deadline(self) -> float:
        at = self.engine.deadline()
        return at if at < self.send_deadline else self.send_deadline


class TrioSide(Protocol[S]):
    """What the loop hands to the trio side (``handlers.SandboxOps``)."""

    def defer(
        self,
        loop: ServingLoop[S],
        conn: SandboxConnection[S],
        pending: Pending,
        deferred: Defer,
    ) -> None: ...

    def connection_closed(self, session: S, conn: SandboxConnection[S] | None) -> None: ...

    def read(self, state: SessionState, read: Read) -> bytes: ...


S_contra = TypeVar("S_contra", bound=Owner, contravariant=True)


class Relay(Protocol[S_contra]):
    """The API proxy's relay, run by the loop (``shell/loopproxy.py``'s ``LoopProxy``)."""

    def adopt(
        self, session: S_contra, state: SessionState, sock: socket.socket, data: bytes, now: float
    ) -> None: ...

    def event(self, fd: int, mask: int, now: float) -> None: ...

    @property
    def heap(self) -> Sequence[tuple[float, int, object]]:
        """Its deadlines, earliest first (the loop wakes for the first)."""
        ...

    def expire(self, now: float) -> None: ...

    def close_session(self, sid: str) -> None: ...

    def shutdown(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Add(Generic[S]):
    sock: socket.socket
    session: S


@dataclass(frozen=True, slots=True)
class _Deliver(Generic[S]):
    conn: SandboxConnection[S]
    pending: Pending
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[..., None]
    args: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class _Ask:
    question: Callable[[ServingCore], object]
    reply: Callable[[object | BaseException], None]


class LoopStopped(CredproxyError):
    """The serving loop is not running (the daemon is stopping)."""


class ServingLoop(Generic[S]):
    """The loop over all sandbox connections (see the module docstring).

    Args:
        core: the serving core this loop owns from now on.
        trio_side: the trio side's part of requests that may wait.
        limits: per-connection limits.
        to_trio: runs a callable in the trio thread soon (``run_sync_soon``, or
            a direct call when the loop is itself a trio task).
        clock: monotonic seconds for connection deadlines.
        wall: epoch seconds (quota holds, serve counts).
        boot: the boot clock (how long a published token may be served).
        on_crash: told why, in the trio thread, if the loop itself crashes.
        fault: the crash tests' checkpoints.
    """

    def __init__(
        self,
        core: ServingCore,
        trio_side: TrioSide[S],
        limits: Limits,
        *,
        to_trio: Callable[..., None],
        clock: Callable[[], float],
        wall: Callable[[], float],
        boot: Callable[[], float],
        on_crash: Callable[[str], None] | None = None,
        fault: Faults = NO_FAULTS,
    ) -> None:
        self.core = core
        self.trio_side = trio_side
        self.on_crash = on_crash
        self.fault = fault
        self.limits = limits
        self.to_trio = to_trio
        self.clock = clock
        self.wall = wall
        self.boot = boot
        self._epoll = select.epoll()
        self.epoll = self._epoll  # (shared with the relay, which runs in this thread)
        #: The API proxy's relay in this loop (:class:`Relay`).
        self.relay: Relay[S] | None = None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _IN)
        self._commands: collections.deque[Command | _Add[S] | _Deliver[S] | _Ask | _Call] = (
            collections.deque()
        )
        self._conns: dict[int, SandboxConnection[S]] = {}
        self._heap: list[tuple[float, int, SandboxConnection[S]]] = []
        self._audits: list[tuple[float, int, SessionState, Key]] = []  # (due, seq, state, key)
        self._seq = itertools.count()
        self._backlog: list[SandboxConnection[S]] = []
        self._stopped = False
        self._closed = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- called from the trio side (thread-safe) -----------------------------

    def add(self, sock: socket.socket, session: S) -> None:
        """Serve *sock* (an accepted, authorised connection of *session*) from now on."""
        sock.setblocking(False)
        self._send(_Add(sock, session))

    def command(self, command: Command) -> None:
        """Change the serving core (applied at the start of the loop's next turn)."""
        self._send(command)

    def deliver(self, conn: SandboxConnection[S], pending: Pending, outcome: Outcome) -> None:
        """The answer to a request handed to the trio side."""
        self._send(_Deliver(conn, pending, outcome))

    def post(self, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` in the loop at the start of its next turn (from any thread)."""
        self._send(_Call(fn, args))

    async def ask(self, question: Callable[[ServingCore], _T]) -> _T:
        """``question(core)``, run by the loop after every command sent before it.

        Raises:
            LoopStopped: the loop is not running.
        """
        done = trio.Event()
        answer: list[object | BaseException] = []

        def reply(value: object | BaseException) -> None:
            answer.append(value)
            done.set()

        self._send(_Ask(question, reply))
        await done.wait()
        value = answer[0]
        if isinstance(value, BaseException):
            raise value
        return value  # type: ignore[return-value]  # what question returned

    def _send(self, command: Command | _Add[S] | _Deliver[S] | _Ask | _Call) -> None:
        with self._lock:  # against _shutdown: a command is either run or refused, never lost
            if not self._closed:
                self._commands.append(command)
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._wake_fd, 1)
                return
        self._refused(command)

    def _refused(self, command: Command | _Add[S] | _Deliver[S] | _Ask | _Call) -> None:
        """A command that came after the loop stopped: a connection handed over is closed."""
        with contextlib.suppress(RuntimeError):  # trio.RunFinishedError: trio is gone too
            if isinstance(command, _Add):
                command.sock.close()
                self.to_trio(self.trio_side.connection_closed, command.session, None)
            elif isinstance(command, _Ask):
                self.to_trio(command.reply, LoopStopped("the daemon is stopping"))

    # -- running -------------------------------------------------------------

    def start_thread(self) -> None:
        """Run the loop in its own thread until :meth:`stop`."""
        self._thread = threading.Thread(
            target=self._run_thread, name="credproxy-serving-loop", daemon=True
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
            poll = self._epoll.poll
            timeout = self._timeout(self.clock())
            while not self._stopped:
                timeout = self._turn(poll(-1 if timeout is None else timeout, MAX_EVENTS))
        except Exception as exc:  # a bug: say so, and stop the daemon rather than half-serve
            log.exception("serving_loop_crashed")
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
            timeout = self._timeout(self.clock())
            while not self._stopped:
                if timeout is None or timeout > 0:
                    deadline = math.inf if timeout is None else trio.current_time() + timeout
                    with trio.move_on_at(deadline):
                        await trio.lowlevel.wait_readable(self._epoll.fileno())
                else:
                    await trio.lowlevel.checkpoint()
                timeout = self._turn(self._epoll.poll(0, MAX_EVENTS))
        finally:
            self._shutdown()

    def _timeout(self, now: float) -> float | None:
        """Seconds the loop may sleep from *now*: 0 with a backlog, else until the next deadline."""
        if self._backlog or self._commands:
            return 0.0
        due = self._heap[0][0] if self._heap else math.inf
        if self._audits and self._audits[0][0] < due:
            due = self._audits[0][0]
        relay = self.relay
        if relay is not None and relay.heap and relay.heap[0][0] < due:
            due = relay.heap[0][0]
        if due == math.inf:
            return None
        due -= now
        return due if due > 0.0 else 0.0

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
            left, self._commands = list(self._commands), collections.deque()
        for command in left:
            self._refused(command)
        for conn in list(self._conns.values()):
            self._close(conn, "daemon stopping")
        if self.relay is not None:
            self.relay.shutdown()
        self._flush_audits(None, math.inf)
        self._epoll.close()
        os.close(self._wake_fd)

    # -- one turn of the loop ------------------------------------------------

    def _turn(self, events: list[tuple[int, int]]) -> float | None:
        """Answer *events*, then the commands, backlog and deadlines; returns :meth:`_timeout`."""
        now = self.clock()
        # Commands first: what the trio side changed holds for everything read from now on.
        while self._commands:
            command = self._commands.popleft()
            try:
                self._run_command(command, now)
            except Exception:  # a bug: logged; the loop and every other connection go on
                log.exception("serving_loop_command_failed", command=type(command).__name__)
        conns = self._conns
        if self._backlog:
            backlog, self._backlog = self._backlog, []
            for conn in backlog:
                conn.backlogged = False
                if not conn.closed:
                    self._guarded(self._process, conn, now)
        for fd, mask in events:
            if fd == self._wake_fd:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wake_fd)
                continue
            ready = conns.get(fd)
            if ready is None:
                if self.relay is not None:
                    self.relay.event(fd, mask, now)
                continue
            if self.fault is not NO_FAULTS:  # (the crash tests: a bug of the loop itself)
                self.fault("serving-loop-turn")
            try:  # (_guarded, inlined: this is every request's path)
                if mask & _OUT:
                    self._flush(ready, now)
                elif mask & _READABLE:
                    if ready.eof:  # (a hang-up after its end of input: nobody reads replies)
                        self._close(ready, "closed by peer")
                    else:
                        self._read(ready, now)
            except Exception:
                log.exception("connection_crashed", conn=ready.state.id)
                self._close(ready, "internal error")
        if self._audits and self._audits[0][0] <= now:
            self._flush_audits(None, now)
        relay = self.relay
        if relay is not None and relay.heap and relay.heap[0][0] <= now:
            relay.expire(now)
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
        # The wait from the turn's start: a deadline of this turn is late by
        # no more than the turn took, and a command sent meanwhile wakes it.
        return self._timeout(now)

    def _guarded(
        self,
        step: Callable[[SandboxConnection[S], float], None],
        conn: SandboxConnection[S],
        now: float,
    ) -> None:
        """Run one connection's step; a bug closes that connection, never the loop."""
        try:
            step(conn, now)
        except Exception:
            log.exception("connection_crashed", conn=conn.state.id)
            self._close(conn, "internal error")

    def _run_command(
        self, command: Command | _Add[S] | _Deliver[S] | _Ask | _Call, now: float
    ) -> None:
        if isinstance(command, _Call):
            command.fn(*command.args)
        elif isinstance(command, _Deliver):
            self._deliver(command.conn, command.pending, command.outcome, now)
        elif isinstance(command, _Add):
            self._add(command.sock, command.session, now)
        elif isinstance(command, _Ask):
            try:
                value: object | BaseException = command.question(self.core)
            except Exception as exc:  # the answer is the error, raised in the asking task
                value = exc
            self.to_trio(command.reply, value)
        else:
            self.core.apply(command)
            if isinstance(command, CloseSession):
                self._close_session(command.session, now)

    def _add(self, sock: socket.socket, session: S, now: float) -> None:
        state = self.core.sessions.get(session.id)
        if state is None or not state.open:
            sock.close()
            self.to_trio(self.trio_side.connection_closed, session, None)
            return
        engine = Connection(self.limits, now, capability=state.capability)
        conn = SandboxConnection(sock, session, state, engine)
        self._conns[sock.fileno()] = conn
        self._epoll.register(sock.fileno(), _IN)
        self._track(conn)

    def _deliver(
        self, conn: SandboxConnection[S], pending: Pending, outcome: Outcome, now: float
    ) -> None:
        if conn.closed:
            return
        if not conn.state.open:
            self._close(conn, "session closed")
            return
        if conn.waiting.get(pending.key) is pending:
            del conn.waiting[pending.key]
        for slot in pending.slots:
            slot.data = self._reply(conn, slot.rid, outcome, now)
        out: list[bytes] = []
        queue = conn.pending
        while queue and (data := queue[0].data) is not None:
            queue.popleft()
            out.append(data)
        if conn.paused and len(queue) < MAX_PENDING:
            conn.paused = False
            if conn.engine.buffered:
                self._to_backlog(conn)
        self._write(conn, b"".join(out), now)
        self._close_if_done(conn)

    def _close_session(self, sid: str, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.state.id == sid]:
            self._close(conn, "session closed")
            self._flush_audits(conn.state, now)
        if self.relay is not None:
            self.relay.close_session(sid)

    # -- reading and answering ---------------------------------------------------

    def _read(self, conn: SandboxConnection[S], now: float) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close(conn, f"socket error: {type(exc).__name__}")
            return
        if not data:
            # A half-close (`nc -N`, a script's `shutdown(SHUT_WR)`): answer
            # what is in flight and every whole request still buffered, then
            # close. Nothing more is read.
            conn.eof = True
            if conn.engine.has_frame and not conn.paused:
                self._to_backlog(conn)
            self._interest(conn)
            self._close_if_done(conn)
            return
        if conn.fresh:
            conn.fresh = False
            # A frame header starts with 0x00 (frames are at most 64 KiB); an
            # HTTP request line with a letter: that connection is the API proxy's.
            if data[:1].isalpha() and self.relay is not None:
                self._detach(conn)
                self.relay.adopt(conn.session, conn.state, conn.sock, data, now)
                return
        if conn.pending:  # replies wait for earlier ones: in order, the usual way
            conn.engine.receive_data(data)
            self._process(conn, now)
            return
        # The usual read: one whole request (see Connection.take), answered
        # without the batch loop of _process.
        try:
            event = conn.engine.take(data, now)
        except ProtocolError as exc:
            self._close(conn, f"protocol error: {exc}")
            return
        if event is None:
            self._process(conn, now)
        elif type(event) is Request:
            out = self._request(conn, event, now, self.wall(), self.boot())
            self._write(conn, out or b"", now, track=False)
        else:
            assert isinstance(event, Send)
            self._write(conn, event.data, now, close_after=event.close, track=False)

    def _process(self, conn: SandboxConnection[S], now: float) -> None:
        """Answer up to :data:`BATCH` buffered requests of *conn*."""
        engine = conn.engine
        next_event = engine.next_event
        out: list[bytes] = []
        close_after = False
        wall = self.wall()
        boot = self.boot()
        try:
            for _ in _BATCH:
                if conn.paused:
                    break  # resumed when the replies before them have left
                event = next_event(now)
                if type(event) is Request:
                    data = self._request(conn, event, now, wall, boot)
                elif event is NEED_DATA:
                    break
                else:
                    assert isinstance(event, Send)
                    data = event.data
                    close_after = event.close
                if data is not None:
                    if conn.pending:  # behind a reply not yet known: it waits its turn
                        conn.pending.append(Slot("", data))
                        conn.paused = len(conn.pending) >= MAX_PENDING
                    else:
                        out.append(data)
                if close_after:
                    break  # the handshake was refused: what waits is dropped with it
            else:
                if engine.buffered:
                    self._to_backlog(conn)  # more may be buffered: next turn
        except ProtocolError as exc:
            self._write(conn, b"".join(out), now)
            self._close(conn, f"protocol error: {exc}")
            return
        # Answering requests only moves the connection's deadline later (the
        # idle clock restarts; a request in flight has none), and the heap
        # keeps an entry for the earlier one, which re-tracks when it comes:
        # only an armed body deadline (or a reply left to send) needs a new entry.
        armed = engine.after_read(now)
        self._write(conn, b"".join(out), now, close_after=close_after, track=armed)
        if conn.eof:
            self._close_if_done(conn)

    def _request(
        self, conn: SandboxConnection[S], req: Request, now: float, wall: float, boot: float
    ) -> bytes | None:
        """The reply to *req*, or None when it waits (its place is in ``conn.pending``)."""
        state = conn.state
        if not state.open:
            return b""  # revoked: the connection is about to close
        try:
            core = self.core
            answer: Ready | Defer | Read | bytes
            if req.op == "get_token":  # (what core.request does first, inline: the hot path)
                answer = core.get_token(state, req.payload, wall, boot)
            else:
                answer = core.request(state, req.op, req.payload, wall, boot)
            if isinstance(answer, Ready):  # the hot path: a cached token
                return self._serve(conn, req.id, answer, now, wall)
            if isinstance(answer, Read):
                answer = self.trio_side.read(state, answer)
        except CredproxyError as exc:
            return self._fail(conn, req.id, req.op, exc, now)
        except Exception:
            log.exception("request_failed", session=state.id, op=req.op)
            return conn.engine.fail(req.id, CredproxyError("bug"), now)
        if isinstance(answer, Defer) and req.op == "get_token" and conn.waiting:
            # The key the request names (a profile's is Key(provider, "")):
            # an earlier get_token of it is still being answered. Wait with
            # it, at no in-flight slot's cost.
            shared = conn.waiting.get(answer.key)
            if shared is not None:
                conn.engine.share(req.id)
                slot = Slot(req.id, None)
                shared.slots.append(slot)
                conn.pending.append(slot)
                conn.paused = len(conn.pending) >= MAX_PENDING
                return None
        if isinstance(answer, Defer):
            slot = Slot(req.id, None)
            pending = Pending(answer.key, slot)
            if req.op == "get_token":
                conn.waiting[answer.key] = pending
            conn.pending.append(slot)
            conn.paused = len(conn.pending) >= MAX_PENDING
            self.to_trio(self.trio_side.defer, self, conn, pending, answer)
            return None
        return conn.engine.answer(req.id, answer, now)

    def _reply(self, conn: SandboxConnection[S], rid: str, outcome: Outcome, now: float) -> bytes:
        if isinstance(outcome, Ready):
            return self._serve(conn, rid, outcome, now, self.wall())
        if isinstance(outcome, bytes):
            return conn.engine.answer(rid, outcome, now)
        return self._fail(conn, rid, "deferred", outcome, now)

    def _serve(
        self, conn: SandboxConnection[S], rid: str, ready: Ready, now: float, wall: float
    ) -> bytes:
        state = conn.state
        key = ready.key
        serves = state.serves.get(key)
        if serves is None:
            state.serves[key] = ServeAudit(ready.fp, ready.expiry, wall)
            self._log_served(state, key, ready.fp, ready.expiry, wall, 1)
        elif serves.is_new(ready.fp):
            self._log_count(state, key, serves, wall)
            serves.renew(ready.fp, ready.expiry, wall)
            self._log_served(state, key, ready.fp, ready.expiry, wall, 1)
        elif serves.count(wall):
            heapq.heappush(self._audits, (now + AUDIT_INTERVAL, next(self._seq), state, key))
        return conn.engine.answer(rid, ready.served, now)

    def _log_served(
        self, state: SessionState, key: Key, fp: str, expiry: float | None, wall: float, count: int
    ) -> None:
        """The audit line of *count* serves of one token (docs/design.md sections 1.3, 2.7)."""
        log.info(
            "token_served",
            session=state.id,
            provider=key.provider,
            bucket=key.bucket,
            fp=fp,
            expires_in=None if expiry is None else int(expiry - wall),
            count=count,
        )

    def _log_count(self, state: SessionState, key: Key, audit: ServeAudit, wall: float) -> None:
        count = audit.take()
        if count:
            self._log_served(state, key, audit.fp, audit.expiry, wall, count)

    def _flush_audits(self, state: SessionState | None, now: float) -> None:
        """Log the counted serves that are due (all of *state*'s, or all, when given)."""
        wall = self.wall()
        if state is not None:
            for key, counted in state.serves.items():
                self._log_count(state, key, counted, wall)
            return
        heap = self._audits
        while heap and heap[0][0] <= now:
            _, _, due_state, key = heapq.heappop(heap)
            audit = due_state.serves.get(key)
            if audit is not None:
                self._log_count(due_state, key, audit, wall)

    def _fail(
        self, conn: SandboxConnection[S], rid: str, op: str, exc: CredproxyError, now: float
    ) -> bytes:
        if exc.code == "INTERNAL_ERROR":
            # Store and other host-side errors: the details (paths, causes) go
            # to the daemon log; the sandbox learns only that it failed.
            log.error("request_failed", session=conn.state.id, op=op, error=str(exc))
        return conn.engine.fail(rid, exc, now)

    # -- writing -----------------------------------------------------------------

    def _write(
        self,
        conn: SandboxConnection[S],
        data: bytes,
        now: float,
        *,
        close_after: bool = False,
        track: bool = True,
    ) -> None:
        """Send *data* now, or what of it the socket takes and the rest when it can.

        ``track=False``: the connection's deadline has not moved earlier (see
        :meth:`_process`); a send deadline armed here is tracked all the same.
        """
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
                track = True
        if close_after:
            if conn.out:
                conn.close_when_flushed = True
            else:
                self._close(conn, "handshake refused")
                return
        if conn.out or conn.eof or conn.paused or conn.mask != _IN:
            self._interest(conn)  # (else it reads, as it did: no change to the epoll set)
        if track:
            self._track(conn)

    def _interest(self, conn: SandboxConnection[S]) -> None:
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
            # A frame's body is not timed while the loop does not read it.
            if conn.mask == _IN:
                conn.engine.hold_body()
            elif mask == _IN and conn.engine.after_read(self.clock()):
                self._track(conn)  # (a body still on its way: a whole deadline again)
            conn.mask = mask
            self._epoll.modify(conn.sock.fileno(), mask)

    def _flush(self, conn: SandboxConnection[S], now: float) -> None:
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
        if self._close_if_done(conn):
            return
        self._interest(conn)
        if conn.engine.buffered and not conn.paused:
            self._to_backlog(conn)
        self._track(conn)

    def _to_backlog(self, conn: SandboxConnection[S]) -> None:
        """Serve more of *conn*'s buffered requests next turn (it is in the backlog once)."""
        if not conn.backlogged:
            conn.backlogged = True
            self._backlog.append(conn)

    def _close_if_done(self, conn: SandboxConnection[S]) -> bool:
        """After the peer's end of input: close once every request it sent is answered."""
        if (
            conn.eof
            and not conn.closed
            and not conn.out
            and not conn.pending
            and conn.engine.in_flight == 0
            and not conn.engine.has_frame  # (a frame cut short by the end: dropped)
        ):
            self._close(conn, "closed by peer")
        return conn.closed

    # -- deadlines and closing -------------------------------------------------

    def _track(self, conn: SandboxConnection[S]) -> None:
        at = conn.deadline()
        if at < conn.heap_at:
            conn.heap_at = at
            heapq.heappush(self._heap, (at, next(self._seq), conn))

    def _detach(self, conn: SandboxConnection[S]) -> None:
        """The connection is no frame connection any more (its socket lives on)."""
        conn.closed = True
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def _close(self, conn: SandboxConnection[S], reason: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        fd = conn.sock.fileno()
        self._conns.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        conn.sock.close()
        log.debug("connection_closed", conn=conn.state.id, reason=reason)
        self.to_trio(self.trio_side.connection_closed, conn.session, conn)
