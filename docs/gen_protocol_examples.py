#!/usr/bin/env python3
"""Generate the byte-level examples of docs/protocol.md from the real daemon.

Usage (from the repository root, in the project's virtual environment, which
has the test dependencies; ``devidp`` needs h11)::

    .venv/bin/python docs/gen_protocol_examples.py            # Markdown on stdout
    .venv/bin/python docs/gen_protocol_examples.py --write docs/protocol.md

``--write`` replaces the text between the ``BEGIN GENERATED EXAMPLES`` and
``END GENERATED EXAMPLES`` markers of the given file.

What runs: the real daemon (:func:`credproxy.shell.daemon.serve`) in this process's
trio loop, with a real :class:`~credproxy.shell.store.TokenStore` in a temporary
directory, real Unix sockets, and the real HTTP refresh path
(:class:`~credproxy.shell.http.HttpTokenEndpoint`) talking to the development
identity provider (:mod:`credproxy.devidp`) on 127.0.0.1. Every frame shown is
the exact bytes that crossed a socket, captured by a raw-socket client.

To make the output reproducible, the daemon's wall clock is a manual clock
fixed at 2027-01-15T08:00:00Z (epoch 1 800 000 000) that only this script
moves, the IdP issues numbered demo tokens instead of random ones, and the
renewal jitter uses a seeded RNG. What still varies between runs: session
ids, socket paths, the daemon pid, and (in the rate-limit example) how many
requests got through before the limit.

All values are demo values; nothing here is a secret.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec

# A documentation tool, not part of the sans-IO core: it drives the daemon, so it needs trio.
import trio  # noqa: TID251

from credproxy import devidp  # noqa: TID251 - the documentation's upstream, not the daemon's
from credproxy.core.config import Config
from credproxy.core.grants import Grants
from credproxy.core.protocol import capability_digest
from credproxy.core.tokendata import normalize_token
from credproxy.shell import logs
from credproxy.shell.daemon import Daemon, serve
from credproxy.shell.http import HttpTokenEndpoint
from credproxy.shell.store import TokenStore

BASE_EPOCH = 1_800_000_000.0
DEMO_CAPABILITY = "0123456789abcdef" * 4  # 64 lowercase hex characters, a demo value
BEGIN = "<!-- BEGIN GENERATED EXAMPLES -->"
END = "<!-- END GENERATED EXAMPLES -->"

HEX_LINES_SHOWN = 12  # frames longer than this many xxd lines are cut in the dump
OUT: list[str] = []


# --- deterministic clock and identity provider ---------------------------------------


class ManualClock:
    """Epoch seconds that move only when the script says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DemoIdP(devidp.DevIdP):
    """The development IdP, issuing numbered demo tokens instead of random ones."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._n_rt = 0
        self._n_at = 0

    def _new_refresh_token(self, family: Any) -> str:
        self._n_rt += 1
        token = f"demo-refresh-{self._n_rt}"
        family.current_refresh_token = token
        self._refresh_tokens[token] = family
        return token

    def _new_access_token(self, family: Any) -> tuple[str, float]:
        self._n_at += 1
        token = f"demo-access-{self._n_at}"
        expiry = self.clock() + self.lifetime
        self._access_tokens[token] = (family, expiry)
        return token, expiry


# --- output ------------------------------------------------------------------------


def emit(text: str = "") -> None:
    OUT.append(text)


def xxd(data: bytes) -> list[str]:
    """``xxd``-style lines: offset, 16 bytes in 2-byte groups, printable ASCII."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        groups = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}: {groups:<39}  {text}")
    return lines


def show_json(body: bytes, pretty: bool = False) -> list[str]:
    if pretty:
        return json.dumps(json.loads(body), indent=2).splitlines()
    text = body.decode("utf-8", "replace")
    if len(text) > 400:
        text = text[:300] + f"… ({len(body)} bytes of JSON in all)"
    return [text]


