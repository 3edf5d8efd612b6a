"""``credproxy login``: the waiting and the I/O of the three login flows.

The decisions live in :mod:`credproxy.core.login` (PKCE, state, URLs, the
device-flow state machine); the HTTP calls to the identity provider go
through :class:`credproxy.shell.http.HttpTokenEndpoint`. This module waits:
for the device-flow interval, for the browser to come back to the loopback
listener, or for the person to paste a code.

What happens on error: every failure is a :class:`~credproxy.core.login.LoginFailed`
with one line for the person, and nothing is returned, so the caller stores
nothing. The loopback listener lives in an ``async with`` block: a time-out,
a failure or Ctrl-C (``KeyboardInterrupt`` out of ``trio.run``) closes it.

What never appears on the terminal or in a message: the PKCE verifier, the
device code, the authorization code and the token. The person sees the
authorization URL (it carries only the PKCE *challenge* and the state), the
verification URL and the user code.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from html import escape
from typing import Any, TextIO

import h11
import trio

from credproxy.core import login, oauth
from credproxy.core.config import Provider
from credproxy.core.login import LoginFailed
from credproxy.errors import CredproxyError
from credproxy.shell.http import HttpTokenEndpoint

__all__ = ["DEFAULT_TIMEOUT", "Terminal", "log_in", "run_login"]

#: Seconds to wait for the browser or a pasted code (the device flow waits
#: until its code expires unless a time-out is given).
DEFAULT_TIMEOUT = 300.0

_REQUEST_TIMEOUT = 10.0  # seconds for a browser to send a whole request
_MAX_REQUEST_BYTES = 16 * 1024  # a callback request is a few hundred bytes


@dataclass
class Terminal:
    """Where the person reads instructions (stderr) and pastes codes (stdin)."""

    out: TextIO = field(default_factory=lambda: sys.stderr)
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    no_browser: bool = False

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def open_browser(self, url: str) -> None:
        """Open *url* in a browser unless ``--no-browser`` or there is no display."""
        if self.no_browser or not _has_display():
            return
        opened = await trio.to_thread.run_sync(_open_browser, url, abandon_on_cancel=True)
        if opened:
            self.say("(opened in your browser)")


def _has_display() -> bool:
    # webbrowser falls back to text browsers (lynx, w3m) that would take over
    # this terminal; only a graphical session gets a browser opened for it.
    return sys.platform == "darwin" or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def _open_browser(url: str) -> bool:
    import webbrowser

    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


def log_in(
    name: str,
    provider: Provider,
    flow: login.Flow,
    *,
    no_browser: bool = False,
    give_up_after: float | None = None,
) -> dict[str, Any]:
    """Run :func:`run_login` in a fresh trio loop with its own HTTP client (the CLI's entry).

    Raises:
        LoginFailed: see :func:`run_login`.
        KeyboardInterrupt: Ctrl-C; every listener is closed by then.
    """

    async def main() -> dict[str, Any]:
        endpoint = HttpTokenEndpoint()
        try:
            return await run_login(
                name,
                provider,
                flow,
                endpoint=endpoint,
                terminal=Terminal(no_browser=no_browser),
                give_up_after=give_up_after,
            )
        finally:
            await endpoint.aclose()

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        # Nurseries wrap what their tasks raise; the CLI wants the one thing
        # that happened: Ctrl-C first, then a login failure.
        leaves = list(_leaves(group))
        for kind in (KeyboardInterrupt, LoginFailed):
            for leaf in leaves:
                if isinstance(leaf, kind):
                    raise leaf from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def run_login(
    name: str,
    provider: Provider,
    flow: login.Flow,
    *,
    endpoint: HttpTokenEndpoint,
    terminal: Terminal,
    give_up_after: float | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Run *flow* for provider *name*; return the token to store.

    *give_up_after* (seconds) bounds the whole wait (default :data:`DEFAULT_TIMEOUT` for
    the loopback and paste flows; the device flow otherwise ends when its
    code expires).

    Raises:
        LoginFailed: the login was denied, expired, timed out, or the identity
            provider answered something unusable. Nothing has been stored.
    """
    runners: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "device": partial(_device, name, provider, endpoint, terminal, wall_clock),
        "loopback": partial(_code, name, provider, endpoint, terminal, paste=False),
        "paste": partial(_code, name, provider, endpoint, terminal, paste=True),
    }
    # A client secret that cannot be read is said now, not after the person
    # has logged in at the provider.
    await endpoint.login_client_secret(provider)
    limit = (
        give_up_after
        if give_up_after is not None
        else (None if flow == "device" else DEFAULT_TIMEOUT)
    )
    with trio.move_on_after(limit if limit is not None else float("inf")) as scope:
        token = await runners[flow]()
        if provider.grant == "copilot":
            token = await _mint_copilot(name, provider, endpoint, terminal, token)
        return token
    assert scope.cancelled_caught
    raise LoginFailed(
        f"no answer within {limit:g} s; nothing was stored (run credproxy login again, "
        "or raise --timeout)"
    )


