"""The control socket's connection loop over a trio stream (credproxy.shell.streams).

:func:`serve_stream` is driven through ``trio.testing.memory_stream_pair``
under ``autojump_clock``, so timeouts are exact and instant, and once over a
real Unix socket pair to show the same loop serves real sockets.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing

from credproxy.core.config import Limits
from credproxy.core.connection import GENERIC_ERROR
from credproxy.core.protocol import capability_digest
from credproxy.errors import CredproxyError, NotFound
from credproxy.shell.streams import Ops, serve_stream

CAPABILITY = "5e" * 32  # 64 lowercase hex characters


class Client:
    """The peer's end: sends frames, reads frames back, notices the server closing."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.received = bytearray()  # every byte the server sent

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self, obj: Any) -> None:
        body = json.dumps(obj).encode()
        await self.send_raw(len(body).to_bytes(4, "big") + body)

    async def request(self, rid: str, op: str, payload: dict[str, Any] | None = None) -> None:
        await self.send({"v": 2, "id": rid, "op": op, "payload": payload or {}})

    async def recv(self) -> dict[str, Any] | None:
        """The next frame, or None once the server has closed the stream."""
        while True:
            if len(self.buf) >= 4:
                size = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) >= 4 + size:
                    body = bytes(self.buf[4 : 4 + size])
                    del self.buf[: 4 + size]
                    obj: dict[str, Any] = json.loads(body)
                    return obj
            try:
                data = await self.stream.receive_some(65_536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.buf += data
            self.received += data

    async def handshake(self, capability: str | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"minVersion": 1, "maxVersion": 2}
        if capability is not None:
            payload["capabilityToken"] = capability
        await self.send({"v": 1, "op": "handshake", "payload": payload})
        reply = await self.recv()
        assert reply is not None, "the server closed the stream during the handshake"
        return reply


class Served:
    """A serve_stream task: the reason it returned with, and when."""

    reason: str | None = None
    ended_at: float | None = None


@pytest.fixture
async def serve(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    """Start serve_stream on one end of a memory stream pair; returns (client, served)."""
    clients: list[Client] = []

    def start(
        ops: Ops, limits: Limits | None = None, capability: bytes | None = None
    ) -> tuple[Client, Served]:
        client_end, server_end = trio.testing.memory_stream_pair()
        served = Served()

        async def run() -> None:
            served.reason = await serve_stream(
                server_end, ops, limits or Limits(), "test", capability=capability
            )
            served.ended_at = trio.current_time()

        nursery.start_soon(run)
        client = Client(client_end)
        clients.append(client)
        return client, served

    yield start
    for c in clients:
        await c.stream.aclose()


def echo(payload: dict[str, Any]) -> Any:
    return {"echo": payload}


async def slow_echo(payload: dict[str, Any]) -> Any:
    await trio.sleep(float(payload.get("sleep", 5)))
    return {"slow": payload}


# -- serving ----------------------------------------------------------------------------------


async def test_handshake_then_a_sync_op_is_answered(serve: Callable[..., Any]) -> None:
    """After the handshake a plain-function op is answered with its return value."""
    client, served = serve({"echo": echo})
    assert await client.handshake() == {
        "v": 2,
        "op": "handshake",
        "ok": True,
        "data": {"version": 2},
    }
    await client.request("r1", "echo", {"x": 1})
    assert await client.recv() == {"id": "r1", "ok": True, "data": {"echo": {"x": 1}}}
    stream = client.stream
    assert isinstance(stream, trio.abc.HalfCloseableStream)
    await stream.send_eof()
    assert await client.recv() is None
    await trio.testing.wait_all_tasks_blocked()
    assert served.reason == "closed by peer"


async def test_a_slow_op_does_not_hold_up_a_fast_one(
    serve: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    """An async op sleeping 5 s is answered after a sync op sent behind it; ids match."""
    client, _ = serve({"echo": echo, "slow": slow_echo})
    await client.handshake()
    start = trio.current_time()
    await client.request("slow-1", "slow", {"sleep": 5})
    await client.request("fast-1", "echo", {"n": 2})
    first = await client.recv()
    assert first == {"id": "fast-1", "ok": True, "data": {"echo": {"n": 2}}}
    assert trio.current_time() == start
    second = await client.recv()
    assert second == {"id": "slow-1", "ok": True, "data": {"slow": {"sleep": 5}}}
    assert trio.current_time() - start == 5


async def test_an_unknown_op_is_an_invalid_request_naming_it(serve: Callable[..., Any]) -> None:
    """A request for an op not in the table gets INVALID_REQUEST with the op's name."""
    client, _ = serve({"echo": echo})
    await client.handshake()
    await client.request("r1", "frobnicate")
    assert await client.recv() == {
        "id": "r1",
        "ok": False,
        "code": "INVALID_REQUEST",
        "error": "Unknown operation: frobnicate",
    }
    await client.request("r2", "echo")
    reply = await client.recv()
    assert reply is not None
    assert reply["ok"] is True


async def test_an_error_for_the_peer_is_sent_with_its_message(serve: Callable[..., Any]) -> None:
    """An op raising NotFound answers NOT_FOUND with the op's message."""

    def missing(payload: dict[str, Any]) -> Any:
        raise NotFound("no token for dev:default")

    client, _ = serve({"missing": missing})
    await client.handshake()
    await client.request("r1", "missing")
    assert await client.recv() == {
        "id": "r1",
        "ok": False,
        "code": "NOT_FOUND",
        "error": "no token for dev:default",
    }


# The text of an INTERNAL_ERROR goes to the daemon log by design (streams.py logs
# error=str(exc)), so it is not a secret marker: the autouse fixture would rightly
# flag a real secret there. What matters is that the peer never sees it.
INTERNAL_DETAIL = "internal-detail-7f3a: /var/lib/credproxy/dev/default.json unreadable"


async def test_an_internal_error_reaches_the_log_but_never_the_peer(
    serve: Callable[..., Any], no_secrets_in_logs: list[Any]
) -> None:
    """An op raising an INTERNAL_ERROR answers a generic message; its text is only logged."""

    def broken(payload: dict[str, Any]) -> Any:
        raise CredproxyError(INTERNAL_DETAIL)

    client, _ = serve({"broken": broken})
    await client.handshake()
    await client.request("r1", "broken")
    assert await client.recv() == {
        "id": "r1",
        "ok": False,
        "code": "INTERNAL_ERROR",
        "error": GENERIC_ERROR,
    }
    assert b"internal-detail" not in client.received
    logged = [e for e in no_secrets_in_logs if e.get("event") == "request_failed"]
    assert logged == [
        {
            "event": "request_failed",
            "log_level": "error",
            "conn": "test",
            "op": "broken",
            "error": INTERNAL_DETAIL,
        }
    ]


async def test_a_bug_answers_internal_error_and_the_connection_keeps_serving(
    serve: Callable[..., Any],
) -> None:
    """A ValueError in an op becomes INTERNAL_ERROR without its text; the next request is served."""

    def buggy(payload: dict[str, Any]) -> Any:
        raise ValueError("CANARY-secret in a bug's message")

    client, served = serve({"buggy": buggy, "echo": echo})
    await client.handshake()
    await client.request("r1", "buggy")
    assert await client.recv() == {
        "id": "r1",
        "ok": False,
        "code": "INTERNAL_ERROR",
        "error": GENERIC_ERROR,
    }
    await client.request("r2", "echo", {"after": "bug"})
    assert await client.recv() == {"id": "r2", "ok": True, "data": {"echo": {"after": "bug"}}}
    assert b"CANARY" not in client.received
    assert served.reason is None  # still serving


async def test_a_bug_in_an_async_op_is_answered_too(
    serve: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    """A coroutine op that raises is answered INTERNAL_ERROR like a plain one."""

    async def buggy(payload: dict[str, Any]) -> Any:
        await trio.sleep(1)
        raise KeyError("CANARY-secret")

    client, _ = serve({"buggy": buggy})
    await client.handshake()
    await client.request("r1", "buggy")
    reply = await client.recv()
    assert reply == {"id": "r1", "ok": False, "code": "INTERNAL_ERROR", "error": GENERIC_ERROR}
    assert b"CANARY" not in client.received


# -- limits and deadlines ------------------------------------------------------------------------


async def test_an_idle_connection_is_closed_after_exactly_the_idle_timeout(
    serve: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    """With no frame after the handshake, the server closes the stream idle_timeout later."""
    client, served = serve({"echo": echo}, Limits(idle_timeout=7))
    await trio.sleep(3)
    await client.handshake()
    assert await client.recv() is None
    assert trio.current_time() == 3 + 7
    await trio.testing.wait_all_tasks_blocked()
    assert served.reason == "idle timeout"
    assert served.ended_at == 10


async def test_the_idle_clock_restarts_after_a_slow_answer(
    serve: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    """A request taking 20 s is not cut off by a 7 s idle timeout, which restarts at its answer."""
    client, served = serve({"slow": slow_echo}, Limits(idle_timeout=7))
    await client.handshake()
    await client.request("r1", "slow", {"sleep": 20})
    reply = await client.recv()
    assert reply is not None
    assert reply["id"] == "r1"
    assert trio.current_time() == 20
    assert await client.recv() is None
    assert trio.current_time() == 27
    await trio.testing.wait_all_tasks_blocked()
    assert served.reason == "idle timeout"


async def test_a_body_that_does_not_arrive_within_five_seconds_closes(
    serve: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    """A header followed by part of its body, then silence, closes the stream 5 s later."""
    client, served = serve({"echo": echo}, Limits(idle_timeout=600))
    await client.handshake()
    await trio.sleep(1)
    await client.send_raw((100).to_bytes(4, "big") + b'{"v": 2')
    assert await client.recv() is None
    assert trio.current_time() == 1 + 5
    await trio.testing.wait_all_tasks_blocked()
    assert served.reason == "frame body did not arrive within 5 s"


async def test_a_rate_limited_request_is_never_run(serve: Callable[..., Any]) -> None:
    """Past the burst, a request is answered RATE_LIMITED and its op does not run."""
    calls: list[str] = []

    def counted(payload: dict[str, Any]) -> Any:
        calls.append(payload["n"])
        return None

    client, _ = serve({"count": counted}, Limits(requests_per_second=1, request_burst=2))
    await client.handshake()
    for n in ("a", "b", "c"):
        await client.request(n, "count", {"n": n})
    replies = [await client.recv() for _ in range(3)]
    assert [r["ok"] for r in replies if r] == [True, True, False]
    assert replies[2] is not None
    assert replies[2]["code"] == "RATE_LIMITED"
    assert replies[2]["retryAfter"] == 1
    assert calls == ["a", "b"]


async def test_a_protocol_error_closes_without_a_reply(serve: Callable[..., Any]) -> None:
    """A frame that is not JSON closes the stream; the reason names the protocol error."""
    client, served = serve({"echo": echo})
    await client.handshake()
    await client.send_raw((3).to_bytes(4, "big") + b"{{{")
    assert await client.recv() is None
    await trio.testing.wait_all_tasks_blocked()
    assert served.reason == "protocol error: frame is not valid UTF-8 JSON"


# -- capability ---------------------------------------------------------------------------------


async def test_a_capability_is_required_when_given(serve: Callable[..., Any]) -> None:
    """Without the capability token the handshake is refused and the stream closed."""
    client, served = serve({"echo": echo}, capability=capability_digest(CAPABILITY))
    reply = await client.handshake()
    assert reply["ok"] is False
    assert reply["code"] == "UNAUTHORIZED"
    assert await client.recv() is None
    await trio.testing.wait_all_tasks_blocked()
    assert served.reason == "handshake refused"


async def test_a_wrong_capability_is_refused(serve: Callable[..., Any]) -> None:
    """Another session's capability token does not open this connection."""
    client, _ = serve({"echo": echo}, capability=capability_digest(CAPABILITY))
    reply = await client.handshake(capability="a1" * 32)
    assert reply["code"] == "UNAUTHORIZED"
    assert await client.recv() is None


async def test_the_right_capability_opens_the_connection(serve: Callable[..., Any]) -> None:
    """With the session's capability token, requests are served."""
    client, _ = serve({"echo": echo}, capability=capability_digest(CAPABILITY))
    reply = await client.handshake(capability=CAPABILITY)
    assert reply["ok"] is True
    await client.request("r1", "echo")
    assert await client.recv() == {"id": "r1", "ok": True, "data": {"echo": {}}}


# -- a real socket --------------------------------------------------------------------------------


async def test_the_same_loop_serves_a_real_unix_socket() -> None:
    """Over a real AF_UNIX socket pair: handshake, a sync and an async op, then peer close."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server_end = trio.SocketStream(trio.socket.from_stdlib_socket(left))
    client = Client(trio.SocketStream(trio.socket.from_stdlib_socket(right)))
    served = Served()

    async def run() -> None:
        served.reason = await serve_stream(
            server_end, {"echo": echo, "slow": slow_echo}, Limits(), "unix"
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        assert (await client.handshake())["ok"] is True
        await client.request("s", "slow", {"sleep": 0.05})
        await client.request("f", "echo", {"n": 1})
        assert await client.recv() == {"id": "f", "ok": True, "data": {"echo": {"n": 1}}}
        assert await client.recv() == {"id": "s", "ok": True, "data": {"slow": {"sleep": 0.05}}}
        await client.stream.aclose()
    assert served.reason == "closed by peer"
