"""Logging in on the host, as a sans-IO codec: PKCE, redirects, the device flow.

Three ways to get a person's first token (``credproxy login``):

- **device** (RFC 8628): ask ``device_authorization_url`` for a device code,
  show the person a short user code and a URL, then poll ``token_url`` until
  they approve it elsewhere.
- **loopback** (RFC 7636 + RFC 8252 section 7.3): send the browser to
  ``authorization_url`` with a PKCE challenge and a ``state``; the identity
  provider redirects it to ``http://127.0.0.1:PORT/callback`` with a ``code``
  that is exchanged, with the PKCE verifier, at ``token_url``. Only a
  redirect with this login's ``state`` answers it: any web page can make the
  browser request the callback, so one without it (or another path) is
  refused and the wait goes on (:class:`Stray`).
- **paste**: the same authorization request, but the person copies the code
  (or the whole redirect URL) from the browser and pastes it.

This module builds the requests and judges every answer; it never opens a
socket, reads a clock or draws random bytes (the caller passes entropy and
``now``). ``credproxy/shell/login.py`` does the waiting and the I/O.

Theory of the device flow
-------------------------

:class:`DeviceFlow` is the whole polling state machine. After the device
authorization response, the caller asks :meth:`DeviceFlow.start` what to do,
then feeds every token-endpoint answer to :meth:`DeviceFlow.on_response`
(or a transport failure to :meth:`DeviceFlow.on_transport_error`). Each
returns one decision:

- :class:`Poll` ``(after)``: sleep *after* seconds, then poll again.
  ``authorization_pending`` keeps the interval; ``slow_down`` adds 5 s to it
  for this and every later poll (RFC 8628 section 3.5). A poll that would
  land after the device code expires is not made: :class:`Failed` instead.
- :class:`Done` ``(token)``: the person approved; the token is parsed exactly
  like a refreshed one (``expires_in`` becomes ``expiry``).
- :class:`Failed` ``(reason)``: ``access_denied``, ``expired_token``, the
  code's lifetime ran out, or the endpoint answered something else. The
  reason is one line for the person; it never quotes a response body.

Secrets: the PKCE verifier, the device code, the authorization code and the
tokens never appear in a message built here. The user code is meant for the
person and is the only value of a response that is shown.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from credproxy.core import oauth
from credproxy.core.config import SIGNING_GRANTS, Provider
from credproxy.errors import CredproxyError

__all__ = [
    "CALLBACK_PATH",
    "DEVICE_GRANT_TYPE",
    "FLOWS",
    "SLOW_DOWN_STEP",
    "STRAY_STATE",
    "CallbackResult",
    "DeviceAuthorization",
    "DeviceFlow",
    "Done",
    "Failed",
    "LoginFailed",
    "Pkce",
    "Poll",
    "Redirect",
    "Stray",
    "authorization_url",
    "choose_flow",
    "code_challenge",
    "code_form",
    "device_authorization_form",
    "device_token_form",
    "loopback_redirect_uri",
    "new_state",
    "parse_callback_target",
    "parse_device_authorization",
    "parse_pasted",
    "parse_token_response",
    "redirect_for",
]

Flow = Literal["device", "loopback", "paste"]
FLOWS: tuple[Flow, ...] = ("device", "loopback", "paste")

#: RFC 8628 section 3.4.
DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
#: RFC 8628 section 3.5: ``slow_down`` adds this many seconds to the interval.
SLOW_DOWN_STEP = 5.0
#: RFC 8628 section 3.2: the interval when the response names none.
DEFAULT_INTERVAL = 5.0
#: The shortest interval honoured: an answer of 0 would poll in a tight loop.
MIN_INTERVAL = 1.0
#: The path of the loopback redirect URI.
CALLBACK_PATH = "/callback"
#: Transport failures in a row tolerated while polling (a Wi-Fi blip must not
#: throw away a login the person is completing on their phone).
MAX_TRANSPORT_ERRORS = 3

# RFC 7636 section 4.1: 43 to 128 characters of [A-Za-z0-9-._~]; 32 random
# bytes in base64url without padding give 43.
_VERIFIER_BYTES = 32
_STATE_BYTES = 16
_MAX_USER_CODE = 64


class LoginFailed(CredproxyError):
    """A login did not produce a token; ``str()`` says why and what to try next.

    Never carries a code, verifier or token, nor a response body.
    """


# -- PKCE and state ----------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def code_challenge(verifier: str) -> str:
    """The S256 challenge of *verifier*: ``BASE64URL(SHA256(ASCII(verifier)))`` (RFC 7636 4.2)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


