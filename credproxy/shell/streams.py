"""A connection served over a trio stream: the control socket's loop (trio shell).

The control socket carries a handful of requests per ``credproxy`` command
(open a session, close it, status), and some of them wait (opening a session
binds a socket). So its connections are served the plain trio way: one task
per connection over a :class:`trio.abc.Stream`, with the limits and the
encoding of the sans-IO :class:`~credproxy.core.connection.Connection`. Being
a stream, it runs as well over ``trio.testing.memory_stream_pair`` under
``autojump_clock`` as over a Unix socket.

Operations come from an op table: a plain function returns data, a coroutine
function is awaited in a task of its own, so a slow request never holds up
the ones behind it. Either raises :class:`~credproxy.errors.CredproxyError`
to answer an error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import trio

from credproxy.core.config import Limits
from credproxy.core.connection import NEED_DATA, Connection, Request, Send
from credproxy.errors import CredproxyError, ProtocolError, UsageError
from credproxy.shell import logs

log = logs.get("credproxy.streams")
_encoder = msgspec.json.Encoder()

RECV_SIZE = 65_536
SEND_TIMEOUT = 10.0  # seconds a reply may wait for a peer that does not read
DRAIN_TIMEOUT = 30.0  # seconds requests in flight may take after the peer shut down its side
# What a peer that hangs up, resets, or stops reading makes our stream calls raise.
_PEER_GONE = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)

Ops = Mapping[str, Callable[[dict[str, Any]], Any]]


async def serve_stream(
    stream: trio.abc.Stream,
    ops: Ops,
    limits: Limits,
    label: str,
    *,
    capability: bytes | None = None,
) -> str:
    """Serve one connection until the peer closes it, breaks the protocol or idles out.

    Never raises for anything the peer does; a bug in an operation becomes an
    ``INTERNAL_ERROR`` reply (without its text). Returns why the connection
    ended; the stream is closed.
    """
    conn = Connection(limits, trio.current_time(), capability=capability)
    send_lock = trio.StrictFIFOLock()
    recv_scope = trio.CancelScope()
    answered = trio.Event()  # set whenever the last request in flight is answered

    async def send(data: bytes) -> None:
        async with send_lock:
            with trio.fail_after(SEND_TIMEOUT):
                await stream.send_all(data)

    async def answer_slow(req: Request, op: Callable[[dict[str, Any]], Any]) -> None:
        out = await _call(conn, req, op, label)
        try:
            await send(out)
        except _PEER_GONE:
            nursery.cancel_scope.cancel()  # the peer is gone or does not read: close
            return
        recv_scope.deadline = conn.deadline()  # the idle clock may have started again
        if conn.in_flight == 0:
            answered.set()

    reason = "closed by peer"
    async with stream, trio.open_nursery() as nursery:
        try:
            while True:
                data = None
                with trio.CancelScope(deadline=conn.deadline()) as recv_scope:
                    data = await stream.receive_some(RECV_SIZE)
                now = trio.current_time()
                if data is None:
                    why = conn.expired(now)
                    if why is not None:
                        reason = why
                        break
                    continue
                if not data:
                    # The peer shut down its side (or closed): answer what is
                    # still in flight before closing, in bounded time.
                    with trio.move_on_after(DRAIN_TIMEOUT):
                        while conn.in_flight:
                            answered = trio.Event()
                            await answered.wait()
                    break
                conn.receive_data(bytes(data))
                while True:
                    event = conn.next_event(now)
                    if event is NEED_DATA:
                        break
                    if isinstance(event, Send):
                        await send(event.data)
                        if event.close:
                            reason = "handshake refused"
                            return reason
                        continue
                    assert isinstance(event, Request)
                    op = ops.get(event.op)
                    if op is None:
                        await send(
                            conn.fail(
                                event.id, UsageError(f"Unknown operation: {event.op[:64]}"), now
                            )
                        )
                    elif inspect.iscoroutinefunction(op):
                        nursery.start_soon(answer_slow, event, op)
                    else:
                        await send(await _call(conn, event, op, label))
                conn.after_read(now)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except _PEER_GONE as exc:
            # Caught here, inside the nursery: escaping it, the error would
            # arrive wrapped in an ExceptionGroup.
            reason = f"socket error: {type(exc).__name__}"
        finally:
            nursery.cancel_scope.cancel()
    log.debug("connection_closed", conn=label, reason=reason)
    return reason


async def _call(
    conn: Connection, req: Request, op: Callable[[dict[str, Any]], Any], label: str
) -> bytes:
    """Run *op* on *req* and encode what it returned or raised."""
    try:
        result = op(req.payload)
        if inspect.isawaitable(result):
            result = await result
        return conn.answer(req.id, _encoder.encode(result), trio.current_time())
    except CredproxyError as exc:
        if exc.code == "INTERNAL_ERROR":
            log.error("request_failed", conn=label, op=req.op, error=str(exc))
        return conn.fail(req.id, exc, trio.current_time())
    except OSError as exc:
        log.error("request_failed", conn=label, op=req.op, error=exc.strerror)
        return conn.fail(req.id, CredproxyError("os error"), trio.current_time())
    except Exception:  # a bug: never let it take the connection down silently
        log.exception("request_failed", conn=label, op=req.op)
        return conn.fail(req.id, CredproxyError("bug"), trio.current_time())
