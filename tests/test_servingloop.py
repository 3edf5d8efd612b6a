"""The serving loop's edges (``credproxy.shell.servingloop``), against the live in-process daemon.

Every test talks to the real daemon over real Unix sockets and asserts what a
sandbox or a person could observe: the bytes and replies on the socket, the
daemon's ``status``, the development IdP's counters and the audit log. Most
tests run the loop as a trio task (the in-process default), where
``autojump_clock`` drives time; those marked "thread mode" start the daemon
with ``serving_thread=True`` as ``credproxy serve`` does, on real clocks, so
they keep their waits short and never use ``autojump_clock``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from typing import Any

import pytest
import trio
import trio.testing

from conftest import Harness, Peer, Peers, StartDaemon
from credproxy.core.protocol import frame
from credproxy.shell.sessions import Session

LONG_IDLE = {"idle_timeout": 1e9}  # connections held across virtual hours
GENERIC_ERROR = "internal error; see the daemon log"
DEV = {"provider": "dev"}

# --- helpers ----------------------------------------------------------------------


def request(rid: str, op: str = "get_token", payload: dict[str, Any] | None = None) -> bytes:
    """One framed v2 request."""
    body = {"v": 2, "id": rid, "op": op, "payload": DEV if payload is None else payload}
    return frame(json.dumps(body).encode())


def pipeline(prefix: str, n: int, op: str = "get_token") -> tuple[list[str], bytes]:
    """*n* requests with distinct ids, as the bytes of one write."""
    ids = [f"{prefix}{i}" for i in range(n)]
    payload: dict[str, Any] | None = None if op == "get_token" else {}
    return ids, b"".join(request(rid, op, payload) for rid in ids)


async def replies(p: Peer, n: int) -> list[dict[str, Any]]:
    """The next *n* replies on *p* (fails if the server closes first)."""
    out: list[dict[str, Any]] = []
    for _ in range(n):
        reply = await p.recv()
        assert reply is not None, f"server closed the connection after {len(out)} of {n} replies"
        out.append(reply)
    return out


async def token(p: Peer) -> str:
    """The access token ``get_token`` serves on *p* (asserting it succeeded)."""
    reply = await p.call("get_token", DEV)
    assert reply["ok"] is True, reply
    access: str = reply["data"]["access_token"]
    return access


async def renewals(h: Harness, session: Session) -> list[dict[str, Any]]:
    """The renewals ``status`` lists for *session*."""
    (entry,) = [s for s in (await h.daemon.status())["sessions"] if s["id"] == session.id]
    out: list[dict[str, Any]] = entry["renewals"]
    return out


async def connections(h: Harness, session: Session) -> int:
    (entry,) = [s for s in (await h.daemon.status())["sessions"] if s["id"] == session.id]
    count: int = entry["connections"]
    return count


async def revoked(p: Peer, within: float = 1) -> bool:
    """True if *p* gets no further byte: a new request is not answered and the server closes."""
    before = bytes(p.received)
    with trio.fail_after(within):
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # already closed
            await p.send_raw(request("after-close"))
        closed = await p.recv() is None
    return closed and bytes(p.received) == before


def store_expired(h: Harness) -> dict[str, Any]:
    """Store a refreshable token that has already expired (get_token must refresh it)."""
    stale = h.idp.mint()
    stale["expiry"] = h.wall() - 10
    h.store.write("dev", "default", stale)
    return stale


# --- 1. the serve margin --------------------------------------------------------------


async def test_token_crossing_the_serve_margin_between_two_requests_is_refreshed(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """A token served fast half a second before the serve margin is refreshed, not served stale, half a second after it."""
    # serve_margin 1000 s: the margin (t=2600) comes well before the renewal timer (t>=3240).
    h = await start_daemon(lifetime=3600, renewal={"serve_margin": 1000}, limits=LONG_IDLE)
    first = h.login()["access_token"]
    s = await h.session("dev")
    p = await peers.open(s)
    assert await token(p) == first
    await trio.sleep(2600 - 0.5)
    assert await token(p) == first  # 1000.5 s left: served as is
    assert await token(p) == first  # the same instant: from the ready table
    assert h.idp.refresh_count == 0
    await trio.sleep(1)
    renewed = await token(p)
    assert renewed != first
    assert h.idp.refresh_count == 1
    assert h.idp.is_access_token_valid(renewed)
    assert await token(p) == renewed
    assert h.idp.refresh_count == 1


async def test_wall_clock_jump_past_the_serve_margin_is_refreshed_at_once(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """After a suspend (the wall clock jumps past expiry minus the serve margin) the next get_token returns a new token."""
    h = await start_daemon(lifetime=3600)
    first = h.login()["access_token"]
    s = await h.session("dev")
    p = await peers.open(s)
    assert await token(p) == first
    assert await token(p) == first  # fast: within the recheck second
    h.wall.jump(3600 - 60 + 1)
    renewed = await token(p)
    assert renewed != first
    assert h.idp.refresh_count == 1
    assert h.idp.is_access_token_valid(renewed)


# --- 2. first serve schedules renewal -------------------------------------------------


async def test_first_serve_in_each_session_schedules_its_own_renewal(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """The first get_token of a session starts one renewal for it; more serves add none; a second session gets its own."""
    h = await start_daemon(lifetime=3600, limits=LONG_IDLE)
    h.login()
    a = await h.session("dev")
    b = await h.session("dev")
    pa = await peers.open(a)
    assert await renewals(h, a) == []
    await token(pa)
    (renewal,) = await renewals(h, a)
    assert (renewal["provider"], renewal["bucket"]) == ("dev", "default")
    assert renewal["next_renewal"] is not None
    assert await renewals(h, b) == []
    for _ in range(5):
        await token(pa)
    assert len(await renewals(h, a)) == 1
    pb = await peers.open(b)
    await token(pb)  # b's ready table is empty: its first serve schedules b's timer
    assert len(await renewals(h, b)) == 1
    assert len(await renewals(h, a)) == 1


# --- 3. a closed session's connection -----------------------------------------------


async def test_closed_sessions_connection_gets_no_further_token(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """After close_session, a connection that was just served gets no reply to its next request and is closed."""
    h = await start_daemon()
    h.login()
    s = await h.session("dev")
    p = await peers.open(s)
    await token(p)
    await token(p)  # the ready table now holds the answer
    assert await h.daemon.close_session(s.id)
    assert await revoked(p)


async def test_session_closed_during_a_refresh_gets_no_token(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """A get_token waiting on a slow refresh when its session closes gets no reply; the refresh still lands on disk."""
    h = await start_daemon(lifetime=3600, limits=LONG_IDLE)
    stale = store_expired(h)
    h.idp.fail_next("slow", delay=2)
    s = await h.session("dev")
    p = await peers.open(s)
    handshake = bytes(p.received)
    await p.send_raw(request("w1") + request("w2"))
    await trio.sleep(1)  # the refresh is under way at the IdP
    assert await h.daemon.close_session(s.id)
    with trio.fail_after(5):
        assert await p.recv() is None
    assert bytes(p.received) == handshake
    await trio.sleep(2)
    assert h.idp.refresh_count == 1
    stored = h.store.read("dev", "default")
    assert stored is not None
    assert stored["access_token"] != stale["access_token"]


# --- 4. pipelining --------------------------------------------------------------------


async def _hundred_pipelined_in_order(h: Harness, peers: Peers, warm: bool) -> tuple[Any, Any]:
    """100 get_token in one write (after one alone when *warm*): 100 ok replies, in order, one token.

    Returns the session and the peer.
    """
    first = h.login()["access_token"]
    s = await h.session("dev")
    p = await peers.open(s)
    if warm:
        assert await token(p) == first
    ids, data = pipeline("q", 100)
    await p.send_raw(data)
    with trio.fail_after(2):
        got = await replies(p, 100)
    assert [r["id"] for r in got] == ids
    assert all(r["ok"] is True for r in got), [r for r in got if not r["ok"]][:2]
    assert {r["data"]["access_token"] for r in got} == {first}
    return s, p


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
async def test_hundred_pipelined_get_token_are_answered_in_order(
    start_daemon: StartDaemon, peers: Peers, warm: bool
) -> None:
    """100 get_token sent in one write get 100 ok replies, in the order sent, on a fresh or a warm session."""
    h = await start_daemon()
    _, p = await _hundred_pipelined_in_order(h, peers, warm)
    assert h.idp.refresh_count == 0
    assert await token(p) == h.store.read("dev", "default")["access_token"]


async def test_two_hundred_pipelined_get_token_on_a_fresh_session_are_answered_in_order(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """200 get_token in one write on a fresh session (the first deferred) get 200 replies in the order sent."""
    h = await start_daemon()
    first = h.login()["access_token"]
    s = await h.session("dev")
    p = await peers.open(s)
    ids, data = pipeline("q", 200)
    await p.send_raw(data)
    with trio.fail_after(2):
        got = await replies(p, 200)
    assert all(r["ok"] is True for r in got), [r for r in got if not r["ok"]][:2]
    assert {r["data"]["access_token"] for r in got} == {first}
    assert [r["id"] for r in got] == ids


async def test_pipelined_get_token_behind_a_slow_refresh_are_answered_in_order(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """100 get_token in one write while the first needs a slow refresh all get the new token, in order, after one refresh."""
    h = await start_daemon(lifetime=3600, limits=LONG_IDLE)
    stale = store_expired(h)
    h.idp.fail_next("slow", delay=2)
    s = await h.session("dev")
    p = await peers.open(s)
    ids, data = pipeline("q", 100)
    await p.send_raw(data)
    with trio.fail_after(10):
        got = await replies(p, 100)
    assert [r["id"] for r in got] == ids
    assert all(r["ok"] is True for r in got), [r for r in got if not r["ok"]][:2]
    served = {r["data"]["access_token"] for r in got}
    assert len(served) == 1
    assert stale["access_token"] not in served
    assert h.idp.refresh_count == 1


async def test_two_hundred_pipelined_profile_and_bucket_requests_are_answered_in_request_order(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """200 requests in one write: get_token without a bucket (its bucket a needs a slow refresh) mixed with ready requests of bucket b and of a: every reply leaves in request order, after one refresh."""
    h = await start_daemon(lifetime=3600, limits=LONG_IDLE)
    h.store.write("dev", "a", h.idp.mint() | {"expiry": h.wall() - 10})
    b_token = h.login(bucket="b")["access_token"]
    s = await h.session("dev:a,b")
    p = await peers.open(s)
    bucket_b = {"provider": "dev", "bucket": "b"}
    assert (await p.call("get_token", bucket_b))["data"]["access_token"] == b_token  # b is ready
    h.idp.fail_next("slow", delay=2)
    kinds = ["profile"] + [("b", "profile", "a")[i % 3] for i in range(199)]
    payloads = {"profile": DEV, "b": bucket_b, "a": {"provider": "dev", "bucket": "a"}}
    await p.send_raw(b"".join(request(f"m{i}", payload=payloads[k]) for i, k in enumerate(kinds)))
    with trio.fail_after(10):
        got = await replies(p, 200)
    assert [r["id"] for r in got] == [f"m{i}" for i in range(200)]
    assert all(r["ok"] is True for r in got), [r for r in got if not r["ok"]][:2]
    a_token = h.store.read("dev", "a")["access_token"]  # type: ignore[index]
    for kind, reply in zip(kinds, got, strict=True):
        served = reply["data"]["access_token"]
        assert served == (b_token if kind == "b" else a_token), (kind, reply["id"])
    assert h.idp.refresh_count == 1


# --- 5. llxprt's burst ----------------------------------------------------------------


async def test_llxprt_burst_during_a_refresh_is_served_twenty_of_twenty(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """20 get_token in one write while the token is being refreshed (slow IdP) are all served, with one upstream refresh."""
    h = await start_daemon(lifetime=3600, limits=LONG_IDLE)
    p = await _burst_behind_a_slow_refresh(h, peers, delay=2, within=10)
    assert (await p.call("list_providers"))["ok"] is True  # nothing left counted in flight


async def _burst_behind_a_slow_refresh(
    h: Harness, peers: Peers, delay: float, within: float
) -> Any:
    """llxprt's burst: 20 get_token in one write behind a refresh taking *delay* s: all served
    within *within* s with the one refreshed token. Returns the peer."""
    stale = store_expired(h)
    h.idp.fail_next("slow", delay=delay)
    s = await h.session("dev")
    p = await peers.open(s)
    ids, data = pipeline("b", 20)
    await p.send_raw(data)
    with trio.fail_after(within):
        got = await replies(p, 20)
    assert [r.get("code") for r in got if not r["ok"]] == []
    assert sorted(r["id"] for r in got) == sorted(ids)
    served = {r["data"]["access_token"] for r in got}
    assert len(served) == 1
    assert stale["access_token"] not in served
    assert h.idp.refresh_count == 1
    return p


async def test_llxprt_burst_joining_a_refresh_already_under_way_is_served(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """A burst of 20 sent after another connection started a slow refresh joins it: 21/21 served, one refresh."""
    h = await start_daemon(lifetime=3600, limits=LONG_IDLE)
    store_expired(h)
    h.idp.fail_next("slow", delay=2)
    s = await h.session("dev")
    starter = await peers.open(s)
    burst = await peers.open(s)
    await starter.send_raw(request("start"))
    await trio.sleep(1)  # the refresh is at the IdP for 1 more second
    assert h.idp.refresh_count == 0
    ids, data = pipeline("b", 20)
    await burst.send_raw(data)
    with trio.fail_after(10):
        got = await replies(burst, 20)
        (first,) = await replies(starter, 1)
    assert [r.get("code") for r in got if not r["ok"]] == []
    assert sorted(r["id"] for r in got) == sorted(ids)
    assert first["ok"] is True
    assert {r["data"]["access_token"] for r in got} == {first["data"]["access_token"]}
    assert h.idp.refresh_count == 1


# --- 6. thread mode ------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "warm"])
async def test_thread_mode_hundred_pipelined_get_token_in_order(
    start_daemon: StartDaemon, peers: Peers, warm: bool
) -> None:
    """Thread mode: 100 get_token in one write get 100 ok replies in the order sent, fresh or warm."""
    h = await start_daemon(serving_thread=True)
    s, _ = await _hundred_pipelined_in_order(h, peers, warm)
    assert len(await renewals(h, s)) == 1


async def test_thread_mode_llxprt_burst_during_a_refresh(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """Thread mode: 20 get_token in one write behind a slow refresh are served 20/20 with one refresh."""
    h = await start_daemon(serving_thread=True)
    await _burst_behind_a_slow_refresh(h, peers, delay=0.3, within=2)


async def test_thread_mode_closing_a_session_revokes_its_open_connections(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """Thread mode: closing a session closes each of its served connections without another reply; other sessions carry on."""
    h = await start_daemon(serving_thread=True)
    h.login()
    s = await h.session("dev")
    other = await h.session("dev")
    ps = [await peers.open(s) for _ in range(3)]
    for p in ps:
        await token(p)
        await token(p)
    po = await peers.open(other)
    await token(po)
    assert await h.daemon.close_session(s.id)
    for p in ps:
        assert await revoked(p)
    assert not s.socket_path.exists()
    await token(po)
    assert await connections(h, other) == 1


async def test_thread_mode_connection_cap_refuses_and_frees_a_slot(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """Thread mode: over max_connections a connection gets RESOURCE_EXHAUSTED and is closed; closing one frees a slot."""
    h = await start_daemon(serving_thread=True, limits={"max_connections": 2})
    h.login()
    s = await h.session("dev")
    full = [await peers.open(s) for _ in range(2)]
    extra = await peers.open(s, handshake=False)
    with trio.fail_after(1):
        assert await extra.recv() == {
            "v": 1,
            "op": "handshake",
            "ok": False,
            "code": "RESOURCE_EXHAUSTED",
            "error": "this session already has 2 connections",
        }
        assert await extra.recv() is None
    await token(full[0])
    full[1].close()
    with trio.fail_after(1):
        while await connections(h, s) != 1:
            await trio.sleep(0.005)
    again = await peers.open(s)
    await token(again)


async def test_thread_mode_rate_limit_and_forbidden_ops_are_refused(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """Thread mode: the request rate limit answers RATE_LIMITED and a forbidden op FORBIDDEN, on a connection that carries on."""
    h = await start_daemon(
        serving_thread=True, limits={"requests_per_second": 0.5, "request_burst": 5}
    )
    h.login()
    s = await h.session("dev")
    p = await peers.open(s)
    forbidden = await p.call("save_token", {"provider": "dev", "token": {"access_token": "x"}})
    assert (forbidden["ok"], forbidden["code"]) == (False, "FORBIDDEN")
    for _ in range(4):
        await token(p)
    limited = await p.call("get_token", DEV)
    assert (limited["ok"], limited["code"]) == (False, "RATE_LIMITED")
    assert limited["retryAfter"] >= 1
    fresh = await peers.open(s)  # the limit is per connection
    await token(fresh)


# --- 7. fairness ----------------------------------------------------------------------


async def test_one_connections_flood_does_not_hold_up_anothers_get_token(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """While one connection's 2,000 pipelined list_providers are answered, another's get_token is answered before the flood's last reply."""
    h = await start_daemon(limits={"requests_per_second": 0})
    first = h.login()["access_token"]
    s = await h.session("dev")
    flood = await peers.open(s)
    single = await peers.open(s)
    assert await token(single) == first  # warm: the next one is a fast serve
    ids, data = pipeline("f", 2000, op="list_providers")
    order: list[str] = []
    flood_started = trio.Event()

    async def flood_send() -> None:
        await flood.send_raw(data)

    async def flood_read() -> None:
        got: list[str] = []
        for i in range(2000):
            reply = await flood.recv()
            assert reply is not None
            assert reply["ok"] is True, reply
            got.append(reply["id"])
            if i == 0:
                flood_started.set()
        assert got == ids
        order.append("flood done")

    async def single_get() -> None:
        await flood_started.wait()
        assert await token(single) == first
        order.append("single served")

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood_read)
            nursery.start_soon(single_get)
            nursery.start_soon(flood_send)
    assert order == ["single served", "flood done"]


