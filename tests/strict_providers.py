"""Strict development providers: one per preset, as picky as the real provider about its own client.

Each class here is an OAuth server on 127.0.0.1 that accepts only what the
provider's *own* client sends, written from that client's source (not from
credproxy's code): the encoding (form or JSON), the exact set of fields (a
missing or an unexpected one is refused), and the values (client id, grant
type, the scope string exactly, the redirect URI of the authorization request,
PKCE S256, the state). Anything else is answered as a real server would:
HTTP 400 with ``{"error": "invalid_request", "error_description": RULES}``,
where RULES says which rules the request broke (all of them, joined by "; ").

Sources of the facts (pinned commits):

- Codex: openai/codex ``codex-rs/login/src/server.rs`` and ``manager.rs`` @250de82b;
  the refresh's ``originator`` header from ``codex-rs/login/src/auth/default_client.rs``
  (``default_headers`` of the ``create_client()`` the refresh is sent with), read at 0157182c.
- Gemini CLI: google-gemini/gemini-cli ``packages/core/src/code_assist/oauth2.ts``
  @5411f113 and google-auth-library ``oauth2client.ts`` (10.5.0 to 10.6.2).
- Qwen Code: QwenLM/qwen-code ``packages/core/src/qwen/qwenOAuth2.ts`` @0231fe43.
- Claude Code: ``cli.js`` of ``@anthropic-ai/claude-code`` 2.1.112 (the OAuth
  constants, the authorization URL, the JSON code exchange with ``state``, the
  JSON refresh); the scopes from 2.1.332, the JavaScript bundled in the native
  binary of ``@anthropic-ai/claude-code-linux-x64`` 2.1.332 (``allOAuthScopes``,
  ``claudeAiLoginScopes``, ``firstPartyRefreshScopes``, ``preservableScopesFrom``).
- Copilot: ericc-ch/copilot-api @0ea08feb (``get-device-code.ts``,
  ``poll-access-token.ts``, ``get-copilot-token.ts``, ``api-config.ts``) and
  GitHub's device flow as GitHub documents it.

Every request is recorded (:attr:`StrictProvider.requests`) with the verdict,
so a test can assert both "nothing was refused" and "the request looked
exactly like this". Adding a provider is one more subclass of
:class:`AuthCodeProvider` or :class:`DeviceProvider` that states its facts as
class attributes.

The tokens, codes and secrets issued contain ``CANARY`` so a test can assert
that none of them reaches a terminal.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
PKCE_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 §4.1
_serial = itertools.count(1)


def s256(verifier: str) -> str:
    """The S256 code challenge of *verifier*: base64url(sha256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def canary(kind: str) -> str:
    """A unique fake secret that says what it is (and contains ``CANARY``)."""
    return f"{kind}-CANARY-{next(_serial)}-{secrets.token_hex(6)}"


@dataclass
class Seen:
    """One request the provider received, and what it answered."""

    endpoint: str  # authorize, exchange, refresh, device, poll, or unknown
    method: str
    path: str
    content_type: str  # the media type, without parameters ("" when absent)
    fields: dict[str, str]  # query (authorize) or body fields
    status: int = 0
    problems: list[str] = field(default_factory=list)
    #: The request headers, names in lower case (may hold a secret: never printed).
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return bool(self.problems)


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of a provider."""

    name: str  # what :attr:`Seen.endpoint` says of a request to it
    method: str
    path: str
    key: str  # the provider table's key for its URL


class Checks:
    """Collects the rules one request breaks (all of them, for a readable refusal)."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, rule: str) -> None:
        self.problems.append(rule)

    def encoding(self, seen: Seen, expected: str | tuple[str, ...]) -> None:
        allowed = (expected,) if isinstance(expected, str) else expected
        if seen.content_type not in allowed:
            self.fail(
                f"Content-Type must be {' or '.join(allowed)}, got {seen.content_type or 'none'}"
            )

    def exact_fields(
        self, fields: dict[str, str], required: Iterable[str], optional: Iterable[str] = ()
    ) -> None:
        required, optional = set(required), set(optional)
        for name in sorted(required - fields.keys()):
            self.fail(f"missing field {name}")
        for name in sorted(fields.keys() - required - optional):
            self.fail(f"unexpected field {name}")

    def value(self, fields: dict[str, str], name: str, expected: str, secret: bool = False) -> None:
        if name in fields and fields[name] != expected:
            if secret:  # never echo a secret into an answer the client may print
                self.fail(f"{name} is wrong")
            else:
                self.fail(f"{name} must be {expected!r}, got {fields[name]!r}")

    def nonempty(self, fields: dict[str, str], *names: str) -> None:
        for name in names:
            if name in fields and not fields[name]:
                self.fail(f"{name} must not be empty")

    def s256_challenge(self, challenge: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge):
            self.fail("code_challenge must be an S256 challenge (43 base64url characters)")

    def loopback_redirect(self, uri: str, host: str, path: str) -> None:
        """*uri* must be ``http://HOST:<port>PATH``, with no query or fragment."""
        parts = urlsplit(uri)
        try:
            port = parts.port
        except ValueError:
            port = None
        if (
            parts.scheme != "http"
            or parts.hostname != host
            or port is None
            or parts.path != path
            or parts.query
            or parts.fragment
        ):
            self.fail(f"redirect_uri must be http://{host}:<port>{path}, got {uri!r}")

    def pkce(self, verifier: str | None, challenge: str | None) -> None:
        if verifier is None or challenge is None:
            return  # a missing field is reported by exact_fields
        if not PKCE_VERIFIER.fullmatch(verifier):
            self.fail("code_verifier must be 43 to 128 unreserved characters (RFC 7636)")
        elif s256(verifier) != challenge:
            self.fail("code_verifier does not match the S256 code_challenge")


class Refused(Exception):
    def __init__(self, problems: list[str], error: str = "invalid_request") -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.error = error


def parse_body(seen: Seen, body: bytes) -> dict[str, str]:
    """The fields of a form or JSON body, whichever the Content-Type says; refuses others.

    A repeated form field or a JSON value that is not a string is refused:
    no client under test sends one.
    """
    text = body.decode("utf-8", errors="replace")
    if seen.content_type == FORM:
        pairs = parse_qsl(text, keep_blank_values=True)
        fields = dict(pairs)
        if len(fields) != len(pairs):
            raise Refused(["a form field is repeated"])
        return fields
    if seen.content_type == JSON:
        try:
            obj = json.loads(text)
        except ValueError:
            raise Refused(["body is not JSON"]) from None
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise Refused(["body must be a JSON object of strings"])
        return obj
    raise Refused([f"Content-Type must be {FORM} or {JSON}, got {seen.content_type or 'none'}"])


class StrictProvider:
    """The server part: routes, records, refuses. Subclasses state the facts.

    Use as a context manager (the server thread is stopped and its socket
    closed on exit).
    """

    name: ClassVar[str]  # the preset name
    client_id: ClassVar[str]
    token_path: ClassVar[str]
    #: The token response's extra fields, or other values for its own (type, expires_in).
    token_extras: ClassVar[dict[str, Any]] = {}
    #: How the provider's own client sends a refresh, and whether the answer rotates it.
    refresh_encoding: ClassVar[str] = FORM
    rotates: ClassVar[bool] = True
    #: The exact scope string the client's refresh carries (None: the refresh has no scope).
    refresh_scope: ClassVar[str | None] = None
    #: Whether the server keeps the scope it granted with each refresh token and names it
    #: in its token answers (``scope``): what the login asked for, then what each refresh did.
    keeps_grants: ClassVar[bool] = False
    #: The HTTP status of an RFC 8628 poll error such as authorization_pending.
    pending_status: ClassVar[int] = 400

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.lock = threading.Lock()
        self.refresh_tokens: set[str] = set()
        #: The scope granted with each refresh token, where the server says (see token_response).
        self.granted: dict[str, str] = {}
        self.issued: list[dict[str, Any]] = []  # every token response, in order
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # -- lifecycle and addresses ------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def netloc(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    @property
    def base(self) -> str:
        return f"http://{self.netloc}"

    def url(self, path: str) -> str:
        return self.base + path

    def config_toml(self, **extra: str) -> str:
        """The provider table: the preset, this server's endpoints, and *extra* keys."""
        lines = [f"[providers.{self.name}]", f'preset = "{self.name}"']
        lines += [f'{e.key} = "{self.url(e.path)}"' for e in self.endpoints()]
        lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
        return "\n".join(lines) + "\n"

    # -- what tests read ----------------------------------------------------------------

    def seen(self, endpoint: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    def only(self, endpoint: str) -> Seen:
        """The one request to *endpoint* (asserts there was exactly one)."""
        got = self.seen(endpoint)
        assert len(got) == 1, f"expected one {endpoint} request, got {self.describe()}"
        return got[0]

    @property
    def refusals(self) -> list[str]:
        """``endpoint: rules`` of every refused request (empty when all were right)."""
        with self.lock:
            return [f"{r.endpoint}: {'; '.join(r.problems)}" for r in self.requests if r.refused]

    def describe(self) -> list[str]:
        with self.lock:
            return [
                f"{r.method} {r.path} [{r.endpoint}] {r.content_type or '-'} "
                f"fields={sorted(r.fields)} -> {r.status} {'; '.join(r.problems)}"
                for r in self.requests
            ]

    def wait_for(self, endpoint: str, count: int = 1, timeout: float = 15) -> list[Seen]:
        deadline = time.monotonic() + timeout
        while len(got := self.seen(endpoint)) < count:
            assert time.monotonic() < deadline, f"no {endpoint} request: {self.describe()}"
            time.sleep(0.02)
        return got

    def seed_refresh_token(self, granted: str | None = None) -> str:
        """A refresh token this provider will accept (as if it had issued it earlier).

        *granted*: the scope its login was granted, where the provider keeps one.
        """
        token = canary(f"rt-{self.name}")
        with self.lock:
            self.refresh_tokens.add(token)
            if granted is not None:
                self.granted[token] = granted
        return token

    # -- answers ------------------------------------------------------------------------

    def token_response(
        self, *, with_refresh_token: bool = True, granted: str | None = None
    ) -> dict[str, Any]:
        """A token answer; with *granted*, it names that scope and the server keeps it with the refresh token."""
        answer: dict[str, Any] = {
            "access_token": canary(f"at-{self.name}"),
            "token_type": "Bearer",
            "expires_in": 3600,
            **self.token_extras,
        }
        if granted is not None:
            answer["scope"] = granted
        with self.lock:
            if with_refresh_token:
                answer["refresh_token"] = canary(f"rt-{self.name}")
                self.refresh_tokens.add(answer["refresh_token"])
                if granted is not None:
                    self.granted[answer["refresh_token"]] = granted
            self.issued.append(answer)
        return answer

    def refresh(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        checks = Checks()
        checks.encoding(seen, self.refresh_encoding)
        self.check_refresh_headers(checks, seen)
        scope = self.refresh_scope_for(seen.fields.get("refresh_token", ""))
        checks.exact_fields(seen.fields, self.refresh_fields(with_scope=scope is not None))
        self.check_client(checks, seen.fields)
        checks.value(seen.fields, "grant_type", "refresh_token")
        if scope is not None:
            checks.value(seen.fields, "scope", scope)
        if checks.problems:
            raise Refused(checks.problems)
        with self.lock:
            known = seen.fields["refresh_token"] in self.refresh_tokens
        if not known:
            raise Refused(["unknown refresh token"], "invalid_grant")
        granted = seen.fields.get("scope") if self.keeps_grants else None
        return 200, {}, self.token_response(with_refresh_token=self.rotates, granted=granted)

    def refresh_scope_for(self, refresh_token: str) -> str | None:
        """The exact scope the client's refresh of *refresh_token* carries (None: no scope)."""
        return self.refresh_scope

    def refresh_fields(self, with_scope: bool) -> set[str]:
        fields = {"grant_type", "refresh_token", "client_id"}
        return fields | {"scope"} if with_scope else fields

    def check_client(self, checks: Checks, fields: dict[str, str]) -> None:
        """Client authentication in a token request (client_id; a secret where there is one)."""
        checks.value(fields, "client_id", self.client_id)

    def check_headers(self, checks: Checks, seen: Seen) -> None:
        """Headers the provider insists on in the device flow (none by default)."""

    def check_refresh_headers(self, checks: Checks, seen: Seen) -> None:
        """Headers the client sends with a refresh, which the provider insists on (none by default)."""

    # -- routing ------------------------------------------------------------------------

    #: The kind of a token endpoint request, by its grant_type (any other: ``token``, refused).
    grant_kinds: ClassVar[dict[str, str]] = {"refresh_token": "refresh"}

    def endpoints(self) -> list[Endpoint]:
        """This server's endpoints, in the order of the provider table's keys."""
        return [Endpoint("token", "POST", self.token_path, "token_url")]

    def route(self, method: str, path: str) -> str:
        """The endpoint name for a request line, or ``unknown``."""
        routes = {(e.method, e.path): e.name for e in self.endpoints()}
        return routes.get((method, path), "unknown")

    def handle(self, seen: Seen, query: str, body: bytes) -> tuple[int, dict[str, str], Any]:
        """Answer one request: (status, extra headers, JSON answer or None)."""
        if seen.endpoint == "token":
            seen.fields = parse_body(seen, body)
            seen.endpoint = self.token_endpoint_kind(seen.fields)
            handler = getattr(self, seen.endpoint, None) if seen.endpoint != "token" else None
            if handler is None:
                raise Refused(
                    [f"unsupported grant_type {seen.fields.get('grant_type')!r}"],
                    "unsupported_grant_type",
                )
            result: tuple[int, dict[str, str], Any] = handler(seen)
            return result
        raise Refused([f"no such endpoint: {seen.method} {seen.path}"])

    def token_endpoint_kind(self, fields: dict[str, str]) -> str:
        return self.grant_kinds.get(fields.get("grant_type", ""), "token")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so no connection outlives a test.
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                endpoint = provider.route(self.command, parts.path)
                seen = Seen(endpoint, self.command, parts.path, ctype, {})
                seen.headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    status, headers, answer = provider.handle(seen, parts.query, body)
                except Refused as refused:
                    seen.problems = refused.problems
                    status, headers = 400, {}
                    answer = {"error": refused.error, "error_description": str(refused)}
                except Pending as pending:
                    status, headers = provider.pending_status, {}
                    answer = {"error": pending.error}
                seen.status = status
                with provider.lock:
                    provider.requests.append(seen)
                data = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if answer is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


class Pending(Exception):
    """A device-flow poll that is answered with an RFC 8628 error (not a refusal)."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


# -- authorization code (+ PKCE) with a loopback redirect ---------------------------------


@dataclass
class Grant:
    """What an authorization request asked for, bound to the code it got."""

    client_id: str
    redirect_uri: str
    challenge: str | None
    state: str | None = None
    scope: str | None = None
    used: bool = False


class AuthCodeProvider(StrictProvider):
    """A provider whose client logs in with the authorization-code grant and a loopback redirect.

    The authorize endpoint checks the query and answers 302 to the redirect
    URI with ``code`` and the ``state`` (or 400 with the rules broken); the
    token endpoint checks the exchange against what the authorization asked.
    """

    authorize_path: ClassVar[str]
    #: Parameters whose value is fixed by the client.
    authorize_fixed: ClassVar[dict[str, str]]
    #: Parameters the client always sends with a value of its own (state, redirect_uri, ...).
    authorize_free: ClassVar[frozenset[str]]
    #: Parameters the server allows but the client need not send.
    authorize_optional: ClassVar[frozenset[str]] = frozenset()
    exchange_encoding: ClassVar[str] = FORM
    pkce_required: ClassVar[bool] = True
    #: Whether the client sends the authorization request's ``state`` in the code exchange.
    exchange_state: ClassVar[bool] = False
    grant_kinds = {**StrictProvider.grant_kinds, "authorization_code": "exchange"}

    def __init__(self) -> None:
        super().__init__()
        self.grants: dict[str, Grant] = {}

    def endpoints(self) -> list[Endpoint]:
        authorize = Endpoint("authorize", "GET", self.authorize_path, "authorization_url")
        return [*super().endpoints(), authorize]

    def check_redirect_uri(self, checks: Checks, uri: str) -> None:
        raise NotImplementedError

    def authorize_problems(self, url: str) -> list[str]:
        """Every rule the authorization URL *url* breaks (host and path, then each parameter)."""
        checks = Checks()
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc, parts.path) != ("http", self.netloc, self.authorize_path):
            checks.fail(f"authorization URL must be {self.url(self.authorize_path)}, got {url}")
        self._check_query(checks, parts.query)
        return checks.problems

    def _check_query(self, checks: Checks, query: str) -> dict[str, str]:
        pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(pairs)
        if len(params) != len(pairs):
            checks.fail("a parameter is repeated")
        self._check_authorize(checks, params)
        return params

    def _check_authorize(self, checks: Checks, params: dict[str, str]) -> None:
        pkce = {"code_challenge", "code_challenge_method"}
        optional = set(self.authorize_optional)
        if not self.pkce_required:
            optional |= pkce
        checks.exact_fields(params, {*self.authorize_fixed, *self.authorize_free}, optional)
        for name, expected in self.authorize_fixed.items():
            checks.value(params, name, expected)
        checks.nonempty(params, *self.authorize_free)
        if "redirect_uri" in params:
            self.check_redirect_uri(checks, params["redirect_uri"])
        if not self.pkce_required and len(pkce & params.keys()) == 1:
            checks.fail("code_challenge and code_challenge_method go together")
        if "code_challenge_method" in params and "code_challenge" in params:
            checks.value(params, "code_challenge_method", "S256")
            checks.s256_challenge(params["code_challenge"])

    def handle(self, seen: Seen, query: str, body: bytes) -> tuple[int, dict[str, str], Any]:
        if seen.endpoint == "authorize":
            checks = Checks()
            seen.fields = self._check_query(checks, query)
            if checks.problems:
                raise Refused(checks.problems)
            return self.authorize(seen.fields)
        return super().handle(seen, query, body)

    def authorize(self, params: dict[str, str]) -> tuple[int, dict[str, str], Any]:
        """A right authorization request: the person approves, the browser is sent back."""
        code = canary(f"code-{self.name}")
        with self.lock:
            self.grants[code] = Grant(
                params["client_id"],
                params["redirect_uri"],
                params.get("code_challenge"),
                params.get("state"),
                params.get("scope"),
            )
        query = urlencode({"code": code, "state": params["state"]})
        return 302, {"Location": f"{params['redirect_uri']}?{query}"}, None

    def redirect_for(self, params: dict[str, str]) -> str:
        """Where the browser is sent for an authorization request with *params*, unchecked.

        For a test of the code exchange on its own: the code is bound to the
        request's client_id, redirect_uri and code_challenge as they are.
        """
        location: str = self.authorize(params)[1]["Location"]
        return location

    def exchange(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        fields = seen.fields
        checks = Checks()
        checks.encoding(seen, self.exchange_encoding)
        with self.lock:
            grant = self.grants.get(fields.get("code", ""))
            used = grant is not None and grant.used
            if grant is not None:
                grant.used = True  # a code is good for one try, right or wrong
        with_verifier = grant is not None and grant.challenge is not None
        checks.exact_fields(fields, self.exchange_fields(with_verifier))
        self.check_client(checks, fields)
        checks.value(fields, "grant_type", "authorization_code")
        if grant is None or used:
            why = (
                "unknown authorization code" if grant is None else "authorization code already used"
            )
            raise Refused([*checks.problems, why], "invalid_grant")
        checks.value(fields, "redirect_uri", grant.redirect_uri)
        if self.exchange_state:
            checks.value(fields, "state", grant.state or "")
        if with_verifier:
            checks.pkce(fields.get("code_verifier"), grant.challenge)
        if checks.problems:
            raise Refused(checks.problems)
        granted = grant.scope if self.keeps_grants else None
        return 200, {}, self.token_response(granted=granted)

    def exchange_fields(self, with_verifier: bool) -> set[str]:
        """The exact fields of the code exchange."""
        fields = {"grant_type", "code", "redirect_uri", "client_id"}
        if self.exchange_state:
            fields.add("state")
        return fields | {"code_verifier"} if with_verifier else fields


# -- the device authorization grant (RFC 8628) ------------------------------------------


@dataclass
class DeviceGrant:
    device_code: str
    user_code: str
    challenge: str | None
    approved: bool = False
    done: bool = False


class DeviceProvider(StrictProvider):
    """A provider whose client logs in with the device flow.

    Polls are answered ``authorization_pending`` until the test calls
    :meth:`approve` with the user code credproxy printed.
    """

    device_path: ClassVar[str]
    device_encoding: ClassVar[str | tuple[str, ...]] = FORM
    scope: ClassVar[str]  # the scope the client's device authorization asks for
    device_free: ClassVar[frozenset[str]] = frozenset()
    poll_encoding: ClassVar[str | tuple[str, ...]] = FORM
    pkce_required: ClassVar[bool] = False
    interval: ClassVar[int] = 1
    verification_uri: ClassVar[str] = "https://provider.invalid/device"
    grant_kinds = {
        **StrictProvider.grant_kinds,
        "urn:ietf:params:oauth:grant-type:device_code": "poll",
    }

    def __init__(self) -> None:
        super().__init__()
        self.devices: dict[str, DeviceGrant] = {}
        self._user_codes = itertools.count(1)

    def endpoints(self) -> list[Endpoint]:
        device = Endpoint("device", "POST", self.device_path, "device_authorization_url")
        return [device, *super().endpoints()]

    @property
    def device_fixed(self) -> dict[str, str]:
        """The device authorization's fields whose value is fixed by the client."""
        return {"client_id": self.client_id, "scope": self.scope}

    def approve(self, user_code: str) -> None:
        """The person enters *user_code* and approves."""
        with self.lock:
            match = [d for d in self.devices.values() if d.user_code == user_code]
            assert match, f"no device authorization with user code {user_code!r}"
            match[0].approved = True

    def handle(self, seen: Seen, query: str, body: bytes) -> tuple[int, dict[str, str], Any]:
        if seen.endpoint == "device":
            seen.fields = parse_body(seen, body)
            return self.device(seen)
        return super().handle(seen, query, body)

    def device(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        fields = seen.fields
        checks = Checks()
        checks.encoding(seen, self.device_encoding)
        self.check_headers(checks, seen)
        pkce = {"code_challenge", "code_challenge_method"} if self.pkce_required else set()
        checks.exact_fields(fields, {*self.device_fixed, *self.device_free, *pkce})
        for name, expected in self.device_fixed.items():
            checks.value(fields, name, expected)
        checks.nonempty(fields, *self.device_free)
        if pkce:
            checks.value(fields, "code_challenge_method", "S256")
            checks.s256_challenge(fields.get("code_challenge", ""))
        if checks.problems:
            raise Refused(checks.problems)
        n = next(self._user_codes)
        grant = DeviceGrant(
            canary(f"dc-{self.name}"), f"WXYZ-{n:04d}", fields.get("code_challenge")
        )
        with self.lock:
            self.devices[grant.device_code] = grant
        return 200, {}, self.device_answer(grant)

    def device_answer(self, grant: DeviceGrant) -> dict[str, Any]:
        return {
            "device_code": grant.device_code,
            "user_code": grant.user_code,
            "verification_uri": self.verification_uri,
            "verification_uri_complete": f"{self.verification_uri}?user_code={grant.user_code}",
            "expires_in": 300,
            "interval": self.interval,
        }

    def poll_fields(self) -> set[str]:
        fields = {"grant_type", "client_id", "device_code"}
        return fields | {"code_verifier"} if self.pkce_required else fields

    def poll(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        fields = seen.fields
        checks = Checks()
        checks.encoding(seen, self.poll_encoding)
        self.check_headers(checks, seen)
        checks.exact_fields(fields, self.poll_fields())
        self.check_client(checks, fields)
        with self.lock:
            grant = self.devices.get(fields.get("device_code", ""))
        if grant is None:
            raise Refused([*checks.problems, "unknown device code"], "invalid_grant")
        if self.pkce_required:
            checks.pkce(fields.get("code_verifier"), grant.challenge)
        if checks.problems:
            raise Refused(checks.problems)
        with self.lock:
            if grant.done:
                raise Refused(["device code already used"], "invalid_grant")
            if not grant.approved:
                raise Pending("authorization_pending")
            grant.done = True
        return 200, {}, self.token_response()


# -- the providers --------------------------------------------------------------------


class Codex(AuthCodeProvider):
    """OpenAI's auth server as the Codex CLI uses it (codex-rs/login @250de82b)."""

    name = "codex"
    client_id = "app_EMoamEEZ73f0CkXaXp7hrann"
    authorize_path = "/oauth/authorize"
    token_path = "/oauth/token"
    scope = "openid profile email offline_access api.connectors.read api.connectors.invoke"
    #: The registered redirect URIs: DEFAULT_PORT 1455, FALLBACK_PORT 1457.
    redirect_uris = (
        "http://localhost:1455/auth/callback",
        "http://localhost:1457/auth/callback",
    )
    authorize_fixed = {
        "response_type": "code",
        "client_id": client_id,
        "scope": scope,
        "code_challenge_method": "S256",
        "id_token_add_organizations": "true",
        "codex_cli_simplified_flow": "true",
        "originator": "codex_cli_rs",
    }
    authorize_free = frozenset({"redirect_uri", "code_challenge", "state"})
    exchange_encoding = FORM
    refresh_encoding = JSON  # manager.rs: RefreshRequest sent with .json(...)
    #: The header every request of Codex's default client carries (default_client.rs
    #: default_headers: DEFAULT_ORIGINATOR), the refresh among them.
    originator = "codex_cli_rs"

    def check_redirect_uri(self, checks: Checks, uri: str) -> None:
        if uri not in self.redirect_uris:
            checks.fail(f"redirect_uri must be one of {list(self.redirect_uris)}, got {uri!r}")

    def check_refresh_headers(self, checks: Checks, seen: Seen) -> None:
        got = seen.headers.get("originator")
        if got != self.originator:
            checks.fail(f"header originator must be {self.originator!r}, got {got!r}")

    def token_response(
        self, *, with_refresh_token: bool = True, granted: str | None = None
    ) -> dict[str, Any]:
        answer = super().token_response(with_refresh_token=with_refresh_token, granted=granted)
        # A fake, unsigned id_token of the shape the Codex client decodes.
        claims = {
            "email": "person@example.invalid",
            "https://api.openai.com/auth": {
                "chatgpt_account_id": "acct-fake-1",
                "chatgpt_plan_type": "plus",
            },
        }
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        answer["id_token"] = f"eyJhbGciOiJub25lIn0.{payload}.sig-CANARY"
        return answer


class Gemini(AuthCodeProvider):
    """Google's OAuth server as Gemini CLI uses it (oauth2.ts @5411f113, google-auth-library)."""

    name = "gemini"
    client_id = "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com"
    authorize_path = "/o/oauth2/v2/auth"
    token_path = "/token"
    scope = (
        "https://www.googleapis.com/auth/cloud-platform "
        "https://www.googleapis.com/auth/userinfo.email "
        "https://www.googleapis.com/auth/userinfo.profile"
    )
    authorize_fixed = {
        "access_type": "offline",
        "scope": scope,
        "response_type": "code",
        "client_id": client_id,
    }
    authorize_free = frozenset({"redirect_uri", "state"})
    pkce_required = False  # gemini-cli sends none; Google accepts S256 PKCE
    refresh_encoding = FORM
    rotates = False  # Google refresh tokens do not rotate
    token_extras = {"scope": scope}

    def __init__(self, client_secret: str) -> None:
        super().__init__()
        self.client_secret = client_secret

    def check_redirect_uri(self, checks: Checks, uri: str) -> None:
        checks.loopback_redirect(uri, "127.0.0.1", "/oauth2callback")

    def check_client(self, checks: Checks, fields: dict[str, str]) -> None:
        super().check_client(checks, fields)
        checks.value(fields, "client_secret", self.client_secret, secret=True)

    def exchange_fields(self, with_verifier: bool) -> set[str]:
        return super().exchange_fields(with_verifier) | {"client_secret"}

    def refresh_fields(self, with_scope: bool) -> set[str]:
        return super().refresh_fields(with_scope) | {"client_secret"}


class Qwen(DeviceProvider):
    """Qwen's OAuth server as Qwen Code uses it (qwenOAuth2.ts @0231fe43)."""

    name = "qwen"
    client_id = "f0304373b74a44d2b584a3fb70ca9e56"
    device_path = "/api/v1/oauth2/device/code"
    token_path = "/api/v1/oauth2/token"
    scope = "openid profile email model.completion"
    pkce_required = True
    verification_uri = "https://chat.qwen.ai/authorize"
    token_extras = {"resource_url": "portal.qwen.ai"}


class Claude(AuthCodeProvider):
    """Anthropic's OAuth server as Claude Code 2.1.332 uses it.

    Authorization at ``/cai/oauth/authorize`` (claude.com) with ``code=true``;
    the redirect is ``http://localhost:<port>/callback``; the code exchange and
    the refresh are JSON bodies (``Content-Type: application/json``), the
    exchange carrying the authorization request's ``state`` (all as in
    2.1.112's ``cli.js``).

    The scopes are 2.1.332's. The authorization asks for ``allOAuthScopes()``:
    the Console scopes and ``claudeAiLoginScopes()`` (the five Claude.ai scopes
    then ``user:plugins``) without duplicates, then
    ``user:privacy_consents:write``. A refresh asks for
    ``firstPartyRefreshScopes(granted)``: ``claudeAiLoginScopes()``, then those
    of ``user:projects:read``, ``user:projects:write`` and
    ``user:privacy_consents:write`` that the token's grant has
    (``preservableScopesFrom``), in the grant's order. The server keeps what
    it granted with each refresh token (the login: what it asked for; a
    refresh: what it asked for) and says it in ``scope``, where Claude Code
    reads the grant from. A refresh token seeded by a test was granted
    :attr:`seed_scope` unless the test says otherwise.
    """

    name = "claude"
    client_id = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    authorize_path = "/cai/oauth/authorize"
    token_path = "/v1/oauth/token"
    scope = (
        "org:create_api_key user:profile user:inference user:sessions:claude_code "
        "user:mcp_servers user:file_upload user:plugins user:privacy_consents:write"
    )
    #: claudeAiLoginScopes(): what every refresh asks for, before what the grant adds.
    refresh_scope = (
        "user:profile user:inference user:sessions:claude_code user:mcp_servers "
        "user:file_upload user:plugins"
    )
    #: preservableScopesFrom(): the scopes a refresh keeps when the token's grant has them.
    preservable = ("user:projects:read", "user:projects:write", "user:privacy_consents:write")
    #: The grant of a seeded refresh token: a login by Claude Code 2.1.112.
    seed_scope = (
        "org:create_api_key user:profile user:inference user:sessions:claude_code "
        "user:mcp_servers user:file_upload"
    )
    keeps_grants = True
    authorize_fixed = {
        "code": "true",
        "client_id": client_id,
        "response_type": "code",
        "scope": scope,
        "code_challenge_method": "S256",
    }
    authorize_free = frozenset({"redirect_uri", "code_challenge", "state"})
    exchange_encoding = JSON
    exchange_state = True
    refresh_encoding = JSON
    token_extras = {"expires_in": 28800}  # about 8 h

    def check_redirect_uri(self, checks: Checks, uri: str) -> None:
        checks.loopback_redirect(uri, "localhost", "/callback")

    def refresh_scope_for(self, refresh_token: str) -> str:
        """firstPartyRefreshScopes(grant of *refresh_token*), joined by spaces."""
        with self.lock:
            granted = self.granted.get(refresh_token, self.seed_scope).split()
        kept = [s for s in granted if s in self.preservable]
        return " ".join(dict.fromkeys([*self.refresh_scope.split(), *kept]))


class Copilot(DeviceProvider):
    """GitHub's device flow for Copilot's client, and Copilot's token exchange (copilot-api @0ea08feb).

    Device authorization and poll: ``client_id`` Iv1.b507a08c87ecfe98, scope
    ``read:user``, JSON bodies with ``Content-Type: application/json`` and
    ``Accept: application/json`` (``standardHeaders()`` and ``JSON.stringify``
    in get-device-code.ts and poll-access-token.ts; GitHub itself would take a
    form too, copilot-api never sends one); a pending poll is answered HTTP 200 with
    ``{"error": "authorization_pending"}``, the approved one with a GitHub
    token and no refresh token or expiry. The second exchange (``mint``) is a
    GET with ``Authorization: token <GitHub token>`` plus ``Editor-Version``,
    ``Editor-Plugin-Version``, ``User-Agent`` and
    ``X-Vscode-User-Agent-Library-Version: electron-fetch`` (``githubHeaders``
    in api-config.ts); anything else is answered 401
    ``{"message": "Bad credentials"}`` (the rules broken are recorded, not
    sent). Each mint issues a new Copilot token valid 30 minutes. GitHub has no
    refresh grant for this client: a ``refresh_token`` grant is refused.
    """

    name = "copilot"
    client_id = "Iv1.b507a08c87ecfe98"
    device_path = "/login/device/code"
    token_path = "/login/oauth/access_token"
    mint_path = "/copilot_internal/v2/token"
    scope = "read:user"
    device_encoding = JSON
    poll_encoding = JSON
    pkce_required = False
    pending_status = 200  # GitHub answers every device-flow error with HTTP 200
    verification_uri = "https://github.com/login/device"
    mint_headers = ("Editor-Version", "Editor-Plugin-Version", "User-Agent")
    #: Mint headers whose value is fixed by the client.
    mint_fixed = {"X-Vscode-User-Agent-Library-Version": "electron-fetch"}
    api = "https://api.individual.githubcopilot.com"

    def __init__(self) -> None:
        super().__init__()
        self.github_tokens: set[str] = set()
        self.minted: list[dict[str, Any]] = []  # every mint answer, in order

    def endpoints(self) -> list[Endpoint]:
        return [*super().endpoints(), Endpoint("mint", "GET", self.mint_path, "mint_url")]

    def handle(self, seen: Seen, query: str, body: bytes) -> tuple[int, dict[str, str], Any]:
        if seen.endpoint == "mint":
            return self.mint(seen)
        return super().handle(seen, query, body)

    def check_headers(self, checks: Checks, seen: Seen) -> None:
        accept = [v.split(";")[0].strip() for v in seen.headers.get("accept", "").split(",")]
        if "application/json" not in accept:
            checks.fail("Accept must include application/json (else GitHub answers a form)")

    def device_answer(self, grant: DeviceGrant) -> dict[str, Any]:
        return {
            "device_code": grant.device_code,
            "user_code": grant.user_code,
            "verification_uri": self.verification_uri,
            "expires_in": 900,
            "interval": self.interval,
        }

    def token_response(
        self, *, with_refresh_token: bool = True, granted: str | None = None
    ) -> dict[str, Any]:
        """A GitHub token: long-lived, no refresh token, no expiry."""
        answer = {
            "access_token": canary("ghu_copilot"),
            "token_type": "bearer",
            "scope": "read:user",
        }
        with self.lock:
            self.github_tokens.add(answer["access_token"])
            self.issued.append(answer)
        return answer

    def refresh(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        raise Refused(
            ["this client's GitHub token has no refresh grant: mint a Copilot token with it"],
            "unsupported_grant_type",
        )

    def seed_refresh_token(self, granted: str | None = None) -> str:
        """A GitHub token this provider knows (as if a device login had issued it earlier)."""
        token = canary("ghu_seed")
        with self.lock:
            self.github_tokens.add(token)
        return token

    @property
    def github_token(self) -> str:
        """The GitHub token of the last device login."""
        token: str = self.issued[-1]["access_token"]
        return token

    def revoke(self, github_token: str) -> None:
        """The person revokes the GitHub login (or loses Copilot): mints with it get 401."""
        with self.lock:
            self.github_tokens.discard(github_token)

    def mint(self, seen: Seen) -> tuple[int, dict[str, str], Any]:
        checks = Checks()
        scheme, _, credential = seen.headers.get("authorization", "").partition(" ")
        with self.lock:
            known = credential in self.github_tokens
        if scheme != "token":
            checks.fail(f"Authorization must be 'token <GitHub token>', got scheme {scheme!r}")
        elif not known:
            checks.fail("unknown or revoked GitHub token")
        for name in self.mint_headers:
            if not seen.headers.get(name.lower()):
                checks.fail(f"missing header {name}")
        for name, expected in self.mint_fixed.items():
            got = seen.headers.get(name.lower())
            if got != expected:
                checks.fail(f"header {name} must be {expected!r}, got {got!r}")
        if checks.problems:
            seen.problems = checks.problems
            return 401, {}, {"message": "Bad credentials"}
        expires_at = int(time.time()) + 1800
        answer = {
            "token": f"tid={canary('copilot')};exp={expires_at};sku=free_limited_copilot",
            "expires_at": expires_at,
            "refresh_in": 1500,
            "endpoints": {"api": self.api},
        }
        with self.lock:
            self.minted.append(answer)
        return 200, {}, answer