@dataclass(frozen=True)
class Pkce:
    """A PKCE verifier and its S256 challenge. ``repr`` hides the verifier."""

    verifier: str = field(repr=False)
    challenge: str

    @classmethod
    def from_entropy(cls, entropy: bytes) -> Pkce:
        """A pair from *entropy* (at least 32 random bytes, e.g. ``secrets.token_bytes(32)``)."""
        if len(entropy) < _VERIFIER_BYTES:
            raise ValueError(f"PKCE needs at least {_VERIFIER_BYTES} bytes of entropy")
        verifier = _b64url(entropy[:96])  # 96 bytes -> 128 characters, the maximum
        return cls(verifier, code_challenge(verifier))


def new_state(entropy: bytes) -> str:
    """An unguessable ``state`` value from *entropy* (at least 16 random bytes)."""
    if len(entropy) < _STATE_BYTES:
        raise ValueError(f"state needs at least {_STATE_BYTES} bytes of entropy")
    return _b64url(entropy)


# -- choosing a flow ---------------------------------------------------------------


def choose_flow(name: str, provider: Provider, requested: str | None) -> Flow:
    """The flow to run: *requested*, else the provider's ``flow``, else what it supports.

    Without a configured ``flow``, the device flow is preferred when the
    provider has a ``device_authorization_url`` (it works over SSH and in
    containers), else the loopback flow.

    Raises:
        LoginFailed: the chosen flow needs an endpoint the provider lacks, or the
            provider's tokens are minted from a key (nothing to log in to).
    """
    if provider.grant in SIGNING_GRANTS:
        raise LoginFailed(
            f"provider {name} has grant {provider.grant!r}: its tokens are minted from its "
            "key on the host, so there is nothing to log in to (docs/signing.md)"
        )
    if not provider.device_authorization_url and not provider.authorization_url:
        # (Said whatever --flow asks for: no flow could run.)
        raise LoginFailed(
            f"provider {name} has neither authorization_url nor device_authorization_url "
            "in the configuration; add one (or a preset) to log in"
        )
    default = "device" if provider.device_authorization_url else "loopback"
    flow = requested or provider.flow or default
    if flow not in FLOWS:
        raise LoginFailed(f"unknown flow {flow!r}; use one of {', '.join(FLOWS)}")
    if flow == "device" and not provider.device_authorization_url:
        raise LoginFailed(
            f"provider {name} has no device_authorization_url; "
            "use --flow loopback or --flow paste, or configure it"
        )
    if flow in ("loopback", "paste") and not provider.authorization_url:
        raise LoginFailed(
            f"provider {name} has no authorization_url; use --flow device, or configure it"
        )
    return flow


# -- authorization code + PKCE -------------------------------------------------------


def loopback_redirect_uri(port: int, host: str = "127.0.0.1", path: str = CALLBACK_PATH) -> str:
    """``http://HOST:PORT/PATH``; by default the IP literal, as RFC 8252 section 7.3 advises."""
    return f"http://{host}:{port}{path}"


class Redirect(NamedTuple):
    """Where the browser is sent back to, and what the listener serves.

    A loopback redirect (*uri* None) is ``http://HOST:PORT/PATH`` with the
    port actually listened on: *port*, else the first free one of
    *fallbacks*, or any free one when *port* is 0. Otherwise *uri* is a page
    of the provider's that shows the code (*port* -1: paste only).
    """

    uri: str | None
    port: int  # the loopback port to listen on; 0: any free one; -1: none (paste only)
    path: str  # the callback path on that port
    host: str = "127.0.0.1"  # the host the redirect URI names (the listener is on 127.0.0.1)
    fallbacks: tuple[int, ...] = ()  # ports tried in order when *port* is taken

    def uri_for(self, port: int) -> str:
        """The redirect URI sent when the listener got *port*."""
        return self.uri or loopback_redirect_uri(port, self.host, self.path)


def redirect_for(provider: Provider) -> Redirect:
    """The redirect of *provider*: its registered ``redirect_uri``, else loopback on any port.

    A loopback ``redirect_uri`` (``http://127.0.0.1[:PORT]/...`` or
    ``http://localhost[:PORT]/...``, as Codex and Claude Code use) gives the
    host and path to send; its port is listened on (none: any free one, the
    redirect naming it), then ``fallback_ports``. Any other one (a page of
    the provider that shows the code) leaves only the paste flow.
    """
    fallbacks = tuple(provider.fallback_ports)
    if provider.redirect_uri is None:
        return Redirect(None, provider.redirect_port or 0, CALLBACK_PATH, fallbacks=fallbacks)
    parts = urlsplit(provider.redirect_uri)
    if parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost"):
        port = parts.port or provider.redirect_port or 0
        return Redirect(None, port, parts.path or "/", parts.hostname, fallbacks)
    return Redirect(provider.redirect_uri, -1, parts.path or "/")