def show_frame(direction: str, data: bytes, note: str = "", pretty: bool = False) -> None:
    """One frame: direction, hex dump (header included), then the JSON body."""
    size = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    head = f"{direction}  ({len(data)} bytes on the wire"
    if size is not None:
        head += f"; header 0x{data[:4].hex()} = {size}-byte body"
    head += ")" + (f"  {note}" if note else "")
    emit(head)
    lines = xxd(data)
    if len(lines) > HEX_LINES_SHOWN:
        lines = [*lines[:4], f"          … {len(lines) - 4} more lines of hex …"]
    for line in lines:
        emit(line)
    if size is not None and len(data) == 4 + size:
        for line in show_json(data[4:], pretty):
            emit(line)
    emit()


def show_raw(direction: str, data: bytes, note: str) -> None:
    emit(f"{direction}  ({len(data)} bytes on the wire)  {note}")
    for line in xxd(data):
        emit(line)
    emit()


def example(title: str, text: str) -> None:
    emit(f"#### {title}")
    emit()
    if text:
        emit(text)
        emit()
    emit("```text")


def end_example() -> None:
    while OUT and OUT[-1] == "":
        OUT.pop()
    emit("```")
    emit()


def frame_of(obj: Any) -> bytes:
    # Compact separators: the bytes llxprt's client (JSON.stringify) sends.
    body = json.dumps(obj, separators=(",", ":")).encode()
    return len(body).to_bytes(4, "big") + body


# --- a raw-socket client -----------------------------------------------------------


class Raw:
    """Sends exactly the bytes it is given and reads whole frames back."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    async def connect(cls, path: Path | str) -> Raw:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(str(path))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def recv_frame(self, wait: float = 10) -> bytes | None:
        """The next whole frame (header included), or None once the daemon closed."""
        with trio.fail_after(wait):
            while True:
                if len(self.buf) >= 4:
                    size = int.from_bytes(self.buf[:4], "big")
                    if len(self.buf) >= 4 + size:
                        data = bytes(self.buf[: 4 + size])
                        del self.buf[: 4 + size]
                        return data
                try:
                    chunk = await self.sock.recv(1 << 20)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    if self.buf:
                        raise AssertionError(f"{len(self.buf)} stray bytes before close")
                    return None
                self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def body(frame: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(frame[4:])
    return obj


class Talk:
    """A connection whose every exchange is written to the output."""

    def __init__(self, raw: Raw) -> None:
        self.raw = raw

    @classmethod
    async def open(cls, path: Path | str) -> Talk:
        return cls(await Raw.connect(path))

    async def send(self, obj: Any, note: str = "") -> None:
        data = frame_of(obj)
        await self.raw.send(data)
        show_frame("client → daemon", data, note)

    async def recv(self, note: str = "", pretty: bool = False) -> dict[str, Any] | None:
        data = await self.raw.recv_frame()
        if data is None:
            emit("(the daemon closed the connection)")
            emit()
            return None
        show_frame("daemon → client", data, note, pretty)
        return body(data)

    async def call(self, obj: Any, pretty: bool = False) -> dict[str, Any] | None:
        await self.send(obj)
        return await self.recv(pretty=pretty)

    async def expect_close(self) -> None:
        data = await self.raw.recv_frame()
        assert data is None, data
        emit("(the daemon closed the connection)")
        emit()

    def close(self) -> None:
        self.raw.close()


async def quiet_open(path: Path | str, version: int = 2, capability: str | None = None) -> Raw:
    raw = await Raw.connect(path)
    payload: dict[str, Any] = {"minVersion": 1, "maxVersion": version}
    if capability:
        payload["capabilityToken"] = capability
    await raw.send(frame_of({"v": 1, "op": "handshake", "payload": payload}))
    reply = await raw.recv_frame()
    assert reply is not None
    assert body(reply)["ok"] is True, reply
    return raw


async def quiet_call(raw: Raw, rid: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
    await raw.send(frame_of({"v": 2, "id": rid, "op": op, "payload": payload}))
    reply = await raw.recv_frame()
    assert reply is not None
    return body(reply)


def hs(lo: int = 1, hi: int = 2, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "op": "handshake", "payload": {"minVersion": lo, "maxVersion": hi, **extra}}


def req(rid: str, op: str, payload: dict[str, Any] | None = None, v: int = 2) -> dict[str, Any]:
    return {"v": v, "id": rid, "op": op, "payload": payload if payload is not None else {}}


# --- a peer of another uid (needs root) -------------------------------------------

# Connects with effective uid 65534 (what SO_PEERCRED reports) but filesystem uid 0,
# so that it can open the 0600 socket in the 0700 directory: the daemon's uid
# check, not the file modes, is what refuses it here.
OTHER_UID_PEER = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
os.setgroups([])
os.setresgid(65534, 65534, 0)
os.setresuid(65534, 65534, 0)
libc.setfsuid(0)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
data = bytes.fromhex(sys.argv[2])
try:
    s.sendall(data)
except OSError:
    pass
got = b""
while True:
    try:
        chunk = s.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    got += chunk
print(got.hex())
"""


