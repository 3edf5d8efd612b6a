"""A development identity provider: a strict OAuth token endpoint on loopback.

It behaves like the strict IdPs credproxy exists for:

- access tokens are short-lived (``lifetime`` seconds, 60 by default);
- every refresh **rotates** the refresh token: the one just used stops being
  current and a new one is returned;
- presenting a refresh token that was already rotated away is treated as theft
  (RFC 6819 5.2.2.3, OAuth 2.0 Security BCP 4.14.2): the **whole token
  family** (every refresh and access token descending from the same login) is
  revoked, so the legitimate holder is logged out too. Two sandboxes racing
  to refresh the same token trigger exactly this, which is the bug credproxy
  prevents.

:class:`DevIdP` is the state machine: it takes a request form and returns a
status and a JSON object, and never does I/O (the clock is injected).
:func:`serve` puts it on a trio + h11 HTTP server (``POST /token``,
``GET /userinfo``), and :func:`main` is ``python -m credproxy.shell.devidp`` for the
README demo. Tests script failures with :meth:`DevIdP.fail_next`.

Nothing here prints or records a token: requests are kept with the refresh
token and client secret replaced by a short SHA-256 :func:`fingerprint`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qsl

import h11
import trio

__all__ = ["FAULT_KINDS", "DevIdP", "fingerprint", "main", "serve"]

#: What :meth:`DevIdP.fail_next` can script.
FAULT_KINDS = frozenset({"server_error", "invalid_grant", "slow", "malformed", "no_refresh_token"})

_MAX_REQUEST_BYTES = 64 * 1024
_READ_TIMEOUT = 10.0  # seconds to receive a whole request


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for *secret*: 12 hex digits of SHA-256."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


@dataclass
class _Family:
    """Every token descending from one login (one :meth:`DevIdP.mint`)."""

    number: int
    current_refresh_token: str
    revoked: bool = False


@dataclass
class _Fault:
    kind: str
    delay: float = 0.0


class DevIdP:
    """The token endpoint's state. No I/O: callers pass forms in and get answers out.

    *lifetime* is the access token lifetime in seconds; *clock* gives the
    epoch time used for expiries (tests inject a fake one). When
    *client_secret* is set, requests must carry it (``client_secret_post``).

    Observable by tests:

    - ``refresh_count``: successful refreshes;
    - ``reuse_count``: rotated refresh tokens presented again (each revokes a family);
    - ``families_revoked``: families revoked so far;
    - ``requests``: every token request received, as a form with
      ``refresh_token`` and ``client_secret`` replaced by :func:`fingerprint`;
    - ``events``: one line per refresh or reuse, fingerprints only (what
      :func:`serve` logs).
    """

    def __init__(
        self,
        *,
        lifetime: float = 60,
        clock: Callable[[], float] = time.time,
        client_id: str = "credproxy-dev",
        client_secret: str | None = None,
    ) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self.client_id = client_id
        self._client_secret = client_secret
        self.refresh_count = 0
        self.reuse_count = 0
        self.families_revoked = 0
        self.requests: list[dict[str, str]] = []
        self.events: list[str] = []
        self._families: list[_Family] = []
        # refresh token -> family; rotated-away tokens stay, so reuse is recognised.
        self._refresh_tokens: dict[str, _Family] = {}
        # access token -> (family, expiry)
        self._access_tokens: dict[str, tuple[_Family, float]] = {}
        self._faults: deque[_Fault] = deque()

    def __repr__(self) -> str:
        return (
            f"<DevIdP lifetime={self.lifetime:g} families={len(self._families)} "
            f"refreshes={self.refresh_count} reuses={self.reuse_count}>"
        )

    # -- issuing ---------------------------------------------------------------

    def mint(self) -> dict[str, Any]:
        """Log in: start a fresh token family and return its first token.

        The result is what ``credproxy import`` stores: ``access_token``,
        ``refresh_token``, ``expiry`` (epoch seconds) and ``token_type``.
        """
        family = _Family(number=len(self._families) + 1, current_refresh_token="")
        self._families.append(family)
        refresh_token = self._new_refresh_token(family)
        access_token, expiry = self._new_access_token(family)
        return {
            "access_token": access_token,
            "refresh_token": refresh_token,
            "expiry": expiry,
            "token_type": "Bearer",
        }

    def _new_refresh_token(self, family: _Family) -> str:
        token = "devrt-" + secrets.token_urlsafe(24)
        family.current_refresh_token = token
        self._refresh_tokens[token] = family
        return token

    def _new_access_token(self, family: _Family) -> tuple[str, float]:
        token = "devat-" + secrets.token_urlsafe(24)
        expiry = self.clock() + self.lifetime
        self._access_tokens[token] = (family, expiry)
        return token, expiry

    def is_access_token_valid(self, access_token: str) -> bool:
        """True if *access_token* was issued here, is unexpired and its family is not revoked."""
        entry = self._access_tokens.get(access_token)
        if entry is None:
            return False
        family, expiry = entry
        return not family.revoked and self.clock() < expiry

    # -- scripting -------------------------------------------------------------

    def fail_next(self, kind: str, count: int = 1, delay: float = 0) -> None:
        """Make the next *count* token requests misbehave in the way *kind* names.

        ``"server_error"`` answers 500; ``"invalid_grant"`` answers 400
        ``invalid_grant`` (without revoking anything); ``"slow"`` waits *delay*
        seconds on the trio clock (in :func:`serve`; no wait when called
        directly) and then answers normally, rotating the refresh token even
        if the client has stopped waiting, as a real IdP would;
        ``"malformed"`` answers 200 with a body that is not JSON (an empty
        object when called directly); ``"no_refresh_token"`` answers
        normally but does not rotate, omitting ``refresh_token``.
        Faults queue up in order, one per request. ``"server_error"``,
        ``"invalid_grant"`` and ``"malformed"`` change no token's state.

        Raises:
            ValueError: unknown *kind*, or a negative *count* or *delay*.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if count < 0 or delay < 0:
            raise ValueError("count and delay must not be negative")
        self._faults.extend(_Fault(kind, delay) for _ in range(count))

    def _take_fault(self) -> _Fault | None:
        return self._faults.popleft() if self._faults else None

    # -- the token endpoint ----------------------------------------------------

    def handle_token_request(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """Answer one ``POST /token`` with form fields *form*: (HTTP status, JSON object).

        Implements the ``refresh_token`` grant with rotation and family
        revocation, after applying the next scripted fault, if any.
        Errors are OAuth error objects (RFC 6749 5.2), never exceptions.
        """
        return self._answer(form, self._take_fault())

    def _answer(self, form: Mapping[str, str], fault: _Fault | None) -> tuple[int, dict[str, Any]]:
        self.requests.append(_redact(form))
        kind = fault.kind if fault else None
        if kind == "server_error":
            return 500, {"error": "server_error", "error_description": "scripted failure"}
        if kind == "invalid_grant":
            return 400, {"error": "invalid_grant", "error_description": "scripted failure"}
        if kind == "malformed":
            return 200, {}

        if form.get("grant_type") != "refresh_token":
            return 400, {"error": "unsupported_grant_type"}
        if not self._client_ok(form):
            return 401, {"error": "invalid_client"}
        presented = form.get("refresh_token", "")
        family = self._refresh_tokens.get(presented)
        if family is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown refresh token"}
        if family.revoked:
            return 400, {"error": "invalid_grant", "error_description": "token family revoked"}
        if not hmac.compare_digest(presented, family.current_refresh_token):
            # A rotated-away token came back: someone holds a copy. Revoke the
            # family, so neither the thief nor the victim can carry on.
            family.revoked = True
            self.reuse_count += 1
            self.families_revoked += 1
            self.events.append(
                f"reuse of rotated refresh token {fingerprint(presented)}: "
                f"family {family.number} revoked"
            )
            return 400, {"error": "invalid_grant", "error_description": "refresh token reused"}

        access_token, _ = self._new_access_token(family)
        answer: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "Bearer",
            # Whole seconds when possible, as real IdPs send them.
            "expires_in": int(self.lifetime)
            if float(self.lifetime).is_integer()
            else self.lifetime,
        }
        if "scope" in form:
            answer["scope"] = form["scope"]
        if kind == "no_refresh_token":
            rotated = "kept"
        else:
            answer["refresh_token"] = self._new_refresh_token(family)
            rotated = f"rotated to {fingerprint(answer['refresh_token'])}"
        self.refresh_count += 1
        self.events.append(
            f"refresh family {family.number}: refresh token {fingerprint(presented)} {rotated}, "
            f"access token {fingerprint(access_token)} valid {self.lifetime:g} s"
        )
        return 200, answer

    def _client_ok(self, form: Mapping[str, str]) -> bool:
        if not hmac.compare_digest(form.get("client_id", ""), self.client_id):
            return False
        if self._client_secret is None:
            return True
        return hmac.compare_digest(form.get("client_secret", ""), self._client_secret)


