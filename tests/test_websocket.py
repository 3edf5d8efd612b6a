"""WebSocket through the API proxy (RFC 6455; issue 19), against real WebSocket servers.

The upstream is the ``websockets`` library's echo server on loopback, plain
(``ws://``, an ``http`` base URL) or TLS (``wss://``, a ``https`` base URL with
a certificate from a test CA, ``trustme``, that the daemon trusts through
``SSL_CERT_FILE``). It runs in a thread and records every opening handshake it
receives (path and headers) before answering it. The sandbox's side is the same
library's client on the session's Unix socket (``unix_connect``), or on
``credproxy forward``'s loopback port, or raw h11 where the exact bytes of a
handshake matter (Codex's).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import socket
import ssl
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trustme
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, unix_connect
from websockets.sync.server import Request, Response, ServerConnection, serve

from conftest import CREDPROXY, Dirs, Harness, StartDaemon
from credproxy.core.protocol import capability_digest

WAIT = 10.0  # seconds any one step may take before a test gives up (never a timing claim)
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3
SANDBOX_AUTH = "Bearer CANARY-sandbox"
API = {"headers": {"Authorization": "Bearer {access_token}"}}

Refusal = Callable[[ServerConnection, Request], Response | None]


@dataclass
class EchoServer:
    """A WebSocket echo server: what it received, and the answers it is told to give."""

    url: str = ""
    handshakes: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)  # answers before the echoing ones
    ended: list[str] = field(default_factory=list)  # how each echo connection ended
    lock: threading.Lock = field(default_factory=threading.Lock)

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        with self.lock:
            headers = {k.lower(): v for k, v in request.headers.raw_items()}
            self.handshakes.append({"path": request.path, "headers": headers})
            refuse = self.refusals.pop(0) if self.refusals else None
        return refuse(conn, request) if refuse else None

    def handler(self, ws: ServerConnection) -> None:
        try:
            for message in ws:
                if message == "slow":
                    time.sleep(0.3)  # (an answer still on its way when the client half-closes)
                ws.send(message)
            how = "closed"
        except ConnectionClosed:
            how = "broken"
        with self.lock:
            self.ended.append(how)

    async def wait_ended(self, count: int = 1) -> list[str]:
        with trio.fail_after(WAIT):
            while len(self.ended) < count:
                await trio.sleep(0.01)
        return self.ended


def refuse(status: int, body: str, headers: dict[str, str] | None = None) -> Refusal:
    def answer(conn: ServerConnection, request: Request) -> Response:
        response = conn.respond(HTTPStatus(status), body)
        for name, value in (headers or {}).items():
            response.headers[name] = value
        return response

    return answer


@pytest.fixture
def ca(tmp_short: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A test CA that the daemon trusts (SSL_CERT_FILE), as a user adds a corporate CA."""
    authority = trustme.CA()
    ca_file = tmp_short / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    return authority


@pytest.fixture(params=["tls", "plain"])
def echo(request: pytest.FixtureRequest, ca: trustme.CA) -> Iterator[EchoServer]:
    """The echo server, over TLS (wss://, base URL https) or plain (ws://, base URL http)."""
    up = EchoServer()
    ctx = None
    if request.param == "tls":
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(ctx)
    server = serve(
        up.handler,
        "127.0.0.1",
        0,
        ssl=ctx,
        process_request=up.process_request,
        max_size=None,
        ping_interval=None,
    )
    port = server.socket.getsockname()[1]
    up.url = f"{'https' if ctx else 'http'}://127.0.0.1:{port}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield up
    finally:
        server.shutdown()
        thread.join(WAIT)


async def _setup(
    start_daemon: StartDaemon,
    up: EchoServer,
    *grants: str,
    capability: bytes | None = None,
    **sections: Any,
) -> tuple[Harness, Any]:
    h = await start_daemon(providers={"dev": {"api": {"base_url": up.url, **API}}}, **sections)
    h.login()
    s = await h.session(*(grants or ("dev",)), capability=capability)
    return h, s


