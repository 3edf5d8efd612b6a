"""The HTTP API proxy on session sockets: unmodified tools, no token in the sandbox (trio shell).

Theory of operation
-------------------

A session socket answers two protocols, told apart by the first byte: a frame
header starts with 0x00 (frames are at most 64 KiB), an HTTP request line with
a letter. The serving loop (:mod:`credproxy.shell.fastpath`) hands an HTTP
connection, with the bytes it has read, to :meth:`ApiProxy.serve`, which
parses HTTP/1.1 with h11 (never by hand) and forwards::

    http://credproxy/PROVIDER[:BUCKET]/REST?QUERY  ->  base_url + /REST?QUERY

with the headers of ``[providers.PROVIDER.api] headers`` filled in from the
token outside the sandbox. So the sandbox holds neither the refresh token nor
even the access token, and no TLS is intercepted: the daemon makes the HTTPS
call itself.

- Whatever the sandbox sent in ``Authorization``, ``x-api-key``, ``Cookie``,
  ``Proxy-*`` and hop-by-hop headers is dropped.
- Bodies stream both ways as they arrive; a request body up to
  ``retry_body_limit`` is also kept, so that an upstream 401 can be answered
  by one coordinated refresh and one retry (a bigger body: the 401 is passed
  through). A client that goes away cancels the upstream request; an upstream
  silent for ``read_timeout`` ends the response.
- No open proxy: only the base URL of a provider the session is granted, no
  redirect followed, no absolute-form target, no CONNECT, no ``.`` or ``..``
  segment (encoded or not), capped header size, a cap of streams per session.
- The token used is the one ``get_token`` would serve (same cache, refresh
  and renewal; the first use schedules the session's renewal). An upstream 429
  holds the bucket as quota-exhausted (several accounts).
- One audit line per request: session, provider, bucket, method, path
  without query, status, bytes, milliseconds. Never a header or a body.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket as stdsocket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote

import h11
import trio

from credproxy.core.config import Config
from credproxy.core.names import DEFAULT_BUCKET, Key, is_name
from credproxy.errors import CredproxyError, NotFound, ReauthRequired
from credproxy.shell import logs
from credproxy.shell.http import ApiClient, UpstreamResponse, UpstreamUnavailable

if TYPE_CHECKING:
    from credproxy.shell.handlers import SandboxOps
    from credproxy.shell.sessions import Session
    from credproxy.shell.tokens import Entry, Tokens

log = logs.get("credproxy.proxy")

RECV_SIZE = 65_536
HEAD_TIMEOUT = 10.0  # seconds for a request's line and headers, once its first byte is here
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never forwarded from the sandbox: credentials of its own, and what the daemon sets.
# (Content-Length is kept: h11 has checked it, and an upstream may insist on it.)
FROM_SANDBOX_DROPPED = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"x-api-key",
    b"cookie",
    b"expect",
}
_FIELD = re.compile(r"\{([A-Za-z0-9_.:@-]+)\}")


class Route(NamedTuple):
    """Where a request goes: the key whose token it carries, and the upstream URL's parts."""

    key: Key
    base_url: str
    rest: str  # the path after /PROVIDER[:BUCKET]/
    query: str  # "?..." or ""
    explicit: bool  # the bucket was named (else the profile's current one)


