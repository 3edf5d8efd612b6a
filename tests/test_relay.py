"""The API proxy's relay in the serving loop: what it keeps that the trio side did not need to.

The relay (``credproxy/shell/loopproxy.py``) remembers things between
requests that the trio side looked up each time: the headers filled from a
token, pooled upstream connections, the bytes a client sent ahead. Each test
is something a sandbox or the host does that would show if one of them were
kept too long or lost. Same setting as ``test_isolation.py``: the live daemon
in this test's trio loop, a real TLS upstream on loopback, raw clients on
real session sockets.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
from functools import partial
from typing import Any

import h11
import pytest
import trio
from test_isolation import _audit, _logged_in, _raw
from test_proxy import HttpClient, Upstream, _json_answer, sse, upstream  # noqa: F401

from conftest import StartDaemon
from credproxy.core.names import Key
from credproxy.shell.loopproxy import HttpConn


def _statuses(reply: bytes) -> list[int]:
    """The status of every answer in *reply* (a whole connection's bytes)."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(reply)
    conn.receive_data(b"")
    out = []
    while True:
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:  # closed without (another) answer
            return out
        if not isinstance(event, h11.Response):
            return out
        out.append(event.status_code)
        while not isinstance(conn.next_event(), h11.EndOfMessage):
            pass
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return out
        conn.start_next_cycle()


async def test_a_renewed_token_is_sent_at_once_on_a_kept_connection(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A new token in the store (a login, a renewal elsewhere): the next request on the same connection carries it, not the headers filled from the old one."""
    h, s = await _logged_in(start_daemon, upstream)
    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/a"))[0] == 200
    old = h.store.read("dev", "default")["access_token"]
    assert upstream.headers()["authorization"] == f"Bearer {old}"
    new = h.login()["access_token"]
    assert new != old
    await h.daemon.token_changed(Key("dev", "default"))
    assert (await c.call("GET", "/dev/b"))[0] == 200
    assert upstream.headers()["authorization"] == f"Bearer {new}"
    await c.aclose()


async def test_a_removed_login_is_not_used_by_a_kept_connection(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """`credproxy logout` on the host: the next request on an open connection gets the 404 that says so, and the upstream sees nothing more."""
    h, s = await _logged_in(start_daemon, upstream)
    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/a"))[0] == 200
    h.store.remove("dev", "default")
    await h.daemon.token_changed(Key("dev", "default"))
    status, _, body = await c.call("GET", "/dev/b")
    assert status == 404 and b"no stored login" in body, body
    assert len(upstream.received) == 1
    await c.aclose()


async def test_pipelined_requests_are_answered_in_order(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """Three requests sent at once on one connection: three answers, in order, each for its own path."""
    _, s = await _logged_in(start_daemon, upstream)
    requests = b"".join(
        b"GET /dev/item/%d HTTP/1.1\r\nHost: credproxy\r\n%s\r\n"
        % (i, b"Connection: close\r\n" if i == 2 else b"")
        for i in range(3)
    )
    reply = await _raw(s.socket_path, requests)
    assert _statuses(reply) == [200, 200, 200]
    assert [r["target"] for r in upstream.received] == [f"/v1/item/{i}" for i in range(3)]
    assert reply.index(b"/v1/item/0") < reply.index(b"/v1/item/1") < reply.index(b"/v1/item/2")


_CLOSE = b"Connection: close\r\n"


async def test_connection_close_is_a_token_of_the_list(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """``Connection: keep-alive, x-closed`` does not close the connection (only a ``close`` token does, as h11 reads it): both pipelined requests are answered."""
    _, s = await _logged_in(start_daemon, upstream)
    reply = await _raw(
        s.socket_path,
        b"GET /dev/one HTTP/1.1\r\nHost: c\r\nConnection: keep-alive, x-closed\r\n\r\n"
        b"GET /dev/two HTTP/1.1\r\nHost: c\r\nConnection: Keep-Alive, Close\r\n\r\n",
    )
    assert _statuses(reply) == [200, 200]
    assert [r["target"] for r in upstream.received] == ["/v1/one", "/v1/two"]


@pytest.mark.parametrize(
    ("request_bytes", "statuses", "sent_upstream"),
    [
        pytest.param(  # h11 ends a head at a bare LF too
            b"GET /dev/lf HTTP/1.1\nHost: credproxy\nConnection: close\n\n",
            [200],
            [("/v1/lf", b"")],
            id="bare-LF-lines",
        ),
        pytest.param(
            b"POST /dev/x HTTP/1.1\r\nHost: credproxy\r\nContent-Length: 3\r\n"
            b"Content-Length: 4\r\n\r\nabcd",
            [400],
            [],
            id="conflicting-Content-Length",
        ),
        pytest.param(  # refused: a body framed two ways is how requests are smuggled
            b"POST /dev/te HTTP/1.1\r\nHost: credproxy\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n" + _CLOSE + b"\r\n5\r\nhello\r\n0\r\n\r\n",
            [400],
            [],
            id="Content-Length-and-chunked",
        ),
        pytest.param(b"GET /dev/x HTTP/1.1\r\nAccept: */*\r\n\r\n", [400], [], id="no-Host"),
        pytest.param(
            b"GET /dev/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", [400], [], id="two-Hosts"
        ),
        pytest.param(
            b"\r\nGET /dev/x HTTP/1.1\r\nHost: credproxy\r\n\r\n",
            [],  # (h11 finds no request line: the connection closes unanswered)
            [],
            id="blank-line-first",
        ),
        pytest.param(
            b"GET /dev/fold HTTP/1.1\r\nHost: credproxy\r\nX-Note: one\r\n two\r\n"
            + _CLOSE
            + b"\r\n",
            [200],
            [("/v1/fold", b"")],
            id="folded-header",
        ),
        pytest.param(
            b"GET /dev/old HTTP/1.0\r\n\r\n", [200], [("/v1/old", b"")], id="HTTP/1.0-no-Host"
        ),
        pytest.param(  # served as HTTP/1.0 is: the connection closes after it
            b"GET /dev/new HTTP/2.0\r\nHost: credproxy\r\n\r\n",
            [200],
            [("/v1/new", b"")],
            id="HTTP/2.0",
        ),
    ],
)
async def test_a_head_the_relay_does_not_read_gets_what_h11_says_of_it(
    start_daemon: StartDaemon,
    upstream: Upstream,
    request_bytes: bytes,
    statuses: list[int],
    sent_upstream: list[tuple[str, bytes]],
) -> None:
    """The relay reads request heads with llhttp; whatever llhttp or its checks do not take is read by h11 on the trio side, so a sandbox gets the same answer either way."""
    _, s = await _logged_in(start_daemon, upstream)
    reply = await _raw(s.socket_path, request_bytes)
    assert _statuses(reply) == statuses, reply[:300]
    assert [(r["target"], r["body"]) for r in upstream.received] == sent_upstream
    if sent_upstream:
        assert upstream.headers()["authorization"].startswith("Bearer ")


async def test_an_agent_shaped_request_reaches_the_upstream_header_for_header(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """Twenty headers as an SDK sends them (mixed case, no space or tabs after the colon, colons and bytes over 0x7f in values, an empty one) and a JSON body: the upstream gets each value, blanks around it trimmed, in order, and the body whole."""
    _, s = await _logged_in(start_daemon, upstream)
    body = b'{"model":"m","messages":[{"role":"user","content":"' + b"x" * 3000 + b'"}]}'
    sent = [
        (b"Accept", b"application/json"),
        (b"anthropic-beta", b"claude-code-20250219,oauth-2025-04-20"),
        (b"Anthropic-Version", b"2023-06-01"),
        (b"Content-Type", b"application/json"),
        (b"User-Agent", b"claude-cli/2.0.14 (external, cli)"),
        (b"x-app", b"cli"),
        (b"X-Stainless-Arch", b"x64"),
        (b"X-Stainless-Lang", b"js"),
        (b"X-Stainless-OS", b"Linux"),
        (b"X-Stainless-Retry-Count", b"0"),
        (b"X-Stainless-Runtime-Version", b"v22.11.0"),
        (b"X-Tabbed", b"\t one\tvalue \t"),
        (b"X-Tight", b"no-space"),
        (b"X-Colons", b"a:b::c"),
        (b"X-Latin", b"caf\xe9 \xff"),
        (b"X-Empty", b""),
        (b"X-Trailing", b"kept   "),
    ]
    lines = b"".join(
        b"%s:%s\r\n" % (n, v) if n == b"X-Tight" else b"%s: %s\r\n" % (n, v) for n, v in sent
    )
    reply = await _raw(
        s.socket_path,
        b"POST /dev/v1/messages HTTP/1.1\r\nHost: credproxy\r\n%sContent-Length: %d\r\n%s\r\n%s"
        % (lines, len(body), _CLOSE, body),
    )
    assert _statuses(reply) == [200], reply[:300]
    (got,) = upstream.received
    assert got["body"] == body
    relayed = [(n, v) for n, v in got["raw_headers"] if n.encode() in {x.lower() for x, _ in sent}]
    assert relayed == [(n.decode().lower(), v.strip(b" \t").decode("latin-1")) for n, v in sent]


@pytest.mark.parametrize(
    ("target", "upstream_target"),
    [
        (b"/dev/a#frag?q=1", "/v1/a"),
        (b"/dev/c/{x}|%zz", "/v1/c/%7Bx%7D|%zz"),
        (b"/dev/d/%7Bok%7D?a=b&c=%2F", "/v1/d/%7Bok%7D?a=b&c=%2F"),
    ],
)
async def test_a_request_target_goes_upstream_as_a_url_writes_it(
    start_daemon: StartDaemon, upstream: Upstream, target: bytes, upstream_target: str
) -> None:
    """A fragment is not sent, and bytes a URL may not hold go quoted, as httpx writes any URL (the trio side's); a target that is a URL already goes as it came."""
    _, s = await _logged_in(start_daemon, upstream)
    reply = await _raw(s.socket_path, b"GET %s HTTP/1.1\r\nHost: c\r\n%s\r\n" % (target, _CLOSE))
    assert _statuses(reply) == [200], reply[:300]
    assert [r["target"] for r in upstream.received] == [upstream_target]


async def test_both_paths_send_the_upstream_the_same_headers(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """One POST through the relay (Content-Length) and the same through the trio side (chunked, which the relay hands over): the upstream gets the same header names from both, bar the body's framing; none of httpx's own (User-Agent, Accept, Connection)."""
    _, s = await _logged_in(start_daemon, upstream)
    head = b"POST /dev/x HTTP/1.1\r\nHost: c\r\nX-App: cli\r\n" + _CLOSE
    for framing in (
        b"Content-Length: 2\r\n\r\n{}",
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ):
        assert _statuses(await _raw(s.socket_path, head + framing)) == [200]
    framing_names = {"content-length", "transfer-encoding"}
    relay, trio_side = (
        sorted(n for n, _ in r["raw_headers"] if n not in framing_names) for r in upstream.received
    )
    assert relay == trio_side, (relay, trio_side)
    assert "user-agent" not in trio_side and "connection" not in trio_side


async def test_a_request_in_pieces_is_read_whole_and_the_next_one_after_it(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A head cut inside its lines, a body in three writes with the next request in the last, its blank line cut in two: two requests upstream, each whole."""
    _, s = await _logged_in(start_daemon, upstream)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    pieces = [
        b"POST /dev/p HTTP/1.1\r\nHo",
        b"st: credproxy\r\nContent-Le",
        b"ngth: 11\r\n\r\nhello",
        b" wor",
        b"ldGET /dev/q HTTP/1.1\r\nHost: credproxy\r\n" + _CLOSE + b"\r",
        b"\n",  # (the blank line cut in two)
    ]
    for piece in pieces:
        await sock.send(piece)
        await trio.sleep(0.05)
    reply = b""
    with trio.fail_after(10):
        while chunk := await sock.recv(65536):
            reply += chunk
    sock.close()
    assert _statuses(reply) == [200, 200]
    assert [(r["target"], r["body"]) for r in upstream.received] == [
        ("/v1/p", b"hello world"),
        ("/v1/q", b""),
    ]


async def _answer_then_hang_up(
    up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
) -> None:
    """A whole keep-alive answer, then the upstream closes the connection (an idle timeout)."""
    payload = b'{"ok": true}'
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    await stream.send_all(conn.send(h11.Response(status_code=200, headers=head)) or b"")
    await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
    await stream.aclose()


async def test_an_upstream_connection_the_upstream_closed_is_not_reused(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """The upstream closes a keep-alive connection after its answer: the next request still gets its answer, sent upstream once."""
    _, s = await _logged_in(start_daemon, upstream)
    upstream.script.append(_answer_then_hang_up)
    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/a"))[0] == 200
    await trio.sleep(0.05)
    status, _, body = await c.call("POST", "/dev/b", body=b'{"n": 1}')
    assert status == 200, body
    assert [r["target"] for r in upstream.received] == ["/v1/a", "/v1/b"]
    assert upstream.received[1]["body"] == b'{"n": 1}'
    await c.aclose()


async def test_a_pooled_connection_that_fails_at_the_first_write_is_retried_whole(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A pooled upstream connection whose first write fails at once (as when the upstream's reset is still on its way to the loop): the request goes again on a new connection with every header, its token and its body, and is answered."""
    h, s = await _logged_in(start_daemon, upstream)
    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/a"))[0] == 200
    relay = h.daemon.loop.relay
    assert relay is not None
    (pooled,) = [up for idle in relay.pool.values() for up in idle]
    # The fault: the socket goes away under the relay, which learns it from its next send.
    pooled.sock.close()
    status, _, body = await c.call("POST", "/dev/b", body=b'{"n": 2}')
    assert status == 200, body
    assert [r["target"] for r in upstream.received] == ["/v1/a", "/v1/b"]
    again = upstream.received[1]
    assert again["body"] == b'{"n": 2}'
    assert again["headers"]["authorization"].startswith("Bearer ")
    assert again["headers"]["host"]
    assert (await c.call("GET", "/dev/c"))[0] == 200  # (and the connection goes on)
    await c.aclose()


async def _no_content_no_headers(
    up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
) -> None:
    """``HTTP/1.1 204`` and not one header line."""
    await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
    conn.send(h11.Response(status_code=204, headers=[]))
    conn.send(h11.EndOfMessage())


async def test_an_answer_without_any_header_is_relayed(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """An upstream's 204 with no header lines at all reaches the sandbox as a 204, and the connection serves the next request."""
    _, s = await _logged_in(start_daemon, upstream)
    upstream.script.append(_no_content_no_headers)
    c = await HttpClient.connect(s.socket_path)
    status, _, body = await c.call("DELETE", "/dev/thing")
    assert (status, body) == (204, b"")
    assert (await c.call("GET", "/dev/next"))[0] == 200
    await c.aclose()


async def test_an_upstream_connection_idle_past_five_seconds_is_closed_when_the_pool_is_used(
    start_daemon: StartDaemon, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    """Two requests at once leave two pooled connections; one is used again 4 s later; 2 s after that, when it comes back to the pool, the other, idle for 6 s, is closed (the upstream sees it end), and the fresh one is kept."""
    _, s = await _logged_in(start_daemon, upstream)
    a = await HttpClient.connect(s.socket_path)
    b = await HttpClient.connect(s.socket_path)
    release = trio.Event()

    async def held(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        await release.wait()  # (both requests are upstream at once: two connections)
        await _json_answer(up, req, body, stream, conn)

    upstream.script.extend([held, held])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.call, "GET", "/dev/a")
        nursery.start_soon(b.call, "GET", "/dev/b")
        while len(upstream.received) < 2:
            await trio.sleep(0.01)
        release.set()
    assert upstream.connections == 2
    await trio.sleep(4)
    assert (await a.call("GET", "/dev/c"))[0] == 200  # (on the newer of the two)
    await trio.sleep(2)
    assert (await a.call("GET", "/dev/d"))[0] == 200  # (on the same, given back: the other goes)
    await trio.sleep(0.1)
    assert upstream.connections == 1
    await a.aclose()
    await b.aclose()


async def test_a_request_the_trio_side_serves_keeps_the_connections_rate(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """Two requests allowed a connection (burst 2): the relay serves a GET, a chunked POST goes to the trio side with the rate spent so far, and a third request gets 429 there."""
    _, s = await _logged_in(
        start_daemon, upstream, limits={"requests_per_second": 0.01, "request_burst": 2}
    )
    requests = (
        b"GET /dev/a HTTP/1.1\r\nHost: credproxy\r\n\r\n"
        b"POST /dev/b HTTP/1.1\r\nHost: credproxy\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
        b"GET /dev/c HTTP/1.1\r\nHost: credproxy\r\nConnection: close\r\n\r\n"
    )
    reply = await _raw(s.socket_path, requests)
    assert _statuses(reply) == [200, 200, 429]
    assert [r["target"] for r in upstream.received] == ["/v1/a", "/v1/b"]
    assert upstream.received[1]["body"] == b"hello"


def _answering(payload: bytes) -> Any:
    """An upstream handler that answers 200 with *payload* (its Content-Length), in one write."""

    async def handler(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        head = [(b"content-length", b"%d" % len(payload))]
        await stream.send_all(
            conn.send(h11.Response(status_code=200, headers=head))
            + conn.send(h11.Data(data=payload))
            + conn.send(h11.EndOfMessage())
        )

    return handler


_answer_32k = _answering(b"y" * 32_000)


async def test_pipelined_requests_wait_while_their_answers_are_not_read(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A sandbox sends 300 requests at once and reads nothing: the relay stops starting them once about 1 MiB of answers waits for it (as the trio side would, one answer at a time), then, as it reads, gets all 300 answers in order."""
    _, s = await _logged_in(start_daemon, upstream)
    upstream.script.extend([_answer_32k] * 300)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(
        b"".join(
            b"GET /dev/i/%d HTTP/1.1\r\nHost: c\r\n%s\r\n" % (i, _CLOSE if i == 299 else b"")
            for i in range(300)
        )
    )
    await trio.sleep(1.0)
    held = len(upstream.received)
    # (1 MiB of 32 KB answers, and what the socket's own buffers hold)
    assert held < 100, f"the relay fetched {held} answers for a client that reads nothing"
    reply = b""
    with trio.fail_after(30):
        while chunk := await sock.recv(1 << 20):
            reply += chunk
    sock.close()
    assert _statuses(reply) == [200] * 300
    assert [r["target"] for r in upstream.received] == [f"/v1/i/{i}" for i in range(300)]


async def test_a_client_that_half_closes_gets_all_of_a_big_answer(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A sandbox sends its request, shuts down its sending side, then reads slowly: it gets the whole 600 KB answer (more than the socket holds at once), then the connection's end."""
    _, s = await _logged_in(start_daemon, upstream)
    payload = bytes(range(256)) * 2400
    upstream.script.append(_answering(payload))
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(b"GET /dev/big HTTP/1.1\r\nHost: c\r\n\r\n")
    sock.shutdown(trio.socket.SHUT_WR)
    await trio.sleep(0.5)  # (the answer is in, and more of it than the socket takes)
    with trio.fail_after(10):
        reply = await _read_slowly(sock, 0.001)
    assert _statuses(reply) == [200]
    assert reply.endswith(payload)


async def _read_slowly(sock: Any, pause: float) -> bytes:
    """Everything *sock* gets until its end, 16 KiB at a time with *pause* s between; closed."""
    reply = b""
    while chunk := await sock.recv(16384):
        reply += chunk
        await trio.sleep(pause)
    sock.close()
    return bytes(reply)


async def test_a_client_that_stops_reading_before_its_answer_counts_once(
    start_daemon: StartDaemon, upstream: Upstream, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """A sandbox sends a request and shuts down its reading side; the whole answer comes in one read and cannot be sent: the exchange ends once (one audit line, 499), and the session's one stream in flight is counted right after it (a second request at once is refused)."""
    _, s = await _logged_in(start_daemon, upstream, proxy={"max_streams": 1})
    # (the whole answer in one read: its end follows the send)
    upstream.script.append(_answering(b"ok"))
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(b"GET /dev/deaf HTTP/1.1\r\nHost: c\r\n\r\n")
    sock.shutdown(trio.socket.SHUT_RD)
    while not [e for e in _audit(no_secrets_in_logs) if e["path"] == "/deaf"]:
        await trio.sleep(0.01)
    await trio.sleep(0.1)
    assert [e["status"] for e in _audit(no_secrets_in_logs)] == [499]
    sock.close()
    # (counted twice, the session's streams in flight would be -1: two requests at once)
    release = trio.Event()

    async def held(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        await release.wait()
        await _json_answer(up, req, body, stream, conn)

    upstream.script.extend([held, held])
    first = await HttpClient.connect(s.socket_path)
    second = await HttpClient.connect(s.socket_path)
    async with trio.open_nursery() as nursery:
        got: list[int] = []

        async def call(c: HttpClient, path: str) -> None:
            got.append((await c.call("GET", path))[0])

        nursery.start_soon(call, first, "/dev/one")
        while len(upstream.received) < 2:
            await trio.sleep(0.01)
        await call(second, "/dev/two")  # (its turn while the first is upstream: refused)
        release.set()
    assert sorted(got) == [200, 503]
    await first.aclose()
    await second.aclose()


async def test_bytes_after_a_whole_answer_leave_the_answer_and_drop_the_connection(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """An upstream sends a whole answer and, in the same write, bytes that are no answer: the sandbox gets that answer, the request went upstream once, and the connection is not used again."""
    _, s = await _logged_in(start_daemon, upstream)

    async def junk_after(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhiXYZ")
        await stream.aclose()

    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/warm"))[0] == 200  # (a pooled connection to reuse)
    upstream.script.append(junk_after)
    status, _, body = await c.call("POST", "/dev/charge", body=b'{"n": 1}')
    assert (status, body) == (200, b"hi")
    assert [r["target"] for r in upstream.received] == ["/v1/warm", "/v1/charge"]
    assert (await c.call("GET", "/dev/after"))[0] == 200
    await c.aclose()


async def test_an_unasked_switch_of_protocols_is_a_502(
    start_daemon: StartDaemon, upstream: Upstream, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """An upstream that answers a plain request with ``101 Switching Protocols``: the sandbox gets a 502 (an answer the relay cannot pass on), not a 500, and no crash is logged."""
    _, s = await _logged_in(start_daemon, upstream)

    async def switch(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
        )
        await stream.aclose()

    upstream.script.append(switch)
    reply = await _raw(s.socket_path, b"GET /dev/plain HTTP/1.1\r\nHost: c\r\n%s\r\n" % _CLOSE)
    assert _statuses(reply) == [502], reply[:300]
    assert not [e for e in no_secrets_in_logs if e["event"] == "api_connection_crashed"]


async def test_a_401_cut_short_is_retried_with_a_new_token(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """The upstream answers 401, sends part of its body and hangs up: the request goes again with a refreshed token and its answer reaches the sandbox (before, the sandbox's connection closed with no answer at all)."""
    h, s = await _logged_in(start_daemon, upstream, renewal={"refresh_cooldown": 0})

    async def cut_401(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        await stream.send_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 100\r\n\r\n0123456789")
        await stream.aclose()

    upstream.script.append(cut_401)
    c = await HttpClient.connect(s.socket_path)
    status, _, _ = await c.call("POST", "/dev/x", body=b'{"n": 1}')
    assert status == 200
    first, second = upstream.received
    assert first["headers"]["authorization"] != second["headers"]["authorization"]
    assert second["body"] == b'{"n": 1}'
    assert h.idp.refresh_count == 1
    await c.aclose()


async def _hang_up_unanswered(
    up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
) -> None:
    """The upstream closes a kept-alive connection with the request read and no answer."""
    await stream.aclose()


@pytest.mark.parametrize(("method", "sent"), [("GET", 2), ("POST", 1)])
async def test_a_request_a_reused_connection_drops_is_sent_again_only_if_it_may_be(
    start_daemon: StartDaemon, upstream: Upstream, method: str, sent: int
) -> None:
    """A pooled connection the upstream closes after reading the request, with no answer: a GET is sent once more on a new connection and answered; a POST, which the upstream may have acted on, is not sent again and gets a 502 (the sandbox's client decides whether to retry)."""
    _, s = await _logged_in(start_daemon, upstream)
    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/warm"))[0] == 200
    upstream.script.append(_hang_up_unanswered)
    status, _, _ = await c.call(method, "/dev/act", body=b"{}" if method == "POST" else b"")
    assert status == (200 if method == "GET" else 502)
    assert [r["target"] for r in upstream.received] == ["/v1/warm"] + ["/v1/act"] * sent
    await c.aclose()


async def test_a_slow_steady_reader_gets_a_long_answer_whole_past_the_read_timeout(
    start_daemon: StartDaemon, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    """A 3 MiB answer to a sandbox that reads 16 KiB every quarter second (about 12 s in all) with a read timeout of 5 s: the relay stops reading the upstream while 1 MiB waits for the client, that wait is not the upstream's silence, and the answer arrives whole."""
    _, s = await _logged_in(start_daemon, upstream, proxy={"read_timeout": 5.0})
    payload = bytes(range(256)) * (3 * 4096)
    upstream.script.append(_answering(payload))
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(b"GET /dev/big HTTP/1.1\r\nHost: c\r\n%s\r\n" % _CLOSE)
    reply = await _read_slowly(sock, 0.25)
    assert _statuses(reply) == [200]
    assert reply.endswith(payload)


async def test_a_streamed_answer_does_not_keep_the_request_body(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """Once its answer has begun (no retry can come after), a 1 MiB request body is no longer held by the relay, while the stream goes on."""
    h, s = await _logged_in(start_daemon, upstream)
    upstream.script.append(sse)
    c = await HttpClient.connect(s.socket_path)
    await c.send("POST", "/dev/stream", body=b"x" * (1 << 20))
    got = b""
    while b"data: one" not in got:
        got += await c.stream.receive_some(65536)
    relay = h.daemon.loop.relay
    assert relay is not None
    exchanges = [
        conn.x for conn in relay.handlers.values() if isinstance(conn, HttpConn) and conn.x
    ]
    assert [(x.body_size, len(x.body)) for x in exchanges] == [(1 << 20, 0)]
    upstream.release.set()
    await c.aclose()


async def _no_length(
    up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
) -> None:
    """An answer without Content-Length (chunked on the upstream's side)."""
    await stream.send_all(
        conn.send(h11.Response(status_code=200, headers=[(b"content-type", b"text/plain")])) or b""
    )
    for part in (b"first ", b"second"):
        await stream.send_all(conn.send(h11.Data(data=part)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def test_an_answer_without_length_is_chunked_for_http_1_1_and_ends_the_connection_for_1_0(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """The relay frames answers as h11 would: chunked to an HTTP/1.1 client (the connection kept), the end of the connection to an HTTP/1.0 one."""
    _, s = await _logged_in(start_daemon, upstream)
    upstream.script += [_no_length, _no_length, _no_length]
    c = await HttpClient.connect(s.socket_path)
    status, headers, body = await c.call("GET", "/dev/a")
    assert (status, headers.get("transfer-encoding"), body) == (200, "chunked", b"first second")
    assert (await c.call("GET", "/dev/b"))[0] == 200  # the same connection goes on
    await c.aclose()
    reply = await _raw(s.socket_path, b"GET /dev/c HTTP/1.0\r\nHost: credproxy\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower() and body == b"first second"


async def test_a_client_that_stops_reading_holds_back_the_upstream_and_is_dropped(
    start_daemon: StartDaemon,
    upstream: Upstream,
    autojump_clock: trio.testing.MockClock,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """A sandbox that reads nothing of a fast stream: the relay stops reading the upstream (which can push only a few MiB), and once nothing moves for the send timeout the client is dropped, the upstream connection closed, and the audit line says 499."""
    pushed = [0]
    ended = trio.Event()

    async def flood(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])) or b"")
        chunk = b"x" * 65536
        try:
            while True:
                await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
                pushed[0] += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ended.set()

    _, s = await _logged_in(start_daemon, upstream)
    upstream.script.append(flood)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(b"GET /dev/flood HTTP/1.1\r\nHost: credproxy\r\n\r\n")
    t0 = trio.current_time()
    with trio.fail_after(120):
        await ended.wait()
    assert 10 <= trio.current_time() - t0 <= 30
    assert pushed[0] < 32 * 2**20, f"the upstream pushed {pushed[0] >> 20} MiB into the relay"
    with trio.fail_after(5):
        while not [e for e in no_secrets_in_logs if e["event"] == "api_request"]:
            await trio.sleep(0.01)
    (line,) = [e for e in no_secrets_in_logs if e["event"] == "api_request"]
    assert line["status"] == 499
    sock.close()


async def test_an_upstream_head_without_end_is_a_502_not_a_memory_sink(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """An upstream that sends header lines without end: the relay gives up past 64 KiB with a 502 naming the host (closing that connection, as for any 5xx); the next connection is served."""

    async def endless_head(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\n")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for i in itertools.count():  # (until the relay hangs up)
                await stream.send_all(b"x-filler-%d: %s\r\n" % (i, b"a" * 200))

    _, s = await _logged_in(start_daemon, upstream)
    upstream.script.append(endless_head)
    c = await HttpClient.connect(s.socket_path)
    with trio.fail_after(10):
        status, _, body = await c.call("GET", "/dev/a")
    assert status == 502 and b"127.0.0.1" in body, body
    await c.aclose()
    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/b"))[0] == 200
    await c.aclose()


async def test_a_head_whose_end_comes_with_a_full_read_of_body_is_not_too_large(
    start_daemon: StartDaemon, upstream: Upstream, nursery: trio.Nursery
) -> None:
    """A plain-http upstream sends part of its head, then the rest with 70,000 bytes of body in one write: the relay reads the end of the head in a full 64 KiB read and relays the answer (before, that read counted as head: a 502)."""
    payload = b"z" * 70_000

    async def serve(stream: trio.SocketStream) -> None:
        got = b""
        while b"\r\n\r\n" not in got:
            got += await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(payload))
        await trio.sleep(0.2)  # (the relay reads this part of the head alone)
        await stream.send_all(b"\r\n" + payload)
        await stream.aclose()

    (listener,) = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    plain = {"dev": {"api": {"base_url": f"http://127.0.0.1:{port}/v1"}}}
    _, s = await _logged_in(start_daemon, upstream, providers=plain)
    reply = await _raw(s.socket_path, b"GET /dev/a HTTP/1.1\r\nHost: c\r\n%s\r\n" % _CLOSE)
    assert _statuses(reply) == [200], reply[:300]
    assert reply.endswith(payload)


async def test_a_stream_is_cut_once_silent_for_the_read_timeout_counted_from_its_last_event(
    start_daemon: StartDaemon,
    upstream: Upstream,
    autojump_clock: trio.testing.MockClock,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """An upstream stream that sends an event every 2 s for 10 s, with a read timeout of 5 s, reaches the sandbox whole; once it falls silent, the relay ends it 5 s after its last event: the sandbox's connection closes without the stream's end, and the upstream connection is closed, not pooled."""
    closed = trio.Event()

    async def paced(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        head = h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")])
        await stream.send_all(conn.send(head) or b"")
        for i in range(5):
            await stream.send_all(conn.send(h11.Data(data=b"data: %d\n\n" % i)) or b"")
            await trio.sleep(2)
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some(65536):  # silent, until the relay hangs up
                pass
        closed.set()

    _, s = await _logged_in(start_daemon, upstream, proxy={"read_timeout": 5.0})
    upstream.script.append(paced)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(b"GET /dev/events HTTP/1.1\r\nHost: credproxy\r\n\r\n")
    got, last = b"", 0.0
    with trio.fail_after(60):
        while chunk := await sock.recv(65536):
            got += chunk
            if b"data: " in chunk:
                last = trio.current_time()
        ended = trio.current_time()
        await closed.wait()
    sock.close()
    assert got.startswith(b"HTTP/1.1 200 ")
    assert [b"data: %d" % i in got for i in range(5)] == [True] * 5
    assert not got.endswith(b"0\r\n\r\n"), "a stream cut short must not look whole"
    assert 5.0 <= ended - last <= 6.0, ended - last
    with trio.fail_after(5):
        while not [e for e in no_secrets_in_logs if e["event"] == "api_upstream_broke_off"]:
            await trio.sleep(0.01)
    (line,) = [e for e in no_secrets_in_logs if e["event"] == "api_upstream_broke_off"]
    assert "sent nothing for the read timeout" in line["error"]


async def test_relayed_requests_leave_no_garbage_for_the_cycle_collector(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """200 requests relayed on one kept-alive connection leave (next to) nothing that only the cycle collector frees: its passes stall every connection the loop serves, so they must stay rare."""
    _, s = await _logged_in(start_daemon, upstream)
    c = await HttpClient.connect(s.socket_path)
    for i in range(20):  # (warm: the pool, the memos)
        assert (await c.call("GET", f"/dev/warm/{i}"))[0] == 200
    gc.collect()
    gc.disable()
    try:
        for i in range(200):
            assert (await c.call("GET", f"/dev/item/{i}"))[0] == 200
        found = gc.collect()
    finally:
        gc.enable()
    await c.aclose()
    assert found < 20, f"{found} objects in reference cycles after 200 requests"


async def test_an_upstream_that_sends_more_than_its_answer_is_not_reused(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """An upstream whose answer is followed, in the same write, by bytes nobody asked for (the start of another answer): the sandbox gets the answer, and the next request goes on a new connection, sent upstream once, its answer its own."""

    async def answer_and_more(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        payload = b'{"first": true}'
        head = h11.Response(
            status_code=200, headers=[(b"content-length", str(len(payload)).encode())]
        )
        whole = conn.send(head) + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
        await stream.send_all(whole + b"HTTP/1.1 200 OK\r\nx-stray: 1\r\n")

    _, s = await _logged_in(start_daemon, upstream)
    upstream.script.append(answer_and_more)
    c = await HttpClient.connect(s.socket_path)
    status, _, body = await c.call("GET", "/dev/a")
    assert (status, body) == (200, b'{"first": true}')
    status, _, body = await c.call("GET", "/dev/b")
    assert status == 200 and b'"path": "/v1/b"' in body, body
    assert [r["target"] for r in upstream.received] == ["/v1/a", "/v1/b"]
    await c.aclose()
