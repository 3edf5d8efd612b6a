"""Limits on sandbox sockets, against the live in-process daemon.

Every test plays one misbehaving client on a real Unix socket and then checks
what docs/design.md section 7 promises: only that connection suffers. A fresh,
well-behaved client of another session (and, where it makes sense, of the same
session) is still served. Anything involving time runs under ``autojump_clock``,
so a 5 s body deadline or a 60 s idle timeout costs no real time.
"""

from __future__ import annotations

import json
import os
import resource
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from conftest import Harness, Peer, Peers, StartDaemon
from credproxy.core.protocol import frame
from credproxy.shell.sessions import Session

# --- helpers ----------------------------------------------------------------------


def request(rid: Any, op: Any = "list_providers", payload: Any = None) -> bytes:
    """One framed request, exactly as given (types are not checked here)."""
    return frame(json.dumps({"v": 2, "id": rid, "op": op, "payload": payload or {}}).encode())


async def setup(start_daemon: StartDaemon, **sections: Any) -> tuple[Harness, Session, Session]:
    """A daemon with a stored `dev` token and two sessions that may read it."""
    h = await start_daemon(**sections)
    h.login()
    return h, await h.session("dev"), await h.session("dev")


async def served(h: Harness, session: Session) -> None:
    """A fresh client of *session* completes a handshake and gets its token at once."""
    with trio.fail_after(1):
        p = await Peer.connect(session.socket_path)
        try:
            assert (await p.handshake())["ok"] is True
            reply = await p.call("get_token", {"provider": "dev"})
            assert reply["ok"] is True, reply
            assert reply["data"]["access_token"]
        finally:
            p.close()


async def silent_and_open(p: Peer, wait: float = 0.01) -> bool:
    """True if the server neither writes nor closes within *wait* seconds."""
    with trio.move_on_after(wait):
        try:
            data = await p.sock.recv(65_536)
        except ConnectionResetError:
            return False
        p.buf += data
        p.received += data
        return False
    return True


async def closed_without_reply(p: Peer, within: float = 1) -> bool:
    """True if the server closes the connection within *within* s, having sent nothing."""
    with trio.fail_after(within):
        return await p.recv() is None and p.received == b""


async def daemon_status(h: Harness) -> dict[str, Any]:
    """``status`` as the control socket reports it."""
    p = await Peer.connect(h.dirs.runtime / "credproxy.sock")
    try:
        assert (await p.handshake())["ok"] is True
        reply = await p.call("status")
        assert reply["ok"] is True, reply
        status: dict[str, Any] = reply["data"]
        return status
    finally:
        p.close()


async def connections(h: Harness, session: Session) -> int:
    status = await daemon_status(h)
    (entry,) = [s for s in status["sessions"] if s["id"] == session.id]
    count: int = entry["connections"]
    return count


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def raise_nofile(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} this test needs")


# --- framing ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [65_537, 0x8000_0000, 0xFFFF_FFFF])
async def test_oversized_length_header_closes_without_reply(
    start_daemon: StartDaemon, peers: Peers, size: int
) -> None:
    """A header announcing more than 65,536 bytes closes that connection without a reply."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same)
    p.received.clear()
    await p.send_raw(size.to_bytes(4, "big") + b"{}")
    assert await closed_without_reply(p)
    p.close()
    await served(h, other)
    await served(h, same)


async def test_frame_of_exactly_the_limit_is_served(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """A request whose body is exactly 65,536 bytes is answered like any other."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same)
    base = {"v": 2, "id": "big", "op": "list_providers", "payload": {"pad": ""}}
    pad = 65_536 - len(json.dumps(base).encode())
    body = json.dumps(dict(base, payload={"pad": "x" * pad})).encode()
    assert len(body) == 65_536
    await p.send_raw(frame(body))
    with trio.fail_after(1):
        assert await p.recv() == {"id": "big", "ok": True, "data": {"providers": ["dev"]}}
    await served(h, other)
    p.close()


