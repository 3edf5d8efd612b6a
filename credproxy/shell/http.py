"""The refresh, login and signing grants over HTTPS: the only module that imports httpx.

:class:`HttpTokenEndpoint` implements :class:`credproxy.core.oauth.TokenEndpoint`
with one shared ``httpx.AsyncClient``, and mints the signing grants' tokens
(:meth:`HttpTokenEndpoint.mint`; the JWTs and forms are ``core/assertions.py``'s,
the keys ``shell/signing_keys.py``'s). The codec in ``credproxy/core/oauth.py``
builds the form and judges the answer; this module only moves bytes and turns
every httpx exception into :class:`~credproxy.errors.RefreshFailed` at the
boundary, so nothing above it needs to know httpx exists. The API proxy's
upstream is :class:`ApiClient`: httpx for requests, and for a WebSocket
upgrade, which httpx cannot do, a connection of its own (trio, h11, the
same TLS context; :meth:`ApiClient.upgrade`).

What never leaves this module: the refresh token, the client secret and the
response body. Exceptions are raised ``from None`` and name only the host of
the token URL and the httpx exception class, because an httpx exception
carries the request (form body included) and its message may quote the URL.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from email.utils import parsedate_to_datetime
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit
from urllib.request import getproxies_environment, proxy_bypass

import h11
import trio

from credproxy.core import copilot, login, oauth
from credproxy.core.config import SIGNING_GRANTS, Provider
from credproxy.core.names import DEFAULT_BUCKET
from credproxy.errors import RefreshFailed

if TYPE_CHECKING:
    import httpx

    from credproxy.shell.signing_keys import SigningKeys

__all__ = ["MAX_RESPONSE_BYTES", "HttpTokenEndpoint"]

#: A token response is a few kilobytes; anything bigger is not one.
MAX_RESPONSE_BYTES = 1 << 20


def _httpx_errors() -> tuple[type[Exception], ...]:
    """Every exception httpx raises on purpose.

    HTTPError covers transport errors (connect, read, timeouts, protocol) and
    decoding errors; the others are siblings outside that hierarchy. httpx is
    imported here, at the first refresh, not at daemon start (~50 ms).
    """
    import httpx

    return (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, httpx.CookieConflict)


# A mount of None means "the client's own transport", i.e. no proxy.
_LOOPBACK_PATTERNS = ("all://127.0.0.1", "all://localhost", "all://[::1]")
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

_RETRY = "check the network connection, then try again"
_CHECK_PROXY = "check the network and the proxy settings (HTTPS_PROXY, NO_PROXY), then try again"


def network_failure(what: str, url: str, exc: BaseException) -> str:
    """One line for a request that failed on the way: what, to which host, why, what next.

    *exc* is what httpx (or the socket or TLS layer) raised; it is looked
    through (its causes, and the attempts of a connection group) for the
    cause in words: DNS lookup, connection refused, timed out, TLS
    verification. Names the host only (a URL's userinfo may hold a
    password) and the exception class, never its text, which may quote the
    URL or the request.
    """
    host = urlsplit(url).hostname or "the server"
    proxied = _env_proxy(urlsplit(url).scheme, host)
    cause, advice = _cause(exc, proxied)
    via = " (through the proxy that HTTPS_PROXY names)" if proxied else ""
    return f"{what} to {host}{via} failed: {cause} ({type(exc).__name__}); {advice}"


def relay_failure(url: str, timed_out: bool) -> str:
    """:func:`network_failure`'s line for the loop's relay: no answer in time, or none at all."""
    import httpx

    exc = httpx.ReadTimeout("read") if timed_out else httpx.RemoteProtocolError("closed")
    return network_failure("the request", url, exc)


def _cause(exc: BaseException, proxied: bool) -> tuple[str, str]:
    """The cause of *exc* in words, and the next step."""
    import httpx

    seen = list(_chain(exc))
    if any(isinstance(e, socket.gaierror) for e in seen):
        if proxied:
            return "DNS lookup of the proxy failed", _CHECK_PROXY
        return (
            "DNS lookup failed, no network or no such host",
            "check the network connection and the host name in the config, then try again",
        )
    for e in seen:
        if isinstance(e, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate verification failed, {str(e.verify_message).rstrip('.')}",
                "check this host's clock and CA certificates (SSL_CERT_FILE names extra ones; "
                "a proxy that intercepts TLS needs its CA there), then try again",
            )
    if any(isinstance(e, ssl.SSLError) for e in seen):
        return "TLS handshake failed", f"{_CHECK_PROXY}; the server may not speak TLS there"
    if any(isinstance(e, ConnectionRefusedError) for e in seen):
        if proxied:
            return "connection to the proxy refused", _CHECK_PROXY
        return "connection refused", "check the host and port in the config, then try again"
    if isinstance(exc, httpx.ConnectTimeout):
        return "connection timed out", _CHECK_PROXY
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time", "the server is slow or unreachable; try again later"
    unreachable = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}
    if any(isinstance(e, OSError) and e.errno in unreachable for e in seen):
        return "network unreachable", _RETRY
    if isinstance(exc, httpx.ProxyError):
        return "the proxy refused the request", _CHECK_PROXY
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return "the URL cannot be used", "fix the URL in the config"
    if isinstance(exc, httpx.ConnectError):
        return "no connection could be made", _CHECK_PROXY
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return "the connection broke before a whole answer", "try again"
    return "the request did not complete", _CHECK_PROXY


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """*exc*, its causes and contexts, and the members of exception groups among them."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def _env_proxy(scheme: str, host: str) -> bool:
    """Whether httpx would send a request to *host* through a proxy of the environment."""
    if host in _LOOPBACK_HOSTS:
        return False  # (the clients' mounts: loopback is always direct)
    proxies = getproxies_environment()
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    return not proxy_bypass(host)  # (on Linux: NO_PROXY)