def _connect(socket_path: Path, path: str = "/dev/echo", **kw: Any) -> ClientConnection:
    kw.setdefault("additional_headers", {"Authorization": SANDBOX_AUTH})
    return unix_connect(
        str(socket_path),
        f"ws://credproxy{path}",
        max_size=None,
        ping_interval=None,
        open_timeout=WAIT,
        **kw,
    )


async def _audit(events: list[Any], count: int = 1) -> list[dict[str, Any]]:
    """The api_request lines once *count* are written (a relay's is written when it ends)."""
    with trio.fail_after(WAIT):
        while len(lines := [e for e in events if e["event"] == "api_request"]) < count:
            await trio.sleep(0.01)
    return lines


def _accept(key: bytes) -> str:
    return base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()


async def test_messages_echo_both_ways_with_the_daemons_credentials(
    start_daemon: StartDaemon, echo: EchoServer, no_secrets_in_logs: list[Any]
) -> None:
    """Text, binary, a 1 MiB message and a ping cross the proxy both ways; the upstream saw the daemon's Authorization, not the sandbox's; one audit line with status 101 and the bytes each way."""
    h, s = await _setup(start_daemon, echo)
    big = os.urandom(1 << 20)  # (random: permessage-deflate cannot shrink it)

    def talk() -> dict[str, Any]:
        with _connect(s.socket_path, "/dev/echo?x=1") as ws:
            got: dict[str, Any] = {
                "extensions": ws.response.headers.get("Sec-WebSocket-Extensions")
            }
            ws.send("hello, upstream")
            got["text"] = ws.recv(WAIT)
            ws.send(b"\x00\x01\xfe\xff")
            got["binary"] = ws.recv(WAIT)
            ws.send(big)
            got["big"] = ws.recv(WAIT)
            got["pong"] = ws.ping(b"are you there").wait(WAIT)
        return got

    got = await trio.to_thread.run_sync(talk)
    assert got["text"] == "hello, upstream"
    assert got["binary"] == b"\x00\x01\xfe\xff"
    assert got["big"] == big
    assert got["pong"] is True
    # The extension both ends agreed on went through (the proxy parses no frame).
    assert "permessage-deflate" in got["extensions"]

    (shake,) = echo.handshakes
    token = h.store.read("dev", "default")["access_token"]
    assert shake["path"] == "/v1/echo?x=1"
    assert shake["headers"]["authorization"] == f"Bearer {token}"
    assert SANDBOX_AUTH not in json.dumps(shake)
    assert await echo.wait_ended() == ["closed"]

    (line,) = await _audit(no_secrets_in_logs)
    assert (line["method"], line["path"], line["status"]) == ("GET", "/echo", 101)
    # The upstream closes the TCP connection after the close handshake (RFC 6455 7.1.1).
    assert line["ended"] == "upstream"
    assert line["bytes"] > len(big) and line["bytes_up"] > len(big)


async def test_codex_handshake_is_answered_101(start_daemon: StartDaemon, echo: EchoServer) -> None:
    """Codex's transport (GET /v1/responses, Upgrade: websocket, Sec-WebSocket-Key and Version 13, OpenAI-Beta) gets the upstream's 101 and its accept for that key."""
    h, s = await _setup(start_daemon, echo)
    key = base64.b64encode(os.urandom(16))
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    stream = trio.SocketStream(sock)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET",
        target="/dev/responses",
        headers=[
            ("host", "credproxy"),
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", key),
            ("sec-websocket-version", "13"),
            ("openai-beta", "responses_websockets=2026-02-06"),
            ("authorization", SANDBOX_AUTH),
            ("originator", "codex_cli_rs"),
        ],
    )
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    with trio.fail_after(WAIT):
        while (event := conn.next_event()) is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
    assert isinstance(event, h11.InformationalResponse), event
    assert event.status_code == 101
    answer = {k.decode().lower(): v.decode() for k, v in event.headers}
    assert answer["upgrade"].lower() == "websocket"
    assert "upgrade" in answer["connection"].lower()
    assert answer["sec-websocket-accept"] == _accept(key)
    await stream.aclose()

    (shake,) = echo.handshakes
    token = h.store.read("dev", "default")["access_token"]
    assert shake["path"] == "/v1/responses"
    assert shake["headers"]["openai-beta"] == "responses_websockets=2026-02-06"
    assert shake["headers"]["sec-websocket-version"] == "13"
    assert shake["headers"]["authorization"] == f"Bearer {token}"
    assert await echo.wait_ended() == ["broken"]  # (the client left without a close frame)