# --- the scenario ------------------------------------------------------------------


def store_token(store: TokenStore, provider: str, bucket: str, raw: dict[str, Any]) -> None:
    """What ``credproxy import`` does: normalise, then write under the key's lock."""
    token = normalize_token(raw, BASE_EPOCH)
    with store.locked(provider, bucket):
        store.write(provider, bucket, token)


def minted(idp: DemoIdP, **extra: Any) -> dict[str, Any]:
    token = idp.mint()
    token["expiry"] = int(token["expiry"])
    token.update(extra)
    return token


async def scenario(root: Path) -> None:
    clock = ManualClock(BASE_EPOCH)
    idp = DemoIdP(lifetime=3600, clock=clock)
    store = TokenStore(root / "state")
    runtime = root / "run"
    endpoint = HttpTokenEndpoint(wall_clock=clock, timeout=10)

    async with trio.open_nursery() as nursery:
        token_url = await nursery.start(devidp.serve, idp)
        provider = {"token_url": token_url, "client_id": idp.client_id}
        cfg = msgspec.convert({"providers": {"demo": provider, "lab": provider}}, Config)

        # The token store: what `credproxy import` and `credproxy key set` would leave.
        store_token(store, "demo", "default", minted(idp, scope="read", account_id="demo-account"))
        store_token(store, "demo", "work", minted(idp, scope="read"))
        expired = {"expiry": int(BASE_EPOCH) - 60}
        store_token(store, "lab", "expired", minted(idp) | expired)
        store_token(store, "lab", "broken", minted(idp) | expired)
        store_token(store, "lab", "short", minted(idp))
        store_token(store, "other", "default", minted(idp))
        store_token(
            store,
            "big",
            "default",
            {
                "access_token": "demo-access-big",
                "expiry": int(BASE_EPOCH) + 3600,
                "id_token": "x" * 70_000,  # a pass-through field, to exceed 64 KiB
            },
        )
        store.write_key("demo-key", "demo-api-key-value")
        store.write_key("other-key", "other-api-key-value")

        daemon: Daemon = await nursery.start(
            functools.partial(
                serve,
                cfg,
                store=store,
                runtime=runtime,
                endpoint=endpoint,
                wall_clock=clock,
                rng=random.Random(7),  # noqa: S311 - reproducible jitter, not crypto
            )
        )
        try:
            await run_examples(daemon, store, idp, clock, runtime)
        finally:
            daemon.stop()
            await endpoint.aclose()
            nursery.cancel_scope.cancel()


