"""The HTTP API proxy on session sockets (issue 13), against a fake HTTPS upstream on loopback.

The upstream is a real TLS server (trio + h11) with a certificate from a test
CA (``trustme``) that the daemon trusts through ``SSL_CERT_FILE``, as a user
adds a corporate CA. It records every request it receives. The sandbox side is
a raw HTTP/1.1 client (h11) on the session's Unix socket.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
import trustme

from conftest import Harness, StartDaemon
from credproxy.core.names import Key

Handler = Callable[
    ["Upstream", h11.Request, bytes, trio.SSLStream[Any], h11.Connection], Awaitable[None]
]


@dataclass
class Upstream:
    """A scripted HTTPS API: what it received, and how it answers."""

    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    script: list[Handler] = field(default_factory=list)
    cancelled: int = 0
    hanging: int = 0
    connections: int = 0  # open now (the proxy's pooled ones among them)
    release: trio.Event = field(default_factory=trio.Event)

    def headers(self, i: int = -1) -> dict[str, str]:
        return self.received[i]["headers"]


async def _json_answer(
    up: Upstream,
    req: h11.Request,
    body: bytes,
    stream: trio.SSLStream[Any],
    conn: h11.Connection,
    status: int = 200,
) -> None:
    payload = json.dumps({"path": req.target.decode(), "got": len(body)}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    if status == 429:
        headers.append((b"retry-after", b"120"))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


def answer(status: int) -> Handler:
    async def handler(
        up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
    ) -> None:
        await _json_answer(up, req, body, stream, conn, status)

    return handler


async def sse(
    up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
) -> None:
    """Two server-sent events; the second only once the test has seen the first."""
    await stream.send_all(
        conn.send(h11.Response(status_code=200, headers=[(b"content-type", b"text/event-stream")]))
        or b""
    )
    await stream.send_all(conn.send(h11.Data(data=b"data: one\n\n")) or b"")
    await up.release.wait()
    await stream.send_all(conn.send(h11.Data(data=b"data: two\n\n")) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def endless(
    up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
) -> None:
    """A stream that never ends (until the proxy hangs up on it)."""
    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])) or b"")
    try:
        while True:
            await stream.send_all(conn.send(h11.Data(data=b"data: tick\n\n")) or b"")
            await trio.sleep(0.01)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        up.cancelled += 1


async def _serve_upstream(up: Upstream, stream: trio.SSLStream[Any]) -> None:
    up.connections += 1
    try:
        await _serve_connection(up, stream)
    finally:
        up.connections -= 1


async def _serve_connection(up: Upstream, stream: trio.SSLStream[Any]) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, h11.Request):
                body = b""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    if isinstance(ev, h11.Data):
                        body += ev.data
                    if isinstance(ev, h11.EndOfMessage):
                        break
                up.received.append(
                    {
                        "method": event.method.decode(),
                        "target": event.target.decode(),
                        "headers": {
                            k.decode().lower(): v.decode("latin-1") for k, v in event.headers
                        },
                        "raw_headers": [
                            (k.decode().lower(), v.decode("latin-1")) for k, v in event.headers
                        ],
                        "body": body,
                    }
                )
                handler = up.script.pop(0) if up.script else answer(200)
                await handler(up, event, body, stream, conn)
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
            else:
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        return


@pytest.fixture
async def upstream(
    nursery: trio.Nursery, tmp_short: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Upstream]:
    """A fake HTTPS API on 127.0.0.1 whose test CA the daemon trusts (SSL_CERT_FILE)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_file = tmp_short / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    up = Upstream(url="")
    listeners = await nursery.start(
        trio.serve_ssl_over_tcp,
        lambda s: _serve_upstream(up, s),
        0,
        server_ctx,
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    up.url = f"https://127.0.0.1:{port}/v1"
    return up


class HttpClient:
    """A raw HTTP/1.1 client on a session socket (the sandbox's side)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.received = bytearray()

    @classmethod
    async def connect(cls, path: Path) -> HttpClient:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(str(path))
        return cls(trio.SocketStream(sock))

    async def send(
        self, method: str, target: str, headers: list[tuple[str, str]] = (), body: bytes = b""
    ) -> None:  # type: ignore[assignment]
        hs = [("host", "credproxy"), *headers]
        if body:
            hs.append(("content-length", str(len(body))))
        await self.stream.send_all(
            self.conn.send(h11.Request(method=method, target=target, headers=hs)) or b""
        )
        if body:
            await self.stream.send_all(self.conn.send(h11.Data(data=body)) or b"")
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()) or b"")

    async def event(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            data = await self.stream.receive_some(65536)
            self.received += data
            self.conn.receive_data(data)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await self.event()
        assert isinstance(head, h11.Response), head
        body = b""
        while True:
            ev = await self.event()
            if isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return head.status_code, {k.decode(): v.decode() for k, v in head.headers}, body

    async def call(self, method: str, target: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        await self.send(method, target, **kw)
        return await self.response()

    async def aclose(self) -> None:
        await self.stream.aclose()


API = {"headers": {"Authorization": "Bearer {access_token}", "x-test-beta": "beta-2025"}}


async def _setup(
    start_daemon: StartDaemon, up: Upstream, **kw: Any
) -> tuple[Harness, Any, HttpClient]:
    h = await start_daemon(providers={"dev": {"api": {"base_url": up.url, **API}}}, **kw)
    h.login()
    s = await h.session("dev")
    client = await HttpClient.connect(s.socket_path)
    return h, s, client


async def test_request_is_forwarded_with_the_headers_added_outside_the_sandbox(
    start_daemon: StartDaemon, upstream: Upstream, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """The upstream gets exactly the template's headers and none of the sandbox's credentials; the sandbox never sees the token."""
    h, _s, c = await _setup(start_daemon, upstream)
    status, _headers, body = await c.call(
        "POST",
        "/dev/messages?beta=1",
        headers=[
            ("authorization", "Bearer CANARY-sandbox"),
            ("x-api-key", "CANARY-key"),
            ("cookie", "a=CANARY"),
            ("content-type", "application/json"),
        ],
        body=b'{"hello": 1}',
    )
    assert status == 200 and json.loads(body) == {"path": "/v1/messages?beta=1", "got": 12}
    got = upstream.received[0]
    token = h.store.read("dev", "default")["access_token"]
    assert got["headers"]["authorization"] == f"Bearer {token}"
    assert got["headers"]["x-test-beta"] == "beta-2025"
    assert "x-api-key" not in got["headers"] and "cookie" not in got["headers"]
    assert got["headers"]["content-type"] == "application/json"
    assert got["body"] == b'{"hello": 1}'
    assert token.encode() not in c.received
    with trio.fail_after(5):  # the audit line is written once the answer has gone out
        while not [e for e in no_secrets_in_logs if e["event"] == "api_request"]:
            await trio.sleep(0.01)
    (line,) = [e for e in no_secrets_in_logs if e["event"] == "api_request"]
    assert (line["method"], line["path"], line["status"]) == ("POST", "/messages", 200)
    await c.aclose()


async def test_keep_alive_serves_several_requests_on_one_connection(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """Three requests in turn on one connection each get their answer."""
    _h, _s, c = await _setup(start_daemon, upstream)
    for i in range(3):
        status, _, body = await c.call("GET", f"/dev/item/{i}")
        assert status == 200 and json.loads(body)["path"] == f"/v1/item/{i}"
    await c.aclose()


async def test_server_sent_events_reach_the_client_as_they_are_sent(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """The first event arrives before the upstream sends the second: nothing is buffered whole."""
    upstream.script.append(sse)
    _h, _s, c = await _setup(start_daemon, upstream)
    await c.send("GET", "/dev/stream")
    head = await c.event()
    assert isinstance(head, h11.Response) and head.status_code == 200
    with trio.fail_after(5):
        first = await c.event()
    assert isinstance(first, h11.Data) and first.data == b"data: one\n\n"
    upstream.release.set()
    second = await c.event()
    assert isinstance(second, h11.Data) and second.data == b"data: two\n\n"
    await c.aclose()


async def test_a_client_that_goes_away_cancels_the_upstream(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """Closing the sandbox's connection mid-stream ends the upstream request."""
    upstream.script.append(endless)
    _h, _s, c = await _setup(start_daemon, upstream)
    await c.send("GET", "/dev/stream")
    assert isinstance(await c.event(), h11.Response)
    assert isinstance(await c.event(), h11.Data)
    await c.aclose()
    with trio.fail_after(10):
        while upstream.cancelled == 0:
            await trio.sleep(0.02)


async def test_a_401_leads_to_one_refresh_and_one_retry(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """The upstream refuses the token once: one refresh at the IdP, the request retried with the new token and its body."""
    upstream.script.append(answer(401))
    h, _s, c = await _setup(start_daemon, upstream)
    before = h.idp.refresh_count
    status, _, _body = await c.call("POST", "/dev/x", body=b"payload")
    assert status == 200
    assert h.idp.refresh_count == before + 1
    first, retry = upstream.received
    assert first["headers"]["authorization"] != retry["headers"]["authorization"]
    assert retry["body"] == b"payload"
    await c.aclose()


async def test_ten_concurrent_401s_lead_to_one_refresh(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """Ten requests refused at once share one coordinated refresh."""
    upstream.script.extend(answer(401) for _ in range(10))
    h, s, c0 = await _setup(start_daemon, upstream)
    await c0.aclose()
    before = h.idp.refresh_count
    statuses: list[int] = []

    async def one() -> None:
        c = await HttpClient.connect(s.socket_path)
        statuses.append((await c.call("GET", "/dev/y"))[0])
        await c.aclose()

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(one)
    assert statuses == [200] * 10
    assert h.idp.refresh_count == before + 1


async def test_a_429_holds_the_bucket_and_is_passed_through(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """An upstream 429 reaches the client as it is and marks the bucket quota-exhausted."""
    upstream.script.append(answer(429))
    h, _s, c = await _setup(start_daemon, upstream)
    status, headers, _ = await c.call("GET", "/dev/z")
    assert status == 429 and headers["retry-after"] == "120"
    assert h.daemon.tokens.quota_held(Key("dev"))
    await c.aclose()


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("CONNECT", "127.0.0.1:443", 405),
        ("GET", "https://evil.example/x", 400),
        ("GET", "/dev/../../etc/passwd", 400),
        ("GET", "/dev/%2e%2e/x", 400),
        ("GET", "/nope/x", 404),
        ("GET", "/secret/x", 404),
    ],
)
async def test_no_open_proxy(
    start_daemon: StartDaemon, upstream: Upstream, method: str, target: str, status: int
) -> None:
    """CONNECT, absolute URLs, dot segments and providers not granted (alike with ones that do not exist) are refused, and nothing reaches the upstream."""
    h = await start_daemon(
        providers={
            "dev": {"api": {"base_url": upstream.url}},
            "secret": {
                "token_url": "https://idp.example/token",
                "client_id": "x",
                "api": {"base_url": upstream.url},
            },
        }
    )
    h.login()
    h.login("secret")
    s = await h.session("dev")
    c = await HttpClient.connect(s.socket_path)
    await c.send(method, target)
    head = await c.event()
    assert isinstance(head, h11.Response) and head.status_code == status
    assert upstream.received == []
    await c.aclose()


async def test_smuggling_and_oversized_headers_close_that_connection_only(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """Content-Length with Transfer-Encoding, or 100 KiB of headers, gets a 4xx; the frame protocol on the same socket still serves."""
    h, s, c = await _setup(start_daemon, upstream)
    await c.aclose()
    for raw in (
        b"POST /dev/x HTTP/1.1\r\nHost: credproxy\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /dev/x HTTP/1.1\r\nHost: credproxy\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    ):
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(str(s.socket_path))
        await sock.send(raw)
        with trio.fail_after(5):
            reply = await sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 4"), reply[:40]
        sock.close()
    assert upstream.received == []
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["ok"] is True


async def test_a_429_without_a_bucket_is_retried_once_on_the_next_bucket(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """With a profile a,b, an upstream 429 on a holds a and the request is sent again with b's token; the client sees the 200."""
    upstream.script.append(answer(429))
    h = await start_daemon(providers={"dev": {"api": {"base_url": upstream.url}}})
    h.login(bucket="a")
    h.login(bucket="b")
    s = await h.session("dev:a,b")
    c = await HttpClient.connect(s.socket_path)
    status, _, _ = await c.call("POST", "/dev/x", body=b"once")
    assert status == 200
    first, retry = upstream.received
    token_a = h.store.read("dev", "a")["access_token"]
    token_b = h.store.read("dev", "b")["access_token"]
    assert first["headers"]["authorization"] == f"Bearer {token_a}"
    assert retry["headers"]["authorization"] == f"Bearer {token_b}"
    assert retry["body"] == b"once"
    assert h.daemon.tokens.quota_held(Key("dev", "a"))
    await c.aclose()


async def test_an_api_grant_serves_the_api_and_never_the_token(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A session granted api:dev reaches the API through the proxy, while get_token answers NOT_FOUND: the token stays on the host."""
    h = await start_daemon(providers={"dev": {"api": {"base_url": upstream.url}}})
    h.login()
    s = await h.session("api:dev")
    c = await HttpClient.connect(s.socket_path)
    status, _, _ = await c.call("GET", "/dev/models")
    assert status == 200
    token = h.store.read("dev", "default")["access_token"]
    assert upstream.headers()["authorization"] == f"Bearer {token}"
    await c.aclose()
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["code"] == "NOT_FOUND"
    assert (await p.call("list_providers"))["data"] == {"providers": []}


async def test_key_templates_need_the_key_grant(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A header template naming an API key is filled only for a session granted that key; others get 403 and nothing goes upstream."""
    api = {"base_url": upstream.url, "headers": {"x-api-key": "{key:upkey}"}}
    h = await start_daemon(providers={"dev": {"api": api}})
    h.login()
    h.store.write_key("upkey", "KEY-value-1")
    without = await h.session("dev")
    c = await HttpClient.connect(without.socket_path)
    status, _, _ = await c.call("GET", "/dev/x")
    assert status == 403
    assert upstream.received == []
    await c.aclose()
    granted = await h.session("dev", "key:upkey")
    c = await HttpClient.connect(granted.socket_path)
    status, _, _ = await c.call("GET", "/dev/x")
    assert status == 200 and upstream.headers()["x-api-key"] == "KEY-value-1"
    await c.aclose()


async def test_content_length_is_passed_on_and_no_compression_is_asked_for_the_client(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A body with Content-Length reaches the upstream with it (not chunked), and without the client's Accept-Encoding the upstream is asked for identity."""
    _h, _s, c = await _setup(start_daemon, upstream)
    status, _, _ = await c.call("POST", "/dev/x", body=b"12345")
    assert status == 200
    got = upstream.headers()
    assert got["content-length"] == "5" and "transfer-encoding" not in got
    assert got["accept-encoding"] == "identity"
    await c.aclose()


async def _set_cookie(
    up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection
) -> None:
    headers = [(b"set-cookie", b"session=abc123; Path=/"), (b"content-length", b"0")]
    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def test_an_upstream_cookie_is_never_sent_for_another_sandbox(
    start_daemon: StartDaemon, upstream: Upstream
) -> None:
    """A Set-Cookie reaches the client that got it, and the shared upstream client sends no cookie on later requests; a GET goes out without a body."""
    upstream.script.append(_set_cookie)
    h, _s, c = await _setup(start_daemon, upstream)
    status, headers, _ = await c.call("GET", "/dev/login")
    assert status == 200 and headers["set-cookie"].startswith("session=")
    await c.aclose()
    other = await h.session("dev")
    c2 = await HttpClient.connect(other.socket_path)
    assert (await c2.call("GET", "/dev/next"))[0] == 200
    assert "cookie" not in upstream.headers()
    assert "transfer-encoding" not in upstream.headers() and upstream.received[-1]["body"] == b""
    await c2.aclose()


async def test_a_slow_loris_request_head_is_closed_after_ten_seconds(
    start_daemon: StartDaemon, upstream: Upstream, autojump_clock: trio.testing.MockClock
) -> None:
    """A request line and headers trickling in a byte every few seconds are cut off 10 s after the first byte; nothing goes upstream."""
    _h, s, c = await _setup(start_daemon, upstream)
    await c.aclose()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    await sock.send(b"GET /dev/x HTTP/1.1\r\n")
    t0 = trio.current_time()
    closed = False
    with trio.fail_after(60):
        while not closed:
            try:
                await sock.send(b"X")
            except OSError:
                break
            with trio.move_on_after(3):
                closed = await sock.recv(65536) == b""
    assert 9 <= trio.current_time() - t0 <= 13
    assert upstream.received == []
    sock.close()