async def test_a_session_without_the_grant_gets_404_and_the_upstream_is_never_contacted(
    start_daemon: StartDaemon, echo: EchoServer
) -> None:
    """A handshake for a provider the session was not granted is answered 404 by credproxy."""
    _h, s = await _setup(start_daemon, echo, "key:unrelated")

    def attempt() -> int:
        with pytest.raises(InvalidStatus) as refused:
            _connect(s.socket_path)
        return refused.value.response.status_code

    assert await trio.to_thread.run_sync(attempt) == 404
    assert echo.handshakes == []


async def test_a_capability_session_wants_its_capability_on_the_handshake(
    start_daemon: StartDaemon, echo: EchoServer
) -> None:
    """In a --capability session a handshake without it gets 407 and reaches no upstream; with Proxy-Authorization it opens, and the capability is not sent upstream."""
    cap = "c0" * 32
    _h, s = await _setup(start_daemon, echo, capability=capability_digest(cap))

    def attempt() -> tuple[int, str]:
        with pytest.raises(InvalidStatus) as refused:
            _connect(s.socket_path)
        assert echo.handshakes == []
        headers = {"Proxy-Authorization": f"Bearer {cap}", "Authorization": SANDBOX_AUTH}
        with _connect(s.socket_path, additional_headers=headers) as ws:
            ws.send("with the capability")
            return refused.value.response.status_code, str(ws.recv(WAIT))

    assert await trio.to_thread.run_sync(attempt) == (407, "with the capability")
    (shake,) = echo.handshakes
    assert cap not in json.dumps(shake) and "proxy-authorization" not in shake["headers"]


@pytest.mark.parametrize(
    ("status", "body", "headers"),
    [
        (400, "bad handshake here", {}),
        (426, "use another version", {"Sec-WebSocket-Version": "13"}),
    ],
)
async def test_the_upstream_refusing_the_upgrade_is_relayed_as_is(
    start_daemon: StartDaemon,
    echo: EchoServer,
    status: int,
    body: str,
    headers: dict[str, str],
    no_secrets_in_logs: list[Any],
) -> None:
    """An upstream that answers the handshake with anything but 101 has that answer, body and headers, reach the client."""
    echo.refusals.append(refuse(status, body, headers))
    _h, s = await _setup(start_daemon, echo)

    def attempt() -> Any:
        with pytest.raises(InvalidStatus) as refused:
            _connect(s.socket_path)
        return refused.value.response

    response = await trio.to_thread.run_sync(attempt)
    assert response.status_code == status
    assert response.body.decode().strip() == body
    for name, value in headers.items():
        assert response.headers[name] == value
    (line,) = await _audit(no_secrets_in_logs)
    assert line["status"] == status and "bytes_up" not in line


async def test_a_401_on_the_handshake_is_retried_once_with_a_newer_token(
    start_daemon: StartDaemon, echo: EchoServer
) -> None:
    """The upstream refuses the first handshake's token: one refresh, the handshake again with the new token, and then the WebSocket works."""
    echo.refusals.append(refuse(401, "token expired"))
    h, s = await _setup(start_daemon, echo)
    first = h.store.read("dev", "default")["access_token"]
    before = h.idp.refresh_count

    def talk() -> str:
        with _connect(s.socket_path) as ws:
            ws.send("after the retry")
            return str(ws.recv(WAIT))

    assert await trio.to_thread.run_sync(talk) == "after the retry"
    assert h.idp.refresh_count == before + 1
    newer = h.store.read("dev", "default")["access_token"]
    assert newer != first
    auths = [shake["headers"]["authorization"] for shake in echo.handshakes]
    assert auths == [f"Bearer {first}", f"Bearer {newer}"]


