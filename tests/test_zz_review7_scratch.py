"""Scratch probes (review7). Deleted after the review."""
from __future__ import annotations

import json
import time
from typing import Any

import h11
import trio

from conftest import StartDaemon
from test_proxy import API, HttpClient, Upstream, upstream  # noqa: F401


async def test_api_grant_opens_every_bucket(start_daemon: StartDaemon, upstream: Upstream) -> None:
    h = await start_daemon(providers={"dev": {"api": {"base_url": upstream.url, **API}}})
    h.login("dev", "a")
    h.login("dev", "b")
    h.login("dev", "default")
    s = await h.session("dev:a", "api:dev")
    c = await HttpClient.connect(s.socket_path)
    for target in ("/dev:a/x", "/dev:b/x", "/dev/x"):
        status, _, body = await c.call("GET", target)
        print(target, status, body[:80])
    toks = {b: h.store.read("dev", b)["access_token"] for b in ("a", "b", "default")}
    for r in upstream.received:
        auth = r["headers"].get("authorization", "")
        print("upstream got", r["target"], [b for b, t in toks.items() if t in auth])
    await c.aclose()


async def _echo_trace(up: Upstream, req: h11.Request, body: bytes, stream: Any, conn: h11.Connection) -> None:
    # What RFC 9110 9.3.8 says a TRACE target does: reflect the request it received.
    payload = b"%s %s HTTP/1.1\r\n" % (req.method, req.target) + b"".join(
        b"%s: %s\r\n" % (n, v) for n, v in req.headers
    )
    headers = [(b"content-type", b"message/http"), (b"content-length", str(len(payload)).encode())]
    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
    await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def test_trace_is_forwarded(start_daemon: StartDaemon, upstream: Upstream) -> None:
    upstream.script.append(_echo_trace)
    h = await start_daemon(providers={"dev": {"api": {"base_url": upstream.url, **API}}})
    h.login()
    s = await h.session("api:dev")
    c = await HttpClient.connect(s.socket_path)
    status, _, body = await c.call("TRACE", "/dev/x")
    token = h.store.read("dev", "default")["access_token"]
    print("TRACE", status, "token in body:", token.encode() in body)
    await c.aclose()


async def test_expect_on_refused(start_daemon: StartDaemon, upstream: Upstream) -> None:
    h = await start_daemon(providers={"dev": {"api": {"base_url": upstream.url, **API}}})
    h.login()
    s = await h.session("api:dev")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(str(s.socket_path))
    st = trio.SocketStream(sock)
    await st.send_all(
        b"POST /nope/x HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    t0 = trio.current_time()
    with trio.move_on_after(60):
        data = await st.receive_some(65536)
    print("expect refused answer after", round(trio.current_time() - t0, 1), data[:60])
    await st.aclose()