async def run_examples(
    daemon: Daemon, store: TokenStore, idp: DemoIdP, clock: ManualClock, runtime: Path
) -> None:
    control_path = runtime / "credproxy.sock"

    emit("### Control socket (host only)")
    emit()

    example(
        "C1. Handshake and `ping` on the control socket",
        "The control socket speaks the same framing and handshake. `ping` answers "
        "with the daemon's pid and version (the launcher uses it to find a live daemon).",
    )
    ctl = await Talk.open(control_path)
    await ctl.call(hs())
    await ctl.call(req("1", "ping"))
    end_example()

    example(
        "C2. `open_session`",
        "What `credproxy run --allow demo --allow lab --allow big --allow key:demo-key "
        "--name demo` sends (here with `watch_launcher: false`, since the script "
        "itself is the launcher). The reply names the new session and its socket.",
    )
    opened = await ctl.call(
        req(
            "2",
            "open_session",
            {
                "grants": ["demo", "lab", "big", "key:demo-key"],
                "allow_uids": [],
                "name": "demo",
                "watch_launcher": False,
            },
        )
    )
    assert opened is not None
    main_sid = opened["data"]["session"]
    sock = opened["data"]["socket"]
    end_example()

    example(
        "C3. A sandbox operation on the control socket",
        "The control socket has only the admin operations; anything else is unknown there.",
    )
    await ctl.call(req("3", "get_token", {"provider": "demo"}))
    end_example()

    emit("### Handshake")
    emit()

    example(
        "H1. Handshake, v2 client",
        "The first frame, without `id`. The daemon picks the highest version both "
        "sides support and puts it in both `v` and `data.version`.",
    )
    sb = await Talk.open(sock)
    await sb.call(hs())
    end_example()

    example(
        "H2. Handshake, v1 client (llxprt-code as first shipped)",
        "`maxVersion: 1` negotiates version 1 (responses then stay within 64 KiB, see S15).",
    )
    v1 = await Talk.open(sock)
    await v1.call(hs(1, 1))
    end_example()

    example(
        "H3. A request as the first frame is taken as the handshake",
        "The first frame is always the handshake, whatever its `op` (llxprt's rule). "
        "Here it has no `minVersion`/`maxVersion`, so its `v` is taken as the version; "
        "the request itself is not answered.",
    )
    t = await Talk.open(sock)
    await t.call(req("1", "get_token", {"provider": "demo"}))
    t.close()
    end_example()

    example(
        "H4. No common version: `UNKNOWN_VERSION`, then close",
        "The error frame is handshake-shaped (`v`, `op`, no `id`); the daemon closes "
        "the connection after it.",
    )
    t = await Talk.open(sock)
    await t.call(hs(3, 4))
    await t.expect_close()
    t.close()
    end_example()

    cap_session = await daemon.open_session(
        Grants.parse(["demo"]),
        frozenset(),
        "capability-demo",
        capability_digest(DEMO_CAPABILITY),
        None,
    )
    example(
        "H5. Session with a capability token: missing token, `UNAUTHORIZED`",
        "A session opened with `capability` (what `credproxy run --capability` does) "
        "refuses a handshake that does not carry the token.",
    )
    t = await Talk.open(cap_session.socket_path)
    await t.call(hs())
    await t.expect_close()
    t.close()
    end_example()

    example(
        "H6. Session with a capability token: token presented",
        f"The same session, with `capabilityToken` (the demo value `{DEMO_CAPABILITY[:16]}…`).",
    )
    t = await Talk.open(cap_session.socket_path)
    await t.call(hs(capabilityToken=DEMO_CAPABILITY))
    t.close()
    end_example()
    await daemon.close_session(cap_session.id)

    example(
        "H7. Peer of another uid: refused before it speaks",
        "A process with effective uid 65534 connects (the session allows no other "
        "uid). The daemon reads its uid with SO_PEERCRED on accept, sends one "
        "handshake-shaped `UNAUTHORIZED` frame without reading anything, and closes. "
        "The client's handshake may or may not have been written by then; the frame "
        "is readable either way.",
    )
    if os.geteuid() == 0:
        hello = frame_of(hs())
        proc = await trio.run_process(
            [sys.executable, "-c", OTHER_UID_PEER, sock, hello.hex()],
            capture_stdout=True,
        )
        got = bytes.fromhex(proc.stdout.decode().strip())
        show_frame("client → daemon", hello, "(sent as uid 65534)")
        show_frame("daemon → client", got)
        emit("(the daemon closed the connection)")
    else:
        emit("(not generated: this example needs root to connect as another uid)")
    end_example()

    cap_demo = await daemon.open_session(
        Grants.parse(["demo"]),
        frozenset(),
        "cap-demo",
        None,
        None,
    )
    example(
        "H8. Connection cap: the 129th connection of a session",
        "With 128 connections open on one session (`limits.max_connections`, the "
        "default), the next one gets one handshake-shaped `RESOURCE_EXHAUSTED` frame "
        "and is closed.",
    )
    held = [await quiet_open(cap_demo.socket_path) for _ in range(128)]
    t = await Talk.open(cap_demo.socket_path)
    await t.recv()
    await t.expect_close()
    t.close()
    for r in held:
        r.close()
    end_example()
    await daemon.close_session(cap_demo.id)

    emit("### Sandbox operations")
    emit()

    example(
        "S1. `get_token`",
        "The stored token minus `refresh_token`, every other field passed through "
        '(`scope`, `account_id`). `bucket` absent means `"default"`. This first '
        "serve also starts the session's renewal timer for `demo:default`.",
    )
    await sb.call(req("1", "get_token", {"provider": "demo"}))
    end_example()

    example("S2. `get_token` with a bucket", "")
    await sb.call(req("2", "get_token", {"provider": "demo", "bucket": "work"}))
    end_example()

    example(
        "S3. `NOT_FOUND`: not granted, and missing, look the same",
        "`other:default` exists in the store but is not granted to this session; "
        "`demo:nope` does not exist. The answers differ only in the names echoed back.",
    )
    await sb.call(req("3", "get_token", {"provider": "other"}))
    await sb.call(req("4", "get_token", {"provider": "demo", "bucket": "nope"}))
    end_example()

    example(
        "S4. `list_providers` and `list_buckets`",
        "Only providers with at least one granted, stored bucket; `other` is hidden. "
        "A provider that is not granted lists no buckets (not an error).",
    )
    await sb.call(req("5", "list_providers"))
    await sb.call(req("6", "list_buckets", {"provider": "demo"}))
    await sb.call(req("7", "list_buckets", {"provider": "other"}))
    end_example()

    example(
        "S5. `get_bucket_stats`",
        "Counts of tokens served by this session: `demo:default` was served once (S1), "
        "as was `demo:work`, so it has 50 % of the provider's serves. `lastUsed` is "
        "epoch milliseconds.",
    )
    await sb.call(req("8", "get_bucket_stats", {"provider": "demo"}))
    end_example()

    example(
        "S6. API keys: `get_api_key`, `list_api_keys`, `has_api_key`",
        "`other-key` exists but is not granted: `NOT_FOUND`, not listed, `exists: false`.",
    )
    await sb.call(req("9", "get_api_key", {"name": "demo-key"}))
    await sb.call(req("10", "get_api_key", {"name": "other-key"}))
    await sb.call(req("11", "list_api_keys"))
    await sb.call(req("12", "has_api_key", {"name": "demo-key"}))
    await sb.call(req("13", "has_api_key", {"name": "other-key"}))
    end_example()

    before = idp.refresh_count
    example(
        "S7. `refresh_token`, then again inside the 30 s cooldown",
        "The first call refreshes upstream (the IdP rotates the refresh token; the "
        "new access token is served). The second, at the same wall-clock instant, is "
        "inside the cooldown and the token is valid, so it gets the current token "
        "without another upstream call.",
    )
    await sb.call(req("14", "refresh_token", {"provider": "demo"}))
    await sb.call(req("15", "refresh_token", {"provider": "demo"}))
    emit(f"(upstream refreshes during this example: {idp.refresh_count - before})")
    end_example()

    example(
        "S8. `FORBIDDEN` operations",
        "`save_token`, `remove_token` and every `oauth_*` op exist in llxprt's "
        "protocol but are never available on a sandbox socket.",
    )
    await sb.call(req("16", "save_token", {"provider": "demo", "token": {}}))
    await sb.call(req("17", "oauth_initiate", {"provider": "demo"}))
    end_example()

    example(
        "S9. `INVALID_REQUEST`: unknown op, bad envelope, bad name",
        "Each gets an error reply and the connection stays open. A missing or "
        'non-string `id` is echoed as `"unknown"`.',
    )
    await sb.call(req("18", "ping"))
    await sb.call(req("19", "cancel", {"targetId": "18"}))
    await sb.call({"v": 2, "op": "get_token", "payload": {"provider": "demo"}})
    await sb.call({"v": 2, "id": "20", "op": "get_token", "payload": ["demo"]})
    await sb.call(req("21", "get_token", {"provider": "demo/../x"}))
    await sb.call(req("22", "get_token", {}))
    end_example()

    before = idp.refresh_count
    idp.fail_next("slow", delay=1.0)
    example(
        "S10. Duplicate id, a burst waiting on one refresh, one upstream refresh for many callers",
        "`lab:expired` has expired, so each `get_token` waits for a refresh (the IdP is "
        "made to take 1 s). The client writes 18 frames at once: `s1`, `s1` again "
        "(duplicate while in flight) and `s2`…`s17`. Replies leave in request order, so "
        "the duplicate's refusal comes right after `s1`'s answer. The 17 `get_token` of "
        "one key wait on one answer together and take one in-flight slot between them "
        "(llxprt's client sends such bursts on one connection), so none is refused: they "
        "share one upstream refresh and then all get the new token, in the order they "
        "were sent (the first three replies shown, as they came).",
    )
    frames = [req("s1", "get_token", {"provider": "lab", "bucket": "expired"})]
    frames.append(frames[0])
    frames += [
        req(f"s{i}", "get_token", {"provider": "lab", "bucket": "expired"}) for i in range(2, 18)
    ]
    blob = b"".join(frame_of(f) for f in frames)
    await sb.raw.send(blob)
    show_frame("client → daemon", frame_of(frames[0]), "(frame 1 of 18; s2…s17 differ only in id)")
    answers = []
    for _ in range(18):
        data = await sb.raw.recv_frame()
        assert data is not None
        answers.append(data)
    served = [a for a in answers if body(a).get("ok") is True]
    for a in answers[:3]:  # s1, the duplicate's refusal, s2: the wire's order
        show_frame("daemon → client", a)
    emit(
        f"({len(served)} requests answered with the new token; "
        f"upstream refreshes: {idp.refresh_count - before})"
    )
    end_example()

    idp.fail_next("server_error")
    example(
        "S11. `REFRESH_FAILED`",
        "`lab:broken` has expired; the token endpoint answers HTTP 500. There is no "
        "valid old token to fall back on, so the error reaches the client.",
    )
    await sb.call(req("23", "get_token", {"provider": "lab", "bucket": "broken"}))
    end_example()

    idp.fail_next("invalid_grant")
    example(
        "S12. `REAUTH_REQUIRED`",
        "After `refresh_cooldown` (a failing key's IdP is not asked again sooner), the "
        "token endpoint rejects the refresh token (`invalid_grant`): not retried; "
        "the message names the command the person runs on the host, who is told once.",
    )
    clock.advance(31)
    emit("(the wall clock moves 31 s, past the 30 s refresh cooldown)")
    emit()
    await sb.call(req("24", "get_token", {"provider": "lab", "bucket": "broken"}))
    end_example()

    example(
        "S13. Request rate: `RATE_LIMITED` with `retryAfter`",
        "A fresh connection writes 600 `list_api_keys` requests at once. The "
        "per-connection bucket (`limits.request_burst` 400, refilled at "
        "`limits.requests_per_second` 200) lets the first ~400 through; the rest get "
        "`RATE_LIMITED` with `retryAfter` in whole seconds (at least 1).",
    )
    flood_conn = await quiet_open(sock)
    flood = [req(f"f{i}", "list_api_keys") for i in range(1, 601)]
    await flood_conn.send(b"".join(frame_of(f) for f in flood))
    show_frame("client → daemon", frame_of(flood[0]), "(frame 1 of 600)")
    replies = []
    for _ in flood:
        data = await flood_conn.recv_frame()
        assert data is not None
        replies.append(data)
    limited = [r for r in replies if body(r).get("code") == "RATE_LIMITED"]
    show_frame("daemon → client", limited[0], "(the first refusal)")
    emit(f"({len(replies) - len(limited)} answered, {len(limited)} RATE_LIMITED in this run)")
    flood_conn.close()
    end_example()

    cooldown = await daemon.open_session(
        Grants.parse(["lab:short"]),
        frozenset(),
        "cooldown-demo",
        None,
        None,
    )
    example(
        "S14. `refresh_token` inside the cooldown with an expired token: `RATE_LIMITED`",
        "The IdP is set to issue 10-second tokens. A `refresh_token` succeeds; the "
        "wall clock then moves 15 s, so the new token has expired but the 30 s "
        "cooldown has 15 s left.",
    )
    idp.lifetime = 10
    t = await Talk.open(cooldown.socket_path)
    await t.send(hs())
    await t.raw.recv_frame()
    await t.call(req("1", "refresh_token", {"provider": "lab", "bucket": "short"}))
    clock.advance(15)
    emit("(the wall clock moves 15 s)")
    emit()
    await t.call(req("2", "refresh_token", {"provider": "lab", "bucket": "short"}))
    t.close()
    idp.lifetime = 3600
    end_example()
    await daemon.close_session(cooldown.id)

    example(
        "S15. v1 peer and a response over 64 KiB: `RESPONSE_TOO_LARGE`",
        "`big:default` carries a 70 000-character pass-through field. On the v1 "
        "connection of H2 the answer would exceed 65 536 bytes, so the daemon sends "
        "`RESPONSE_TOO_LARGE` instead; a v2 connection gets the whole token.",
    )
    await v1.call(req("1", "get_token", {"provider": "big"}, v=1))
    await sb.call(req("25", "get_token", {"provider": "big"}))
    v1.close()
    end_example()

    emit("### What closes a connection without a reply")
    emit()

    async def closes(title: str, text: str, data: bytes, note: str) -> None:
        example(title, text)
        raw = await quiet_open(sock)
        emit("(after a successful handshake)")
        emit()
        t0 = trio.current_time()
        await raw.send(data)
        show_raw("client → daemon", data, note)
        got = await raw.recv_frame(wait=15)
        assert got is None, got
        took = trio.current_time() - t0
        emit(f"(the daemon closed the connection after {took:.1f} s without sending a byte)")
        raw.close()
        end_example()

    await closes(
        "X1. Header announcing more than 65 536 bytes",
        "Refused as soon as the 4-byte header is complete; the body is never read.",
        (65_537).to_bytes(4, "big"),
        "(header only: 65 537)",
    )
    bad_json = b'{"v":2,"id":"1",'
    await closes(
        "X2. Body that is not JSON",
        "",
        len(bad_json).to_bytes(4, "big") + bad_json,
        "(truncated JSON)",
    )
    array = b'["get_token"]'
    await closes(
        "X3. Body that is JSON but not an object",
        "",
        len(array).to_bytes(4, "big") + array,
        "(a JSON array)",
    )
    await closes(
        "X4. Body that does not arrive within 5 s of its header",
        "The header announces 16 bytes; only 5 follow.",
        (16).to_bytes(4, "big") + b'{"v":',
        "(header + 5 of 16 body bytes)",
    )

    emit("### Control socket, continued")
    emit()

    with store.locked("demo", "work"):
        store.remove("demo", "work")
    example(
        "C4. `token_changed` after a logout",
        "What `credproxy logout demo --bucket work` sends after removing the file. "
        "The session of S2 had a renewal timer for `demo:work`; it is cancelled.",
    )
    await ctl.call(req("4", "token_changed", {"provider": "demo", "bucket": "work"}))
    end_example()

    example(
        "C5. `status`",
        "Sessions, grants, renewal timers, stored tokens and key names; never a "
        "secret value. (JSON shown indented here; on the wire it is compact.)",
    )
    await ctl.send(req("5", "status"))
    await ctl.recv(pretty=True)
    end_example()

    example(
        "C6. `close_session`, twice",
        "Closing cancels the session's connections and timers and removes its socket; "
        "a second close finds nothing.",
    )
    await ctl.call(req("6", "close_session", {"session": main_sid}))
    await ctl.call(req("7", "close_session", {"session": main_sid}))
    end_example()
    sb.close()
    ctl.close()


def render() -> str:
    return "\n".join(OUT).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="splice the output into this Markdown file")
    args = parser.parse_args()
    for name in ("CREDPROXY_FAULT", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC"):
        os.environ.pop(name, None)
    logs.configure("error")  # log lines go to stderr; keep the refused-peer warnings out
    os.umask(0o077)
    root = Path(tempfile.mkdtemp(prefix="cpdemo-", dir="/tmp"))  # short: sun_path limit
    try:
        trio.run(scenario, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    # The temporary directory's name varies per run; show it as a placeholder.
    out = render().replace(str(root), "/tmp/cpdemo-XXXX")  # noqa: S108
    if args.write is None:
        sys.stdout.write(out)
        return 0
    doc = args.write.read_text(encoding="utf-8")
    start, stop = doc.find(BEGIN), doc.find(END)
    if start < 0 or stop < start:
        print(f"{args.write}: markers {BEGIN} / {END} not found", file=sys.stderr)
        return 1
    doc = doc[: start + len(BEGIN)] + "\n\n" + out + "\n" + doc[stop:]
    args.write.write_text(doc, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
