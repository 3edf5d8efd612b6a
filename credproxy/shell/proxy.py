"""The HTTP API proxy on session sockets: unmodified tools, no token in the sandbox (trio shell).

Theory of operation
-------------------

A session socket answers two protocols, told apart by the first byte: a frame
header starts with 0x00 (frames are at most 64 KiB), an HTTP request line with
a letter. The serving loop relays most requests itself
(:mod:`credproxy.shell.loopproxy`, with the rules below, from the functions of
this module); what it does not serve it hands, with the connection and the
bytes it has read, to :meth:`ApiProxy.serve`, which parses HTTP/1.1 with h11
(never by hand) and forwards::

    http://credproxy/PROVIDER[:BUCKET]/REST?QUERY  ->  base_url + /REST?QUERY

with the headers of ``[providers.PROVIDER.api] headers`` filled in from the
token outside the sandbox. So the sandbox holds neither the refresh token nor
even the access token, and no TLS is intercepted: the daemon makes the HTTPS
call itself. What may pass is decided in :mod:`credproxy.core.httprules`.

Every rule of the frame side holds here too:

- **Who.** The peer's uid was checked when the socket accepted it. A session
  with a capability wants it in every request (``Proxy-Authorization: Bearer
  <capability>``, else ``407``) or once in the connection's preamble, the line
  ``credproxy forward`` sends first (``CREDPROXY/1 forward=PORT
  capability=HEX``). A connection that came through ``forward`` must name its
  loopback port in ``Host`` and carry no ``Origin`` or ``Sec-Fetch-Site:
  cross-site`` (``403`` with the rule that refused).
- **What.** Only a granted provider's base URL; the bucket without a bucket in
  the path is the one ``get_token`` would serve (the same function, holds
  included). No redirect followed, no absolute-form target, no CONNECT, no
  ``.`` or ``..`` segment (encoded or not). Credential headers never come from
  the sandbox; the template's headers replace the sandbox's copies.
- **How much.** The connection's request rate (``[limits]``, ``429``), the
  session's connection cap (at accept) and streams in flight (``503``); an
  upstream 401 is retried at most once, after at most one refresh per key per
  ``refresh_cooldown`` shared with every session and path
  (:meth:`Tokens.after_rejection`); the bodies kept for that retry are bounded
  per request (``retry_body_limit``) and per daemon (``retry_body_budget``).
- **How long.** A request head must arrive within 10 s of its first byte; a
  body within ``body_timeout`` (20 s) plus one second per ``body_min_rate``
  (500) bytes of the time spent waiting on the client (``408``). h11
  protocol errors answer ``400`` (``431``, ``413``) and close. A client
  that goes away, before or after the upstream's answer has begun, cancels
  the upstream request at once.
- **Audit.** One line per request: session, provider, bucket, method, path
  without query, status, bytes, milliseconds; a client that went away is
  status ``499`` (as nginx logs it), never a traceback. Never a header or a body.

**WebSocket** (RFC 6455). A ``GET`` with ``Upgrade: websocket`` is admitted,
routed and given its headers like any request, then sent upstream as an
upgrade on a connection of its own (:meth:`ApiClient.upgrade`: httpx cannot
switch protocols). A ``101`` is relayed, and then bytes both ways, unparsed
(:meth:`ApiProxy._tunnel`), until either side closes or breaks, nothing
moves for ``idle_timeout``, the client hangs up or the session closes (after
a client's half-close, which is how a close reaches it through ``forward``,
replies on their way still reach it for :data:`HALF_CLOSE_GRACE`); it counts as a
request in flight throughout, and its audit line, written when it ends, says
``101``, the bytes each way (``bytes``, ``bytes_up``) and which side ended it.
A logout of the login whose token opened it ends it too (:meth:`ApiProxy.end_tunnels`),
and so does a reload that changes or removes the ``api`` section it was opened
under (:meth:`ApiProxy.reconfigure`): its host and credential are the old ones.
Any other answer is relayed as a response; a ``401`` is retried as above.
"""

from __future__ import annotations

import contextlib
import functools
import re
import select
import socket as stdsocket
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote

import h11
import trio

from credproxy.core import httprules
from credproxy.core.config import HEADER_FIELD, UNSERVED_FIELDS, Api, Config, Provider
from credproxy.core.connection import TokenBucket
from credproxy.core.grants import Grants
from credproxy.core.httprules import HOP_BY_HOP, BodyPace, Preamble, error_answer
from credproxy.core.names import DEFAULT_BUCKET, Key, is_name
from credproxy.core.servecore import Ready
from credproxy.core.throttle import Throttle
from credproxy.errors import AllBucketsExhausted, CredproxyError, NotFound, ReauthRequired
from credproxy.shell import logs
from credproxy.shell.http import ApiClient, UpstreamResponse, UpstreamUnavailable

if TYPE_CHECKING:
    from credproxy.shell.handlers import SandboxOps
    from credproxy.shell.sessions import Session
    from credproxy.shell.tokens import Entry, Tokens

log = logs.get("credproxy.proxy")

RECV_SIZE = 65_536
HEAD_TIMEOUT = 10.0  # seconds for a request's line and headers, once its first byte is here
CLOSE_TIMEOUT = 1.0  # seconds to close an upstream response (shielded from cancellation)
SEND_TIMEOUT = 10.0  # seconds a client may take nothing of its answer (as on the frame side)
HALF_CLOSE_GRACE = 2.0  # seconds a WebSocket lives after its client's end of input
CLIENT_GONE_STATUS = 499  # nginx's "client closed request", in the audit line only
TRIM_AFTER = 1 << 20  # body bytes relayed before the last exchange ending gives memory back
_NO_API = "no such API in this session (http://credproxy/PROVIDER/...)"
#: A reload moved the provider's API while a request waited (for its token).
API_MOVED = "the provider's API moved (a reload) while this request waited; send it again"
#: A reload changed the provider's API (its base URL or headers) while a WebSocket
#: handshake sent under the old one waited for its 101.
API_CHANGED = (
    "the provider's API changed (a reload) while this WebSocket handshake waited; send it again"
)
NOT_SERVED_LOG_INTERVAL = 60.0  # seconds between api_not_served lines of a session and cause
NOT_SERVED_MEMORY = 1024  # (session, provider, cause) throttles kept; then forgotten at once
#: Why a request to a provider's API was not served, as the host's log says it, and the fix.
#: The sandbox gets one answer (_NO_API) for the first two, so it cannot tell unknown providers
#: from ones it was not granted; the last two concern what it was granted and are said plainly.
_NOT_SERVED_FIX = {
    "not_configured": "add [providers.{p}] and [providers.{p}.api] to the config file, "
    "or fix the sandbox's URL",
    "not_granted": "grant it to the session: credproxy run --allow {p} (or --allow api:{p})",
    "no_api_section": "add [providers.{p}.api] (base_url, headers) to the config file",
    "no_login": "log in on the host: credproxy login {p} --bucket {b}",
}


