"""One sandbox, one session: the HTTP side held to the frame side's promise (issue 16).

The live daemon in this test's trio loop, a real TLS upstream on loopback
(``test_proxy``'s), the development IdP (which counts refreshes), and raw
HTTP/1.1 clients on real session sockets. Each test is one numbered item of
the issue, seen as a user or an attacker would see it: status codes, what the
upstream received, refreshes at the IdP, what other sessions are answered.
The ones that need another uid, bubblewrap or a separate daemon process are in
``test_isolation_e2e.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import h11
import pytest
import trio
from test_proxy import HttpClient, Upstream, answer, endless, upstream  # noqa: F401

from conftest import Harness, StartDaemon
from credproxy.core.names import Key
from credproxy.core.protocol import capability_digest

CAP = "c0ffee" * 10 + "abcd"  # 64 lowercase hex characters


async def hang(
    up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
) -> None:
    """Never answer; count the connection as closed when the proxy hangs up on it."""
    up.hanging += 1
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    up.cancelled += 1


async def _daemon(start_daemon: StartDaemon, up: Upstream, **kw: Any) -> Harness:
    providers = kw.pop("providers", {})
    dev = providers.pop("dev", {})
    api = {"base_url": up.url, **dev.pop("api", {})}
    h = await start_daemon(providers={"dev": {"api": api, **dev}, **providers}, **kw)
    return h


async def _logged_in(
    start_daemon: StartDaemon,
    up: Upstream,
    grant: str = "dev",
    capability: bytes | None = None,
    **kw: Any,
) -> tuple[Harness, Any]:
    """The daemon of :func:`_daemon` with a ``dev`` token stored, and a session granted *grant*."""
    h = await _daemon(start_daemon, up, **kw)
    h.login()
    return h, await h.session(grant, capability=capability)


async def _until(done: Callable[[], bool], timeout: float = 10, step: float = 0.01) -> None:
    """Wait until *done()*; fail after *timeout* seconds."""
    with trio.fail_after(timeout):
        while not done():
            await trio.sleep(step)


async def _raw(path: Any, data: bytes) -> bytes:
    """Send *data* on a new connection; everything the daemon answers until it closes."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(path))
    await sock.send(data)
    got = b""
    with trio.fail_after(10):
        while chunk := await sock.recv(65536):
            got += chunk
    sock.close()
    return got


def _audit(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "api_request"]


# -- 1. the capability holds on HTTP --------------------------------------------------