def authorization_url(provider: Provider, redirect_uri: str, state: str, pkce: Pkce) -> str:
    """The URL to send the browser to (RFC 6749 4.1.1 with RFC 7636 S256).

    A query already in ``authorization_url`` is kept, then ``authorize_params``
    (a provider's extras, such as Claude's ``code=true``); scopes are joined by
    spaces, and a space is sent as ``%20``.
    """
    if provider.authorization_url is None:
        raise LoginFailed("this provider has no authorization_url")
    base = urlsplit(provider.authorization_url)
    params = parse_qsl(base.query, keep_blank_values=True)
    params += list(provider.authorize_params.items())
    params += [
        ("response_type", "code"),
        ("client_id", provider.client_id),
        ("redirect_uri", redirect_uri),
    ]
    if provider.scopes:
        params.append(("scope", " ".join(provider.scopes)))
    params += [
        ("state", state),
        ("code_challenge", pkce.challenge),
        ("code_challenge_method", "S256"),
    ]
    return urlunsplit(base._replace(query=urlencode(params, quote_via=quote)))


def code_form(
    provider: Provider, code: str, pkce: Pkce, redirect_uri: str, state: str | None = None
) -> dict[str, str]:
    """The token request of the authorization code grant (RFC 6749 4.1.3, RFC 7636 4.5).

    With the login's *state* when the provider's client sends it
    (``exchange_state``). Without the client secret: the HTTP layer adds it
    (``client_secret_post``). Sent as ``exchange_body`` says (form or JSON).
    """
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": provider.client_id,
        "code_verifier": pkce.verifier,
    }
    if provider.exchange_state and state is not None:
        form["state"] = state
    return form


@dataclass(frozen=True)
class CallbackResult:
    """What a request to the loopback listener means.

    ``code`` is set when the identity provider sent one with the right state;
    else ``error`` says, in one line, why the login failed. ``repr`` hides the code.
    """

    code: str | None = field(default=None, repr=False)
    error: str | None = None


@dataclass(frozen=True)
class Stray:
    """A request to the loopback listener that is not this login's answer.

    Another path (a browser also asks for ``/favicon.ico``: *status* 404), or
    the callback path without this login's ``state`` (400: any web page can
    make the browser send one, so it must not end the login). The listener
    answers *status* with a page titled *title* saying *text*, and keeps
    waiting for the real redirect.
    """

    status: int
    title: str
    text: str


def parse_callback_target(
    target: str, state: str, path: str = CALLBACK_PATH
) -> CallbackResult | Stray:
    """Judge the request target (path and query) the browser sent to the listener.

    Only a redirect carrying this login's *state* answers it (a
    :class:`CallbackResult`: the code, or the identity provider's error such
    as ``access_denied``); anything else is a :class:`Stray`, refused without
    ending the wait.
    """
    parts = urlsplit(target)
    if parts.path != path:
        return Stray(404, "Not found", "This is credproxy's login listener.")
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    if not _same(params.get("state", ""), state):
        return Stray(400, "Wrong state", STRAY_STATE)
    return _judge_query(parts.query, state)


def parse_pasted(text: str, state: str) -> CallbackResult:
    """Judge what the person pasted: the redirect URL, its query, ``code#state`` or a bare code.

    A pasted URL or query must carry the right ``state``; so must the
    ``code#state`` form some providers display. A bare code cannot be checked
    and is taken as is (it came from the page the person just logged in on).
    """
    text = text.strip()
    if not text:
        return CallbackResult(error="nothing was pasted")
    if "://" in text or text.startswith(("?", "/")) or "code=" in text or "error=" in text:
        parts = urlsplit(text if "://" in text or text.startswith("/") else "/?" + text.lstrip("?"))
        query = parts.query or parts.fragment
        return _judge_query(query, state)
    code, sep, pasted_state = text.partition("#")
    if sep and not _same(pasted_state, state):
        return CallbackResult(error=_WRONG_STATE)
    if not code or any(c.isspace() for c in code):
        return CallbackResult(error="the pasted text is not an authorization code or redirect URL")
    return CallbackResult(code=code)