async def test_closing_the_session_ends_an_open_websocket(
    start_daemon: StartDaemon, echo: EchoServer, no_secrets_in_logs: list[Any]
) -> None:
    """An open WebSocket ends when its session closes: the client's connection and the upstream's."""
    h, s = await _setup(start_daemon, echo)

    def talk() -> str:
        with _connect(s.socket_path) as ws:
            ws.send("before")
            assert ws.recv(WAIT) == "before"
            assert trio.from_thread.run(h.daemon.close_session, s.id)
            with pytest.raises(ConnectionClosed):
                ws.recv(WAIT)
        return "closed"

    assert await trio.to_thread.run_sync(talk) == "closed"
    assert await echo.wait_ended() == ["broken"]
    (line,) = await _audit(no_secrets_in_logs)
    assert (line["status"], line["ended"]) == (101, "cancelled")


def one_ends_other_stays(
    socket_path: Path, other_path: str, act: Callable[[ClientConnection], None]
) -> None:
    """Two WebSockets, one on /dev/echo and one on *other_path*: after *act* (given the
    first), the first is closed and the other still echoes."""
    with _connect(socket_path) as ws, _connect(socket_path, other_path) as other:
        ws.send("before")
        assert ws.recv(WAIT) == "before"
        act(ws)
        with pytest.raises(ConnectionClosed):
            ws.recv(WAIT)
        other.send("still")
        assert other.recv(WAIT) == "still"


async def test_a_logout_ends_an_open_websocket(
    start_daemon: StartDaemon, echo: EchoServer, no_secrets_in_logs: list[Any]
) -> None:
    """`credproxy logout` on the host ends an open WebSocket its token let in; a WebSocket of another login stays open."""
    h, s = await _setup(start_daemon, echo, "dev")
    h.login(bucket="work")

    def logout(_: ClientConnection) -> None:
        h.store.remove("dev", "default")
        trio.from_thread.run(h.daemon.token_changed, ("dev", "default"))

    ended = functools.partial(one_ends_other_stays, s.socket_path, "/dev:work/echo", logout)
    await trio.to_thread.run_sync(ended)
    lines = await _audit(no_secrets_in_logs, 2)
    assert sorted((line["bucket"], line["status"], line["ended"]) for line in lines) == [
        ("default", 101, "logout"),
        ("work", 101, "upstream"),  # (closed in the end by its client's close frame)
    ]


async def test_a_client_that_hangs_up_closes_the_upstream(
    start_daemon: StartDaemon, echo: EchoServer, no_secrets_in_logs: list[Any]
) -> None:
    """A client that drops its connection without a close frame has the upstream connection closed too."""
    _h, s = await _setup(start_daemon, echo)

    def talk_then_drop() -> None:
        with _connect(s.socket_path) as ws:
            ws.send("one")
            assert ws.recv(WAIT) == "one"
            ws.socket.close()  # no close frame: as when the process is killed

    await trio.to_thread.run_sync(talk_then_drop)
    assert await echo.wait_ended() == ["broken"]
    (line,) = await _audit(no_secrets_in_logs)
    assert (line["status"], line["ended"]) == (101, "client")


async def test_a_client_that_half_closes_still_gets_the_answers_on_their_way(
    start_daemon: StartDaemon, echo: EchoServer, no_secrets_in_logs: list[Any]
) -> None:
    """A client that shuts down its sending side (as after its close frame) still reads what the upstream sends; closing then ends the tunnel."""
    _h, s = await _setup(start_daemon, echo)

    def talk_then_half_close() -> str:
        with _connect(s.socket_path) as ws:
            ws.send("slow")
            ws.socket.shutdown(socket.SHUT_WR)
            answer = ws.recv(WAIT)
            assert isinstance(answer, str)
            ws.socket.close()
            return answer

    assert await trio.to_thread.run_sync(talk_then_half_close) == "slow"
    assert await echo.wait_ended() == ["broken"]
    (line,) = await _audit(no_secrets_in_logs)
    assert (line["status"], line["ended"]) == (101, "client")