class HttpTokenEndpoint:
    """Refreshes tokens with ``POST token_url`` (``client_secret_post``), and mints them.

    *wall_clock* gives the epoch time used to turn ``expires_in`` into an
    absolute expiry and to date the JWTs of the signing grants (tests inject
    a fake one); *random* the bytes of each ``jti``; *signing_keys* loads and
    caches the signing grants' keys (:meth:`mint`). *timeout* bounds each phase of
    a request (connect at most 5 s); a token endpoint that does not answer in
    time is a :class:`~credproxy.errors.RefreshFailed` like any other
    transport failure.

    The ``httpx.AsyncClient`` (and its TLS context, ~100 ms to build) is
    created on the first refresh, so a daemon that never refreshes never pays
    for it. Call :meth:`aclose` on shutdown.
    """

    def __init__(
        self,
        *,
        wall_clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
        random: Callable[[int], bytes] = os.urandom,
        signing_keys: SigningKeys | None = None,
        signing_store: Path | None = None,
    ) -> None:
        self._signing_store = signing_store  # where "store:NAME" keys live
        self._wall_clock = wall_clock
        self._timeout = timeout
        self._random = random
        # Created at the first mint: PyJWT and cryptography cost ~40 ms to import.
        self._keys = signing_keys
        self._client: httpx.AsyncClient | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._client else "idle")
        return f"<HttpTokenEndpoint {state} timeout={self._timeout}>"

    def _get_client(self) -> httpx.AsyncClient:
        # No await between the check and the assignment, so concurrent first
        # refreshes in one trio loop still share a single client.
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                # The system trust store rather than certifi's bundle, so
                # corporate CAs installed on the host are honoured.
                verify=ssl.create_default_context(),
                timeout=httpx.Timeout(self._timeout, connect=min(5.0, self._timeout)),
                # A token endpoint that redirects is misconfigured; following
                # it would re-send the refresh token somewhere else.
                follow_redirects=False,
                # HTTPS_PROXY / NO_PROXY from the environment apply, except to
                # loopback: a development IdP on 127.0.0.1 must not be sent to
                # a corporate proxy (httpx, like curl, would do so otherwise).
                trust_env=True,
                mounts=dict.fromkeys(_LOOPBACK_PATTERNS),
                headers={"Accept": "application/json", "User-Agent": "credproxy"},
            )
        return self._client

    def _now(self, clock: Callable[[], float] | None) -> float:
        """The wall clock as a request goes out: the caller's *clock* if it gave one."""
        return (self._wall_clock if clock is None else clock)()

    async def refresh(
        self,
        provider: Provider,
        refresh_token: str,
        granted: Any = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> dict[str, Any]:
        """Exchange *refresh_token* at ``provider.token_url``.

        *granted*: the stored token's ``scope`` (:func:`credproxy.core.oauth.refresh_form`).

        The client secret is read from ``provider.client_secret_file`` on
        every call, so rotating the file needs no daemon restart.

        Returns:
            The parsed token (see :func:`credproxy.core.oauth.parse_refresh_response`),
            not yet merged with the stored one.

        Raises:
            RefreshFailed: the secret file cannot be read, the endpoint is
                unreachable, too slow, or answers anything but a usable token
                or a rejection; also after :meth:`aclose`.
            ReauthRequired: the endpoint rejected the refresh token or the
                client (``invalid_grant``, ``invalid_client``, 401, ...).
        """
        if self._closed:
            raise RefreshFailed("the HTTP client is closed (the daemon is shutting down)")
        if provider.grant == "copilot":
            return await self._mint_copilot(provider, refresh_token)
        if provider.grant in SIGNING_GRANTS:
            # Not minted here: a GitHub App token depends on the bucket, which
            # a refresh does not know. The caller mints (see mint).
            raise RefreshFailed(f"grant {provider.grant!r} is minted, not refreshed")
        client_secret = await _read_client_secret(provider.client_secret_file)
        form = oauth.refresh_form(provider, refresh_token, client_secret, granted)
        # The userinfo part of a URL may hold a password; name the host only.
        host = urlsplit(provider.token_url).hostname or "the token endpoint"
        # Taken before sending: expires_in counts from when the IdP answered,
        # so the computed expiry is early by one round trip, never late. (On the
        # caller's clock when it gives one: a step is reckoned from this reading.)
        now = self._now(clock)
        try:
            status, body = await self._post(
                provider.token_url,
                form,
                json_body=provider.refresh_body == "json",
                headers=oauth.refresh_headers(provider),
            )
        except _httpx_errors() as exc:
            raise RefreshFailed(network_failure("the refresh", provider.token_url, exc)) from None
        except _ResponseTooLarge:
            raise RefreshFailed(
                f"refresh for {host} failed: response larger than {MAX_RESPONSE_BYTES} bytes"
            ) from None
        return oauth.parse_refresh_response(status, body, now)

    async def _mint_copilot(self, provider: Provider, github_token: str) -> dict[str, Any]:
        """Copilot's second exchange: a Copilot token minted from *github_token*.

        See :mod:`credproxy.core.copilot`.

        Raises:
            ReauthRequired: GitHub refused (the login was revoked, no Copilot).
            RefreshFailed: unreachable, too slow, or not a usable answer.
        """
        url = provider.mint_url or copilot.MINT_URL
        host = urlsplit(url).hostname or "the Copilot token endpoint"
        try:
            status, body = await self._call("GET", url, headers=copilot.mint_headers(github_token))
        except _httpx_errors() as exc:
            raise RefreshFailed(network_failure("the Copilot token request", url, exc)) from None
        except _ResponseTooLarge:
            raise RefreshFailed(
                f"the answer of {host} is larger than {MAX_RESPONSE_BYTES} bytes"
            ) from None
        return copilot.parse_mint_response(status, body)

    # -- the signing grants -------------------------------------------------------------

    async def mint(
        self,
        provider: Provider,
        bucket: str = DEFAULT_BUCKET,
        *,
        clock: Callable[[], float] | None = None,
    ) -> dict[str, Any]:
        """A new token for a signing grant (jwt-bearer, client_credentials, github-app, signed-jwt).

        Loads the key (cached per file and mtime), signs what the grant needs
        (:mod:`credproxy.core.assertions`), sends one request and parses the
        answer; a ``signed-jwt`` is the token itself, with no request. *bucket*
        picks a GitHub App's narrowing (``[providers.X.narrow.BUCKET]``).

        Returns:
            ``access_token``, ``expiry`` (epoch seconds), ``token_type`` and what
            else the issuer said (``scope``; GitHub's ``permissions``,
            ``repository_selection``, ``repositories``); never a refresh_token.

        Raises:
            MintFailed: the key or secret cannot be had (cause ``"key"``), the
                issuer refused (``"refused"``, ``"clock_skew"``), or it could not
                be reached or answered nonsense (``"transient"``). The message
                names hosts and files, the issuer's error text with anything
                secret removed, never the key, a passphrase or a secret.
        """
        from credproxy.core import assertions
        from credproxy.shell.signing_keys import SigningKeys

        if self._closed:
            raise assertions.MintFailed("the HTTP client is closed (the daemon is shutting down)")
        if provider.grant not in SIGNING_GRANTS:
            raise assertions.MintFailed(f"grant {provider.grant!r} is refreshed, not minted")
        if self._keys is None:
            self._keys = SigningKeys(store_dir=self._signing_store)
        keys = self._keys
        key = await keys.load(provider)
        if provider.grant == "signed-jwt":
            if key is None:
                raise assertions.MintFailed("a signed-jwt provider needs private_key", "key")
            return assertions.signed_jwt_token(
                provider,
                key,
                now=self._now(clock),
                random=self._random,
            )
        client_secret = None
        if provider.grant == "client_credentials":
            if provider.client_secret is not None:
                client_secret = provider.client_secret.reveal()
            elif provider.client_secret_file:
                client_secret = await keys.read_secret(
                    provider.client_secret_file, "client_secret_file"
                )
        # Taken before signing and sending: the JWT's times, and expires_in counted
        # from here, so the computed expiry errs early (the caller's clock, as
        # for refresh).
        now = self._now(clock)
        request = assertions.build_request(
            provider, bucket, key=key, client_secret=client_secret, now=now, random=self._random
        )
        host = urlsplit(request.url).hostname or "the issuer"
        try:
            status, body, headers = await self._exchange(
                request.method,
                request.url,
                data=request.form,
                json=request.json,
                headers=request.headers or None,
            )
        except _httpx_errors() as exc:
            raise assertions.MintFailed(
                network_failure(f"the {request.grant} request", request.url, exc)
            ) from None
        except _ResponseTooLarge:
            raise assertions.MintFailed(
                f"the answer of {host} is larger than {MAX_RESPONSE_BYTES} bytes"
            ) from None
        return assertions.parse_answer(
            request, status, body, now=now, server_date=_http_date(headers.get("date"))
        )

    # -- the login grants (credproxy login) ------------------------------------------

    async def device_authorization(
        self, provider: Provider, pkce: login.Pkce | None = None
    ) -> login.DeviceAuthorization:
        """Start a device flow: ``POST device_authorization_url`` (RFC 8628 3.1).

        A form, or JSON as ``exchange_body`` says (see :meth:`_login_post`).

        Raises:
            LoginFailed: unreachable, too slow, or not a usable device authorization
                response (:func:`credproxy.core.login.parse_device_authorization`).
            RefreshFailed: the client secret file cannot be read.
        """
        if provider.device_authorization_url is None:
            raise login.LoginFailed("this provider has no device_authorization_url")
        form = login.device_authorization_form(provider, pkce)
        now = self._wall_clock()
        status, body = await self._login_post(provider, provider.device_authorization_url, form)
        return login.parse_device_authorization(status, body, now)

    async def poll_device_token(
        self, provider: Provider, device_code: str, pkce: login.Pkce | None = None
    ) -> tuple[int, bytes, float]:
        """One device-flow poll of ``token_url``: (status, body, time sent), judged by the caller.

        A form, or JSON as ``exchange_body`` says (see :meth:`_login_post`).

        Raises:
            LoginFailed: the endpoint could not be reached or answered too much.
        """
        form = login.device_token_form(provider, device_code, pkce)
        now = self._wall_clock()
        status, body = await self._login_post(provider, provider.token_url, form)
        return status, body, now

    async def exchange_code(
        self,
        provider: Provider,
        code: str,
        pkce: login.Pkce,
        redirect_uri: str,
        state: str | None = None,
    ) -> dict[str, Any]:
        """Exchange an authorization code (with its PKCE verifier) at ``token_url``.

        Returns:
            The token, parsed like a refreshed one (``expiry``, not ``expires_in``).

        Raises:
            LoginFailed: unreachable, or the code was refused (the message names
                the HTTP status and OAuth error code only).
        """
        form = login.code_form(provider, code, pkce, redirect_uri, state)
        now = self._wall_clock()
        status, body = await self._login_post(provider, provider.token_url, form)
        return login.parse_token_response(status, body, now)

    async def login_client_secret(self, provider: Provider) -> str | None:
        """*provider*'s client secret for a login, if it has one.

        Raises:
            LoginFailed: its ``client_secret_file`` cannot be read (the message
                names the file and why, never the content).
        """
        try:
            return await _read_client_secret(provider.client_secret_file)
        except RefreshFailed as exc:
            raise login.LoginFailed(f"{exc}; nothing was stored") from None

    async def _login_post(
        self, provider: Provider, url: str, form: dict[str, str]
    ) -> tuple[int, bytes]:
        """POST one request of a login, with the client secret if there is one.

        Every request of a login (the code exchange, the device authorization
        request and each poll) is a form, or a JSON object when the provider's
        ``exchange_body`` is ``"json"`` (copilot-api sends its device flow so).
        """
        if self._closed:
            raise login.LoginFailed("the HTTP client is closed")
        client_secret = await self.login_client_secret(provider)
        if client_secret is not None:
            form = {**form, "client_secret": client_secret}
        host = urlsplit(url).hostname or "the identity provider"
        try:
            return await self._post(url, form, json_body=provider.exchange_body == "json")
        except _httpx_errors() as exc:
            raise login.LoginFailed(network_failure("the login request", url, exc)) from None
        except _ResponseTooLarge:
            raise login.LoginFailed(
                f"the answer of {host} is larger than {MAX_RESPONSE_BYTES} bytes"
            ) from None

    async def _post(
        self,
        url: str,
        form: dict[str, str],
        *,
        json_body: bool = False,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """POST *form* as ``application/x-www-form-urlencoded``, or as a JSON object.

        *headers* are added to the client's own (``Accept``, ``User-Agent``).
        """
        if json_body:
            return await self._call("POST", url, json=form, headers=headers)
        return await self._call("POST", url, data=form, headers=headers)

    async def _call(
        self,
        method: str,
        url: str,
        *,
        data: dict[str, str] | None = None,
        json: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One request: (status, body), a body over :data:`MAX_RESPONSE_BYTES` refused."""
        status, body, _ = await self._exchange(method, url, data=data, json=json, headers=headers)
        return status, body

    async def _exchange(
        self,
        method: str,
        url: str,
        *,
        data: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        """One request: (status, body, headers with lowercase names), the body capped."""
        client = self._get_client()
        async with client.stream(method, url, data=data, json=json, headers=headers) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise _ResponseTooLarge
            answered = {name.lower(): value for name, value in response.headers.items()}
            return response.status_code, bytes(body), answered

    async def aclose(self) -> None:
        """Close the shared client; later refreshes raise RefreshFailed. Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class _ResponseTooLarge(Exception):
    pass


def _http_date(value: str | None) -> float | None:
    """Epoch seconds of an HTTP ``Date`` header, or None when absent or unreadable."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


async def _read_client_secret(path: str | None) -> str | None:
    """The client secret from *path* (``~`` expanded, surrounding whitespace stripped).

    Read in a worker thread: a secret file on a slow or hung network home
    directory must not stall the daemon's event loop.

    Raises:
        RefreshFailed: the file cannot be read, is not UTF-8 or is empty. The
            message names the file and the reason, never the content.
    """
    if path is None:
        return None
    return await trio.to_thread.run_sync(_read_client_secret_sync, path)


def _read_client_secret_sync(path: str) -> str:
    try:
        with open(os.path.expanduser(path), "rb") as f:
            raw = f.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RefreshFailed(f"cannot read client_secret_file {path}: {reason}") from None
    try:
        secret = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        # str(UnicodeDecodeError) quotes the offending byte; say less.
        raise RefreshFailed(f"client_secret_file {path} is not UTF-8 text") from None
    if not secret:
        raise RefreshFailed(f"client_secret_file {path} is empty")
    return secret


# -- the API proxy's upstream ------------------------------------------------------------


class UpstreamUnavailable(RefreshFailed):
    """The API upstream could not be reached, or broke off (the message names host and kind)."""


class UpstreamResponse:
    """An upstream response whose body is read as it arrives (bytes as sent: no decoding).

    *tunnel* is set when the upstream switched protocols (``101`` to a
    WebSocket upgrade, :meth:`ApiClient.upgrade`): the connection is then the
    caller's to relay, and there is no body.
    """

    tunnel: Tunnel | None = None

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], host: str) -> None:
        self.status = status
        self.headers = headers
        self._host = host

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body, chunk by chunk, as the upstream sends it.

        Raises:
            UpstreamUnavailable: the upstream broke off or stalled past the read timeout.
        """
        raise NotImplementedError

    async def aclose(self) -> None:
        """Give the connection back (or close it); idempotent."""


class _HttpxResponse(UpstreamResponse):
    def __init__(self, response: httpx.Response, host: str) -> None:
        super().__init__(response.status_code, list(response.headers.raw), host)
        self._response = response

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        errors = _httpx_errors()
        try:
            raw = cast("AsyncGenerator[bytes, None]", self._response.aiter_raw())
            async with contextlib.aclosing(raw):
                async for chunk in raw:
                    yield chunk
        except errors as exc:
            raise UpstreamUnavailable(
                f"{self._host} broke off the response ({type(exc).__name__})"
            ) from None

    async def aclose(self) -> None:
        await self._response.aclose()


#: What a broken upstream connection of our own (trio, TLS) raises.
_STREAM_ERRORS = (OSError, ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError)


class Tunnel:
    """An upstream connection that switched protocols: bytes both ways, nothing parsed.

    *early* holds what the upstream sent right after its ``101`` (h11 read it
    with the head). :meth:`send` gives up after the write timeout; :meth:`receive`
    waits as long as it is let (the caller's idle deadline bounds it).
    """

    def __init__(self, stream: trio.abc.Stream, early: bytes, host: str, write: float) -> None:
        self.early = early
        self._stream = stream
        self._host = host
        self._write = write

    async def receive(self) -> bytes:
        """The next bytes the upstream sends; b"" once it has closed.

        Raises:
            UpstreamUnavailable: the connection broke.
        """
        try:
            return bytes(await self._stream.receive_some(_RECV))
        except _STREAM_ERRORS as exc:
            raise UpstreamUnavailable(f"{self._host} broke off ({type(exc).__name__})") from None

    async def send(self, data: bytes) -> None:
        """Send *data* upstream.

        Raises:
            UpstreamUnavailable: the connection broke, or took nothing for the write timeout.
        """
        try:
            with trio.fail_after(self._write):
                await self._stream.send_all(data)
        except trio.TooSlowError:
            raise UpstreamUnavailable(f"{self._host} stopped reading") from None
        except _STREAM_ERRORS as exc:
            raise UpstreamUnavailable(f"{self._host} broke off ({type(exc).__name__})") from None


class _UpgradeResponse(UpstreamResponse):
    """The answer to an upgrade request on a connection of our own (h11 over trio)."""

    def __init__(
        self,
        event: h11.Response | h11.InformationalResponse,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        host: str,
        timeouts: tuple[float, float, float],
    ) -> None:
        super().__init__(event.status_code, list(event.headers), host)
        self._conn = conn
        self._stream = stream
        self._read = timeouts[1]
        if event.status_code == 101:
            self.tunnel = Tunnel(stream, conn.trailing_data[0], host, timeouts[2])

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        while True:
            try:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(self._read):
                        self._conn.receive_data(bytes(await self._stream.receive_some(_RECV)))
                    continue
            except (trio.TooSlowError, h11.RemoteProtocolError, *_STREAM_ERRORS) as exc:
                raise UpstreamUnavailable(
                    f"{self._host} broke off the response ({type(exc).__name__})"
                ) from None
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def aclose(self) -> None:
        await self._stream.aclose()


_RECV = 65_536


async def _answer_head(
    conn: h11.Connection, stream: trio.abc.Stream
) -> h11.Response | h11.InformationalResponse:
    """The head of the answer to the request sent on *conn* (a ``100`` is passed over)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(_RECV)))
        elif isinstance(event, h11.InformationalResponse) and event.status_code != 101:
            continue
        elif isinstance(event, h11.Response | h11.InformationalResponse):
            return event
        else:  # closed before answering
            raise trio.BrokenResourceError


#: TLS driven by the serving loop: the object and its incoming and outgoing buffers.
Tls = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]
Opened = tuple[socket.socket, Tls | None]


async def _handshake(
    stream: trio.SocketStream, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
) -> None:
    """A TLS handshake through memory buffers, over *stream*."""
    while True:
        try:
            obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        if outgoing.pending:
            await stream.send_all(outgoing.read())
        if done:
            return
        data = await stream.receive_some(65_536)
        if not data:
            raise ssl.SSLEOFError("the server closed the connection during the TLS handshake")
        incoming.write(data)


class ApiClient:
    """One shared ``httpx.AsyncClient`` for every proxied API request.

    The system trust store (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` add a
    corporate CA, or a test's own), explicit timeouts, no redirects followed
    (a redirect is passed back to the client as it is), and ``HTTPS_PROXY``
    honoured except for loopback. Created on first use; :meth:`aclose` on
    shutdown.
    """

    def __init__(self, *, connect: float = 10.0, read: float = 300.0, write: float = 60.0) -> None:
        self._timeouts = (connect, read, write)
        self._client: httpx.AsyncClient | None = None
        self._ssl: ssl.SSLContext | None = None

    def _tls(self) -> ssl.SSLContext:
        """The one TLS context of the upstream: the system trust store, verified (built once)."""
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            import httpx

            connect, read, write = self._timeouts
            self._client = httpx.AsyncClient(
                verify=self._tls(),
                timeout=httpx.Timeout(connect=connect, read=read, write=write, pool=connect),
                follow_redirects=False,
                trust_env=True,
                mounts=dict.fromkeys(_LOOPBACK_PATTERNS),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
            # One client serves every session: a cookie an upstream sets for
            # one sandbox must never be sent on behalf of another. Set-Cookie
            # still reaches the client that got it; the jar keeps nothing.
            self._client.cookies.jar.set_policy(DefaultCookiePolicy(allowed_domains=[]))
            # Nor headers of httpx's own (User-Agent: python-httpx, Accept,
            # Connection): the upstream gets the sandbox's, as from the relay.
            self._client.headers.clear()
        return self._client

    async def send(
        self,
        method: str,
        url: str,
        headers: list[tuple[bytes, bytes]],
        content: Any,
    ) -> UpstreamResponse:
        """Send a request whose body is *content* (bytes or an async iterator of bytes).

        Raises:
            UpstreamUnavailable: not reached, or no answer in time.
        """
        client = self._get_client()
        host = urlsplit(url).hostname or "the upstream"
        try:
            request = client.build_request(method, url, headers=headers, content=content)
            response = await client.send(request, stream=True)
        except _httpx_errors() as exc:
            raise UpstreamUnavailable(network_failure("the request", url, exc)) from None
        return _HttpxResponse(response, host)

    async def upgrade(self, url: str, headers: list[tuple[bytes, bytes]]) -> UpstreamResponse:
        """Send a WebSocket upgrade (``GET`` with *headers*) on a connection of its own.

        httpx cannot switch protocols, so the connection is opened here with
        trio (TLS with :meth:`_tls`, as every other request: ``wss://`` for an
        ``https`` base URL, ``ws://`` for ``http``) and the handshake is h11's.
        The same timeouts apply: connect (TCP and TLS), write, read (the head
        of the answer). *headers* are sent as given, after ``Host``; the
        caller adds ``Connection`` and ``Upgrade``.

        Returns:
            A ``101`` with its :attr:`~UpstreamResponse.tunnel`, or any other
            answer, whose body :meth:`~UpstreamResponse.chunks` reads. Either
            way the caller closes it (:meth:`close_response`).

        Raises:
            UpstreamUnavailable: not reached, TLS refused, no answer in time,
                not HTTP, or a proxy from the environment would apply (upgrades
                are not sent through ``HTTPS_PROXY`` yet).
        """
        parts = urlsplit(url)
        host = parts.hostname or "the upstream"
        secure = parts.scheme == "https"
        if self._env_proxy(parts.scheme, host):
            raise UpstreamUnavailable(
                f"{host} is reached through a proxy of the environment (HTTPS_PROXY), "
                "and WebSocket upgrades are not sent through one; use HTTP instead"
            )
        try:
            port = parts.port or (443 if secure else 80)
            authority = parts.netloc.rpartition("@")[2].encode("ascii")
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn = h11.Connection(h11.CLIENT)
            head = conn.send(
                h11.Request(method="GET", target=target, headers=[(b"host", authority), *headers])
            )
            head += conn.send(h11.EndOfMessage())
        except (ValueError, h11.LocalProtocolError) as exc:  # (UnicodeError is a ValueError)
            raise UpstreamUnavailable(
                f"the request to {host} cannot be sent ({type(exc).__name__})"
            ) from None
        connect, read, write = self._timeouts
        stream: trio.abc.Stream | None = None
        done = False
        try:
            with trio.fail_after(connect):
                stream = await trio.open_tcp_stream(host, port)
                if secure:
                    stream = trio.SSLStream(
                        stream, self._tls(), server_hostname=host, https_compatible=True
                    )
                    await stream.do_handshake()
            with trio.fail_after(write):
                await stream.send_all(head)
            with trio.fail_after(read):
                event = await _answer_head(conn, stream)
            done = True
        except (trio.TooSlowError, h11.ProtocolError, *_STREAM_ERRORS) as exc:
            raise UpstreamUnavailable(f"{host} did not answer ({type(exc).__name__})") from None
        finally:
            if not done and stream is not None:
                await trio.aclose_forcefully(stream)
        return _UpgradeResponse(event, conn, stream, host, self._timeouts)

    @staticmethod
    def _env_proxy(scheme: str, host: str) -> bool:
        """Whether httpx would send a request to *host* through a proxy of the environment."""
        return _env_proxy(scheme, host)

    @property
    def read_timeout(self) -> float:
        return self._timeouts[1]

    async def open(self, scheme: str, host: str, port: int) -> Opened:
        """A connection to *host* for the serving loop's relay: connected, TLS negotiated.

        TLS is an ``ssl.SSLObject`` over two ``MemoryBIO`` (:meth:`_tls`'s
        context, so the same trust store), so the loop drives it on its
        non-blocking socket. The connect timeout bounds TCP and TLS together.

        Raises:
            UpstreamUnavailable: not reached, or TLS refused, in words.
        """
        import httpx

        url = f"{scheme}://{host}:{port}/"
        stream: trio.SocketStream | None = None
        try:
            with trio.fail_after(self._timeouts[0]):
                stream = await trio.open_tcp_stream(host, port)
                tls = None
                if scheme == "https":
                    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
                    obj = self._tls().wrap_bio(incoming, outgoing, server_hostname=host)
                    tls = (obj, incoming, outgoing)
                    await _handshake(stream, *tls)
            fd = stream.socket.detach()
            stream = None
        except trio.TooSlowError:
            exc: BaseException = httpx.ConnectTimeout("connect")
            raise UpstreamUnavailable(network_failure("the request", url, exc)) from None
        except _STREAM_ERRORS as exc:
            raise UpstreamUnavailable(network_failure("the request", url, exc)) from None
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)
        return socket.socket(fileno=fd), tls

    async def close_response(self, response: UpstreamResponse) -> None:
        await response.aclose()

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