async def _mint_copilot(
    name: str,
    provider: Provider,
    endpoint: HttpTokenEndpoint,
    terminal: Terminal,
    github: dict[str, Any],
) -> dict[str, Any]:
    """The token to store for Copilot: the GitHub token (to mint with) and a first Copilot token.

    Raises:
        LoginFailed: GitHub would not mint one (no Copilot for this account, say).
    """
    github_token = github.get("access_token")
    if not isinstance(github_token, str) or not github_token:
        raise LoginFailed("GitHub's answer had no access token")
    try:
        minted = await endpoint.refresh(provider, github_token)  # grant "copilot": the mint
    except CredproxyError as exc:
        raise LoginFailed(
            f"logged in to GitHub, but no Copilot token could be minted for {name}: {exc}"
        ) from None
    terminal.say("Logged in to GitHub; minted a first Copilot token.")
    return oauth.merge_refreshed({"refresh_token": github_token}, minted)


# -- the device flow -----------------------------------------------------------------


async def _device(
    name: str,
    provider: Provider,
    endpoint: HttpTokenEndpoint,
    terminal: Terminal,
    wall_clock: Callable[[], float],
) -> dict[str, Any]:
    pkce = login.Pkce.from_entropy(secrets.token_bytes(32)) if provider.device_pkce else None
    auth = await endpoint.device_authorization(provider, pkce)
    terminal.say(f"To log in to {name}, open {auth.verification_uri}")
    terminal.say(f"and enter the code: {auth.user_code}")
    if auth.verification_uri_complete:
        terminal.say(f"(or open {auth.verification_uri_complete})")
    terminal.say("Waiting for the approval (Ctrl-C to cancel)...")
    await terminal.open_browser(auth.verification_uri_complete or auth.verification_uri)
    machine = login.DeviceFlow(auth)
    decision = machine.start(wall_clock())
    while isinstance(decision, login.Poll):
        await trio.sleep(decision.after)
        try:
            status, body, sent = await endpoint.poll_device_token(provider, auth.device_code, pkce)
        except LoginFailed as exc:
            decision = machine.on_transport_error(str(exc), wall_clock())
            continue
        decision = machine.on_response(status, body, sent)
    if isinstance(decision, login.Failed):
        raise LoginFailed(decision.reason)
    return decision.token


# -- authorization code + PKCE: loopback and paste ---------------------------------------