async def test_truncated_body_is_closed_at_the_body_deadline_not_before(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """A body that stops halfway keeps the connection open for 5 s after its header, then closes it."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same)
    p.received.clear()
    await p.send_raw((100).to_bytes(4, "big") + b"x" * 50)
    t0 = trio.current_time()
    await trio.sleep(4.9)
    assert await silent_and_open(p)
    await served(h, other)
    await served(h, same)
    assert await closed_without_reply(p)
    assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.02)
    p.close()
    await served(h, other)
    await served(h, same)


async def test_slow_loris_is_closed_five_seconds_after_the_header(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """One body byte every 4 s does not extend the deadline: the connection closes 5 s after the header."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same)
    p.received.clear()
    await p.send_raw((100).to_bytes(4, "big"))
    t0 = trio.current_time()
    await p.send_raw(b"{")
    await trio.sleep(4)
    await p.send_raw(b'"')
    assert await silent_and_open(p)
    assert await closed_without_reply(p)
    assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.02)
    p.close()
    await served(h, other)
    await served(h, same)


async def test_body_deadline_runs_from_each_frames_own_header(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """A frame whose header arrives together with the end of the previous frame gets its own 5 s."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same)
    a, b = request("a"), request("b")
    await p.send_raw(a[:10])
    await trio.sleep(4.5)
    await p.send_raw(a[10:] + b[:10])  # the end of frame a and the header of frame b
    with trio.fail_after(1):
        assert (await p.recv() or {}).get("id") == "a"
    await trio.sleep(1.4)  # 5.9 s after a's header, 1.4 s after b's
    assert await silent_and_open(p), "closed on frame a's deadline while frame b had 3.6 s left"
    await p.send_raw(b[10:])
    with trio.fail_after(1):
        assert (await p.recv() or {}).get("id") == "b"
    await served(h, other)
    p.close()


BAD_BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b'{"v": 2, "id": "x"', id="truncated-json"),
    pytest.param(b"\xff\xfe\x00{}", id="not-utf8"),
    pytest.param(b'{"id": "\xed\xa0\x80"}', id="utf8-surrogate"),
    pytest.param(b'{"id": "x"} {"id": "y"}', id="two-values"),
    pytest.param(b"[]", id="array"),
    pytest.param(b'"x"', id="string"),
    pytest.param(b"1", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"1e999", id="number-out-of-range"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
@pytest.mark.parametrize("handshaken", [True, False], ids=["after-handshake", "as-handshake"])
async def test_invalid_json_or_non_object_closes_without_reply(
    start_daemon: StartDaemon, peers: Peers, body: bytes, handshaken: bool
) -> None:
    """A frame that is not one UTF-8 JSON object closes that connection without a reply."""
    h, same, other = await setup(start_daemon)
    bystander = await peers.open(same)
    p = await peers.open(same, handshake=handshaken)
    p.received.clear()
    await p.send_raw(frame(body))
    assert await closed_without_reply(p)
    p.close()
    await served(h, other)
    await served(h, same)
    assert (await bystander.call("list_providers"))["ok"] is True
    bystander.close()


async def test_deeply_nested_json_closes_only_that_connection(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """A frame of 30,000 nested arrays (60 KB) closes that connection; the daemon carries on."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same)
    p.received.clear()
    await p.send_raw(frame(b"[" * 30_000 + b"]" * 30_000))
    assert await closed_without_reply(p)
    p.close()
    await served(h, other)
    await served(h, same)


# --- envelopes --------------------------------------------------------------------

WRONG_TYPES = [
    pytest.param({"v": 2, "id": 1, "op": "list_providers", "payload": {}}, "unknown", id="id-int"),
    pytest.param({"v": 2, "id": None, "op": "list_providers"}, "unknown", id="id-null"),
    pytest.param({"v": 2, "op": "list_providers"}, "unknown", id="id-missing"),
    pytest.param({"v": 2, "id": ["a"], "op": "list_providers"}, "unknown", id="id-list"),
    pytest.param({"v": 2, "id": "", "op": "list_providers"}, "", id="id-empty"),
    pytest.param({"v": 2, "id": "i" * 129, "op": "list_providers"}, "i" * 128, id="id-too-long"),
    pytest.param({"v": 2, "id": "a", "op": ["get_token"], "payload": {}}, "a", id="op-list"),
    pytest.param({"v": 2, "id": "a", "op": 7}, "a", id="op-int"),
    pytest.param({"v": 2, "id": "a", "op": ""}, "a", id="op-empty"),
    pytest.param({"v": 2, "id": "a"}, "a", id="op-missing"),
    pytest.param({"v": 2, "id": "a", "op": "get_token", "payload": "dev"}, "a", id="payload-str"),
    pytest.param(
        {"v": 2, "id": "a", "op": "get_token", "payload": ["dev"]}, "a", id="payload-list"
    ),
    pytest.param({"v": 2, "id": "a", "op": "get_token", "payload": 1}, "a", id="payload-int"),
    pytest.param(
        {"v": 2, "id": "a", "op": "get_token", "payload": {"provider": 5}}, "a", id="provider-int"
    ),
    pytest.param(
        {"v": 2, "id": "a", "op": "get_token", "payload": {"provider": "../x"}},
        "a",
        id="provider-path",
    ),
    pytest.param(
        {"v": 2, "id": "a", "op": "get_api_key", "payload": {"name": {"k": 1}}}, "a", id="name-obj"
    ),
]


@pytest.mark.parametrize(("envelope", "echo"), WRONG_TYPES)
async def test_wrong_types_get_invalid_request_and_keep_the_connection(
    start_daemon: StartDaemon, peers: Peers, envelope: dict[str, Any], echo: str
) -> None:
    """A request with a mistyped id, op, payload or name gets INVALID_REQUEST; the connection stays usable."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same)
    await p.send(envelope)
    with trio.fail_after(1):
        reply = await p.recv()
    assert reply is not None, "closed instead of answering"
    assert (reply["id"], reply["ok"], reply["code"]) == (echo, False, "INVALID_REQUEST")
    assert isinstance(reply["error"], str)
    assert reply["error"]
    assert (await p.call("get_token", {"provider": "dev"}))["ok"] is True
    p.close()
    await served(h, other)


async def test_unknown_op_is_named_in_invalid_request(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """An unknown op answers INVALID_REQUEST "Unknown operation: X" and the connection carries on."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same)
    await p.send_raw(request("u1", "frobnicate"))
    with trio.fail_after(1):
        assert await p.recv() == {
            "id": "u1",
            "ok": False,
            "code": "INVALID_REQUEST",
            "error": "Unknown operation: frobnicate",
        }
    assert (await p.call("list_providers"))["data"] == {"providers": ["dev"]}
    p.close()
    await served(h, other)


# --- in flight ----------------------------------------------------------------------


async def test_duplicate_in_flight_id_is_refused(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """A second request reusing the id of one still in flight gets INVALID_REQUEST "Duplicate request id", in its turn after the first."""
    h, same, other = await setup(start_daemon)
    old = h.store.read("dev")["access_token"]
    h.idp.fail_next("slow", delay=5)
    p = await peers.open(same)
    await p.send_raw(request("dup", "refresh_token", {"provider": "dev"}))
    await p.send_raw(request("dup", "refresh_token", {"provider": "dev"}))
    t0 = trio.current_time()
    # While the refresh is in flight, the same session and another one are served.
    with trio.fail_after(1):
        await served(h, same)
        await served(h, other)
    with trio.fail_after(10):
        first = await p.recv()
    assert first is not None
    assert (first["id"], first["ok"]) == ("dup", True)
    assert first["data"]["access_token"] != old
    assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.1)
    # Replies leave in request order: the refusal of the duplicate comes next.
    with trio.fail_after(1):
        assert await p.recv() == {
            "id": "dup",
            "ok": False,
            "code": "INVALID_REQUEST",
            "error": "Duplicate request id",
        }
    # Answered, the id is free again.
    await p.send_raw(request("dup", "get_token", {"provider": "dev"}))
    with trio.fail_after(1):
        again = await p.recv()
    assert again is not None
    assert (again["id"], again["ok"]) == ("dup", True)
    p.close()


async def test_seventeenth_request_in_flight_is_resource_exhausted(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """With 16 requests in flight the 17th gets RESOURCE_EXHAUSTED; the 16 are answered later and the connection carries on."""
    h, same, other = await setup(start_daemon)
    buckets = [f"b{i}" for i in range(1, 17)]
    for bucket in buckets:  # one key per request: each refresh goes upstream on its own
        h.login("dev", bucket)
    h.idp.fail_next("slow", count=16, delay=5)
    p = await peers.open(same)
    for i, bucket in enumerate(buckets, 1):
        await p.send_raw(request(f"r{i}", "refresh_token", {"provider": "dev", "bucket": bucket}))
    await p.send_raw(request("r17", "list_providers"))
    with trio.fail_after(1):  # the refreshes are slow; other connections are not held up
        await served(h, same)
        await served(h, other)
    answered = []
    with trio.fail_after(10):
        for _ in range(16):
            reply = await p.recv()
            assert reply is not None
            assert reply["ok"] is True, reply
            answered.append(reply["id"])
        # Replies leave in request order: the refusal of the 17th comes after the 16.
        assert await p.recv() == {
            "id": "r17",
            "ok": False,
            "code": "RESOURCE_EXHAUSTED",
            "error": "more than 16 requests in flight on this connection",
        }
    assert answered == [f"r{i}" for i in range(1, 17)]
    assert h.idp.refresh_count == 16
    assert (await p.call("list_providers"))["ok"] is True


async def test_idle_timeout_applies_after_a_slow_request_is_answered(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that goes silent after its last (slow) answer is closed 60 s (the idle timeout) after that answer."""
    h, same, other = await setup(start_daemon, limits={"idle_timeout": 60})
    h.idp.fail_next("slow", delay=5)
    p = await peers.open(same)
    await p.send_raw(request("r1", "refresh_token", {"provider": "dev"}))
    with trio.fail_after(10):
        assert (await p.recv() or {}).get("ok") is True
    answered = trio.current_time()
    await trio.sleep(59.9)
    assert await silent_and_open(p)
    with trio.move_on_after(600):
        await p.closed_by_server()
    assert trio.current_time() - answered == pytest.approx(60, abs=0.05), "idle timeout missed"
    p.close()
    await served(h, other)
    await served(h, same)


async def flood_without_reading(p: Peer) -> None:
    """Pipeline 30,000 requests and read nothing (send until the daemon stops reading)."""
    flood = b"".join(request(f"f{i}") for i in range(30_000))
    with trio.move_on_after(1):
        await p.send_raw(flood)


async def test_peer_that_never_reads_is_closed_by_the_idle_timeout(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """A client that pipelines requests and never reads the replies does not outlive the idle timeout."""
    h, same, other = await setup(
        start_daemon, limits={"idle_timeout": 60, "requests_per_second": 0}
    )
    await flood_without_reading(await peers.open(same))
    await served(h, other)
    await trio.sleep(61)
    assert await connections(h, same) == 0, "the non-reading connection is still open"
    await served(h, same)


async def hang_up_before_reply(p: Peer) -> None:
    """Send a handshake and a request in one write, then close without reading."""
    hello = {"v": 1, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}}
    await p.send_raw(
        frame(json.dumps(hello).encode()) + request("a", "get_token", {"provider": "dev"})
    )
    p.close()


@pytest.mark.parametrize("misbehave", [hang_up_before_reply, flood_without_reading])
async def test_peer_socket_errors_close_quietly(
    start_daemon: StartDaemon,
    peers: Peers,
    autojump_clock: trio.testing.MockClock,
    no_secrets_in_logs: list[dict[str, Any]],
    misbehave: Any,
) -> None:
    """A peer that hangs up before its reply, or never reads, is closed normally, with no error-level log event."""
    h, same, other = await setup(start_daemon, limits={"requests_per_second": 0})
    await misbehave(await peers.open(same, handshake=False))
    with trio.fail_after(60):
        while await connections(h, same):
            await trio.sleep(1)
    await served(h, same)
    await served(h, other)
    errors = [e for e in no_secrets_in_logs if e.get("log_level") in ("error", "critical")]
    assert errors == []
    closed = [e for e in no_secrets_in_logs if e["event"] == "connection_closed"]
    assert [e for e in closed if e.get("conn") == same.id], "no connection_closed for it"


# --- handshake and idle ------------------------------------------------------------


async def test_request_before_handshake_is_taken_as_the_handshake(
    start_daemon: StartDaemon,
    peers: Peers,
) -> None:
    """A request sent as the first frame gets the handshake reply (llxprt's rule), not an answer."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same, handshake=False)
    await p.send_raw(request("r1", "get_token", {"provider": "dev"}))
    with trio.fail_after(1):
        assert await p.recv() == {"v": 2, "op": "handshake", "ok": True, "data": {"version": 2}}
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is True
    p.close()
    await served(h, other)


async def test_versionless_first_frame_is_refused(start_daemon: StartDaemon, peers: Peers) -> None:
    """A first frame with no usable version gets UNKNOWN_VERSION and the connection closes."""
    h, same, other = await setup(start_daemon)
    p = await peers.open(same, handshake=False)
    await p.send({"id": "r1", "op": "get_token", "payload": {"provider": "dev"}})
    with trio.fail_after(1):
        assert await p.recv() == {
            "v": 1,
            "op": "handshake",
            "ok": False,
            "code": "UNKNOWN_VERSION",
            "error": "Unsupported protocol version",
        }
        assert await p.recv() is None
    p.close()
    await served(h, other)
    await served(h, same)


async def test_client_that_never_handshakes_is_closed_by_the_idle_timeout(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """A silent client, or one that sent 3 header bytes, is closed after the idle timeout and not before."""
    h, same, other = await setup(start_daemon, limits={"idle_timeout": 60})
    silent = await peers.open(same, handshake=False)
    partial = await peers.open(same, handshake=False)
    await partial.send_raw(b"\x00\x00\x00")  # under a header: no body deadline
    t0 = trio.current_time()
    await trio.sleep(59.9)
    assert await silent_and_open(silent)
    assert await silent_and_open(partial)
    await served(h, other)
    await served(h, same)
    assert await closed_without_reply(silent)
    assert await closed_without_reply(partial)
    assert trio.current_time() - t0 == pytest.approx(60, abs=0.05)
    silent.close()
    partial.close()
    await served(h, other)
    await served(h, same)


# --- connection cap and many idle connections ----------------------------------------


async def test_connection_over_the_session_cap_is_refused(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """With 128 connections open, the 129th gets a handshake-shaped RESOURCE_EXHAUSTED; a slot frees when one closes."""
    raise_nofile(1024)
    h, same, other = await setup(start_daemon)
    full = [await peers.open(same) for _ in range(128)]
    extra = await peers.open(same, handshake=False)
    with trio.fail_after(2):
        assert await extra.recv() == {
            "v": 1,
            "op": "handshake",
            "ok": False,
            "code": "RESOURCE_EXHAUSTED",
            "error": "this session already has 128 connections",
        }
        assert await extra.recv() is None
    # One that sends its handshake first reads the same refusal.
    eager = await peers.open(same, handshake=False)
    await eager.send({"v": 1, "op": "handshake", "id": "h", "payload": {}})
    with trio.fail_after(2):
        assert (await eager.recv() or {}).get("code") == "RESOURCE_EXHAUSTED"
        assert await eager.recv() is None
    await served(h, other)
    assert (await full[0].call("list_providers"))["ok"] is True
    full[1].close()
    with trio.fail_after(2):
        while await connections(h, same) != 127:
            await trio.sleep(0.01)
    await served(h, same)


async def test_an_http_client_over_the_session_cap_gets_an_http_503(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """An HTTP client (the API proxy's) over the connection cap reads a 503 that says why, not a protocol frame it cannot parse."""
    h, same, other = await setup(start_daemon, limits={"max_connections": 2})
    _full = [await peers.open(same) for _ in range(2)]

    def get() -> httpx.Response:
        transport = httpx.HTTPTransport(uds=str(same.socket_path))
        with httpx.Client(transport=transport, timeout=5) as client:
            return client.post("http://credproxy/api/dev/v1/messages", content=b"x" * 1000)

    answer = await trio.to_thread.run_sync(get)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["connection"] == "close"
    assert answer.json() == {
        "error": {"type": "credproxy", "message": "this session already has 2 connections"}
    }
    await served(h, other)


async def test_silent_connections_over_the_cap_hold_no_more_of_the_daemons_descriptors(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """300 connections over the cap that say nothing: at most a few are waited for (to tell HTTP from frames), the rest are refused at once, and the daemon holds their descriptors no longer."""
    raise_nofile(2048)
    h, same, other = await setup(start_daemon, limits={"max_connections": 2})
    _full = [await peers.open(same) for _ in range(2)]
    await trio.sleep(0.1)
    baseline = open_fds()
    silent = [await peers.open(same, handshake=False) for _ in range(300)]
    await trio.sleep(0.2)
    held = open_fds() - baseline - len(silent)  # (the test's own ends not counted)
    assert held <= 10, f"the daemon holds {held} descriptors of refused connections"
    with trio.fail_after(2):
        assert (await silent[-1].recv() or {}).get("code") == "RESOURCE_EXHAUSTED"
    await served(h, other)


async def test_a_thousand_idle_connections_do_not_starve_other_sessions(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """1,000 idle connections on one session leave another served at once, and are all closed by the idle timeout."""
    raise_nofile(2 * 1000 + 256)
    h, same, other = await setup(start_daemon, limits={"max_connections": 1100, "idle_timeout": 60})
    baseline = open_fds()
    t0 = trio.current_time()
    idle = [await peers.open(same, handshake=i % 2 == 0) for i in range(1000)]
    with trio.fail_after(1):
        while await connections(h, same) != 1000:
            await trio.sleep(0)
    t1 = trio.current_time()
    assert t1 - t0 < 1
    assert open_fds() <= baseline + 2 * 1000 + 4  # one fd per end, nothing more
    await served(h, other)
    assert trio.current_time() == t1, "another session waited on the idle ones"
    await served(h, same)  # the 1,001st of 1,100
    await trio.sleep(59)
    assert await connections(h, same) == 1000
    await trio.sleep(2)
    assert await connections(h, same) == 0
    with trio.fail_after(1):
        for p in idle:
            assert await p.closed_by_server()
            p.close()
    await served(h, same)
    await served(h, other)
    assert open_fds() <= baseline + 4


# --- request rate -----------------------------------------------------------------


async def test_request_rate_is_limited_per_connection(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """With a burst of 5 at 10/s the 6th immediate request is RATE_LIMITED with retryAfter; after waiting it is served."""
    h, same, other = await setup(
        start_daemon, limits={"requests_per_second": 10, "request_burst": 5}
    )
    p = await peers.open(same)
    t0 = trio.current_time()
    for _ in range(5):
        assert (await p.call("list_providers"))["ok"] is True
    limited = await p.call("list_providers")
    assert trio.current_time() == t0
    assert (limited["ok"], limited["code"]) == (False, "RATE_LIMITED")
    retry = limited["retryAfter"]
    assert isinstance(retry, int)
    assert retry >= 1
    assert set(limited) == {"id", "ok", "code", "error", "retryAfter"}
    # The limit is this connection's: the same session's other clients are served.
    await served(h, same)
    await served(h, other)
    await trio.sleep(retry)
    for _ in range(5):
        assert (await p.call("get_token", {"provider": "dev"}))["ok"] is True
    assert (await p.call("list_providers"))["code"] == "RATE_LIMITED"
    p.close()