async def test_a_websocket_idle_past_the_idle_timeout_is_closed(
    start_daemon: StartDaemon, echo: EchoServer, no_secrets_in_logs: list[Any]
) -> None:
    """With nothing moving either way for [limits] idle_timeout, both connections are closed."""
    _h, s = await _setup(start_daemon, echo, limits={"idle_timeout": 0.5})

    def idle() -> str:
        with _connect(s.socket_path) as ws:
            ws.send("one")
            assert ws.recv(WAIT) == "one"
            with pytest.raises(ConnectionClosed):
                ws.recv(WAIT)  # nothing more is sent: the proxy closes within the deadline
        return "closed"

    assert await trio.to_thread.run_sync(idle) == "closed"
    assert await echo.wait_ended() == ["broken"]
    (line,) = await _audit(no_secrets_in_logs)
    assert (line["status"], line["ended"]) == (101, "idle")


FORWARDED = """
    import json, os
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect
    url = os.environ["CREDPROXY_BASE_URL_DEV"].replace("http://", "ws://", 1) + "/echo"
    with connect(url, proxy=None, max_size=None, open_timeout=10) as ws:
        ws.send("through forward")
        text = ws.recv(10)
        ws.send(bytes(range(256)) * 4096)
        blob = ws.recv(10)
    try:  # a web page's WebSocket carries its Origin: refused
        connect(url, proxy=None, origin="http://evil.example", open_timeout=10).close()
        origin = 101
    except InvalidStatus as exc:
        origin = exc.response.status_code
    ok = blob == bytes(range(256)) * 4096
    print(json.dumps({"text": text, "blob": len(blob), "ok": ok, "origin": origin}))
"""


async def test_through_credproxy_forward_on_loopback_tcp(
    start_daemon: StartDaemon, echo: EchoServer, dirs: Dirs
) -> None:
    """A WebSocket client on forward's loopback port (Host and no Origin, as tools send) echoes text and a 1 MiB binary message; one with a browser's Origin gets 403 and reaches no upstream."""
    h, s = await _setup(start_daemon, echo)
    env = {
        **dirs.env(),
        "CREDPROXY_SOCKET": str(s.socket_path),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    code = textwrap.dedent(FORWARDED)
    argv = [CREDPROXY, "forward", "--provider", "dev", "--", sys.executable, "-c", code]
    with trio.fail_after(3 * WAIT):
        proc = await trio.run_process(argv, env=env, capture_stdout=True, capture_stderr=True)
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out == {"text": "through forward", "blob": 1 << 20, "ok": True, "origin": 403}
    token = h.store.read("dev", "default")["access_token"]
    assert [shake["headers"]["authorization"] for shake in echo.handshakes] == [f"Bearer {token}"]
    assert token.encode() not in proc.stdout + proc.stderr


# A tool behind `credproxy forward` that drops its WebSocket without a close frame
# and goes on running: forward passes its FIN on as a half-close of the session socket.
DROPPER = """
    import base64, os, socket, time, urllib.parse
    url = urllib.parse.urlsplit(os.environ["CREDPROXY_BASE_URL_DEV"])
    s = socket.create_connection((url.hostname, url.port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((
        "GET /dev/echo HTTP/1.1\\r\\nHost: %s:%d\\r\\nUpgrade: websocket\\r\\n"
        "Connection: Upgrade\\r\\nSec-WebSocket-Key: %s\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n"
        % (url.hostname, url.port, key)).encode())
    head = b""
    while b"\\r\\n\\r\\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    s.close()
    open(os.environ["MARK"], "w").close()
    time.sleep(30)
"""


async def test_a_websocket_dropped_behind_forward_closes_its_upstream(
    start_daemon: StartDaemon,
    echo: EchoServer,
    dirs: Dirs,
    tmp_path: Path,
    no_secrets_in_logs: list[Any],
) -> None:
    """A tool behind forward that drops its WebSocket (no close frame) and goes on running: the upstream connection is closed within seconds, not at idle_timeout."""
    _h, s = await _setup(start_daemon, echo)
    mark = tmp_path / "dropped"
    env = {
        **dirs.env(),
        "CREDPROXY_SOCKET": str(s.socket_path),
        "PYTHONPATH": os.pathsep.join(sys.path),
        "MARK": str(mark),
    }
    code = textwrap.dedent(DROPPER)
    argv = [CREDPROXY, "forward", "--provider", "dev", "--", sys.executable, "-c", code]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(trio.run_process, argv, env=env, capture_stdout=True))
        with trio.fail_after(3 * WAIT):
            while not mark.exists():
                await trio.sleep(0.05)
        assert await echo.wait_ended() == ["broken"]  # (within WAIT; idle_timeout is 600 s)
        nursery.cancel_scope.cancel()
    (line,) = await _audit(no_secrets_in_logs)
    assert (line["status"], line["ended"]) == (101, "client")