class _Waiter:
    """Takes the first answer (a browser's redirect or a pasted line); later ones are refused.

    A request without this login's state is no answer at all: the listener
    refuses it and the wait goes on (see :class:`credproxy.core.login.Stray`).

    The answer's code is exchanged at once, while the browser waits for its
    page, so the page can say whether the login worked.
    """

    def __init__(
        self,
        state: str,
        exchange: Callable[[str], Awaitable[dict[str, Any]]],
        name: str,
        path: str = login.CALLBACK_PATH,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.state = state
        self.name = name
        self.path = path
        self._exchange = exchange
        self._say = say
        self.strays = 0  # callbacks refused for a wrong or missing state
        self.claimed = False
        self.token: dict[str, Any] | None = None
        self.error: str | None = None
        self.done = trio.Event()

    def __repr__(self) -> str:
        return f"<_Waiter claimed={self.claimed} error={self.error!r}>"

    def note_stray(self) -> None:
        """Count a callback refused for its state; the terminal is told once per login."""
        self.strays += 1
        if self.strays == 1 and self._say is not None:
            self._say(
                "(refused a request to the login listener whose state does not match "
                "this login; still waiting)"
            )

    async def deliver(self, result: login.CallbackResult) -> bool:
        """Judge *result*: exchange its code or record its error. False if already answered."""
        if self.claimed:
            return False
        self.claimed = True
        if result.code is None:
            self.error = result.error or "the login failed"
        else:
            try:
                self.token = await self._exchange(result.code)
            except LoginFailed as exc:
                self.error = str(exc)
        return True


async def _code(
    name: str,
    provider: Provider,
    endpoint: HttpTokenEndpoint,
    terminal: Terminal,
    *,
    paste: bool,
) -> dict[str, Any]:
    pkce = login.Pkce.from_entropy(secrets.token_bytes(32))
    state = login.new_state(secrets.token_bytes(16))
    redirect = login.redirect_for(provider)
    port = redirect.port
    if port < 0 and not paste:
        raise LoginFailed(
            f"the redirect URI of {name} ({redirect.uri}) is not on this machine; "
            "use --flow paste and paste the code it shows"
        )
    try:
        listeners, port = ([], port) if port < 0 else await _listen(port, redirect.fallbacks)
    except OSError as exc:
        if not (paste and port):
            busy = " (is another login running? use --flow paste)" if port else ""
            raise LoginFailed(
                f"cannot listen on 127.0.0.1:{port} for the browser's redirect: "
                f"{exc.strerror or type(exc).__name__}{busy}"
            ) from None
        listeners = []  # paste: the redirect URI needs the port, not a listener here
    try:
        redirect_uri = redirect.uri_for(port)
        url = login.authorization_url(provider, redirect_uri, state, pkce)
        exchange = partial(
            endpoint.exchange_code, provider, pkce=pkce, redirect_uri=redirect_uri, state=state
        )
        waiter = _Waiter(state, exchange, name, redirect.path, terminal.say)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(
                    partial(trio.serve_listeners, partial(_callback, waiter), [listener])
                )
            terminal.say(f"To log in to {name}, open this URL in a browser:")
            terminal.say(url)
            if paste:
                nursery.start_soon(_read_paste, terminal, waiter)
            else:
                await terminal.open_browser(url)
                terminal.say("Waiting for the browser (Ctrl-C to cancel)...")
            await waiter.done.wait()
            nursery.cancel_scope.cancel()
    finally:
        # Closed before returning, whatever happened: no listener outlives the login.
        for listener in listeners:
            await trio.aclose_forcefully(listener)
    if waiter.token is None:
        raise LoginFailed(waiter.error or "the login failed")
    return waiter.token


async def _listen(port: int, fallbacks: tuple[int, ...]) -> tuple[list[Any], int]:
    """Listeners on 127.0.0.1: *port* (0: any free one), else the first free fallback.

    Returns the listeners and the port they got (the redirect URI names it).

    Raises:
        OSError: of *port*, when neither it nor any fallback could be bound.
    """
    first: OSError | None = None
    for candidate in (port, *fallbacks):
        try:
            listeners = await trio.open_tcp_listeners(candidate, host="127.0.0.1")
        except OSError as exc:
            first = first or exc
            continue
        return list(listeners), listeners[0].socket.getsockname()[1]
    assert first is not None
    raise first


async def _read_paste(terminal: Terminal, waiter: _Waiter) -> None:
    terminal.say("Then paste the code, or the whole URL the browser was sent to, and press Enter:")
    line = await trio.to_thread.run_sync(terminal.stdin.readline, abandon_on_cancel=True)
    if not line:
        result = login.CallbackResult(
            error="standard input closed before a code was pasted; nothing was stored"
        )
    else:
        result = login.parse_pasted(line, waiter.state)
    if await waiter.deliver(result):
        waiter.done.set()


async def _callback(waiter: _Waiter, stream: trio.SocketStream) -> None:
    """Answer one connection to the loopback listener (one request, then close)."""
    async with stream:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
        request = None
        with trio.move_on_after(_REQUEST_TIMEOUT):
            try:
                request = await _next_request(conn, stream)
            except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
        if request is None:
            return
        if request.method != b"GET":
            await _page(conn, stream, 405, "Method not allowed", "Only GET is answered here.")
            return
        target = request.target.decode("ascii", "replace")
        result = login.parse_callback_target(target, waiter.state, waiter.path)
        if isinstance(result, login.Stray):
            # Not this login's answer (any web page can make the browser send
            # one): refused, and the wait goes on until the real redirect.
            if result.status != 404:
                waiter.note_stray()
            await _page(conn, stream, result.status, result.title, result.text)
            return
        if not await waiter.deliver(result):
            await _page(conn, stream, 409, "Already answered", "This login was answered already.")
            return
        try:
            if waiter.token is not None:
                text = f"credproxy is logged in to {waiter.name}. You can close this tab."
                await _page(conn, stream, 200, "Logged in", text)
            else:
                text = f"{waiter.error}. Return to the terminal."
                await _page(conn, stream, 400, "Login failed", text)
        finally:
            waiter.done.set()


async def _next_request(conn: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(4096))
        elif isinstance(event, h11.Request):
            return event
        else:  # ConnectionClosed (or a stray event) before a request
            return None


async def _page(
    conn: h11.Connection, stream: trio.SocketStream, status: int, title: str, text: str
) -> None:
    """Send a short HTML page and end the exchange; a browser gone away is not an error."""
    body = (
        f"<!doctype html><meta charset=utf-8><title>credproxy: {escape(title)}</title>"
        f"<h1>{escape(title)}</h1><p>{escape(text)}</p>"
    ).encode()
    headers = [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("Referrer-Policy", "no-referrer"),
        ("Connection", "close"),
    ]
    events = (h11.Response(status_code=status, headers=headers), h11.Data(data=body))
    try:
        data = b"".join(conn.send(e) or b"" for e in (*events, h11.EndOfMessage()))
        await stream.send_all(data)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
