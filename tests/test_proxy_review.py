"""The API proxy under what a review of issue 16's work found: each a request a tool or a sandbox can send.

Same setting as ``test_isolation.py``: the live daemon in this test's trio
loop, a real TLS upstream on loopback, the development IdP, raw clients on
real session sockets.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import time
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
from test_isolation import _daemon, _logged_in, _raw
from test_proxy import HttpClient, Upstream, upstream  # noqa: F401
from test_reload import StartLive, WatchedIdP, edit, idp, provider, start_live  # noqa: F401

from conftest import StartDaemon
from credproxy.core.config import parse
from credproxy.core.names import Key
from credproxy.errors import ConfigError


async def test_a_header_value_with_non_ascii_bytes_is_forwarded_as_it_came(
    start_daemon: StartDaemon, upstream: Upstream, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """`X-Title: café` in Latin-1 (legal in HTTP, refused by httpx as text) reaches the upstream byte for byte; no crash."""
    _, s = await _logged_in(start_daemon, upstream)
    reply = await _raw(
        s.socket_path,
        b"GET /dev/x HTTP/1.1\r\nHost: credproxy\r\nX-Title: caf\xe9\r\nConnection: close\r\n\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 200"), reply[:80]
    (raw_title,) = [v for n, v in upstream.received[0]["raw_headers"] if n == "x-title"]
    assert raw_title.encode("latin-1") == b"caf\xe9"
    assert not [e for e in no_secrets_in_logs if "crash" in e["event"] or e.get("exc_info")]


async def test_a_failing_idp_is_asked_once_per_cooldown_however_many_proxied_requests(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A token inside its serve margin, an IdP answering 500: 10 proxied requests cause one refresh attempt, and all are served with the still-valid token."""
    h = await _daemon(start_daemon, upstream, lifetime=100)
    h.login()
    s = await h.session("dev")
    c = await HttpClient.connect(s.socket_path)
    assert (await c.call("GET", "/dev/x"))[0] == 200  # the daemon has seen the token's lifetime
    await c.aclose()
    h.wall.jump(70)  # 30 s left: inside the serve margin (half the lifetime), still valid
    h.idp.fail_next("server_error", count=50)
    statuses = []
    for _ in range(10):
        c = await HttpClient.connect(s.socket_path)
        statuses.append((await c.call("GET", "/dev/x"))[0])
        await c.aclose()
    assert statuses == [200] * 10
    health = h.daemon.tokens.known_health(Key("dev", "default"))
    assert health is not None and health.failures == 1, "the IdP was asked more than once"


async def test_a_half_closed_client_still_gets_its_answer(
    start_daemon: StartDaemon, upstream: Upstream, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """`nc -N`: the request, then shutdown(SHUT_WR); the answer still comes, audited 200."""
    _, s = await _logged_in(start_daemon, upstream)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(b"GET /dev/x HTTP/1.1\r\nHost: credproxy\r\nConnection: close\r\n\r\n")
    sock.shutdown(trio.socket.SHUT_WR)
    got = b""
    with trio.fail_after(10):
        while chunk := await sock.recv(65536):
            got += chunk
    sock.close()
    assert got.startswith(b"HTTP/1.1 200"), got[:80]
    with trio.fail_after(5):
        while not [e for e in no_secrets_in_logs if e["event"] == "api_request"]:
            await trio.sleep(0.01)
    (line,) = [e for e in no_secrets_in_logs if e["event"] == "api_request"]
    assert line["status"] == 200


async def test_an_upstream_that_breaks_off_leaves_no_clean_end(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """The upstream dies mid-body: the client's connection closes without the last chunk, so the truncated answer cannot pass for a whole one."""

    async def broken(up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: Any) -> None:
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])) or b"")
        await stream.send_all(conn.send(h11.Data(data=b"data: one\n\n")) or b"")
        await stream.aclose()  # no terminating chunk

    upstream.script.append(broken)
    _, s = await _logged_in(start_daemon, upstream)
    c = await HttpClient.connect(s.socket_path)
    await c.send("GET", "/dev/stream")
    assert isinstance(await c.event(), h11.Response)
    assert isinstance(await c.event(), h11.Data)
    with trio.fail_after(10):
        try:
            event = await c.event()
        except h11.RemoteProtocolError:
            event = None  # the connection closed before the end of the message
    assert not isinstance(event, h11.EndOfMessage)
    await c.aclose()