# --- 8. internal errors ---------------------------------------------------------------


async def test_internal_store_error_in_the_fast_path_does_not_leak_its_text(
    start_daemon: StartDaemon, peers: Peers, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """An unreadable key file (a directory) answers INTERNAL_ERROR with the generic text; the path goes to the log only."""
    h = await start_daemon()
    h.login()
    h.store.key_path("broken").mkdir(parents=True)
    s = await h.session("dev", "key:broken")
    p = await peers.open(s)
    reply = await p.call("get_api_key", {"name": "broken"})
    assert reply == {
        "id": reply["id"],
        "ok": False,
        "code": "INTERNAL_ERROR",
        "error": GENERIC_ERROR,
    }
    assert str(h.dirs.root).encode() not in p.received
    assert b"IsADirectoryError" not in p.received
    logged = [e for e in no_secrets_in_logs if e["event"] == "request_failed"]
    assert logged, "the cause was not logged"
    assert any(str(h.dirs.root) in repr(e) for e in logged)
    await token(p)  # the connection carries on


async def test_internal_store_error_on_a_deferred_get_token_does_not_leak_its_text(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """An unreadable token file (a directory) answers get_token with INTERNAL_ERROR and the generic text only."""
    h = await start_daemon()
    h.login()
    h.store.token_path("dev", "broken").mkdir(parents=True)
    s = await h.session("dev")
    p = await peers.open(s)
    reply = await p.call("get_token", {"provider": "dev", "bucket": "broken"})
    assert reply == {
        "id": reply["id"],
        "ok": False,
        "code": "INTERNAL_ERROR",
        "error": GENERIC_ERROR,
    }
    assert str(h.dirs.root).encode() not in p.received
    await token(p)


# --- the audit log --------------------------------------------------------------------


async def test_serves_are_audited_first_at_once_then_as_one_count_per_interval(
    start_daemon: StartDaemon,
    peers: Peers,
    no_secrets_in_logs: list[dict[str, Any]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The first serve of a token is logged at once; the next ten are one token_served line with count=10 a minute later; a refused get_token logs none."""
    h = await start_daemon(renewal={"serve_margin": 60})
    h.login()
    s = await h.session("dev")
    p = await peers.open(s)
    await token(p)  # the first serve (slow: schedules the renewal)
    for _ in range(10):
        await token(p)
    refused = await p.call("get_token", {"provider": "other"})
    assert refused["code"] == "NOT_FOUND"

    def served() -> list[dict[str, Any]]:
        return [e for e in no_secrets_in_logs if e["event"] == "token_served"]

    assert [e["count"] for e in served()] == [1]
    await trio.sleep(59)
    assert [e["count"] for e in served()] == [1], "the count line came before the interval"
    await trio.sleep(2)
    assert [e["count"] for e in served()] == [1, 10]
    assert {(e["session"], e["provider"], e["bucket"]) for e in served()} == {
        (s.id, "dev", "default")
    }
    assert len({e["fp"] for e in served()}) == 1


async def test_audit_counts_every_pipelined_reply_and_is_flushed_when_the_session_closes(
    start_daemon: StartDaemon, peers: Peers, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """Ten get_token pipelined on a fresh session (one deferred, nine waiting on it) are audited as 1 + 9, the 9 logged when the session closes."""
    h = await start_daemon()
    h.login()
    s = await h.session("dev")
    p = await peers.open(s)
    _, data = pipeline("q", 10)
    await p.send_raw(data)
    with trio.fail_after(2):
        got = await replies(p, 10)
    assert all(r["ok"] for r in got)
    served = [e for e in no_secrets_in_logs if e["event"] == "token_served"]
    assert [e["count"] for e in served] == [1]
    assert await h.daemon.close_session(s.id)
    with trio.fail_after(2):
        while len([e for e in no_secrets_in_logs if e["event"] == "token_served"]) < 2:
            await trio.sleep(0.01)
    served = [e for e in no_secrets_in_logs if e["event"] == "token_served"]
    assert sum(e["count"] for e in served) == 10


async def test_a_refreshed_token_is_audited_at_once_with_the_old_tokens_count(
    start_daemon: StartDaemon,
    peers: Peers,
    no_secrets_in_logs: list[dict[str, Any]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When the served token changes, the old one's pending count and the new one's first serve are logged right away."""
    h = await start_daemon(renewal={"serve_margin": 60})
    h.login()
    s = await h.session("dev")
    p = await peers.open(s)
    first = await token(p)
    for _ in range(4):
        await token(p)
    r = await p.call("refresh_token", {"provider": "dev"})
    assert r["ok"] and r["data"]["access_token"] != first
    served = [e for e in no_secrets_in_logs if e["event"] == "token_served"]
    assert [e["count"] for e in served] == [1, 4, 1]
    assert served[0]["fp"] == served[1]["fp"] != served[2]["fp"]


async def test_thread_mode_a_connection_handed_over_after_the_loop_stopped_is_closed_and_counted(
    start_daemon: StartDaemon,
) -> None:
    """Shutdown loses no command: a connection accepted as the loop stops is closed, and the session's count comes back down."""
    h = await start_daemon(serving_thread=True)
    h.login()
    s = await h.session("dev")
    h.daemon.loop.stop()
    left, right = socket.socketpair(socket.AF_UNIX)
    s.connections += 1  # as the accept loop counts it before the hand-over
    h.daemon.loop.add(left, s)
    with trio.fail_after(5):
        while s.connections:
            await trio.sleep(0.01)
    assert right.recv(16) == b""  # closed, not left open with nobody serving it
    right.close()


# --- the end of a client's input, and what it holds back ----------------------------


async def _sent_then_half_closed(
    start_daemon: StartDaemon, peers: Peers, data: bytes, n: int
) -> list[dict[str, Any]]:
    """*data* in one write on a served connection, then the end of input: the *n*
    replies that come, after which the server must close."""
    h = await start_daemon(limits=LONG_IDLE)
    h.login()
    p = await peers.open(await h.session("dev"))
    await p.send_raw(data)
    p.sock.shutdown(socket.SHUT_WR)
    with trio.fail_after(10):
        got = await replies(p, n)
        assert await p.recv() is None
    return got


async def test_a_half_close_after_three_hundred_pipelined_requests_gets_every_reply(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """300 get_token in one write, then the client shuts its sending side (``nc -N``): all 300 replies come, in order (more than the loop answers in one turn), then the end."""
    ids, data = pipeline("h", 300)
    got = await _sent_then_half_closed(start_daemon, peers, data, 300)
    assert [r["id"] for r in got] == ids
    assert all(r["ok"] for r in got)


async def test_a_frame_cut_short_by_the_end_of_input_is_dropped_and_the_rest_answered(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """Two whole requests and half of a third, then the end of input: two replies, then the connection closes."""
    third = request("c3")
    data = request("c1") + request("c2") + third[: len(third) // 2]
    got = await _sent_then_half_closed(start_daemon, peers, data, 2)
    assert [r["id"] for r in got] == ["c1", "c2"]


def _loop_thread_cpu() -> float:
    """CPU seconds the serving loop's thread has used (thread mode)."""
    (t,) = [t for t in threading.enumerate() if t.name == "credproxy-serving-loop"]
    with open(f"/proc/self/task/{t.native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


async def test_thread_mode_a_client_gone_while_its_token_is_refreshed_costs_no_cpu(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """Thread mode: a get_token that waits for a slow refresh, and the client closes its socket: while the refresh goes on, the loop's thread stays idle (it does not wake for the hang-up again and again)."""
    h = await start_daemon(serving_thread=True)
    store_expired(h)
    h.idp.fail_next("slow", delay=1.5)
    s = await h.session("dev")
    p = await peers.open(s)
    await p.send_raw(request("w1"))
    await trio.sleep(0.2)  # (the refresh is under way)
    p.sock.close()
    await trio.sleep(0.1)
    before = _loop_thread_cpu()
    await trio.sleep(0.6)
    used = _loop_thread_cpu() - before
    assert used < 0.1, f"the serving loop's thread used {used:.2f} s of CPU in 0.6 s"


async def test_a_frame_body_is_not_timed_while_the_loop_holds_back_reading(
    start_daemon: StartDaemon, peers: Peers, autojump_clock: trio.testing.MockClock
) -> None:
    """50 replies of 16 KB the client has not read yet fill the socket, so the loop stops reading; the client's next frame, started in the same write and finished a second later, is not cut for a slow body while the client takes 6.5 s to read: it is answered."""
    h = await start_daemon(limits=LONG_IDLE)
    big = h.idp.mint()
    big["access_token"] = "t" * 16_000
    big["expiry"] = h.wall() + 3600
    h.store.write("dev", "default", big)
    s = await h.session("dev")
    p = await peers.open(s)
    ids, data = pipeline("f", 50)
    last = request("late")
    await p.send_raw(data + last[:10])
    await trio.sleep(1)
    await p.send_raw(last[10:])
    await trio.sleep(5.5)  # (past the 5 s a frame's body may take; within the send's 10 s)
    with trio.fail_after(5):
        got = await replies(p, 51)
    assert [r["id"] for r in got] == [*ids, "late"]


async def test_made_up_provider_names_do_not_grow_the_daemon_without_end(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """6,000 get_token, each naming a provider nobody configured: each gets NOT_FOUND, and what the session remembers of providers stays bounded (4,096 names)."""
    h = await start_daemon(limits={**LONG_IDLE, "requests_per_second": 0})
    h.login()
    s = await h.session("dev")
    p = await peers.open(s)
    ids = [f"m{i}" for i in range(6000)]
    await p.send_raw(
        b"".join(request(rid, "get_token", {"provider": f"made-up-{rid}"}) for rid in ids)
    )
    with trio.fail_after(30):
        got = await replies(p, 6000)
    assert {r["code"] for r in got} == {"NOT_FOUND"}
    assert len(h.daemon.loop.core.sessions[s.id].profiles) <= 4096
    assert (await p.call("get_token", DEV))["ok"] is True


async def test_a_v1_peer_naming_a_huge_unknown_op_gets_a_reply_within_64_kib(
    start_daemon: StartDaemon, peers: Peers
) -> None:
    """A v1 peer sends an operation name of 60,000 characters: the error reply quotes at most 64 of them, so it stays within v1's 64 KiB frames."""
    h = await start_daemon()
    s = await h.session("dev")
    p = await peers.open(s, handshake=False)
    assert (await p.handshake(1, 1))["ok"] is True
    op = "x" * 60_000
    await p.send_raw(frame(json.dumps({"v": 1, "id": "big", "op": op, "payload": {}}).encode()))
    start = len(p.received)
    reply = await p.recv()
    assert reply is not None and reply["ok"] is False and reply["id"] == "big"
    assert reply["code"] == "INVALID_REQUEST"
    assert len(p.received) - start < 200
