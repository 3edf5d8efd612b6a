"""The development IdP on HTTP: a trio + h11 server around the :class:`~.idp.DevIdP` state machine.

:func:`serve` answers ``POST /token``, ``GET /userinfo``,
``POST /device_authorization``, the ``GET /device`` approval page and
``GET /authorize``, one request per connection (``Connection: close``). With
*issuers* (a :class:`~.issuers.DevIssuers`) it also answers the signing
grants: the JWT bearer and client credentials grants at ``POST /token``,
``POST /app/installations/{id}/access_tokens`` and ``/repos/...`` as GitHub,
and ``GET /resource``; their replies carry a ``Date`` from the issuers' clock.
Every decision is the state machine's; this module parses requests, waits out a
scripted ``"slow"`` fault on the trio clock, writes replies and passes the state
machine's event lines to *log*.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from html import escape
from typing import Any, NoReturn
from urllib.parse import parse_qsl

import h11

# The server is the development IdP's I/O half; the state machine (idp.py) stays sans-IO.
import trio  # noqa: TID251

from credproxy.devidp.idp import DevIdP
from credproxy.devidp.issuers import DevIssuers

__all__ = ["serve", "serve_listeners"]

_MAX_REQUEST_BYTES = 64 * 1024
_READ_TIMEOUT = 10.0  # seconds to receive a whole request


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    extra_headers: tuple[tuple[str, str], ...] = ()


def _json_reply(status: int, obj: Mapping[str, Any], **kw: Any) -> _Reply:
    return _Reply(status, json.dumps(obj).encode("utf-8"), **kw)


async def serve(
    idp: DevIdP,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    log: Callable[[str], None] | None = None,
    issuers: DevIssuers | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve *idp* (and *issuers*, when given) over HTTP on *host*:*port* until cancelled.

    ``task_status.started`` receives the token URL (``http://HOST:PORT/token``,
    with the port actually bound when *port* is 0). One request per
    connection (``Connection: close``). *log*, when given, receives one line
    per refresh or reuse detection (fingerprints only).

    A misbehaving client only loses its own connection; errors inside a
    handler are reported through *log* and never stop the server.

    Raises:
        OSError: the address cannot be bound (before ``started`` is called).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    await serve_listeners(idp, listeners, log=log, issuers=issuers, task_status=task_status)


async def serve_listeners(
    idp: DevIdP,
    listeners: list[trio.SocketListener],
    *,
    log: Callable[[str], None] | None,
    issuers: DevIssuers | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """:func:`serve` on *listeners* already bound (the first one names the URL).

    The command line binds first, so that "address already in use" arrives as a
    plain OSError rather than inside an ExceptionGroup.
    """
    host, bound_port = listeners[0].socket.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    base_url = f"http://{shown}:{bound_port}"
    task_status.started(f"{base_url}/token")
    await trio.serve_listeners(partial(_handle, idp, issuers, log, base_url), listeners)


async def _handle(
    idp: DevIdP,
    issuers: DevIssuers | None,
    log: Callable[[str], None] | None,
    base_url: str,
    stream: trio.SocketStream,
) -> None:
    async with stream:
        try:
            await _handle_one(idp, issuers, log, base_url, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # the client went away or spoke nonsense; nothing to answer
        except Exception as exc:  # a bug here must not take the server down
            (log or _stderr)(f"devidp: internal error handling a request: {type(exc).__name__}")


async def _handle_one(
    idp: DevIdP,
    issuers: DevIssuers | None,
    log: Callable[[str], None] | None,
    base_url: str,
    stream: trio.SocketStream,
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
    request: h11.Request | None = None
    body = bytearray()
    with trio.move_on_after(_READ_TIMEOUT) as scope:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(16384))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_REQUEST_BYTES:
                    await _send(conn, stream, _json_reply(413, {"error": "invalid_request"}))
                    return
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed before a whole request
                return
    if scope.cancelled_caught or request is None:
        return

    method = request.method.decode("ascii", "replace")
    target, _, query_text = request.target.decode("ascii", "replace").partition("?")
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
    query = dict(parse_qsl(query_text, keep_blank_values=True))

    events_before = len(idp.events)
    signing = None
    if issuers is not None:
        signing = _signing(issuers, base_url, method, target, headers, bytes(body))
    if issuers is not None and signing is not None:
        issuer_events = len(issuers.events)
        date = formatdate(issuers.clock(), usegmt=True)
        reply = _json_reply(*signing, extra_headers=(("Date", date),))
        if log is not None:
            for line in issuers.events[issuer_events:]:
                log(f"devidp: {line}")
    elif target == "/token":
        if method != "POST":
            reply = _json_reply(405, {"error": "invalid_request"})
        else:
            reply = await _token(idp, log, bytes(body))
            events_before = len(idp.events)  # _token logged its own
    elif target == "/userinfo":
        reply = _userinfo(idp, headers.get("authorization", ""))
    elif target == "/device_authorization" and method == "POST":
        form = _form(bytes(body))
        if form is None:
            reply = _json_reply(400, {"error": "invalid_request"})
        else:
            reply = _json_reply(*idp.handle_device_authorization(form, base_url))
    elif target == "/device" and method == "GET":
        reply = _device_page(idp, query)
    elif target == "/authorize" and method == "GET":
        status, where = idp.handle_authorize(query)
        if status == 302:
            reply = _Reply(302, b"", "text/plain", (("Location", where),))
        else:
            reply = _html(status, "Authorization refused", where)
    else:
        reply = _json_reply(404, {"error": "not_found"})
    if log is not None:
        for line in idp.events[events_before:]:
            log(f"devidp: {line}")
    await _send(conn, stream, reply)


def _signing(
    issuers: DevIssuers,
    base_url: str,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
) -> tuple[int, dict[str, Any]] | None:
    """The issuers' answer to this request, or None when it is not theirs.

    The token endpoint's own URL, ``{base_url}/token``, is the ``aud`` an
    assertion must name.
    """
    authorization = headers.get("authorization", "")
    if target == "/token" and method == "POST":
        form = _form(body)
        if form is None or not issuers.handles_grant(form.get("grant_type")):
            return None
        return issuers.answer_token_request(form, f"{base_url}/token")
    if issuers.is_installation_path(target):
        if method != "POST":
            return 404, {"message": "Not Found"}
        return issuers.answer_installation_token(target, authorization, body)
    if target.startswith("/repos/"):
        return issuers.answer_github_request(method, target, authorization)
    if target == "/resource":
        return issuers.answer_resource(authorization)
    return None


def _form(body: bytes) -> dict[str, str] | None:
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return None


def _html(status: int, title: str, text: str) -> _Reply:
    page = (
        f"<!doctype html><title>{escape(title)}</title>"
        f"<h1>{escape(title)}</h1><p>{escape(text)}</p>"
    )
    return _Reply(status, page.encode("utf-8"), "text/html; charset=utf-8")


def _device_page(idp: DevIdP, query: Mapping[str, str]) -> _Reply:
    """``GET /device``: the approval page; with ``action=`` it records the person's answer."""
    user_code = query.get("user_code", "")
    action = query.get("action")
    if action is not None:
        status, text = idp.device_action(user_code, action)
        return _html(status, "Device login", text)
    buttons = "".join(
        f'<button name="action" value="{a}">{a}</button>' for a in ("approve", "deny")
    )
    page = (
        "<!doctype html><title>Device login</title><h1>Device login (development IdP)</h1>"
        '<form method="get" action="/device"><label>User code '
        f'<input name="user_code" value="{escape(user_code)}"></label> {buttons}</form>'
    )
    return _Reply(200, page.encode("utf-8"), "text/html; charset=utf-8")