class Route(NamedTuple):
    """Where a request goes: provider, the bucket it named (or None), the upstream URL's parts."""

    provider: str
    bucket: str | None  # None: the profile's pick, as get_token without a bucket
    base_url: str
    rest: str  # the path after /PROVIDER[:BUCKET]/
    query: str  # "?..." or ""


class HttpError(Exception):
    """An answer the proxy gives itself: status and a message for the person (no secret)."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or []


class ClientGone(Exception):
    """The client closed its connection (or broke it) before its answer was complete."""


class ClientTooSlow(Exception):
    """The client sent its request body too slowly (:class:`BodyPace`)."""


#: What a client that went away looks like from here.
GONE = (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass(slots=True)
class Link:
    """One HTTP connection's standing: where it came from and its request rate."""

    preamble: Preamble
    rate: TokenBucket


@dataclass(frozen=True, slots=True)
class Handed:
    """A connection the loop's relay hands to the trio side at the start of a request."""

    preamble: Preamble
    rate: TokenBucket  # the connection's request rate, on the loop's clock at *at*
    at: float
    admitted: bool  # the request was admitted (and its rate spent) already
    unsent: bytes = b""  # the end of earlier answers, to send before anything else


@dataclass(slots=True)
class Audit:
    """What the audit line of one request says (filled in as the exchange goes)."""

    key: Key | None = None
    path: str = "-"
    status: int = 0
    sent: int = 0  # body bytes to the client (after a 101: the upstream's bytes)
    received: int = 0  # after a 101: the client's bytes to the upstream
    upgraded: bool = False  # switched to WebSocket (101)
    ended: str | None = None  # after a 101: which side ended the relay, or "idle"


@dataclass(slots=True)
class Exchange:
    """One request on its way: who asked, on which connection, where it goes, what is logged."""

    session: Session
    conn: h11.Connection
    stream: trio.SocketStream
    req: h11.Request
    route: Route
    url: str
    audit: Audit  # audit.key is the key whose token the request carries
    body: Body
    websocket: bool = False  # a WebSocket handshake (httprules.is_websocket_upgrade)
    logouts: int = 0  # ApiProxy's count of logouts when it began (a WebSocket's check)
    api: Api | None = None  # the api section its last upstream request was sent under


@dataclass(frozen=True, slots=True)
class Tunnel:
    """One open WebSocket: the ``api`` section it was opened under, and its audit line."""

    api: Api
    audit: Audit

    def end(self, scope: trio.CancelScope, why: str) -> None:
        """End it (*scope* is its relay's), saying *why* unless it is ending already."""
        if self.audit.ended is None:
            self.audit.ended = why
        scope.cancel()


