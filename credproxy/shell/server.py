"""Unix-socket listeners and the per-connection loop (trio shell).

The protocol logic lives in :mod:`credproxy.core.protocol`; this module moves bytes
between a socket and a :class:`~credproxy.core.protocol.ServerConnection`, enforces
the timing limits (body deadline, idle timeout, request rate), and isolates
failures: whatever one client sends, only its own connection is closed.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket as stdsocket
import stat
import struct
from pathlib import Path
from typing import Protocol

import trio

from credproxy.core.config import Limits
from credproxy.core.protocol import (
    BODY_DEADLINE,
    NEED_DATA,
    Request,
    Send,
    ServerConnection,
    TokenBucket,
    handshake_error,
)
from credproxy.errors import CredproxyError, ProtocolError
from credproxy.shell import logs

log = logs.get("credproxy.shell.server")
_PEERCRED = struct.Struct("3i")
RECV_SIZE = 65_536
SEND_TIMEOUT = 10.0  # seconds a reply may wait for a peer that does not read
# What a peer that hangs up, resets, or stops reading makes our socket calls raise.
_PEER_GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


class AlreadyRunning(CredproxyError):
    """Another daemon answers on the socket path."""


def make_private_dir(path: Path) -> None:
    """Create *path* 0700 (parents too) and refuse one that is not ours or is open.

    Raises:
        CredproxyError: the directory belongs to someone else or is a symlink.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CredproxyError(f"{path} is not a directory; remove it and retry")
    if st.st_uid != os.getuid():
        raise CredproxyError(f"{path} belongs to uid {st.st_uid}; refusing to put sockets there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


async def bind_unix(path: Path, backlog: int = 1024) -> trio.socket.SocketType:
    """Bind and listen on *path*, reclaiming a stale socket file safely.

    The socket is born 0600: it is bound under umask 177 (no chmod window),
    synchronously, so no other task runs while the process umask is changed.
    If the path is taken, it is reclaimed only when it is a socket and a
    probe-connect is refused (its daemon is gone); a live listener raises
    :class:`AlreadyRunning` and anything that is not a socket is left alone.
    """
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        try:
            _bind_private(sock, path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise CredproxyError(f"cannot bind {path}: {exc.strerror}") from None
            await _reclaim(path)
            _bind_private(sock, path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


def _bind_private(sock: stdsocket.socket, path: Path) -> None:
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)


async def _reclaim(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise CredproxyError(f"{path} exists and is not a socket; remove it and retry")
    probe = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    with probe:
        try:
            with trio.fail_after(2):
                await probe.connect(str(path))
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: the daemon that bound it is gone
            return
        except (OSError, trio.TooSlowError):
            pass
    raise AlreadyRunning(f"another credproxy daemon is listening on {path}")


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, as the kernel reports it (SO_PEERCRED)."""
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


async def _send_all_raw(raw: stdsocket.socket, data: bytes) -> None:
    """Write all of *data* to a non-blocking stdlib socket, waiting while it is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[raw.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(raw)


class _closing:
    """Close a stdlib socket trio may have registered (notify_closing first)."""

    def __init__(self, raw: stdsocket.socket) -> None:
        self.raw = raw

    def __enter__(self) -> stdsocket.socket:
        return self.raw

    def __exit__(self, *exc: object) -> None:
        trio.lowlevel.notify_closing(self.raw)
        self.raw.close()


async def refuse(sock: trio.socket.SocketType, code: str, message: str) -> None:
    """Tell a refused peer why (one handshake-shaped error frame), then close."""
    with sock, trio.move_on_after(1), contextlib.suppress(OSError):
        await send_all(sock, handshake_error(code, message))


class Handler(Protocol):
    """What a listener serves: the control socket or one sandbox session."""

    capability: bytes | None

    def fast(self, conn: ServerConnection, req: Request) -> bytes | None:
        """Answer without waiting (the cached ``get_token``), or None to go slow."""

    async def slow(self, conn: ServerConnection, req: Request) -> bytes:
        """Answer a request that may wait (a refresh, a store write)."""


async def serve_connection(
    sock: trio.socket.SocketType,
    handler: Handler,
    limits: Limits,
    label: str,
) -> None:
    """Run one connection until the peer closes it, breaks the protocol or idles out.

    Deadlines: a frame body must follow its header within 5 s; with nothing
    in flight, the connection closes after ``limits.idle_timeout`` without a
    request; a reply that cannot be written within :data:`SEND_TIMEOUT` (a
    peer that does not read) closes the connection.

    Never raises for anything the peer does; internal errors in a request
    become ``INTERNAL_ERROR`` replies (without exception text).
    """
    conn = ServerConnection(capability=handler.capability, max_in_flight=limits.max_in_flight)
    now = trio.current_time()
    bucket = TokenBucket(limits.requests_per_second, limits.request_burst, now)
    send_lock = trio.StrictFIFOLock()
    idle_deadline = now + limits.idle_timeout
    body_deadline = math.inf
    recv_scope: trio.CancelScope | None = None
    reason = "closed by peer"

    def recv_deadline() -> float:
        return body_deadline if conn.in_flight else min(body_deadline, idle_deadline)

    # The hot path talks to the stdlib socket directly (trio.lowlevel waits):
    # one scheduler pass per request instead of three.
    raw = stdsocket.socket(fileno=sock.detach())

    async def send(data: bytes) -> None:
        # Fast path: no other task is mid-reply and the kernel takes the whole
        # reply at once: no lock, no timeout scope, no trip through the scheduler.
        if not send_lock.locked():
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        async with send_lock:
            with trio.fail_after(SEND_TIMEOUT):
                await _send_all_raw(raw, data)

    async def answer_slow(req: Request) -> None:
        nonlocal idle_deadline
        try:
            out = await handler.slow(conn, req)
        except Exception:  # a bug: never let it take the connection down silently
            log.exception("request_failed", conn=label, op=req.op)
            out = conn.reply_error(req.id, "INTERNAL_ERROR", "internal error; see the daemon log")
        try:
            await send(out)
        except _PEER_GONE:
            nursery.cancel_scope.cancel()  # the peer is gone or does not read: close
            return
        if conn.in_flight == 0:
            # The idle clock starts again now that nothing is in flight.
            idle_deadline = trio.current_time() + limits.idle_timeout
            if recv_scope is not None:
                recv_scope.deadline = recv_deadline()

    with _closing(raw):
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    waited = timed_out = False
                    while True:
                        try:
                            data = raw.recv(RECV_SIZE)
                            break
                        except BlockingIOError:
                            pass
                        with trio.CancelScope(deadline=recv_deadline()) as scope:
                            recv_scope = scope
                            await trio.lowlevel.wait_readable(raw)
                        recv_scope = None
                        if scope.cancelled_caught:
                            timed_out = True
                            break
                        waited = True
                    if not timed_out and not waited:
                        # Data was already buffered: yield once per read so
                        # one busy peer cannot starve the others.
                        await trio.lowlevel.checkpoint()
                    if timed_out:
                        if conn.awaiting_body:
                            reason = "frame body did not arrive within 5 s"
                            break
                        if conn.in_flight == 0:
                            reason = "idle timeout"
                            break
                        continue
                    if not data:
                        break
                    conn.receive_data(data)
                    while True:
                        ev = conn.next_event()
                        if ev is NEED_DATA:
                            break
                        now = trio.current_time()
                        idle_deadline = now + limits.idle_timeout
                        body_deadline = math.inf  # a frame completed
                        if isinstance(ev, Send):
                            await send(ev.data)
                            if ev.close:
                                reason = "handshake refused"
                                return
                            continue
                        assert isinstance(ev, Request)
                        wait = bucket.take(now)
                        if wait:
                            await send(
                                conn.reply_error(
                                    ev.id,
                                    "RATE_LIMITED",
                                    "too many requests on this connection; slow down",
                                    retry_after=max(1, math.ceil(wait)),
                                )
                            )
                            continue
                        try:
                            out = handler.fast(conn, ev)
                        except Exception:
                            log.exception("request_failed", conn=label, op=ev.op)
                            out = conn.reply_error(
                                ev.id, "INTERNAL_ERROR", "internal error; see the daemon log"
                            )
                        if out is not None:
                            await send(out)
                        else:
                            nursery.start_soon(answer_slow, ev)
                    if conn.awaiting_body and body_deadline == math.inf:
                        body_deadline = trio.current_time() + BODY_DEADLINE
            except ProtocolError as exc:
                reason = f"protocol error: {exc}"
            except _PEER_GONE as exc:
                # Caught here, inside the nursery: escaping it, the error
                # would arrive wrapped in an ExceptionGroup.
                reason = f"socket error: {type(exc).__name__}"
            finally:
                nursery.cancel_scope.cancel()
    log.debug("connection_closed", conn=label, reason=reason)