def _redact(form: Mapping[str, str]) -> dict[str, str]:
    return {
        key: fingerprint(value) if key in ("refresh_token", "client_secret") else value
        for key, value in form.items()
    }


# -- HTTP ------------------------------------------------------------------------


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
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve *idp* over HTTP on *host*:*port* until cancelled.

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
    await _serve_listeners(idp, listeners, log=log, task_status=task_status)


async def _serve_listeners(
    idp: DevIdP,
    listeners: list[trio.SocketListener],
    *,
    log: Callable[[str], None] | None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    host, bound_port = listeners[0].socket.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    task_status.started(f"http://{shown}:{bound_port}/token")
    await trio.serve_listeners(partial(_handle, idp, log), listeners)


async def _handle(
    idp: DevIdP, log: Callable[[str], None] | None, stream: trio.SocketStream
) -> None:
    async with stream:
        try:
            await _handle_one(idp, log, stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # the client went away or spoke nonsense; nothing to answer
        except Exception as exc:  # a bug here must not take the server down
            (log or _stderr)(f"devidp: internal error handling a request: {type(exc).__name__}")


async def _handle_one(
    idp: DevIdP, log: Callable[[str], None] | None, stream: trio.SocketStream
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
    target = request.target.decode("ascii", "replace").split("?", 1)[0]
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}

    if target == "/token":
        if method != "POST":
            reply = _json_reply(405, {"error": "invalid_request"})
        else:
            reply = await _token(idp, log, bytes(body))
    elif target == "/userinfo":
        reply = _userinfo(idp, headers.get("authorization", ""))
    else:
        reply = _json_reply(404, {"error": "not_found"})
    await _send(conn, stream, reply)


async def _token(idp: DevIdP, log: Callable[[str], None] | None, body: bytes) -> _Reply:
    try:
        form = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
    except UnicodeDecodeError:
        return _json_reply(400, {"error": "invalid_request"})
    fault = idp._take_fault()
    if fault is not None and fault.kind == "slow":
        await trio.sleep(fault.delay)
    events_before = len(idp.events)
    status, answer = idp._answer(form, fault)
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


# -- python -m credproxy.shell.devidp ---------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m credproxy.shell.devidp",
        description=(
            "Development OAuth token endpoint on loopback: short-lived access tokens, "
            "rotating refresh tokens, family revocation on refresh-token reuse."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (default 0: any free)")
    parser.add_argument(
        "--lifetime", type=float, default=60, help="access token lifetime in seconds (default 60)"
    )
    parser.add_argument("--client-id", default="credproxy-dev", help="accepted client_id")
    parser.add_argument(
        "--mint",
        metavar="FILE",
        type=Path,
        help="write a freshly minted token as JSON to FILE (mode 0600), for `credproxy import`",
    )
    parser.add_argument(
        "--port-file", metavar="FILE", type=Path, help="write the token URL to FILE once serving"
    )
    args = parser.parse_args(argv)
    if args.lifetime <= 0:
        parser.error("--lifetime must be positive")
    return args


def _write_private(path: Path, text: str) -> None:
    """Write *text* to *path* atomically with mode 0600.

    Atomic because scripts poll for these files: they must never see one
    half-written. mkstemp creates the file 0600 from the start.
    """
    path = path.expanduser()
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace) -> int:
    idp = DevIdP(lifetime=args.lifetime, client_id=args.client_id)
    # Bound outside any nursery, so "address already in use" arrives as a plain
    # OSError rather than wrapped in an ExceptionGroup.
    listeners = await trio.open_tcp_listeners(args.port, host=args.host)
    # The receiver is open before the URL is announced, so a SIGTERM sent the
    # moment a script sees the URL is handled here, not by Python's default.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(_serve_listeners, idp, listeners, log=_stderr))
            # Mint before announcing: once the URL (or port file) appears, the
            # token file is complete.
            if args.mint is not None:
                token = idp.mint()
                await trio.to_thread.run_sync(
                    _write_private, args.mint, json.dumps(token, indent=2) + "\n"
                )
                _stderr(
                    f"devidp: minted family 1 into {args.mint} "
                    f"(refresh token {fingerprint(token['refresh_token'])})"
                )
            if args.port_file is not None:
                await trio.to_thread.run_sync(_write_private, args.port_file, url + "\n")
            print(url, flush=True)
            async for signum in signals:
                _stderr(f"devidp: {signal.Signals(signum).name}, stopping")
                nursery.cancel_scope.cancel()
                break
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the development IdP until SIGTERM or SIGINT; returns the exit status (0).

    Prints the token URL as one line on stdout once serving; logs one line per
    refresh on stderr (fingerprints only). Exits 2 on bad arguments and 1 if
    the address cannot be bound or a file cannot be written.
    """
    args = _parse_args(argv)
    try:
        return trio.run(_run, args)
    except OSError as exc:
        _stderr(f"devidp: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