class ApiProxy:
    """Serves HTTP connections of session sockets (see the module docstring)."""

    def __init__(self, cfg: Config, tokens: Tokens, ops: SandboxOps, client: ApiClient) -> None:
        self.cfg = cfg
        self.tokens = tokens
        self.ops = ops
        self.client = client
        self.ledger = Ledger()  # streams in flight, kept bodies: counted with the loop's relay
        self.hangups = Hangups()  # run by the daemon: ApiProxy.hangups.run()
        self._said: dict[tuple[str, str, str], Throttle] = {}
        # The open WebSockets, by the key whose token opened them (ended by a
        # logout, or a reload that changes their api section).
        self._tunnels: dict[Key, dict[trio.CancelScope, Tunnel]] = {}
        self._logouts = 0  # logouts so far
        self._logged_out: dict[Key, int] = {}  # each key's last one (its number)

    def end_tunnels(self, key: Key) -> int:
        """End every open WebSocket that *key*'s token opened (its login was removed).

        One whose handshake is still on its way is refused when its ``101``
        comes (:meth:`_tunnel`).
        """
        self._logouts += 1
        self._logged_out[key] = self._logouts
        tunnels = self._tunnels.pop(key, {})
        for scope, tunnel in tunnels.items():
            tunnel.end(scope, "logout")
        return len(tunnels)

    def reconfigure(self, cfg: Config) -> int:
        """Serve with *cfg* from now on (a reload); returns the WebSockets it ended.

        An open WebSocket whose provider's ``api`` section *cfg* changes or
        removes ends (``ended=reload``): it was opened on the old ``base_url``
        with the old section's headers, which are what the reload replaces. One
        whose section *cfg* keeps as it was (another provider changed, or its
        own outside ``api``) stays open. One whose handshake is still on its
        way is refused when its ``101`` comes (:meth:`_tunnel`).
        """
        self.cfg = cfg
        ended = 0
        for key, tunnels in self._tunnels.items():
            api = self._configured_api(key.provider)
            for scope, tunnel in tunnels.items():
                if tunnel.api != api and not scope.cancel_called:
                    tunnel.end(scope, "reload")
                    ended += 1
        return ended

    def _configured_api(self, provider: str) -> Api | None:
        """*provider*'s ``api`` section as configured now (None: none, or no such provider)."""
        prov = self.cfg.providers.get(provider)
        return None if prov is None else prov.api

    def pace(self) -> BodyPace:
        return BodyPace(self.cfg.proxy.body_timeout, self.cfg.proxy.body_min_rate)

    # -- one connection ------------------------------------------------------------

    async def serve(
        self,
        session: Session,
        sock: stdsocket.socket,
        initial: bytes,
        handed: Handed | None = None,
    ) -> None:
        """Serve one HTTP connection until it closes, idles out or breaks the protocol.

        *handed*: the connection comes from the loop's relay
        (:mod:`credproxy.shell.loopproxy`) at the start of a request it does not
        serve itself; *initial* is that request's bytes, and the preamble, the
        rate spent so far and whether the request was already admitted come
        with it.
        """
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.cfg.proxy.max_header_bytes)
        try:
            async with stream:
                try:
                    await self._serve(session, conn, stream, initial, handed)
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint if exc.error_status_hint in (413, 431) else 400
                    await self._refuse(conn, stream, status, f"malformed HTTP request: {exc}")
        except GONE:
            pass  # the client went away (its request, if any, has its audit line)
        except Exception:  # a bug: this connection ends, the daemon and every other go on
            log.exception("api_connection_crashed", session=session.id)
        finally:
            session.connection_closed()

    async def _serve(
        self,
        session: Session,
        conn: h11.Connection,
        stream: trio.SocketStream,
        initial: bytes,
        handed: Handed | None,
    ) -> None:
        admitted = False
        if handed is None:
            got = await self._preamble(stream, initial)
            if got is None:
                return
            preamble, rest = got
            if isinstance(preamble, str):
                await self._refuse(conn, stream, 400, preamble)
                return
            limits = self.cfg.limits
            rate = TokenBucket(limits.requests_per_second, limits.request_burst, _now())
            link = Link(preamble, rate)
        else:
            link, rest, admitted = Link(handed.preamble, handed.rate), initial, handed.admitted
            handed.rate.rebase(handed.at, _now())  # the loop's clock, then trio's
            await self._send_all(stream, handed.unsent)
        if rest:  # (h11 takes b"" for the end of the stream)
            conn.receive_data(rest)
        while True:
            event = await self._next_event(conn, stream, head=True)
            if not isinstance(event, h11.Request):
                return  # closed, idle, or broken
            await self._exchange(session, link, conn, stream, event, admitted=admitted)
            admitted = False
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _preamble(
        self, stream: trio.SocketStream, data: bytes
    ) -> tuple[Preamble | str, bytes] | None:
        """The connection's preamble (or an error to answer) and the bytes after it.

        Most connections have none: their first bytes are a request line. None
        when the client left or stalled before its preamble was complete.
        """
        marker = httprules.PREAMBLE
        deadline = _now() + HEAD_TIMEOUT
        while marker.startswith(data[: len(marker)]) and b"\r\n" not in data:
            if len(data) > httprules.MAX_PREAMBLE:
                return "the CREDPROXY/1 preamble line is too long", b""
            chunk = b""
            with trio.move_on_at(deadline):
                chunk = await stream.receive_some(RECV_SIZE)
            if not chunk:
                return None
            data += chunk
        if not data.startswith(marker):
            return Preamble(), data
        line, _, rest = data.partition(b"\r\n")
        try:
            return httprules.parse_preamble(line), rest
        except ValueError as exc:
            return str(exc), b""

    async def _next_event(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        *,
        head: bool = False,
        pace: BodyPace | None = None,
    ) -> Any:
        """The next h11 event; None when the peer idles out (or, with *pace*, is too slow).

        Waiting for a request (*head*), the connection may idle for
        ``idle_timeout``; once its first bytes are here, the request line and
        headers must follow within :data:`HEAD_TIMEOUT` (a slow-loris client
        does not hold a task for ten minutes a byte at a time). A body read
        with *pace* must keep up with it.

        Raises:
            ClientGone: the client closed its side in the middle of a body.
        """
        head_deadline = None
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            now = _now()
            if head and head_deadline is None and conn.trailing_data[0]:
                head_deadline = now + HEAD_TIMEOUT
            deadline = now + self.cfg.limits.idle_timeout
            if head_deadline is not None:
                deadline = min(deadline, head_deadline)
            if pace is not None:
                deadline = min(deadline, now + pace.allowance())
            data = b""
            with trio.move_on_at(deadline) as scope:
                data = await stream.receive_some(RECV_SIZE)
            if pace is not None:
                pace.record(_now() - now, len(data))
            if scope.cancelled_caught:
                return None
            if not data and conn.their_state is h11.SEND_BODY:
                raise ClientGone
            conn.receive_data(data)

    async def _refuse(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        message: str,
        extra: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
        draining: bool = False,
    ) -> None:
        """Answer with an error of the proxy's own, if the connection still allows it.

        *draining*: the rest of the request's body will be read after it (the
        connection may go on, unless the answer closes it anyway).
        """
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        whole = draining or conn.their_state is h11.DONE
        headers, body = error_answer(whole, status, message, extra, close=close)
        try:
            await stream.send_all(
                conn.send(h11.Response(status_code=status, headers=headers)) or b""
            )
            await stream.send_all(conn.send(h11.Data(data=body)) or b"")
            await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        except (h11.LocalProtocolError, *GONE):
            pass

    # -- one request -------------------------------------------------------------------

    async def _exchange(
        self,
        session: Session,
        link: Link,
        conn: h11.Connection,
        stream: trio.SocketStream,
        req: h11.Request,
        *,
        admitted: bool = False,
    ) -> None:
        started = _now()
        method = req.method.decode("ascii", "replace")
        audit = Audit()
        try:
            if not admitted:  # (the loop's relay admitted it, and spent its rate)
                self._admit(session, link, req)
            route = self._route(session, method, req.target, req.headers)
            audit.path = "/" + route.rest
            audit.key = await self.key_for(session, route)
            if not self.ledger.enter(session.id, self.cfg.proxy.max_streams):
                raise HttpError(503, "too many proxied requests in flight for this session")
            try:
                url = f"{route.base_url.rstrip('/')}/{route.rest}{route.query}"
                body = Body(self, conn, stream)
                websocket = httprules.is_websocket_upgrade(method, req.headers)
                await self._forward(
                    Exchange(
                        session,
                        conn,
                        stream,
                        req,
                        route,
                        url,
                        audit,
                        body,
                        websocket,
                        self._logouts,
                    )
                )
            finally:
                if self.ledger.leave(session.id):
                    # The last exchange has ended: what the big ones freed goes
                    # back to the system, not only to the allocator.
                    give_back_memory()
        except HttpError as exc:
            audit.status = exc.status
            if exc.status in (403, 407) or conn.they_are_waiting_for_100_continue:
                # Refused for who or where it comes from (such a peer gets no
                # more of our time), or a client that sends its body only after
                # a 100 Continue, which a refusal does not give: no body is
                # read, and the connection closes.
                await self._refuse(conn, stream, exc.status, str(exc), exc.headers, close=True)
                return
            # The answer goes at once: a client still sending its body (a
            # streamed upload, or one the upstream could not be reached for)
            # gets it now, not when its body ends. The rest of the body is then
            # read and dropped, paced, so that the connection can carry the
            # next request; an answer that closes it (a 5xx) drops it unread.
            await self._refuse(conn, stream, exc.status, str(exc), exc.headers, draining=True)
            if conn.our_state is h11.DONE:
                with contextlib.suppress(ClientTooSlow, *GONE):
                    await self._drain_request(conn, stream)
        except h11.RemoteProtocolError:
            audit.status = 400  # answered by serve(), which closes the connection
            raise
        except ClientTooSlow:
            audit.status = 408
            proxy = self.cfg.proxy
            await self._refuse(
                conn,
                stream,
                408,
                f"the request body arrived too slowly (at least {proxy.body_min_rate:g} "
                f"bytes/s after {proxy.body_timeout:g} s)",
            )
        except GONE:
            audit.status = CLIENT_GONE_STATUS
            raise ClientGone from None
        except Exception:  # a bug: this request gets a 500, the connection closes
            audit.status = 500
            log.exception("api_request_failed", session=session.id)
            await self._refuse(conn, stream, 500, "internal error; see the daemon log", close=True)
        finally:
            tunnel = (
                {"bytes_up": audit.received, "ended": audit.ended or "cancelled"}
                if audit.upgraded
                else {}
            )
            log.info(
                "api_request",
                session=session.id,
                provider=None if audit.key is None else audit.key.provider,
                bucket=None if audit.key is None else audit.key.bucket,
                method=method,
                path=audit.path,
                status=audit.status,
                bytes=audit.sent,
                **tunnel,
                ms=round((_now() - started) * 1000, 1),
            )

    def _admit(self, session: Session, link: Link, req: h11.Request) -> None:
        """The checks of the peer before anything is looked up: how often, from where, who.

        The rate comes first, so refusals cost the peer its rate too.

        Raises:
            HttpError: 429 (rate), 403 (a forward rule), 407 (no capability).
        """
        wait = link.rate.take(_now())
        if wait:
            retry = max(1, int(wait + 0.999))
            raise HttpError(
                429,
                "too many requests on this connection; slow down",
                [(b"retry-after", str(retry).encode())],
            )
        port = link.preamble.forward_port
        if port is not None:
            why = httprules.forward_refusal(req.headers, port)
            if why is not None:
                raise HttpError(403, why)
        if session.capability is not None:
            presented = link.preamble.capability or httprules.presented_capability(req.headers)
            if not httprules.capability_ok(presented, session.capability):
                raise HttpError(
                    407,
                    "this session requires its capability token: send "
                    "Proxy-Authorization: Bearer <token from fd 3>, or use credproxy forward",
                    [(b"proxy-authenticate", b'Bearer realm="credproxy"')],
                )

    def _route(self, session: Session, method: str, target: bytes, headers: Any = ()) -> Route:
        """Where a request target goes (:func:`route_request`), said on the host when refused."""
        try:
            return route_request(
                self.cfg.providers,
                session.grants,
                self.cfg.proxy.max_header_bytes,
                method,
                target,
                headers,
            )
        except NotServed as exc:
            raise self._not_served(session, exc.provider, exc.cause) from None

    @staticmethod
    def _allowed(session: Session, key: Key) -> bool:
        return allowed(session.grants, key)

    async def key_for(self, session: Session, route: Route) -> Key:
        """The key whose token the request carries: the named bucket, or get_token's choice.

        (Also the loop's relay's, when the serving core could not pick at once.)
        """
        if route.bucket is not None:
            return Key(route.provider, route.bucket)
        if self.ops.profile(session, route.provider) is None:
            key = Key(route.provider, DEFAULT_BUCKET)
        else:
            try:
                key = await self.ops.pick(session, route.provider)
            except AllBucketsExhausted as exc:
                extra = (
                    [] if exc.retry_after is None else [(b"retry-after", b"%d" % exc.retry_after)]
                )
                raise HttpError(429 if extra else 503, str(exc), extra) from None
            except ReauthRequired as exc:
                raise HttpError(401, str(exc)) from None
            except CredproxyError as exc:
                raise HttpError(502, f"no token for {route.provider}: {exc.code}") from None
        if not self._allowed(session, key):
            raise self._not_served(session, key.provider, "not_granted")
        return key

    def _not_served(
        self, session: Session, provider: str, cause: str, bucket: str = DEFAULT_BUCKET
    ) -> HttpError:
        """The 404 for *cause*, said on the host with the fix (one line per interval and cause).

        The sandbox is told plainly only what concerns a provider it was
        granted (no ``api`` section, no login); an unknown provider and one
        not granted get one identical answer.
        """
        said = (session.id, provider, cause)
        throttle = self._said.get(said)
        if throttle is None:
            if len(self._said) >= NOT_SERVED_MEMORY:
                self._said.clear()
            throttle = self._said[said] = Throttle(NOT_SERVED_LOG_INTERVAL)
        suppressed = throttle.allow(_now())
        if suppressed is not None:
            log.warning(
                "api_not_served",
                session=session.id,
                provider=provider,
                cause=cause,
                fix=_NOT_SERVED_FIX[cause].format(p=provider, b=bucket),
                suppressed=suppressed,
            )
        if cause == "no_api_section":
            return HttpError(404, f"{provider} has no api section in the host's config")
        if cause == "no_login":
            return HttpError(404, f"{provider}:{bucket} has no stored login on the host")
        return HttpError(404, _NO_API)

    async def _forward(self, x: Exchange) -> None:
        """Forward one request and stream its answer back, watching the client throughout.

        While the request is forwarded, the connection is in :attr:`hangups`:
        if the client closes it (or breaks it), the upstream request is
        cancelled at once, whether or not its answer has begun.
        """
        body = x.body
        failure: Exception | None = None
        with self.hangups.watch(x.stream.socket.fileno()) as hangup:
            try:
                await self._attempts(x)
            except Exception as exc:  # re-raised below, after the checks
                failure = exc
            finally:
                body.release()
                await body.aclose()
        if hangup.gone and x.audit.upgraded and x.audit.ended is None:
            x.audit.ended = "client"  # (closing is how a WebSocket client may end)
        if (hangup.gone or body.gone) and x.conn.our_state not in (
            h11.DONE,
            h11.MUST_CLOSE,
            h11.SWITCHED_PROTOCOL,
        ):
            # (A client that closes once it has the whole answer has not gone early.)
            raise ClientGone
        if body.too_slow:
            raise ClientTooSlow
        if failure is not None:
            raise failure

    async def _attempts(self, x: Exchange) -> None:
        """Send; after a 401 maybe again with a newer token, after a 429 on the next bucket."""
        key, body = x.audit.key, x.body
        assert key is not None
        # A provider whose headers name only API keys ({key:NAME}) needs no login.
        entry = await self._token(x.session, key) if self._api(key).uses_token() else None
        framing = {name.lower(): value for name, value in x.req.headers}
        has_body = b"transfer-encoding" in framing or framing.get(b"content-length", b"0") != b"0"
        if x.websocket and has_body:
            raise HttpError(400, "a WebSocket handshake has no body")
        if not has_body:
            # No body: none is sent (a GET must not go out as an empty chunked body).
            await self._next_event(x.conn, x.stream)  # the request's EndOfMessage
            body.complete = True
        elif x.conn.they_are_waiting_for_100_continue:
            # The body is wanted: say so at once (curl would wait a second).
            await self._send_all(
                x.stream, x.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        upstream = await self._send(x, key, entry, body.source() if has_body else b"")
        try:
            if upstream.status == 401 and entry is not None and body.whole():
                newer = await self.tokens.after_rejection(key, entry.fp)
                if newer is not None:
                    await self._close(upstream)
                    self.ops.publish(x.session, key, newer)
                    upstream = await self._send(x, key, newer, body.copy())
            if upstream.status == 429:
                self.tokens.mark_quota(key, _retry_after(upstream.headers))
                if (
                    body.whole()
                    and x.route.bucket is None
                    and self.ops.profile(x.session, key.provider) is not None
                ):
                    # Several accounts, asked without a bucket: once more, on the
                    # bucket get_token serves now (the held one is passed over).
                    retried = await self._on_next_bucket(x, key)
                    if retried is not None:
                        await self._close(upstream)
                        x.audit.key, upstream = retried
                        if upstream.status == 429:
                            self.tokens.mark_quota(x.audit.key, _retry_after(upstream.headers))
            body.release()  # no retry from here on: a long stream does not keep the body
            x.audit.status = upstream.status
            if upstream.tunnel is not None:
                await self._tunnel(x, upstream)
            else:
                await self._relay(x, upstream)
        finally:
            await self._close(upstream)

    async def _on_next_bucket(self, x: Exchange, key: Key) -> tuple[Key, UpstreamResponse] | None:
        """The request sent again with the token of the bucket get_token serves now, if another."""
        try:
            other = await self.ops.pick(x.session, key.provider)
            entry = self.tokens.entry(other)
        except CredproxyError:
            return None
        if entry is None or other == key or not x.body.whole():
            return None
        self.ops.publish(x.session, other, entry)
        return other, await self._send(x, other, entry, x.body.copy())

    async def _token(self, session: Session, key: Key) -> Entry:
        """The token get_token would serve for *key* (its first use schedules the renewal)."""
        try:
            entry = await self.tokens.get(key)
        except NotFound:
            raise self._not_served(session, key.provider, "no_login", key.bucket) from None
        except ReauthRequired as exc:
            raise HttpError(401, str(exc)) from None
        except CredproxyError as exc:
            raise HttpError(502, f"no token for {key}: {exc.code}") from None
        self.ops.publish(session, key, entry)
        return entry

    # -- what the loop's relay hands over to wait for (credproxy.shell.loopproxy) --------

    async def ready(self, session: Session, key: Key) -> Ready:
        """What the session is served for *key* now (published to the loop as well).

        Raises:
            HttpError: as for a request of the trio side (no login, reauth, failed).
        """
        entry = await self._token(session, key)
        return self.ops.publish(session, key, entry)

    async def retry_ready(self, session: Session, key: Key, rejected: str) -> Ready | None:
        """The token to send again after an upstream 401 of the token *rejected* (its fp)."""
        newer = await self.tokens.after_rejection(key, rejected)
        return None if newer is None else self.ops.publish(session, key, newer)

    async def next_ready(self, session: Session, key: Key) -> Ready | None:
        """After a 429 of *key*: the bucket get_token serves now, if another, and its token."""
        try:
            other = await self.ops.pick(session, key.provider)
            entry = self.tokens.entry(other)
        except CredproxyError:
            return None
        if entry is None or other == key:
            return None
        return self.ops.publish(session, other, entry)

    def not_served(self, session: Session, provider: str) -> None:
        """Say on the host why a request of the loop's relay got its 404 (not granted)."""
        self._not_served(session, provider, "not_granted")

    def mark_quota(self, key: Key, headers: list[tuple[bytes, bytes]]) -> None:
        self.tokens.mark_quota(key, _retry_after(headers))

    async def _send(
        self, x: Exchange, key: Key, entry: Entry | None, content: Any
    ) -> UpstreamResponse:
        """Send *x*'s request upstream with *key*'s token (*content*: bytes or an iterator)."""
        x.api = self._api(key, x.route.base_url)
        headers = httprules.upstream_headers(
            x.req.headers,
            self._template(x.session, key, entry, x.api),
            self.cfg.proxy.strip_headers,
        )
        if not any(name.lower() == b"accept-encoding" for name, _ in headers):
            # httpx would ask for gzip on its own, and the body is relayed as
            # it comes: a client that did not ask for compression gets none.
            headers.append((b"accept-encoding", b"identity"))
        method = x.req.method.decode("ascii")
        try:
            if x.websocket:
                # Its own connection, switched to WebSocket if the upstream agrees.
                return await self.client.upgrade(x.url, [*headers, *httprules.WEBSOCKET_UPGRADE])
            return await self.client.send(method, x.url, headers, content)
        except UpstreamUnavailable as exc:
            raise HttpError(502, str(exc)) from None

    def _api(self, key: Key, base_url: str | None = None) -> Api:
        """*key*'s provider's ``api`` section as configured now (at *base_url*, if given).

        Raises:
            HttpError: a reload took it away (404) or moved it (503: the
                request was routed to the old ``base_url``, and the new
                section's headers are not for that host) while the request waited.
        """
        api = self._configured_api(key.provider)
        if api is None:
            raise HttpError(404, _NO_API)
        if base_url is not None and api.base_url != base_url:
            raise HttpError(503, API_MOVED, [(b"retry-after", b"1")])
        return api

    def _template(
        self, session: Session, key: Key, entry: Entry | None, api: Api
    ) -> dict[str, str]:
        """*api*'s headers filled in from the token and keys (``{client}`` left in place)."""
        fields = token_fields(entry.token) if entry is not None else {}
        return fill_headers(api.headers, fields, key, session.grants, self.ops.store.read_key)

    async def _relay(self, x: Exchange, upstream: UpstreamResponse) -> None:
        """Send the upstream's answer as it arrives (a hang-up cancels it: :class:`Hangups`)."""
        conn, stream = x.conn, x.stream
        headers = [(n, v) for n, v in upstream.headers if n.lower() not in HOP_BY_HOP]
        if conn.their_state is h11.SEND_BODY:
            # The upstream answered before the whole body came (a 413 of a
            # large upload): the rest is not read, so the connection closes
            # after this answer, and the client is told so in it.
            headers.append((b"connection", b"close"))
        await self._send_all(
            stream, conn.send(h11.Response(status_code=upstream.status, headers=headers))
        )
        try:
            async with contextlib.aclosing(upstream.chunks()) as chunks:
                async for chunk in chunks:
                    if chunk:
                        await self._send_all(stream, conn.send(h11.Data(data=chunk)))
                        x.audit.sent += len(chunk)
                        self.ledger.moved(len(chunk))
        except UpstreamUnavailable as exc:
            # No clean end for a truncated answer: the connection closes
            # without the last chunk, so the client cannot take it as whole.
            log.warning("api_upstream_broke_off", error=str(exc))
            return
        # A Content-Length the upstream did not fill cannot end cleanly: the
        # connection closes instead.
        with contextlib.suppress(h11.LocalProtocolError):
            await self._send_all(stream, conn.send(h11.EndOfMessage()))

    async def _tunnel(self, x: Exchange, upstream: UpstreamResponse) -> None:
        """After the upstream's ``101``: relay it, then bytes both ways until one side ends.

        Frames are not parsed: the handshake's key and accept went through
        unchanged, so the client and the upstream speak RFC 6455 to each
        other. The relay ends when the upstream closes, either side breaks,
        nothing moves either way for ``idle_timeout``, :data:`HALF_CLOSE_GRACE`
        after the client's end of input, when the client hangs up
        (:class:`Hangups`), or the session closes; the upstream connection is
        then closed (:meth:`_attempts`), and the client's with it (:meth:`serve`).
        A logout of its login or a reload of its ``api`` section ends it too
        (:meth:`end_tunnels`, :meth:`reconfigure`), and refuses it when it came
        while the handshake was on its way.
        """
        tunnel = upstream.tunnel
        assert tunnel is not None
        key, api = x.audit.key, x.api
        assert key is not None
        assert api is not None
        if not httprules.websocket_accepted(upstream.headers):
            raise HttpError(502, "the upstream switched to a protocol other than WebSocket")
        if self._logged_out.get(key, 0) > x.logouts:
            # Its login was removed while the handshake was on its way.
            raise HttpError(404, f"{key.provider}:{key.bucket} has no stored login on the host")
        if self._configured_api(key.provider) != api:
            # A reload changed the section it was sent under while it was on its
            # way: it went to the old host, or with the old headers.
            self._api(key, x.route.base_url)  # 404 (taken away) or 503 (moved)
            raise HttpError(503, API_CHANGED, [(b"retry-after", b"1")])
        head = x.conn.send(
            h11.InformationalResponse(
                status_code=101, headers=httprules.switch_headers(upstream.headers)
            )
        )
        x.audit.upgraded = True
        early, client_closed = x.conn.trailing_data  # what the client sent after its head
        idle = self.cfg.limits.idle_timeout
        audit = x.audit
        opened = Tunnel(api, audit)
        client_ended = False

        def moved() -> None:
            if not client_ended:
                scope.deadline = _now() + idle

        def end(why: str) -> None:
            opened.end(scope, why)

        async def to_upstream() -> None:
            try:
                data = bytes(early)
                while True:
                    if data:
                        await tunnel.send(data)
                        audit.received += len(data)
                        moved()
                    if client_closed:
                        break  # (it closed right after its handshake)
                    data = await x.stream.receive_some(RECV_SIZE)
                    if not data:
                        break
                # The client's end of input: a half-close (it sends no more,
                # and still reads what is on its way, such as the answer to
                # its close frame), or a close, which Hangups notices at once
                # (not behind forward, which passes a close on as a
                # half-close). What the upstream sends still reaches it for
                # HALF_CLOSE_GRACE; then the tunnel ends.
                nonlocal client_ended
                client_ended = True
                scope.deadline = min(scope.deadline, _now() + HALF_CLOSE_GRACE)
            except UpstreamUnavailable:
                end("upstream")
            except GONE:
                end("client")

        async def to_client() -> None:
            try:
                data = tunnel.early
                while True:
                    if data:
                        await self._send_all(x.stream, data)
                        audit.sent += len(data)
                        moved()
                    data = await tunnel.receive()
                    if not data:
                        break
                end("upstream")
            except UpstreamUnavailable:
                end("upstream")
            except GONE:
                end("client")

        with trio.CancelScope(deadline=_now() + idle) as scope:
            # Counted open before its 101 is sent: a logout or reload meanwhile ends it.
            open_now = self._tunnels.setdefault(key, {})
            open_now[scope] = opened
            try:
                await self._send_all(x.stream, head)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(to_upstream)
                    nursery.start_soon(to_client)
            finally:
                open_now.pop(scope, None)
                if not open_now and self._tunnels.get(key) is open_now:
                    del self._tunnels[key]
        if audit.ended is None:
            audit.ended = "client" if client_ended else "idle"

    @staticmethod
    async def _send_all(stream: trio.SocketStream, data: bytes | None) -> None:
        """Write to the client; one that takes nothing for :data:`SEND_TIMEOUT` is gone."""
        if data:
            with trio.move_on_after(SEND_TIMEOUT):
                await stream.send_all(data)
                return
            raise ClientGone("the client stopped reading its answer")

    async def _close(self, upstream: UpstreamResponse) -> None:
        """Close an upstream response, even in a cancelled scope (within :data:`CLOSE_TIMEOUT`)."""
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self.client.close_response(upstream)

    async def _drain_request(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        """Read and drop the body of a refused request, so the connection can go on."""
        pace = self.pace()
        while conn.their_state is h11.SEND_BODY:
            event = await self._next_event(conn, stream, pace=pace)
            if event is None or isinstance(event, h11.ConnectionClosed):
                return


# -- what both paths decide alike (the trio side above, the loop's relay) ---------------


class NotServed(Exception):
    """A provider's API is not served to this session: *cause* (see ``_NOT_SERVED_FIX``)."""

    def __init__(self, provider: str, cause: str) -> None:
        super().__init__(cause)
        self.provider = provider
        self.cause = cause


def allowed(grants: Grants, key: Key) -> bool:
    """Whether a session with *grants* may send requests with *key*'s token."""
    return grants.token_allowed(*key) or grants.api_allowed(key.provider, key.bucket)


def route_request(
    providers: Mapping[str, Provider],
    grants: Grants,
    max_header_bytes: int,
    method: str,
    target: bytes,
    headers: Any = (),
) -> Route:
    """Where a request target goes (see :class:`Route`).

    Raises:
        HttpError: CONNECT, an absolute-form target, a dot segment, or headers
            too large.
        NotServed: a provider that is not configured or not granted (one 404
            for both), or that is granted but has no ``api`` section.
    """
    if method == "CONNECT":
        raise HttpError(405, "CONNECT is not available: this is not an open proxy")
    if method == "TRACE":  # (the upstream would echo the host's credential headers back)
        raise HttpError(405, "TRACE is not available through the API proxy")
    size = len(target) + sum([len(n) + len(v) + 4 for n, v in headers])
    if size > max_header_bytes:
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
        decoded = unquote(segment) if "%" in segment else segment
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise HttpError(400, "the path may not contain . or .. segments")
    head = segments[0] if segments else ""
    provider, _, bucket = head.partition(":")
    if not is_name(provider) or (bucket and not is_name(bucket)):
        raise HttpError(404, _NO_API)
    prov = providers.get(provider)
    if prov is None:
        raise NotServed(provider, "not_configured")
    if bucket and not allowed(grants, Key(provider, bucket)):
        raise NotServed(provider, "not_granted")
    if prov.api is None:
        granted = grants.provider_visible(provider) or grants.api_allowed(provider)
        raise NotServed(provider, "no_api_section" if granted else "not_granted")
    return Route(
        provider,
        bucket or None,
        prov.api.base_url,
        "/".join(segments[1:]),
        mark + query if query else "",
    )


def token_fields(token: Mapping[str, Any]) -> dict[str, str]:
    """What a header template may name of a token: its scalar fields as served."""
    return {
        k: str(v)
        for k, v in token.items()
        if k not in UNSERVED_FIELDS and isinstance(v, str | int | float) and not isinstance(v, bool)
    }


def fill_headers(
    templates: Mapping[str, str],
    fields: Mapping[str, str],
    key: Key,
    grants: Grants,
    read_key: Callable[[str], str | None],
) -> dict[str, str]:
    """*templates* (``[providers.X.api] headers``) filled in; ``{client}`` is left in place.

    Raises:
        HttpError: 403 for an API key the session is not granted, 502 for one
            not stored or a field the token lacks.
    """

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "client":
            return httprules.CLIENT_FIELD
        if name.startswith("key:"):
            if not grants.key_allowed(name[4:]):
                raise HttpError(
                    403,
                    f"the headers need the API key {name[4:]}, which this session is not granted",
                )
            value = read_key(name[4:])
            if value is None:
                raise HttpError(502, f"the API key {name[4:]} named in the headers is not stored")
            return value
        if name not in fields:
            raise HttpError(502, f"the token of {key} has no field {name!r} for the headers")
        return fields[name]

    return {header: HEADER_FIELD.sub(fill, template) for header, template in templates.items()}


class Ledger:
    """What the two paths of the proxy count together: streams in flight, kept bodies.

    The loop's relay (in the serving loop's thread) and the trio side both
    count here, under one lock, so a session's ``max_streams`` and the
    daemon's ``retry_body_budget`` hold whichever path serves a request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, int] = {}  # session id -> requests in flight (no entry: none)
        self.kept = 0  # request bodies kept for a retry, all sessions together
        self._moved = 0  # body bytes relayed since memory was last given back

    def enter(self, sid: str, cap: int) -> bool:
        """Count one more request in flight for *sid*, unless it has *cap* already."""
        with self._lock:
            n = self._streams.get(sid, 0)
            if n >= cap:
                return False
            self._streams[sid] = n + 1
            return True

    def leave(self, sid: str) -> bool:
        """One request of *sid* ended; True when none is left anywhere after big bodies moved.

        Then the caller gives the freed memory back (:func:`give_back_memory`).
        """
        with self._lock:
            n = self._streams.get(sid, 0)
            if n <= 1:
                self._streams.pop(sid, None)
            else:
                self._streams[sid] = n - 1
            if not self._streams and self._moved >= TRIM_AFTER:
                self._moved = 0
                return True
            return False

    def in_flight(self, sid: str) -> int:
        return self._streams.get(sid, 0)

    def keep(self, n: int, budget: int) -> bool:
        """Reserve *n* bytes of kept body within *budget* for all (False: not kept)."""
        with self._lock:
            if self.kept + n > budget:
                return False
            self.kept += n
            return True

    def unkeep(self, n: int) -> None:
        with self._lock:
            self.kept -= n

    def moved(self, n: int) -> None:
        self._moved += n  # (a hint for give_back_memory: a lost update costs nothing)


class Hangup:
    """One watched connection: the scope to cancel when its client hangs up."""

    __slots__ = ("gone", "scope")

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.gone = False


class Hangups:
    """Notices clients that hang up while their request is forwarded, without reading them.

    One epoll set, for the whole daemon, of the connections whose exchange is
    under way, waiting for ``EPOLLHUP`` (the peer closed or reset its socket)
    or ``EPOLLERR`` only, never ``EPOLLIN``: bytes the client pipelines stay
    where h11 will read them. One task (:meth:`run`)
    waits on the set and cancels the exchange of a connection that hung up.
    A task per request would cost more than the rest of the proxy's work on
    a small request.
    """

    # Not EPOLLRDHUP: a client's half-close (shutdown(SHUT_WR) once its request
    # is sent) is legal HTTP and still wants the answer; a close is EPOLLHUP.
    MASK = select.EPOLLHUP | select.EPOLLERR

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, Hangup] = {}

    @contextlib.contextmanager
    def watch(self, fd: int) -> Iterator[Hangup]:
        """Cancel the body of this ``with`` if the client of *fd* hangs up meanwhile."""
        hangup = Hangup()
        self._epoll.register(fd, self.MASK)
        self._watched[fd] = hangup
        try:
            with hangup.scope:
                yield hangup
        finally:
            if self._watched.pop(fd, None) is not None:
                self._epoll.unregister(fd)

    async def run(self) -> None:
        """Wait for hang-ups and cancel their exchanges (until cancelled)."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _mask in self._epoll.poll(0):
                    hangup = self._watched.pop(fd, None)
                    if hangup is not None:
                        self._epoll.unregister(fd)
                        hangup.gone = True
                        hangup.scope.cancel()
        finally:
            self._epoll.close()


class Body:
    """A request body as it streams upstream, and the copy kept for one retry.

    The copy is bounded per request (``retry_body_limit``) and, with every
    other request's, per daemon (``retry_body_budget``): past either it is
    dropped, and an upstream 401 or 429 is passed through instead of retried.
    """

    def __init__(self, proxy: ApiProxy, conn: h11.Connection, stream: trio.SocketStream) -> None:
        self.proxy = proxy
        self.conn = conn
        self.stream = stream
        self.kept: bytearray | None = bytearray()
        self.complete = False  # the request has been read whole
        self.gone = False
        self.too_slow = False
        self._chunks: AsyncGenerator[bytes, None] | None = None

    def source(self) -> AsyncIterator[bytes]:
        """The body as httpx sends it (closed by :meth:`aclose` however the exchange ends)."""
        self._chunks = self.chunks()
        return self._chunks

    async def aclose(self) -> None:
        if self._chunks is not None:
            await self._chunks.aclose()

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        pace = self.proxy.pace()
        while True:
            try:
                event = await self.proxy._next_event(self.conn, self.stream, pace=pace)
            except GONE:
                self.gone = True
                raise
            if isinstance(event, h11.Data):
                self.proxy.ledger.moved(len(event.data))
                self._keep(event.data)
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.complete = True
                return
            elif event is None:
                self.too_slow = True
                raise ClientTooSlow
            else:
                self.gone = True
                raise ClientGone

    def copy(self) -> bytes:
        """The kept body, to send again (only while :meth:`whole`)."""
        assert self.kept is not None
        return bytes(self.kept)

    def whole(self) -> bool:
        """Whether the body was read to its end and kept (it can be sent again)."""
        return self.kept is not None and self.complete

    def _keep(self, data: bytes | bytearray) -> None:
        if self.kept is None:
            return
        cfg = self.proxy.cfg.proxy
        if len(self.kept) + len(data) > cfg.retry_body_limit or not self.proxy.ledger.keep(
            len(data), cfg.retry_body_budget
        ):
            self.release()  # too big to keep: a 401 is passed through
            return
        self.kept += data

    def release(self) -> None:
        """Drop the kept copy (no retry from here on) and give its bytes back to the budget."""
        if self.kept is not None:
            self.proxy.ledger.unkeep(len(self.kept))
            self.kept = None


def _now() -> float:
    return trio.current_time()


def give_back_memory() -> None:
    """Hand the heap pages freed by big bodies back to the system (glibc's ``malloc_trim``).

    glibc keeps freed memory for reuse: after 64 bodies of 8 MiB the daemon
    would stay ~100 MB larger for good. Elsewhere (musl) this does nothing.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


#: glibc's mallopt parameter for the size from which a block gets pages of its own.
M_MMAP_THRESHOLD = -3
BIG_BLOCK = 1 << 20  # bytes from which a block is mmapped, and handed back when freed


def keep_big_blocks_off_the_heap() -> None:
    """Blocks of :data:`BIG_BLOCK` bytes or more get pages of their own (glibc's ``mallopt``).

    glibc raises its mmap threshold each time such a block is freed (up to
    32 MiB), after which request bodies of a few MiB come from the heap and
    leave it fragmented: 64 concurrent bodies of 8 MiB left 8 to 26 MB behind,
    :func:`give_back_memory` or not. A fixed threshold ends the raising; such a
    block is then one ``mmap`` and one ``munmap``. Elsewhere (musl) this does
    nothing.
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, BIG_BLOCK)


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None)


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return float(value)
            except ValueError:
                return None
    return None