async def refused_while(
    echo: EchoServer, socket_path: Path, said: bytes, meanwhile: Callable[[], Awaitable[None]]
) -> int:
    """The status a WebSocket handshake gets when *meanwhile* runs while the upstream holds
    it before its 101; the refusal's body must say *said*."""
    in_handshake, go_on = threading.Event(), threading.Event()

    def slow(conn: ServerConnection, request: Request) -> Response | None:
        in_handshake.set()
        go_on.wait(WAIT)
        return None  # (accepted: 101)

    echo.refusals.append(slow)

    def talk() -> int:
        with pytest.raises(InvalidStatus) as refused:
            _connect(socket_path)
        assert said in refused.value.response.body
        return refused.value.response.status_code

    async def then() -> None:
        await trio.to_thread.run_sync(in_handshake.wait, WAIT)
        await meanwhile()
        go_on.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(then)
        return await trio.to_thread.run_sync(talk)


async def test_a_logout_while_the_handshake_is_on_its_way_refuses_it(
    start_daemon: StartDaemon, echo: EchoServer
) -> None:
    """`credproxy logout` while a WebSocket handshake sent with its token waits for the upstream's 101: the client gets 404 (no stored login), no tunnel."""
    h, s = await _setup(start_daemon, echo)

    async def logout() -> None:
        h.store.remove("dev", "default")
        await h.daemon.token_changed(("dev", "default"))

    assert await refused_while(echo, s.socket_path, b"no stored login", logout) == 404


async def test_a_refused_upgrade_leaves_the_connection_open_for_the_next_request(
    start_daemon: StartDaemon, echo: EchoServer
) -> None:
    """After the upstream answers 426, the same client connection sends the handshake again and gets 101."""
    echo.refusals.append(refuse(426, "not now"))
    _h, s = await _setup(start_daemon, echo)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    stream = trio.SocketStream(sock)
    conn = h11.Connection(h11.CLIENT)
    key = base64.b64encode(os.urandom(16))
    handshake = [
        ("host", "credproxy"),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", key),
        ("sec-websocket-version", "13"),
    ]

    async def next_event() -> Any:
        with trio.fail_after(WAIT):
            while (event := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        return event

    async def shake() -> Any:
        request = h11.Request(method="GET", target="/dev/echo", headers=handshake)
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        return await next_event()

    refused = await shake()
    assert isinstance(refused, h11.Response) and refused.status_code == 426
    body = b""
    while not isinstance(event := await next_event(), h11.EndOfMessage):
        body += event.data
    assert body.strip() == b"not now"
    conn.start_next_cycle()
    accepted = await shake()
    assert isinstance(accepted, h11.InformationalResponse) and accepted.status_code == 101
    assert dict(accepted.headers)[b"sec-websocket-accept"].decode() == _accept(key)
    await stream.aclose()
    assert len(echo.handshakes) == 2


async def test_an_upstream_behind_https_proxy_gets_no_websocket_around_it(
    start_daemon: StartDaemon, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When HTTPS_PROXY applies to the upstream, the handshake is answered 502 naming the reason, and nothing connects to the upstream directly."""
    accepted: list[Any] = []

    async def record(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, record, 0, host="127.0.0.2"))
    port = listeners[0].socket.getsockname()[1]
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # (never reached either)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    up = EchoServer(url=f"https://127.0.0.2:{port}/v1")
    _h, s = await _setup(start_daemon, up)

    def attempt() -> Any:
        with pytest.raises(InvalidStatus) as refused:
            _connect(s.socket_path)
        return refused.value.response

    response = await trio.to_thread.run_sync(attempt)
    assert response.status_code == 502
    assert "HTTPS_PROXY" in json.loads(response.body)["error"]["message"]
    assert accepted == []