class HttpError(Exception):
    """An answer the proxy gives itself: status and a message for the person (no secret)."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


class ApiProxy:
    """Serves HTTP connections of session sockets (see the module docstring)."""

    def __init__(self, cfg: Config, tokens: Tokens, ops: SandboxOps, client: ApiClient) -> None:
        self.cfg = cfg
        self.tokens = tokens
        self.ops = ops
        self.client = client
        self._streams: dict[str, int] = {}  # session id -> proxied requests in flight

    # -- one connection ------------------------------------------------------------

    async def serve(self, session: Session, sock: stdsocket.socket, initial: bytes) -> None:
        """Serve one HTTP connection until it closes, idles out or breaks the protocol."""
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.cfg.proxy.max_header_bytes)
        conn.receive_data(initial)
        try:
            async with stream:
                while True:
                    event = await self._next_event(conn, stream, head=True)
                    if not isinstance(event, h11.Request):
                        return  # closed, idle, or broken
                    await self._exchange(session, conn, stream, event)
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._refuse(conn, stream, exc.error_status_hint, "malformed HTTP request")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:  # a bug: this connection ends, the daemon and every other go on
            log.exception("api_connection_crashed", session=session.id)
        finally:
            session.connection_closed()

    async def _next_event(
        self, conn: h11.Connection, stream: trio.SocketStream, *, head: bool = False
    ) -> Any:
        """The next h11 event; None when the peer idles out.

        Waiting for a request (*head*), the connection may idle for
        ``idle_timeout``; once its first bytes are here, the request line and
        headers must follow within :data:`HEAD_TIMEOUT` (a slow-loris client
        does not hold a task for ten minutes a byte at a time).
        """
        head_deadline = None
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if head and head_deadline is None and conn.trailing_data[0]:
                head_deadline = trio.current_time() + HEAD_TIMEOUT
            deadline = trio.current_time() + self.cfg.limits.idle_timeout
            if head_deadline is not None:
                deadline = min(deadline, head_deadline)
            data = b""
            with trio.move_on_at(deadline) as scope:
                data = await stream.receive_some(RECV_SIZE)
            if scope.cancelled_caught:
                return None
            conn.receive_data(data)

    async def _refuse(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int, message: str
    ) -> None:
        """Answer with an error of the proxy's own, if the connection still allows it."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = b'{"error":{"type":"credproxy","message":' + _json_string(message) + b"}}"
        try:
            await stream.send_all(
                conn.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                    )
                )
                or b""
            )
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        except (
            h11.LocalProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
        ):
            pass

    # -- one request -------------------------------------------------------------------

    async def _exchange(
        self, session: Session, conn: h11.Connection, stream: trio.SocketStream, req: h11.Request
    ) -> None:
        started = trio.current_time()
        method = req.method.decode("ascii", "replace")
        key: Key | None = None
        status, sent, path = 0, 0, "-"
        try:
            key, base_url, rest, query, explicit = self._route(
                session, method, req.target, req.headers
            )
            path = "/" + rest
            if self._streams.get(session.id, 0) >= self.cfg.proxy.max_streams:
                raise HttpError(503, "too many proxied requests in flight for this session")
            self._streams[session.id] = self._streams.get(session.id, 0) + 1
            try:
                status, sent = await self._forward(
                    session,
                    conn,
                    stream,
                    req,
                    key,
                    f"{base_url.rstrip('/')}/{rest}{query}",
                    explicit,
                )
            finally:
                self._streams[session.id] -= 1
        except HttpError as exc:
            status = exc.status
            await self._drain_request(conn, stream)
            await self._refuse(conn, stream, exc.status, str(exc))
        finally:
            log.info(
                "api_request",
                session=session.id,
                provider=None if key is None else key.provider,
                bucket=None if key is None else key.bucket,
                method=method,
                path=path,
                status=status,
                bytes=sent,
                ms=round((trio.current_time() - started) * 1000, 1),
            )

    def _route(self, session: Session, method: str, target: bytes, headers: Any = ()) -> Route:
        """Where a request target goes (see :class:`Route`).

        Raises:
            HttpError: CONNECT, an absolute-form target, a dot segment, or a
                provider that is not granted or has no API (the same 404 for both).
        """
        if method == "CONNECT":
            raise HttpError(405, "CONNECT is not available: this is not an open proxy")
        size = len(target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if size > self.cfg.proxy.max_header_bytes:
            # h11 caps what it buffers of an incomplete request, not a whole one
            # that arrived at once: the cap is checked here as well.
            raise HttpError(431, "request line and headers are too large")
        names = [name.lower() for name, _ in headers]
        if b"transfer-encoding" in names and b"content-length" in names:
            # A request-smuggling shape (RFC 9112 6.3): refused, not guessed at.
            raise HttpError(400, "Content-Length and Transfer-Encoding together are refused")
        text = target.decode("ascii", "replace")
        if not text.startswith("/"):
            raise HttpError(400, "use a path (http://credproxy/PROVIDER/...), not an absolute URL")
        path, mark, query = text.partition("?")
        segments = path.split("/")[1:]
        for segment in segments:
            decoded = unquote(segment)
            if decoded in (".", "..") or "/" in decoded or "\\" in decoded:
                raise HttpError(400, "the path may not contain . or .. segments")
        head = segments[0] if segments else ""
        provider, _, bucket = head.partition(":")
        explicit = bool(bucket)
        if not is_name(provider) or (bucket and not is_name(bucket)):
            raise HttpError(404, "no such API in this session (http://credproxy/PROVIDER/...)")
        prov = self.cfg.providers.get(provider)
        if not bucket:
            profile = self.ops.profile(session, provider)
            current = 0 if profile is None else session.current.get(provider, 0)
            bucket = (
                DEFAULT_BUCKET
                if profile is None
                else profile.buckets[current % len(profile.buckets)]
            )
        key = Key(provider, bucket)
        allowed = session.grants.token_allowed(*key) or session.grants.api_allowed(provider)
        if prov is None or prov.api is None or not allowed:
            raise HttpError(404, "no such API in this session (http://credproxy/PROVIDER/...)")
        return Route(
            key, prov.api.base_url, "/".join(segments[1:]), mark + query if query else "", explicit
        )

    async def _forward(
        self,
        session: Session,
        conn: h11.Connection,
        stream: trio.SocketStream,
        req: h11.Request,
        key: Key,
        url: str,
        explicit: bool = True,
    ) -> tuple[int, int]:
        """Forward one request and stream its answer back; returns (status, body bytes sent)."""
        entry = await self._token(session, key)
        method = req.method.decode("ascii")
        limit = self.cfg.proxy.retry_body_limit
        kept: bytearray | None = bytearray()

        async def body() -> AsyncIterator[bytes]:
            nonlocal kept
            while True:
                event = await self._next_event(conn, stream)
                if isinstance(event, h11.Data):
                    if kept is not None:
                        kept += event.data
                        if len(kept) > limit:
                            kept = None  # too big to keep: a 401 is passed through
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    return
                else:
                    raise trio.BrokenResourceError("the client went away mid-request")

        framing = {name.lower(): value for name, value in req.headers}
        has_body = b"transfer-encoding" in framing or framing.get(b"content-length", b"0") != b"0"
        if not has_body:
            # No body: none is sent (a GET must not go out as an empty chunked body).
            await self._next_event(conn, stream)  # the request's EndOfMessage
        upstream = await self._send(
            session, method, url, req, key, entry, body() if has_body else b""
        )
        if upstream.status == 401 and kept is not None:
            # One forced, coordinated refresh, then one retry with the kept body.
            await self.client.close_response(upstream)
            try:
                entry = await self.tokens.refresh(key, entry.expiry, reason="api-401")
            except CredproxyError as exc:
                raise HttpError(401, f"the upstream refused the token and {exc}") from None
            self.ops.publish(session, key, entry)
            upstream = await self._send(session, method, url, req, key, entry, bytes(kept))
        if upstream.status == 429:
            self.tokens.mark_quota(key, _retry_after(upstream.headers))
            if (
                kept is not None
                and not explicit
                and self.ops.profile(session, key.provider) is not None
            ):
                # Several accounts, asked without a bucket: once more, on the
                # bucket failover picks now (the held one is skipped).
                retried = await self._on_next_bucket(session, key, method, url, req, bytes(kept))
                if retried is not None:
                    await self.client.close_response(upstream)
                    upstream = retried
        try:
            return upstream.status, await self._relay(conn, stream, upstream)
        finally:
            await self.client.close_response(upstream)

    async def _on_next_bucket(
        self, session: Session, key: Key, method: str, url: str, req: h11.Request, body: bytes
    ) -> UpstreamResponse | None:
        """The request sent again with the token of the bucket failover serves now, if any."""
        try:
            ready = await self.ops.walk(session, key.provider)
            entry = self.tokens.entry(ready.key)
        except (CredproxyError, HttpError):
            return None
        if entry is None or ready.key == key:
            return None
        return await self._send(session, method, url, req, ready.key, entry, body)

    async def _token(self, session: Session, key: Key) -> Entry:
        """The token get_token would serve for *key* (its first use schedules the renewal)."""
        try:
            entry = await self.tokens.get(key)
        except NotFound:
            raise HttpError(
                404, "no such API in this session (http://credproxy/PROVIDER/...)"
            ) from None
        except ReauthRequired as exc:
            raise HttpError(401, str(exc)) from None
        except CredproxyError as exc:
            raise HttpError(502, f"no token for {key}: {exc.code}") from None
        self.ops.publish(session, key, entry)
        return entry

    async def _send(
        self,
        session: Session,
        method: str,
        url: str,
        req: h11.Request,
        key: Key,
        entry: Entry,
        content: Any,
    ) -> UpstreamResponse:
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in req.headers
            if name.lower() not in FROM_SANDBOX_DROPPED and not name.lower().startswith(b"proxy-")
        ]
        if not any(name.lower() == "accept-encoding" for name, _ in headers):
            # httpx would ask for gzip on its own, and the body is relayed as
            # it comes: a client that did not ask for compression gets none.
            headers.append(("accept-encoding", "identity"))
        headers += self._injected(session, key, entry)
        try:
            return await self.client.send(method, url, headers, content)
        except UpstreamUnavailable as exc:
            raise HttpError(502, str(exc)) from None

    def _injected(self, session: Session, key: Key, entry: Entry) -> list[tuple[str, str]]:
        prov = self.cfg.providers[key.provider]
        assert prov.api is not None
        fields = {
            k: str(v)
            for k, v in entry.token.items()
            if k != "refresh_token" and isinstance(v, str | int | float) and not isinstance(v, bool)
        }

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("key:"):
                if not session.grants.key_allowed(name[4:]):
                    raise HttpError(
                        403,
                        f"the headers need the API key {name[4:]}, "
                        "which this session is not granted",
                    )
                value = self.ops.store.read_key(name[4:])
                if value is None:
                    raise HttpError(
                        502, f"the API key {name[4:]} named in the headers is not stored"
                    )
                return value
            if name not in fields:
                raise HttpError(502, f"the token of {key} has no field {name!r} for the headers")
            return fields[name]

        return [
            (header, _FIELD.sub(fill, template)) for header, template in prov.api.headers.items()
        ]

    async def _relay(
        self, conn: h11.Connection, stream: trio.SocketStream, upstream: UpstreamResponse
    ) -> int:
        """Send the upstream's answer as it arrives; a client that goes away cancels it."""
        headers = [(n, v) for n, v in upstream.headers if n.lower() not in HOP_BY_HOP]
        await stream.send_all(
            conn.send(h11.Response(status_code=upstream.status, headers=headers)) or b""
        )
        sent = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_client, conn, stream, nursery.cancel_scope)
            try:
                async for chunk in upstream.chunks():
                    if chunk:
                        await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
                        sent += len(chunk)
            except UpstreamUnavailable as exc:
                log.warning("api_upstream_broke_off", error=str(exc))
            # A Content-Length the upstream did not fill cannot end cleanly: the
            # connection closes instead.
            with contextlib.suppress(h11.LocalProtocolError):
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
            nursery.cancel_scope.cancel()
        return sent

    async def _watch_client(
        self, conn: h11.Connection, stream: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        """Cancel the response if the client goes away (pipelined bytes are kept for later)."""
        while True:
            try:
                data = await stream.receive_some(RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                scope.cancel()
                return
            conn.receive_data(data)
            if len(conn.trailing_data[0]) > self.cfg.proxy.max_header_bytes:
                return  # enough pipelined for now: the next cycle reads the rest

    async def _drain_request(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        """Read and drop the body of a refused request, so the connection can go on."""
        while conn.their_state is h11.SEND_BODY:
            event = await self._next_event(conn, stream)
            if event is None or isinstance(event, h11.ConnectionClosed):
                return


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None


def _json_string(text: str) -> bytes:
    return json.dumps(text).encode()