#: The page for a callback without this login's state (see :class:`Stray`).
STRAY_STATE = (
    "The state of this request does not match this login, so it was refused. "
    "The login is still waiting for the identity provider's redirect."
)

_WRONG_STATE = (
    "the redirect carried the wrong state (not the answer to this login; "
    "possibly a forged request): nothing was stored, run credproxy login again"
)


def _judge_query(query: str, state: str) -> CallbackResult:
    params = dict(parse_qsl(query, keep_blank_values=True))
    if "error" in params:
        code = oauth.error_code(params["error"])
        # The state is checked first so a forged page cannot put words in our mouth.
        if not _same(params.get("state", ""), state):
            return CallbackResult(error=_WRONG_STATE)
        hint = " (the login was declined)" if code == "access_denied" else ""
        return CallbackResult(error=f"the identity provider answered error {code}{hint}")
    if not _same(params.get("state", ""), state):
        return CallbackResult(error=_WRONG_STATE)
    code = params.get("code", "")
    if not code:
        return CallbackResult(error="the redirect carried no authorization code")
    return CallbackResult(code=code)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


# -- the device authorization grant ----------------------------------------------------


def device_authorization_form(provider: Provider, pkce: Pkce | None = None) -> dict[str, str]:
    """The device authorization request (RFC 8628 3.1): ``client_id`` and ``scope``.

    With *pkce* (a provider with ``device_pkce``, as Qwen Code's), its S256
    challenge too. Sent as ``exchange_body`` says, like every request of a
    login (a form; JSON for copilot-api's device flow).
    """
    form = {"client_id": provider.client_id}
    if provider.scopes:
        form["scope"] = " ".join(provider.scopes)
    if pkce is not None:
        form["code_challenge"] = pkce.challenge
        form["code_challenge_method"] = "S256"
    return form


def device_token_form(
    provider: Provider, device_code: str, pkce: Pkce | None = None
) -> dict[str, str]:
    """One poll of the token endpoint (RFC 8628 3.4), without the client secret.

    With *pkce*, its verifier on every poll. Sent as ``exchange_body`` says.
    """
    form = {
        "grant_type": DEVICE_GRANT_TYPE,
        "client_id": provider.client_id,
        "device_code": device_code,
    }
    if pkce is not None:
        form["code_verifier"] = pkce.verifier
    return form


@dataclass(frozen=True)
class DeviceAuthorization:
    """The device authorization response (RFC 8628 3.2). ``repr`` hides the device code."""

    device_code: str = field(repr=False)
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    interval: float
    expires_at: float


def parse_device_authorization(status: int, body: bytes, now: float) -> DeviceAuthorization:
    """Judge the device authorization response; *now* is when the request was sent.

    Raises:
        LoginFailed: not a 200 with the required fields (the message names the
            HTTP status, the OAuth error code or the missing field only).
    """
    payload = oauth.json_object(body)
    if status != 200 or payload is None:
        code = oauth.error_code(payload.get("error") if payload else None)
        where = f"HTTP {status}" + (f", error {code}" if code else "")
        raise LoginFailed(f"the device authorization endpoint answered {where}")
    # Google spells it verification_url (an early draft of RFC 8628 did too).
    payload.setdefault("verification_uri", payload.get("verification_url"))
    for key in ("device_code", "user_code", "verification_uri"):
        value = payload.get(key)
        if not isinstance(value, str) or not value:
            raise LoginFailed(f"the device authorization response has no usable {key}")
    user_code = payload["user_code"]
    if len(user_code) > _MAX_USER_CODE or not user_code.isprintable():
        raise LoginFailed("the device authorization response has an unusable user_code")
    uri = _web_url(payload["verification_uri"], "verification_uri")
    complete = payload.get("verification_uri_complete")
    complete = _web_url(complete, "verification_uri_complete") if complete else None
    expires_in = oauth.seconds_value(payload.get("expires_in"))
    if expires_in is None or expires_in <= 0:
        raise LoginFailed("the device authorization response has no usable expires_in")
    interval = payload.get("interval")
    seconds = DEFAULT_INTERVAL if interval is None else oauth.seconds_value(interval)
    if seconds is None:
        raise LoginFailed("the device authorization response has an invalid interval")
    return DeviceAuthorization(
        device_code=payload["device_code"],
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete,
        interval=max(seconds, MIN_INTERVAL),
        expires_at=now + expires_in,
    )


def _web_url(value: object, key: str) -> str:
    # Shown to the person and maybe opened in a browser: http(s) only, one line.
    if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
        raise LoginFailed(f"the device authorization response has an unusable {key}")
    if not value.isprintable():
        raise LoginFailed(f"the device authorization response has an unusable {key}")
    return value