async def _token(idp: DevIdP, log: Callable[[str], None] | None, body: bytes) -> _Reply:
    try:
        form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
    except UnicodeDecodeError:
        return _json_reply(400, {"error": "invalid_request"})
    fault = idp.take_fault()
    if fault is not None and fault.kind == "slow":
        await trio.sleep(fault.delay)
    events_before = len(idp.events)
    status, answer = idp.answer_token_request(form, fault)
    if log is not None:
        for line in idp.events[events_before:]:
            log(f"devidp: {line}")
    if fault is not None and fault.kind == "malformed":
        return _Reply(200, b"<html><body>502 Bad Gateway</body></html>", "text/html")
    extra: tuple[tuple[str, str], ...] = ()
    if status == 401:
        extra = (("WWW-Authenticate", 'Basic realm="devidp"'),)
    return _json_reply(status, answer, extra_headers=extra)


def _userinfo(idp: DevIdP, authorization: str) -> _Reply:
    scheme, _, access_token = authorization.partition(" ")
    if scheme.lower() == "bearer" and idp.is_access_token_valid(access_token.strip()):
        return _json_reply(200, {"sub": "dev-user"})
    return _json_reply(
        401,
        {"error": "invalid_token"},
        extra_headers=(("WWW-Authenticate", 'Bearer error="invalid_token"'),),
    )


async def _send(conn: h11.Connection, stream: trio.SocketStream, reply: _Reply) -> None:
    headers = [
        ("Content-Type", reply.content_type),
        ("Content-Length", str(len(reply.body))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
        *reply.extra_headers,
    ]
    events = (
        h11.Response(status_code=reply.status, headers=headers),
        h11.Data(data=reply.body),
        h11.EndOfMessage(),
    )
    await stream.send_all(b"".join(conn.send(event) or b"" for event in events))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