async def test_1_a_session_with_a_capability_refuses_http_without_it(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """Without the capability (or with a wrong one) a request gets 407, the connection closes, and nothing reaches the upstream; with it, 200."""
    _, s = await _logged_in(start_daemon, upstream, capability=capability_digest(CAP))
    c = await HttpClient.connect(s.socket_path)
    status, headers, body = await c.call("GET", "/dev/models")
    assert status == 407 and "capability" in json.loads(body)["error"]["message"]
    assert headers["proxy-authenticate"].startswith("Bearer")
    assert headers["connection"] == "close"
    await c.aclose()
    wrong = "0" * 64
    c = await HttpClient.connect(s.socket_path)
    status, _, _ = await c.call(
        "GET", "/dev/models", headers=[("proxy-authorization", f"Bearer {wrong}")]
    )
    assert status == 407
    await c.aclose()
    assert upstream.received == []
    c = await HttpClient.connect(s.socket_path)
    status, _, _ = await c.call(
        "GET", "/dev/models", headers=[("proxy-authorization", f"Bearer {CAP}")]
    )
    assert status == 200
    assert "proxy-authorization" not in upstream.headers()
    await c.aclose()


async def test_1_the_forward_preamble_presents_the_capability_for_the_connection(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """`credproxy forward`'s preamble carries the capability: the tool's own requests need nothing."""
    _, s = await _logged_in(start_daemon, upstream, capability=capability_digest(CAP))
    request = b"GET /dev/models HTTP/1.1\r\nHost: 127.0.0.1:4000\r\nConnection: close\r\n\r\n"
    ok = await _raw(
        s.socket_path, f"CREDPROXY/1 forward=4000 capability={CAP}\r\n".encode() + request
    )
    assert ok.startswith(b"HTTP/1.1 200")
    refused = await _raw(s.socket_path, b"CREDPROXY/1 forward=4000\r\n" + request)
    assert refused.startswith(b"HTTP/1.1 407")
    bad = await _raw(s.socket_path, b"CREDPROXY/1 forward=4000 capability=nothex\r\n" + request)
    assert bad.startswith(b"HTTP/1.1 400")
    assert len(upstream.received) == 1
    # as forward sends it: the preamble alone first, the tool's bytes when they come
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(f"CREDPROXY/1 forward=4000 capability={CAP}\r\n".encode())
    await trio.sleep(0.1)
    await sock.send(request)
    with trio.fail_after(10):
        assert (await sock.recv(65536)).startswith(b"HTTP/1.1 200")
    sock.close()


async def test_1_the_connection_rate_limit_holds_on_http(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """[limits] requests_per_second and request_burst apply per HTTP connection: 429 from credproxy, upstream spared."""
    _, s = await _logged_in(
        start_daemon, upstream, limits={"requests_per_second": 0.01, "request_burst": 2}
    )
    c = await HttpClient.connect(s.socket_path)
    statuses = [(await c.call("GET", "/dev/models"))[0] for _ in range(2)]
    status, headers, body = await c.call("GET", "/dev/models")
    assert statuses == [200, 200] and status == 429
    assert int(headers["retry-after"]) >= 1 and b"credproxy" in body
    assert len(upstream.received) == 2
    await c.aclose()


# -- 2. an upstream 401 goes through the refresh_token rules ----------------------------


async def test_2_a_path_that_always_answers_401_costs_one_refresh_per_cooldown(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """30 requests to an always-401 path: one refresh at the IdP, every later 401 passed through."""
    upstream.script.extend(answer(401) for _ in range(60))
    h, s = await _logged_in(start_daemon, upstream, "api:dev", renewal={"refresh_cooldown": 3600})
    c = await HttpClient.connect(s.socket_path)
    before = h.idp.refresh_count
    statuses = [(await c.call("POST", "/dev/x", body=b"{}"))[0] for _ in range(30)]
    assert statuses == [401] * 30
    assert h.idp.refresh_count == before + 1
    # the refresh_token op shares the same cooldown: nothing more reaches the IdP
    p = await h.peer(await h.session("dev"))
    assert (await p.call("refresh_token", {"provider": "dev"}))["ok"] is True
    assert h.idp.refresh_count == before + 1
    await c.aclose()


async def test_2_a_thousand_401s_from_ten_sessions_cost_at_most_one_refresh_per_cooldown(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """1,000 requests from 10 sessions to an upstream that always answers 401: at most one refresh per key per cooldown."""
    cooldown = 30.0
    upstream.script.extend(answer(401) for _ in range(1100))  # retries too
    h = await _daemon(start_daemon, upstream, renewal={"refresh_cooldown": cooldown})
    h.login()
    sessions = [await h.session("api:dev") for _ in range(10)]
    before = h.idp.refresh_count
    started = trio.current_time()
    statuses: list[int] = []

    async def hundred(s: Any) -> None:
        c = await HttpClient.connect(s.socket_path)
        for _ in range(100):
            statuses.append((await c.call("GET", "/dev/x"))[0])
        await c.aclose()

    async with trio.open_nursery() as n:
        for s in sessions:
            n.start_soon(hundred, s)
    elapsed = trio.current_time() - started
    assert statuses.count(401) == 1000
    assert 1 <= h.idp.refresh_count - before <= 1 + int(elapsed // cooldown)


# -- 3. holds have an owner ---------------------------------------------------------------


async def test_3_one_sandbox_cannot_lock_another_out(start_daemon: StartDaemon) -> None:
    """A session that reports 429 retryAfter 86400 on every bucket locks out itself only; release ends it."""
    h = await start_daemon(limits={"idle_timeout": 1e9})
    tokens = {b: h.login(bucket=b)["access_token"] for b in ("a", "b")}
    attacker, victim = await h.session("dev:a,b"), await h.session("dev:a,b")
    pa, pv = await h.peer(attacker), await h.peer(victim)
    for b in ("a", "b"):
        reply = await pa.call(
            "report_failure", {"provider": "dev", "bucket": b, "status": 429, "retryAfter": 86400}
        )
        assert reply["ok"]
    mine = await pa.call("get_token", {"provider": "dev"})
    assert mine["code"] == "ALL_BUCKETS_EXHAUSTED"
    theirs = await pv.call("get_token", {"provider": "dev"})
    assert theirs["ok"] and theirs["data"]["access_token"] == tokens["a"]
    stats = await pv.call("get_bucket_stats", {"provider": "dev", "bucket": "a"})
    assert stats["data"]["state"] == "ok"
    holds = (await h.daemon.status())["holds"]
    assert {(x["bucket"], x["source"]) for x in holds} == {
        ("a", f"session {attacker.id}"),
        ("b", f"session {attacker.id}"),
    }
    assert all(86_000 < x["ends_in"] <= 86_400 for x in holds)
    assert await h.daemon.release("dev", None) == 2
    assert (await h.daemon.status())["holds"] == []
    again = await pa.call("get_token", {"provider": "dev"})
    assert again["ok"] and again["data"]["access_token"] == tokens["a"]


async def test_3_what_the_daemon_saw_holds_for_every_session_capped(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A 429 answered through the proxy holds the bucket for all sessions, at most max_quota_hold; release P:B ends it."""

    async def huge_429(up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: Any) -> None:
        await stream.send_all(
            conn.send(
                h11.Response(
                    status_code=429,
                    headers=[(b"retry-after", b"99999999"), (b"content-length", b"0")],
                )
            )
            or b""
        )
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    upstream.script.append(huge_429)
    h = await _daemon(start_daemon, upstream, failover={"max_quota_hold": 600})
    for b in ("a", "b"):
        h.login(bucket=b)
    s1, s2 = await h.session("dev:a"), await h.session("dev:a,b")
    c = await HttpClient.connect(s1.socket_path)
    assert (await c.call("GET", "/dev:a/x"))[0] == 429
    (hold,) = (await h.daemon.status())["holds"]
    assert (hold["bucket"], hold["source"]) == ("a", "daemon") and hold["ends_in"] <= 600
    p2 = await h.peer(s2)
    reply = await p2.call("get_token", {"provider": "dev"})
    assert reply["data"]["access_token"] == h.store.read("dev", "b")["access_token"]
    assert await h.daemon.release("dev", "a") == 1
    reply = await p2.call("get_token", {"provider": "dev"})
    assert reply["data"]["access_token"] == h.store.read("dev", "a")["access_token"]
    await c.aclose()


# -- 4. a client that leaves is noticed ----------------------------------------------------


async def test_4_clients_that_leave_before_the_headers_cancel_their_upstream_requests(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """16 POSTs to an upstream that never answers, then the clients close: every upstream connection is closed within 1 s, and new requests are served."""
    upstream.script.extend(hang for _ in range(16))
    _, s = await _logged_in(start_daemon, upstream)
    clients = [await HttpClient.connect(s.socket_path) for _ in range(16)]
    for c in clients:
        await c.send("POST", "/dev/slow", body=b"x" * 1000)
    await _until(lambda: upstream.hanging >= 16)
    for c in clients:
        await c.aclose()
    await _until(lambda: upstream.cancelled >= 16, timeout=1)
    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/models"))[0] == 200
    await c.aclose()


# -- 5. kept bodies are bounded per daemon -------------------------------------------------


async def test_5_past_the_daemon_budget_a_body_is_not_kept_and_its_401_passes_through(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """retry_body_budget bounds all kept bodies: a body past it is streamed, not kept, and its 401 is not retried."""
    upstream.script.append(answer(401))
    h, s = await _logged_in(start_daemon, upstream, proxy={"retry_body_budget": 1000})
    c = await HttpClient.connect(s.socket_path)
    before = h.idp.refresh_count
    status, _, _ = await c.call("POST", "/dev/x", body=b"y" * 5000)
    assert status == 401 and h.idp.refresh_count == before
    assert upstream.received[0]["body"] == b"y" * 5000
    status, _, _ = await c.call("POST", "/dev/x", body=b"z" * 500)  # within budget: kept
    assert status == 200
    await c.aclose()


# -- 6. a dropped client is one audit line -------------------------------------------------


async def test_6_dropped_streams_are_one_audit_line_each_and_never_a_traceback(
    start_daemon: StartDaemon, upstream: Upstream, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """20 clients that hang up mid-stream: 20 audit lines with status 499 and the bytes they got; no crash logged."""
    upstream.script.extend(endless for _ in range(20))
    _, s = await _logged_in(start_daemon, upstream)
    clients = [await HttpClient.connect(s.socket_path) for _ in range(20)]
    for c in clients:
        await c.send("GET", "/dev/stream")
        assert isinstance(await c.event(), h11.Response)
        assert isinstance(await c.event(), h11.Data)
    for c in clients:
        c.stream.socket.setsockopt(
            trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        await c.aclose()
    await _until(lambda: len(_audit(no_secrets_in_logs)) >= 20, step=0.02)
    lines = _audit(no_secrets_in_logs)
    assert [line["status"] for line in lines] == [499] * 20
    assert all(line["bytes"] > 0 for line in lines)
    crashes = [e for e in no_secrets_in_logs if "crash" in e["event"] or e.get("exc_info")]
    assert crashes == []


# -- 8. the host's headers replace the sandbox's ------------------------------------------


async def test_8_credential_headers_never_come_from_the_sandbox_and_templates_replace(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """x-goog-api-key and api-key from the sandbox are dropped; a templated header is one line with the host's value; {client} keeps the client's betas."""
    h, s = await _logged_in(
        start_daemon,
        upstream,
        providers={
            "dev": {
                "api": {
                    "headers": {
                        "x-goog-api-key": "{access_token}",
                        "anthropic-beta": "oauth-2025-04-20,{client}",
                        "x-host-only": "host",
                    }
                }
            }
        },
        proxy={"strip_headers": ["x-gateway-key"]},
    )
    c = await HttpClient.connect(s.socket_path)
    sent = [
        ("x-goog-api-key", "CANARY-sandbox-goog"),
        ("api-key", "CANARY-sandbox-azure"),
        ("x-gateway-key", "CANARY-sandbox-gw"),
        ("anthropic-beta", "files-2025"),
        ("anthropic-beta", "tools-2025"),
        ("X-Host-Only", "sandbox"),
        ("x-other", "kept"),
    ]
    assert (await c.call("GET", "/dev/x", headers=sent))[0] == 200
    got = upstream.received[-1]["headers"]
    token = h.store.read("dev", "default")["access_token"]
    assert got["x-goog-api-key"] == token
    assert got["anthropic-beta"] == "oauth-2025-04-20, files-2025, tools-2025"
    assert got["x-host-only"] == "host" and got["x-other"] == "kept"
    assert "api-key" not in got and "x-gateway-key" not in got
    raw = upstream.received[-1]["raw_headers"]
    assert [n for n, _ in raw].count("anthropic-beta") == 1
    assert [n for n, _ in raw].count("x-goog-api-key") == 1
    assert (await c.call("GET", "/dev/x"))[0] == 200  # no client betas: the host's alone
    assert upstream.received[-1]["headers"]["anthropic-beta"] == "oauth-2025-04-20"
    await c.aclose()


# -- 9. bodies need progress; protocol errors answer 400 -----------------------------------


async def test_9_a_body_that_trickles_gets_408(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """One byte every 0.3 s against body_timeout 1 s and 500 B/s: 408 well before the body is done."""
    _, s = await _logged_in(start_daemon, upstream, proxy={"body_timeout": 1.0})
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(b"POST /dev/x HTTP/1.1\r\nHost: credproxy\r\nContent-Length: 100\r\n\r\n")
    started = trio.current_time()
    reply = b""
    with trio.fail_after(10):
        while True:
            with trio.move_on_after(0.3):
                reply += await sock.recv(65536)
            if reply:
                break
            try:
                await sock.send(b"x")
            except OSError:
                break
    assert reply.startswith(b"HTTP/1.1 408"), reply[:60]
    assert trio.current_time() - started < 5
    sock.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /dev/x HTTP/1.1\r\nHost: c\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /dev/x HTTP/1.1\r\n\r\n",
        b"POST /dev/x HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"GET /dev/x HTTP/1.1\r\nHost: c\r\nBad Header: x\r\n\r\n",
    ],
    ids=["two-lengths", "no-host", "xchunked", "bad-name"],
)
async def test_9_protocol_errors_answer_400_then_close(
    start_daemon: StartDaemon, upstream: Upstream, raw: bytes
) -> None:
    """What h11 refuses gets a 400 with a reason, then the connection closes; nothing goes upstream."""
    _, s = await _logged_in(start_daemon, upstream)
    reply = await _raw(s.socket_path, raw)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:60]
    assert b"malformed HTTP request" in reply
    assert upstream.received == []


# -- 10. the proxy picks the bucket as get_token does -------------------------------------


async def test_10_the_proxy_without_a_bucket_respects_holds_and_records_a_429_on_the_retry(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """a held: the proxy uses b as get_token would; both 429: both held, and then the proxy answers ALL_BUCKETS_EXHAUSTED itself."""
    h = await _daemon(start_daemon, upstream)
    for b in ("a", "b"):
        h.login(bucket=b)
    s = await h.session("dev:a,b")
    p = await h.peer(s)
    await p.call("report_failure", {"provider": "dev", "bucket": "a", "status": 429})
    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/x"))[0] == 200
    token_b = h.store.read("dev", "b")["access_token"]
    assert upstream.headers()["authorization"] == f"Bearer {token_b}"
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == token_b

    await h.daemon.release("dev", None)
    upstream.script.extend([answer(429), answer(429)])
    assert (await c.call("POST", "/dev/x", body=b"{}"))[0] == 429
    assert h.daemon.tokens.quota_held(Key("dev", "a"))
    assert h.daemon.tokens.quota_held(Key("dev", "b")), "the 429 on the retry was not recorded"
    before = len(upstream.received)
    status, headers, body = await c.call("GET", "/dev/x")
    assert status == 429 and "retry-after" in headers
    assert b"every bucket of dev failed" in body
    assert len(upstream.received) == before
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["code"] == "ALL_BUCKETS_EXHAUSTED"
    await c.aclose()


# -- 11. an API grant for one bucket is for that bucket ------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["relay", "trio side"])
async def test_11_an_api_grant_for_one_bucket_reaches_that_buckets_api_and_no_other(
    start_daemon: StartDaemon, upstream: Upstream, chunked: bool
) -> None:
    """Grants ``dev:a`` and ``api:dev:b``: requests to ``/dev:a`` and ``/dev:b`` carry those buckets' tokens, ``/dev:c`` and ``/dev`` (the default bucket) are 404 and reach nobody, and ``get_token`` of b is NOT_FOUND; the same through the relay and (chunked bodies) the trio side."""
    h = await _daemon(start_daemon, upstream)
    for b in ("a", "b", "c", "default"):
        h.login(bucket=b)
    s = await h.session("dev:a", "api:dev:b")
    c = await HttpClient.connect(s.socket_path)

    async def post(path: str) -> int:
        if chunked:  # (a chunked body: the relay hands the request to the trio side)
            reply = await _raw(
                s.socket_path,
                b"POST %s HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n" % path.encode(),
            )
            return int(reply.split(b" ", 2)[1])
        return (await c.call("POST", path, body=b"{}"))[0]

    for bucket in ("a", "b"):
        assert await post(f"/dev:{bucket}/x") == 200
        token = h.store.read("dev", bucket)["access_token"]
        assert upstream.headers()["authorization"] == f"Bearer {token}"
    sent = len(upstream.received)
    assert await post("/dev:c/x") == 404
    assert await post("/dev/x") == 404
    assert len(upstream.received) == sent
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev", "bucket": "b"}))["code"] == "NOT_FOUND"
    await c.aclose()


async def test_11_trace_is_refused_and_reaches_nobody(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """``TRACE`` would have the upstream echo the request, the host's credential headers included, back to the sandbox: it is refused (405), and the upstream sees nothing."""
    _, s = await _logged_in(start_daemon, upstream, "api:dev")
    reply = await _raw(
        s.socket_path, b"TRACE /dev/x HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 405"), reply[:200]
    assert upstream.received == []


async def test_11_a_refused_request_that_expects_100_continue_is_answered_at_once(
    start_daemon: StartDaemon, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    """A POST with ``Expect: 100-continue`` to a provider the session was not granted: the 404 comes at once (the client will not send its body before a 100 Continue), not when the body's time runs out, and the connection closes."""
    _, s = await _logged_in(start_daemon, upstream)
    start = trio.current_time()
    reply = await _raw(
        s.socket_path,
        b"POST /nope/x HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 404"), reply[:200]
    assert trio.current_time() - start < 1


# -- 7. the forward rules, on the daemon's side ----------------------------------------------


@pytest.mark.parametrize(
    ("headers", "rule"),
    [
        (b"Host: attacker.example:4000\r\n", b"Host must be"),
        (b"Host: 127.0.0.1:4001\r\n", b"Host must be"),
        (b"Host: 127.0.0.1:4000\r\nOrigin: https://attacker.example\r\n", b"Origin"),
        (b"Host: localhost:4000\r\nSec-Fetch-Site: cross-site\r\n", b"Sec-Fetch-Site"),
    ],
    ids=["rebinding", "other-port", "origin", "fetch-metadata"],
)
async def test_7_a_forwarded_request_from_a_browser_is_refused(
    start_daemon: StartDaemon, upstream: Upstream, headers: bytes, rule: bytes
) -> None:
    """On a connection that came through forward (port 4000): DNS rebinding and cross-site shapes get 403 naming the rule."""
    _, s = await _logged_in(start_daemon, upstream)
    request = (
        b"POST /dev/x HTTP/1.1\r\n" + headers + b"Content-Type: text/plain\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    reply = await _raw(s.socket_path, b"CREDPROXY/1 forward=4000\r\n" + request)
    assert reply.startswith(b"HTTP/1.1 403") and rule in reply, reply
    assert upstream.received == []
    good = (
        request.split(b"\r\n", 1)[0]
        + b"\r\nHost: [::1]:4000\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    assert (await _raw(s.socket_path, b"CREDPROXY/1 forward=4000\r\n" + good)).startswith(
        b"HTTP/1.1 200"
    )