@dataclass(frozen=True)
class Poll:
    """Poll the token endpoint again after *after* seconds."""

    after: float


@dataclass(frozen=True)
class Done:
    """The login succeeded; *token* is ready for the store. ``repr`` hides it."""

    token: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Failed:
    """The login failed; *reason* is one line for the person."""

    reason: str


Decision = Poll | Done | Failed


class DeviceFlow:
    """The polling state machine of RFC 8628 section 3.4 and 3.5 (see the module docstring)."""

    def __init__(self, authorization: DeviceAuthorization) -> None:
        self.interval = authorization.interval
        self.expires_at = authorization.expires_at
        self.polls = 0
        self.transport_errors = 0
        self.finished: Done | Failed | None = None

    def __repr__(self) -> str:
        done = self.finished
        return f"<DeviceFlow interval={self.interval:g} polls={self.polls} finished={done}>"

    def start(self, now: float) -> Decision:
        """The first decision: wait one interval, then poll."""
        return self._next_poll(now)

    def on_response(self, status: int, body: bytes, now: float) -> Decision:
        """Judge one token endpoint answer received at *now*."""
        self._check_open()
        self.polls += 1
        payload = oauth.json_object(body)
        if (status >= 500 or status == 429) and (payload is None or "error" not in payload):
            # A busy or failing endpoint, not an answer about this login: polled
            # again, as a network error is, up to MAX_TRANSPORT_ERRORS in a row.
            return self.on_transport_error(f"the token endpoint answered HTTP {status}", now)
        self.transport_errors = 0
        if payload is not None and "access_token" in payload:
            try:
                token = parse_token_response(status, body, now)
            except LoginFailed as exc:
                return self._finish(Failed(str(exc)))
            return self._finish(Done(token))
        error = payload.get("error") if payload is not None else None
        # GitHub answers these with HTTP 200; RFC 8628 says 400. Judge the code.
        if error == "authorization_pending":
            return self._next_poll(now)
        if error == "slow_down":
            self.interval += SLOW_DOWN_STEP
            return self._next_poll(now)
        if error == "access_denied":
            return self._finish(Failed("the login was denied at the identity provider"))
        if error == "expired_token":
            return self._finish(
                Failed("the device code expired before the login was approved; run it again")
            )
        code = oauth.error_code(error)
        where = f"HTTP {status}" + (f", error {code}" if code else "")
        return self._finish(Failed(f"the token endpoint answered {where}"))

    def on_transport_error(self, reason: str, now: float) -> Decision:
        """A poll could not reach the endpoint (*reason* names the failure, not a secret)."""
        self._check_open()
        self.transport_errors += 1
        if self.transport_errors >= MAX_TRANSPORT_ERRORS:
            return self._finish(Failed(f"{reason} ({self.transport_errors} times in a row)"))
        return self._next_poll(now)

    def _next_poll(self, now: float) -> Decision:
        if now + self.interval >= self.expires_at:
            return self._finish(
                Failed("the device code expired before the login was approved; run it again")
            )
        return Poll(self.interval)

    def _finish(self, decision: Done | Failed) -> Decision:
        self.finished = decision
        return decision

    def _check_open(self) -> None:
        if self.finished is not None:
            raise RuntimeError("the device flow has already finished")


# -- token responses of the code and device grants ----------------------------------------


def parse_token_response(status: int, body: bytes, now: float) -> dict[str, Any]:
    """The token from a code or device grant answer; *now* is when the request was sent.

    A usable answer is parsed by :func:`credproxy.core.oauth.parse_refresh_response`,
    so ``expires_in`` becomes ``expiry`` exactly as for a refresh.

    Raises:
        LoginFailed: naming the HTTP status and the OAuth error code only.
    """
    payload = oauth.json_object(body)
    if status == 200 and payload is not None and "access_token" in payload:
        try:
            return oauth.parse_refresh_response(status, body, now)
        except CredproxyError as exc:
            raise LoginFailed(str(exc)) from None
    code = oauth.error_code(payload.get("error") if payload is not None else None)
    where = f"HTTP {status}" + (f", error {code}" if code else "")
    hint = ""
    if code == "invalid_grant":
        hint = " (the code was refused: expired, used already, or the PKCE check failed)"
    elif code == "invalid_client" or status == 401:
        hint = " (check client_id and client_secret_file)"
    elif status == 200 and payload is None:
        hint = " with no JSON object"
    raise LoginFailed(f"the token endpoint answered {where}{hint}")