async def test_a_malformed_chunked_body_is_audited_as_the_400_it_got(
    start_daemon: StartDaemon, upstream: Upstream, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """A chunk size that is not hex: the client gets 400 and the audit line says 400, not 0."""
    _, s = await _logged_in(start_daemon, upstream)
    reply = await _raw(
        s.socket_path,
        b"POST /dev/x HTTP/1.1\r\nHost: credproxy\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    )
    assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
    with trio.fail_after(5):
        while not [e for e in no_secrets_in_logs if e["event"] == "api_request"]:
            await trio.sleep(0.01)
    (line,) = [e for e in no_secrets_in_logs if e["event"] == "api_request"]
    assert line["status"] == 400


async def test_expect_100_continue_is_answered_before_the_body(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """curl's `Expect: 100-continue`: the proxy says 100 at once, then the body goes upstream."""
    _, s = await _logged_in(start_daemon, upstream)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(
        b"POST /dev/x HTTP/1.1\r\nHost: credproxy\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    with trio.fail_after(0.9):  # curl would send the body anyway after 1 s
        interim = await sock.recv(65536)
    assert interim.startswith(b"HTTP/1.1 100"), interim[:80]
    await sock.send(b"hello")
    got = b""
    with trio.fail_after(10):
        while chunk := await sock.recv(65536):
            got += chunk
    sock.close()
    assert b"HTTP/1.1 200" in got
    assert upstream.received[0]["body"] == b"hello"
    assert "expect" not in upstream.received[0]["headers"]


async def test_headers_that_pick_who_pays_never_come_from_the_sandbox(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """OpenAI-Organization, OpenAI-Project and X-Goog-User-Project from the sandbox are dropped (the host's template may set them)."""
    _, s = await _logged_in(start_daemon, upstream)
    c = await HttpClient.connect(s.socket_path)
    sent = [
        ("openai-organization", "org-other"),
        ("openai-project", "proj-other"),
        ("x-goog-user-project", "billing-other"),
    ]
    assert (await c.call("GET", "/dev/x", headers=sent))[0] == 200
    got = upstream.received[-1]["headers"]
    assert not {"openai-organization", "openai-project", "x-goog-user-project"} & set(got)
    await c.aclose()


async def test_refusals_for_who_or_where_close_the_connection(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A forwarded request with a foreign Host: 403, and the connection closes (a second pipelined request gets nothing)."""
    _, s = await _logged_in(start_daemon, upstream)
    head = b"GET /dev/x HTTP/1.1\r\nHost: attacker.example:4000\r\n\r\n"
    reply = await _raw(s.socket_path, b"CREDPROXY/1 forward=4000\r\n" + head + head)
    assert reply.startswith(b"HTTP/1.1 403")
    assert reply.count(b"HTTP/1.1") == 1  # closed after the first refusal
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"].startswith("Host")
    assert upstream.received == []


async def test_fill_first_says_a_failover_once_and_does_not_walk_on_every_request(
    start_daemon: StartDaemon, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """Only the second bucket is logged in: 50 get_token without a bucket serve it, with one bucket_failover line, not fifty."""
    h = await start_daemon(limits={"idle_timeout": 1e9})
    h.login(bucket="b")
    s = await h.session("dev:a,b")
    p = await h.peer(s)
    for _ in range(50):
        reply = await p.call("get_token", {"provider": "dev"})
        assert reply["data"]["access_token"] == h.store.read("dev", "b")["access_token"]
    lines = [e for e in no_secrets_in_logs if e["event"] == "bucket_failover"]
    assert len(lines) == 1, len(lines)
    assert lines[0]["reasons"] == {"a": "no-token"}


async def test_an_api_with_only_key_headers_needs_no_login_nor_token_url(
    start_daemon: StartDaemon,
    upstream: Upstream,
    tmp_path: Path,
) -> None:
    """A provider whose API headers name only {key:NAME} loads without token_url or client_id, and its requests go out with the key though no login is stored."""
    text = (
        '[providers.openai.api]\nbase_url = "https://api.openai.com/v1"\n'
        'headers = { Authorization = "Bearer {key:openai}" }\n'
    )
    parse(text, tmp_path / "config.toml")  # loads: no token_url, no client_id, no error
    with pytest.raises(ConfigError, match="token_url"):
        parse(text.replace("{key:openai}", "{access_token}"), tmp_path / "config.toml")
    api = {"base_url": upstream.url, "headers": {"Authorization": "Bearer {key:openai}"}}
    h = await start_daemon(providers={"openai": {"api": api}})
    h.store.write_key("openai", "sk-KEY-only-1")
    s = await h.session("api:openai", "key:openai")
    c = await HttpClient.connect(s.socket_path)
    status, _, _ = await c.call("GET", "/openai/models")
    assert status == 200
    assert upstream.headers()["authorization"] == "Bearer sk-KEY-only-1"
    assert h.store.read("openai", "default") is None  # nothing was logged in, or needed
    await c.aclose()


async def _answers(sock: trio.socket.SocketType, method: bytes) -> h11.Response:
    """The next answer on *sock*, read whole (h11, for a request of *method*)."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/", headers=[(b"host", b"x")]))
    head: h11.Response | None = None
    with trio.fail_after(10):
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await sock.recv(65536))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return head


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_an_upstream_refusing_an_upload_after_its_head_is_relayed_with_the_connection_s_fate(
    start_daemon: StartDaemon, nursery: trio.Nursery, framing: str
) -> None:
    """An upstream that answers 413 after a 3 MB upload's head, and closes: the client gets the 413, with Connection: close while its body was still coming (chunked, streamed), else on a connection that carries its next request."""

    async def refuse_after_head(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        body = b'{"error":"too large"}'
        await stream.send_all(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        await stream.aclose()

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, refuse_after_head, 0, host="127.0.0.1")
    )
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    api = {"base_url": base, "headers": {"Authorization": "Bearer {access_token}"}}
    h = await start_daemon(providers={"dev": {"api": api}})
    h.login()
    s = await h.session("dev")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    piece = b"x" * 0x4000
    chunked = framing == "chunked"
    frame = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % (200 * len(piece))
    await sock.send(b"POST /dev/upload HTTP/1.1\r\nHost: credproxy\r\n" + frame + b"\r\n\r\n")

    async def upload() -> None:
        with contextlib.suppress(OSError):  # (refused midway: the rest has nowhere to go)
            for _ in range(200):
                await sock.send(b"4000\r\n" + piece + b"\r\n" if chunked else piece)
            if chunked:
                await sock.send(b"0\r\n\r\n")

    nursery.start_soon(upload)
    answer = await _answers(sock, b"POST")
    assert answer.status_code == 413
    if chunked:
        assert (b"connection", b"close") in list(answer.headers)
    else:  # (the relay had read the whole body before sending it)
        assert (b"connection", b"close") not in list(answer.headers)
        await sock.send(b"GET /dev/next HTTP/1.1\r\nHost: credproxy\r\n\r\n")
        assert (await _answers(sock, b"GET")).status_code == 413
    sock.close()


async def test_a_refusal_reaches_a_client_still_streaming_its_body_at_once(
    start_daemon: StartDaemon,
) -> None:
    """A chunked upload whose upstream cannot be reached gets its 502 while its body is still coming (not after body_timeout); a 404 is answered as early, and the connection then carries the next request once the body has ended."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # (bound, never listening: connections are refused)
    api = {
        "base_url": f"http://127.0.0.1:{closed.getsockname()[1]}",
        "headers": {"Authorization": "Bearer {access_token}"},
    }
    h = await start_daemon(providers={"dev": {"api": api}}, proxy={"body_timeout": 600})
    h.login()
    s = await h.session("dev")
    upload = b"POST /%s/x HTTP/1.1\r\nHost: credproxy\r\nTransfer-Encoding: chunked\r\n\r\n"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    with trio.fail_after(10):  # (600 s if it waited for the body)
        await sock.send(upload % b"dev" + b"4\r\nabcd\r\n")
        assert (await _answers(sock, b"POST")).status_code == 502
    sock.close()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    with trio.fail_after(10):
        await sock.send(upload % b"other" + b"4\r\nabcd\r\n")
        refused = await _answers(sock, b"POST")
        assert refused.status_code == 404
        assert (b"connection", b"close") not in list(refused.headers)
        await sock.send(b"4\r\nefgh\r\n0\r\n\r\nGET /other/y HTTP/1.1\r\nHost: credproxy\r\n\r\n")
        assert (await _answers(sock, b"GET")).status_code == 404
    sock.close()
    closed.close()


async def _reloaded_while_waiting(
    live: Any, the_idp: WatchedIdP, method: str, new_config: str
) -> tuple[int, Any, bytes]:
    """*method* /dev/models with an expired token at a slow IdP; while it waits, the config becomes *new_config* and is reloaded: the answer."""
    expired = the_idp.mint()
    expired["expiry"] = time.time() - 60  # serving it needs a refresh
    live.store.write("dev", "default", expired)
    http = await HttpClient.connect((await live.session("*")).socket_path)
    the_idp.fail_next("slow", delay=1.5)
    answer: list[tuple[int, Any, bytes]] = []

    async def ask() -> None:
        answer.append(await http.call(method, "/dev/models"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        with trio.fail_after(10):
            await the_idp.slow_started.wait()  # the request waits for its token now
        edit(live.dirs.config, new_config)
        await live.daemon.reload("command")
    await http.aclose()
    (got,) = answer
    return got


@pytest.mark.parametrize("method", ["GET", "HEAD"])  # GET: the loop's relay; HEAD: the trio side
@pytest.mark.parametrize("change", ["api_removed", "provider_renamed"])
async def test_a_reload_that_takes_the_api_away_while_a_request_waits_for_its_token(
    start_live: StartLive,
    idp: tuple[WatchedIdP, str],
    upstream: Upstream,
    no_secrets_in_logs: list[dict[str, Any]],
    method: str,
    change: str,
) -> None:
    """A reload that removes the provider's api section (or renames the provider) while a request waits for a refresh: the request gets the 404 a later one gets, not a 500 and a crash in the log."""
    the_idp, url = idp
    live = await start_live(provider("dev", url, api=upstream.url))
    renamed = provider("dev2", url, upstream.url)
    new = provider("dev", url) if change == "api_removed" else renamed
    status, _, body = await _reloaded_while_waiting(live, the_idp, method, new)
    assert status == 404, (status, body)
    crashes = [e["event"] for e in no_secrets_in_logs if e["event"].endswith(("crashed", "failed"))]
    assert crashes == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])  # GET: the loop's relay; HEAD: the trio side
async def test_a_reload_that_moves_the_api_while_a_request_waits_sends_nothing_to_the_old_host(
    start_live: StartLive,
    idp: tuple[WatchedIdP, str],
    upstream: Upstream,
    method: str,
) -> None:
    """A reload gives dev's api a new base_url and a new key header while a request waits for its token: the request is answered 503 (send it again) and the old base_url gets nothing, least of all the new api's credentials."""
    the_idp, url = idp

    def api(base: str, extra: str = "") -> str:
        return (
            f'[providers.dev]\ntoken_url = "{url}"\nclient_id = "credproxy-dev"\n'
            f'[providers.dev.api]\nbase_url = "{base}"\n'
            'headers = { Authorization = "Bearer {access_token}"' + extra + " }\n"
        )

    live = await start_live(api(upstream.url))
    live.store.write_key("bkey", "CANARY-for-v2-only")
    moved = api(upstream.url.replace("/v1", "/v2"), ', X-Api-Key = "{key:bkey}"')
    status, _, _ = await _reloaded_while_waiting(live, the_idp, method, moved)
    assert status == 503
    assert upstream.received == []
