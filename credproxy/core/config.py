"""The configuration file: msgspec structs decoded from TOML.

A bad file is refused as a whole with a :class:`~credproxy.errors.ConfigError`
that names the file, the line and the field, so the daemon never starts on a
half-understood configuration. A missing file means "all defaults".
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import SplitResult, urlsplit

import msgspec

from credproxy.core.names import DEFAULT_BUCKET, NAME_RULE, is_name
from credproxy.errors import ConfigError

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class Api(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The API behind a provider, for the HTTP proxy on session sockets.

    ``http://credproxy/PROVIDER[:BUCKET]/REST`` from a sandbox goes to
    ``base_url`` + ``/REST`` with ``headers`` added: each value is a template
    where ``{access_token}``, ``{token_type}`` or any other stored token field
    (never the refresh token), and ``{key:NAME}`` (an API key the session is
    granted), are filled in outside the sandbox. A header named here replaces
    the sandbox's copy; ``{client}`` in its value stands for the sandbox's own
    value (a list header such as ``anthropic-beta = "oauth-2025-04-20,{client}"``
    keeps the client's betas beside the host's).
    """

    base_url: str
    headers: dict[str, str] = msgspec.field(
        default_factory=lambda: {"Authorization": "Bearer {access_token}"}
    )

    def uses_token(self) -> bool:
        """Whether the headers name a field of the provider's token (not only API keys).

        An API whose headers name only ``{key:NAME}`` (and ``{client}``) needs
        no login: its requests go out without one, and its provider needs no
        ``token_url`` or ``client_id``.
        """
        return any(
            name != "client" and not name.startswith("key:")
            for template in self.headers.values()
            for name in HEADER_FIELD.findall(template)
        )


#: A ``{field}`` in an API header template.
HEADER_FIELD = re.compile(r"\{([A-Za-z0-9_.:@-]+)\}")


class Secret:
    """A secret written in the config file itself (``client_secret``): hidden from every repr.

    ``str()`` and ``repr()`` show ``Secret('***')``; only :meth:`reveal` gives
    the value, so a Provider in a log line, an error or a traceback shows
    nothing of it.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(Secret)


class Narrowing(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A narrower GitHub App installation token for one bucket (``[providers.X.narrow.BUCKET]``).

    The names and levels are GitHub's (``POST /app/installations/{id}/access_tokens``):
    ``repositories`` are repository names without the owner, ``repository_ids``
    their numeric ids, ``permissions`` a permission name (``contents``,
    ``issues``, ``pull_requests``, ...) to ``read``, ``write`` or ``admin``.
    """

    repositories: list[str] = msgspec.field(default_factory=list)
    repository_ids: list[int] = msgspec.field(default_factory=list)
    permissions: dict[str, Literal["read", "write", "admin"]] = msgspec.field(default_factory=dict)


#: The grants whose token is minted on the host from a key or a client secret
#: (docs/signing.md), rather than refreshed from a stored refresh token.
SIGNING_GRANTS = frozenset({"jwt-bearer", "client_credentials", "github-app", "signed-jwt"})

#: The grants whose answer says when the token ends on the issuer's clock
#: (``expires_at``: GitHub's, Copilot's), not how long it lives from the request
#: (``expires_in``, or a ``signed-jwt``'s ``lifetime``).
EXPIRES_AT_GRANTS = frozenset({"copilot", "github-app"})

#: ``lifetime`` of a ``signed-jwt``: seconds from ``iat`` to ``exp``. ``iat`` is
#: backdated 60 s for clock skew, so less than 120 would be spent before it is served;
#: an hour is what such issuers take (Snowflake's key-pair JWTs).
LIFETIME_RANGE = (120, 3600)


class Provider(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An OAuth 2.0 client: where and as whom to refresh tokens and to log in.

    The login keys are named after RFC 8414 metadata, shortened like
    ``token_url``: ``authorization_url`` (authorization code + PKCE, loopback
    or paste), ``device_authorization_url`` (RFC 8628 device flow). ``flow``
    picks the default of ``credproxy login``; ``redirect_port`` fixes the
    loopback port when the client's registered redirect demands one.
    ``preset`` names a provider preset whose values the other keys override.

    ``token_url`` and ``client_id`` are required by the grants that use them
    (:func:`_grant_problems` says which); an empty string means "not set".
    The signing grants' keys (``private_key`` to ``narrow``) are described in
    docs/signing.md.
    """

    token_url: str = ""
    client_id: str = ""
    client_secret_file: str | None = None
    scopes: list[str] = msgspec.field(default_factory=list)
    authorization_url: str | None = None
    device_authorization_url: str | None = None
    flow: Literal["device", "loopback", "paste"] | None = None
    redirect_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    # The redirect URI registered for the client, when it must be that exact one:
    # a loopback http URL (its host, path and port are used, and the port is
    # listened on; without a port, any free one), or an https page that shows
    # the code (paste flow only).
    redirect_uri: str | None = None
    # Ports tried in order when the redirect's fixed port is taken (the
    # redirect URI names the port actually listened on): Codex's 1457.
    fallback_ports: list[Annotated[int, msgspec.Meta(ge=1, le=65535)]] = msgspec.field(
        default_factory=list
    )
    # How the requests look on the wire, where a provider's own client differs
    # from the plain RFC 6749 form (presets set these; see docs/providers.md):
    # extra query parameters of the authorization request,
    authorize_params: dict[str, str] = msgspec.field(default_factory=dict)
    # the body of every request of a login (the code exchange, or the device
    # request and its polls) and of a refresh (form-urlencoded or JSON),
    exchange_body: Literal["form", "json"] = "form"
    refresh_body: Literal["form", "json"] = "form"
    # whether the code exchange carries the login's `state` (Claude's does),
    exchange_state: bool = False
    # whether a refresh asks for `scopes` again (Codex and Gemini CLI do not),
    # or which scopes it asks for (Claude Code: its login's, less one),
    refresh_scopes: bool | list[str] = True
    # and whether the device flow uses PKCE (Qwen Code's does).
    device_pkce: bool = False
    # How a token is renewed: the refresh grant, or Copilot's second exchange
    # (`mint_url` mints a short-lived token from the stored GitHub token), or
    # one of the SIGNING_GRANTS, which mint with a key on the host.
    grant: Literal[
        "refresh_token", "copilot", "jwt-bearer", "client_credentials", "github-app", "signed-jwt"
    ] = "refresh_token"
    mint_url: str | None = None
    # The signing grants (docs/signing.md). Files must be private (0600, yours):
    # a PEM private key, or Google's JSON service-account key,
    private_key: str | None = None
    key_file: str | None = None
    # the passphrase of an encrypted PEM (a file, or a command run without a shell),
    passphrase_file: str | None = None
    passphrase_command: list[str] | None = None
    # the JWT's `kid` header (a key file's private_key_id by default),
    key_id: str | None = None
    # the claims (`issuer` default: the key file's client_email; `audience`:
    # token_url); `issuer` and `subject` may say {key_fingerprint} and {subject},
    issuer: str | None = None
    subject: str | None = None
    audience: str | None = None
    # jwt-bearer: scopes in the assertion's `scope` claim (Google) instead of the form,
    scope_in_assertion: bool = False
    # signed-jwt: seconds from iat to exp (LIFETIME_RANGE; default the top),
    lifetime: int | None = None
    # client_credentials: the client secret (client_secret_file is better: the
    # config file is rarely private),
    client_secret: Secret | None = None
    # github-app: the App (its id, or its client id), the installation, the
    # API (GitHub Enterprise elsewhere), and a narrower token per bucket.
    app_id: int | str | None = None
    installation_id: int | None = None
    api_url: str | None = None
    narrow: dict[str, Narrowing] = msgspec.field(default_factory=dict)
    preset: str | None = None
    # Several accounts: the ordered buckets `get_token` without a bucket may
    # serve (the default profile), and how it picks among them.
    buckets: list[str] = msgspec.field(default_factory=list)
    strategy: Literal["fill-first", "sticky", "round-robin"] = "fill-first"
    api: Api | None = None

    def minted_buckets(self) -> frozenset[str]:
        """The buckets this provider mints with a key on the host (none: not a signing grant).

        A signing grant mints the buckets the configuration names: ``default``,
        its ``buckets`` and the ones it narrows; any other name has no token,
        as a bucket never logged in to has none (a typo must not get the
        installation's whole token, nor make the issuer mint per made-up name).
        """
        if self.grant not in SIGNING_GRANTS:
            return frozenset()
        return frozenset({DEFAULT_BUCKET, *self.buckets, *self.narrow})

    def mints(self, bucket: str) -> bool:
        """True if this provider mints *bucket*'s tokens (:meth:`minted_buckets`)."""
        return bucket in self.minted_buckets()

    def minted_with(self, bucket: str, *, key: str | None) -> str:
        """A digest of what *bucket*'s tokens are minted from (for :data:`MINTED_WITH`).

        Whom the token is for and what it may do: the grant and its endpoints,
        the key, the claims and scopes, the App and installation, the bucket's
        narrowing. A stored minted token with another digest was minted under
        another configuration (a narrowing taken back by a reload, a key
        replaced) and is not served: the bucket is minted again.

        *key* is a digest of the key file's content, which the shell reads
        (``signing_keys.key_digest``; None for a provider without one): the
        file's path alone would not tell a key rotated in place, the same path
        with a new key, from the key it replaced.
        """
        narrowing = self.narrow.get(bucket)
        inputs = [
            key,
            self.grant,
            self.token_url,
            self.client_id,
            self.scopes,
            self.issuer,
            self.subject,
            self.audience,
            self.scope_in_assertion,
            self.private_key,
            self.key_file,
            self.app_id,
            self.installation_id,
            self.api_url,
            self.mint_url,
            None if narrowing is None else msgspec.structs.asdict(narrowing),
        ]
        return hashlib.sha256(msgspec.json.encode(inputs)).hexdigest()[:32]


#: The field of a minted token that says what it was minted from (``Provider.minted_with``).
MINTED_WITH = "minted_with"
#: The fields of a stored token that never leave the host (served, or put in a header).
UNSERVED_FIELDS = frozenset({"refresh_token", MINTED_WITH})


#: The Provider fields that hold endpoint URLs: https, or plain http on loopback.
PROVIDER_URL_FIELDS = (
    "token_url",
    "authorization_url",
    "device_authorization_url",
    "redirect_uri",
    "mint_url",
    "api_url",
)

#: GitHub's REST API, the default ``api_url`` of a ``github-app`` provider.
GITHUB_API_URL = "https://api.github.com"


class Renewal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Renewal constants, all in seconds (docs/design.md section 3).

    Every value must be a finite number in the range noted beside it (see
    :data:`RANGES`); ``nan`` and ``inf``, which TOML allows, are refused.
    """

    min_lead: float = 300  # >= 0: renew at least this long before expiry
    lead_fraction: float = 0.1  # 0 to 0.5: the lead is capped at half the lifetime anyway
    max_jitter: float = 30  # >= 0
    retry_base: float = 30  # > 0: 0 would retry a failing refresh in a busy loop
    retry_cap: float = 1800  # >= retry_base
    max_failures: int = 10  # >= 1 consecutive failures before renewal gives up
    serve_margin: float = 60  # >= 0: get_token refreshes first when less is left
    refresh_cooldown: float = 30  # >= 0: the refresh_token op reaches the IdP at most this often


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Limits per connection (every socket) and per session (the connection cap).

    Finite numbers in the range noted beside each (see :data:`RANGES`).
    """

    requests_per_second: float = 200  # >= 0: sustained rate per connection; 0 disables
    request_burst: int = 400  # >= 1: bucket size of that rate
    max_connections: int = 128  # >= 1: open connections per session
    idle_timeout: float = 600  # > 0: seconds without a request before a connection is closed
    max_in_flight: int = 16  # >= 1: requests in flight per connection (llxprt's figure)


class Range(NamedTuple):
    """The values a number in the config may take: finite, and within these bounds."""

    low: float
    low_inclusive: bool = True
    high: float | None = None  # inclusive

    def describe(self) -> str:
        low = f"{'at least' if self.low_inclusive else 'greater than'} {self.low:g}"
        return low if self.high is None else f"from {self.low:g} to {self.high:g}"

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value >= self.low if self.low_inclusive else value > self.low
        return above and (self.high is None or value <= self.high)


# Documented ranges of every number in the config (README "Use"). A value
# outside its range would not fail loudly later: a NaN min_lead renews in a
# loop, a negative cooldown lets a sandbox hammer the IdP.
RANGES: dict[tuple[str, str], Range] = {
    ("renewal", "min_lead"): Range(0),
    ("renewal", "lead_fraction"): Range(0, high=0.5),
    ("renewal", "max_jitter"): Range(0),
    ("renewal", "retry_base"): Range(0, low_inclusive=False),
    ("renewal", "retry_cap"): Range(0, low_inclusive=False),  # and >= retry_base
    ("renewal", "max_failures"): Range(1),
    ("renewal", "serve_margin"): Range(0),
    ("renewal", "refresh_cooldown"): Range(0),
    ("limits", "requests_per_second"): Range(0),
    ("limits", "request_burst"): Range(1),
    ("limits", "max_connections"): Range(1),
    ("limits", "idle_timeout"): Range(0, low_inclusive=False),
    ("limits", "max_in_flight"): Range(1),
    ("failover", "quota_hold"): Range(1),
    ("proxy", "max_streams"): Range(1),
    ("proxy", "retry_body_limit"): Range(0),
    ("proxy", "retry_body_budget"): Range(0),
    ("proxy", "max_header_bytes"): Range(1024),
    ("proxy", "read_timeout"): Range(0, low_inclusive=False),
    ("proxy", "body_timeout"): Range(0, low_inclusive=False),
    ("proxy", "body_min_rate"): Range(0, low_inclusive=False),
    ("failover", "max_quota_hold"): Range(1),  # and >= quota_hold
}


class Failover(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Buckets reported quota-exhausted, in seconds (see :data:`RANGES`)."""

    quota_hold: float = 60  # >= 1: held this long when the report gives no retry-after
    max_quota_hold: float = 86_400  # >= quota_hold: a reported retry-after is capped here


class Proxy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The HTTP API proxy on session sockets (see :data:`RANGES`)."""

    max_streams: int = 64  # >= 1: proxied requests in flight per session
    retry_body_limit: int = 8 * 1024 * 1024  # >= 0: bodies up to this are kept for the 401 retry
    # >= 0: what all kept bodies together may hold; past it a body is not kept
    # (its 401 is passed through), so memory stays bounded per daemon.
    retry_body_budget: int = 64 * 1024 * 1024
    max_header_bytes: int = 65_536  # >= 1024: request line and headers
    read_timeout: float = 300.0  # > 0: an upstream silent this long ends the response
    # A request body gets body_timeout seconds, plus one for every body_min_rate
    # bytes it has sent, of time spent waiting on the client (mod_reqtimeout's way).
    body_timeout: float = 20.0  # > 0
    body_min_rate: float = 500.0  # > 0: bytes a second, on average
    # Header names never taken from the sandbox, besides the known credential
    # headers (Authorization, X-Api-Key, Cookie, ...): e.g. ["x-my-gateway-key"].
    strip_headers: list[str] = msgspec.field(default_factory=list)


class Sandbox(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Defaults for ``credproxy run``."""

    default_allow: list[str] = msgspec.field(default_factory=list)


class Notify(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the person on the host hears that a login is needed (without a shell).

    ``command`` is run as given, with the message as one more argument and
    ``CREDPROXY_PROVIDER``, ``CREDPROXY_BUCKET`` and ``CREDPROXY_LOGIN`` (the
    command to run) in its environment; e.g. ``["notify-send", "credproxy"]``.
    """

    command: list[str] = msgspec.field(default_factory=list)


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    providers: dict[str, Provider] = msgspec.field(default_factory=dict)
    renewal: Renewal = msgspec.field(default_factory=Renewal)
    limits: Limits = msgspec.field(default_factory=Limits)
    sandbox: Sandbox = msgspec.field(default_factory=Sandbox)
    failover: Failover = msgspec.field(default_factory=Failover)
    proxy: Proxy = msgspec.field(default_factory=Proxy)
    notify: Notify = msgspec.field(default_factory=Notify)


def parse(text: str, path: Path) -> Config:
    """Decode TOML *text* (read from *path*, used in messages) into a :class:`Config`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "... (at line N, column M)": lead with FILE:N like every other error.
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{path}:{m.group(1)}" if m else str(path)
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    # Providers are converted one by one so that an error names the provider
    # (msgspec reports dictionary keys as "[...]").
    providers = raw.get("providers", {})
    if isinstance(providers, dict):
        from credproxy.core.presets import PresetError, apply_preset

        for name, table in providers.items():
            if isinstance(table, dict):  # a preset fills in what the table leaves out
                try:
                    providers[name] = table = apply_preset(name, table)
                except PresetError as exc:
                    raise ConfigError(_locate(path, text, exc.keys, str(exc))) from None
                narrow = table.get("narrow")
                if isinstance(narrow, dict):  # so that an error names the bucket too
                    for bucket, rules in narrow.items():
                        at = ["providers", name, "narrow", bucket]
                        _convert(rules, Narrowing, path, text, at)
            _convert(table, Provider, path, text, ["providers", name])
    cfg: Config = _convert(raw, Config, path, text, [])
    for problem, keys in _problems(cfg):
        raise ConfigError(_locate(path, text, keys, problem))
    return cfg


def _convert(raw: Any, kind: type[Any], path: Path, text: str, prefix: list[str]) -> Any:
    try:
        return msgspec.convert(raw, kind, dec_hook=_decode_secret)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at ")
        keys = prefix + _path_keys(where)
        unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
        if unknown:
            keys.append(unknown.group(1))
            message = "unknown field (check the spelling against the documentation)"
        raise ConfigError(_locate(path, text, keys, message)) from None


def _decode_secret(kind: type[Any], value: Any) -> Any:
    if kind is Secret:
        if not isinstance(value, str):
            raise TypeError("Expected `str`")  # msgspec adds " - at `$.client_secret`"
        return Secret(value)
    raise NotImplementedError


def _problems(cfg: Config) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for name, prov in cfg.providers.items():
        if not is_name(name):
            out.append((f"provider name {name!r} must be {NAME_RULE}", ["providers", name]))
        out.extend(
            (problem, ["providers", name, *where]) for problem, where in _grant_problems(prov)
        )
        bad = [b for b in prov.buckets if not is_name(b)]
        if bad or len(set(prov.buckets)) != len(prov.buckets):
            out.append(
                (
                    f"buckets must be distinct names of {NAME_RULE}",
                    ["providers", name, "buckets"],
                )
            )
        urls = [(key, getattr(prov, key), [key]) for key in PROVIDER_URL_FIELDS]
        if prov.api is not None:
            urls.append(("base_url", prov.api.base_url, ["api", "base_url"]))
        for key, value, where in urls:
            if not value:  # unset ("" for token_url: the grant checks say if it is needed)
                continue
            url = urlsplit(value)
            try:
                url.port  # noqa: B018 (raises on a port that is no number, or out of range)
            except ValueError:
                out.append((f"{key} has an invalid port", ["providers", name, *where]))
                continue
            if not url.hostname:
                out.append((f"{key} has no host", ["providers", name, *where]))
            elif (
                key == "redirect_uri"
                and url.scheme == "http"
                and (problem := _loopback_redirect_problem(url, prov.redirect_port))
            ):
                out.append((problem, ["providers", name, *where]))
            elif key == "base_url" and (url.username is not None or url.query or url.fragment):
                # The API proxy puts the request's own path and query after
                # base_url: a user, a query or a fragment there has no one meaning.
                out.append(
                    (
                        "base_url may not carry a user, a query or a fragment "
                        "(put credentials in the api headers)",
                        ["providers", name, *where],
                    )
                )
            elif url.scheme != "https" and not (
                url.scheme == "http" and url.hostname in LOOPBACK_HOSTS
            ):
                out.append(
                    (
                        f"{key} must be an https:// URL (plain http is allowed for loopback only)",
                        ["providers", name, *where],
                    )
                )
    for (section, field), allowed in RANGES.items():
        value = getattr(getattr(cfg, section), field)
        if not allowed.admits(value):
            problem = f"must be a finite number, {allowed.describe()} (got {value!r})"
            out.append((f"{field} {problem}", [section, field]))
    r = cfg.renewal
    if r.retry_cap < r.retry_base:
        out.append(("retry_cap must be at least retry_base", ["renewal", "retry_cap"]))
    if cfg.failover.max_quota_hold < cfg.failover.quota_hold:
        out.append(("max_quota_hold must be at least quota_hold", ["failover", "max_quota_hold"]))
    return out


def _loopback_redirect_problem(url: SplitResult, redirect_port: int | None) -> str | None:
    """What is wrong with a plain-http ``redirect_uri`` for the login's listener, if anything."""
    if url.hostname not in ("127.0.0.1", "localhost"):
        return (
            "a plain-http redirect_uri must name 127.0.0.1 or localhost "
            "(the login listens on 127.0.0.1)"
        )
    if url.query or url.fragment:
        return "a loopback redirect_uri may not carry a query or a fragment"
    if redirect_port is not None and url.port is not None and url.port != redirect_port:
        return f"redirect_port {redirect_port} differs from redirect_uri's port {url.port}"
    return None


# The keys of the signing grants, and which grant uses which (docs/signing.md).
_SIGNING_KEYS = (
    "private_key",
    "key_file",
    "passphrase_file",
    "passphrase_command",
    "key_id",
    "issuer",
    "subject",
    "audience",
    "scope_in_assertion",
    "lifetime",
    "client_secret",
    "app_id",
    "installation_id",
    "api_url",
    "narrow",
)
_PASSPHRASE = ("passphrase_file", "passphrase_command")
_GRANT_KEYS: dict[str, frozenset[str]] = {
    "refresh_token": frozenset(),
    "copilot": frozenset(),
    "jwt-bearer": frozenset(
        {"private_key", "key_file", *_PASSPHRASE, "key_id", "issuer", "subject", "audience"}
        | {"scope_in_assertion"}
    ),
    "client_credentials": frozenset(
        {"client_secret", "private_key", *_PASSPHRASE, "key_id", "audience"}
    ),
    "github-app": frozenset({"private_key", *_PASSPHRASE, "app_id", "installation_id"})
    | {"api_url", "narrow"},
    "signed-jwt": frozenset(
        {"private_key", *_PASSPHRASE, "key_id", "issuer", "subject", "audience", "lifetime"}
    ),
}
# Which grants need token_url and client_id (jwt-bearer takes token_url from a key_file).
_NEEDS_TOKEN_URL = frozenset({"refresh_token", "copilot", "jwt-bearer", "client_credentials"})
_NEEDS_CLIENT_ID = frozenset({"refresh_token", "copilot", "client_credentials"})
_NO_TOKEN_URL = frozenset({"github-app", "signed-jwt"})
_NO_CLIENT_ID = frozenset({"github-app", "signed-jwt"})
# The placeholders `issuer` and `subject` may hold (filled in by core/assertions.py).
_PLACEHOLDER_RE = re.compile(r"\{(key_fingerprint|subject)\}")
# A GitHub repository name (without the owner), and a permission name.
_REPO_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")
_PERMISSION_RE = re.compile(r"[a-z][a-z_]{0,63}")


def _is_set(prov: Provider, key: str) -> bool:
    value = getattr(prov, key)
    return value not in (None, False, {}, [])


def _snowflake_subject(subject: str) -> list[str]:
    """What Snowflake refuses in a key-pair JWT's ``ACCOUNT.USER`` (its drivers fix it silently).

    Snowflake compares the account and the user in uppercase (its own
    connectors uppercase both). Said at load, not as a 401 at the first use.
    """
    problems = []
    if subject != subject.upper():
        problems.append(f"subject must be uppercase, as Snowflake compares it: {subject.upper()}")
    account, _, user = subject.partition(".")
    if not account or not user:
        problems.append("subject must be ACCOUNT.USER (your account identifier, a dot, the user)")
    return problems


def _grant_problems(prov: Provider) -> list[tuple[str, list[str]]]:
    """What is wrong with *prov* for its ``grant``: (message, the key at fault)."""
    grant = prov.grant
    out: list[tuple[str, list[str]]] = []
    used = _GRANT_KEYS[grant]
    for key in _SIGNING_KEYS:
        if _is_set(prov, key) and key not in used:
            users = ", ".join(sorted(g for g, keys in _GRANT_KEYS.items() if key in keys))
            out.append((f"{key} is not used by grant {grant!r} (only by: {users})", [key]))
    if grant in _NO_TOKEN_URL and prov.token_url:
        out.append((f"token_url is not used by grant {grant!r}", ["token_url"]))
    if grant in _NO_CLIENT_ID and prov.client_id:
        out.append((f"client_id is not used by grant {grant!r}", ["client_id"]))
    if grant not in ("refresh_token", "copilot", "client_credentials") and prov.client_secret_file:
        out.append((f"client_secret_file is not used by grant {grant!r}", ["client_secret_file"]))
    if out:
        return out

    def need(key: str, what: str) -> None:
        out.append((f"missing required field `{key}`: grant {grant!r} needs {what}", []))

    # A provider that only gives an API with API keys has no login to refresh.
    keys_only = grant == "refresh_token" and prov.api is not None and not prov.api.uses_token()
    if grant in _NEEDS_TOKEN_URL and not prov.token_url and not prov.key_file and not keys_only:
        need("token_url", "the token endpoint's URL")
    if grant in _NEEDS_CLIENT_ID and not prov.client_id and not keys_only:
        need("client_id", "the client's id")
    if grant in ("github-app", "signed-jwt") and not prov.private_key:
        need("private_key", "the private key file (PEM)")
    if grant == "github-app":
        if prov.app_id is None:
            need("app_id", "the App's id (or its client id)")
        if prov.installation_id is None:
            need("installation_id", "the installation's id")
    if grant == "signed-jwt" and not prov.issuer:
        need("issuer", "the JWT's iss")
    if grant == "jwt-bearer":
        if bool(prov.private_key) == bool(prov.key_file):
            out.append(("grant 'jwt-bearer' needs exactly one of private_key and key_file", []))
        elif not prov.issuer and not prov.key_file:
            need("issuer", "the assertion's iss (a key_file's client_email is the default)")
    if grant == "client_credentials":
        given = [
            k for k in ("client_secret", "client_secret_file", "private_key") if _is_set(prov, k)
        ]
        if len(given) != 1:
            out.append(
                (
                    "grant 'client_credentials' needs exactly one of client_secret, "
                    f"client_secret_file and private_key (got {', '.join(given) or 'none'})",
                    [],
                )
            )
        elif not prov.private_key:
            out.extend(
                (f"{key} is used only with private_key (private_key_jwt)", [key])
                for key in ("key_id", "audience", *_PASSPHRASE)
                if _is_set(prov, key)
            )
        if prov.client_secret is not None and not prov.client_secret.reveal():
            out.append(("client_secret is empty", ["client_secret"]))
    if prov.preset == "snowflake" and prov.subject:
        out.extend((message, ["subject"]) for message in _snowflake_subject(prov.subject))
    if prov.passphrase_file and prov.passphrase_command is not None:
        out.append(("set passphrase_file or passphrase_command, not both", ["passphrase_command"]))
    if prov.key_file and any(_is_set(prov, k) for k in _PASSPHRASE):
        out.append(("a key_file's key is not encrypted: no passphrase is used", [_PASSPHRASE[0]]))
    if prov.passphrase_command is not None and not prov.passphrase_command:
        out.append(("passphrase_command must name a program", ["passphrase_command"]))
    if prov.lifetime is not None:
        low, high = LIFETIME_RANGE
        if not low <= prov.lifetime <= high:
            out.append(
                (
                    f"lifetime must be from {low} to {high} seconds (got {prov.lifetime}): "
                    "iat is backdated 60 s, and such a JWT may live an hour at most",
                    ["lifetime"],
                )
            )
    if (isinstance(prov.app_id, int) and prov.app_id < 1) or prov.app_id == "":
        out.append(("app_id must be a positive number or the App's client id", ["app_id"]))
    if prov.installation_id is not None and prov.installation_id < 1:
        out.append(("installation_id must be a positive number", ["installation_id"]))
    for key in ("issuer", "subject"):
        value = getattr(prov, key)
        if value is not None:
            rest = _PLACEHOLDER_RE.sub("", value)
            if "{" in rest or "}" in rest:
                out.append(
                    (
                        f"{key} may hold only the placeholders {{key_fingerprint}} and {{subject}}",
                        [key],
                    )
                )
            elif key == "subject" and "{subject}" in value:
                out.append(("subject cannot hold {subject}", [key]))
    for bucket, narrowing in prov.narrow.items():
        where = ["narrow", bucket]
        if not is_name(bucket):
            out.append((f"bucket name {bucket!r} must be {NAME_RULE}", where))
        elif narrowing == Narrowing():
            out.append(("narrows nothing: set repositories, repository_ids or permissions", where))
        bad_repos = [r for r in narrowing.repositories if not _REPO_RE.fullmatch(r)]
        if bad_repos:
            out.append(
                (
                    f"repositories are names without the owner (got {bad_repos[0]!r})",
                    [*where, "repositories"],
                )
            )
        bad_perms = [p for p in narrowing.permissions if not _PERMISSION_RE.fullmatch(p)]
        if bad_perms:
            out.append(
                (
                    f"permission names are GitHub's, e.g. contents (got {bad_perms[0]!r})",
                    [*where, "permissions"],
                )
            )
    return out


def _path_keys(where: str) -> list[str]:
    # msgspec paths look like "$.providers.example.token_url" or "$.sandbox.default_allow[0]".
    where = where.strip().strip("`")
    if where.startswith("$"):
        where = where[1:]
    return [k for k in re.split(r"\.|\[\d+\]|\[\.\.\.\]", where) if k]


def _locate(path: Path, text: str, keys: list[str], message: str) -> str:
    """Format "FILE:LINE: field a.b.c: message", finding the line by a scan of the text."""
    line = _find_line(text, keys)
    field = ".".join(keys) or "(top level)"
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: field {field}: {message}"


def _find_line(text: str, keys: list[str]) -> int | None:
    """The line that sets the field *keys* (or the closest enclosing table or key)."""
    if not keys:
        return None
    table: list[str] = []
    best: tuple[int, int] | None = None  # (keys matched, line number)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[") and not line.startswith("[["):
            table = _split_key(line[1 : line.find("]")] if "]" in line else line[1:])
            path = table
        else:
            m = re.match(r"^([^=#\[]+?)\s*=", line)
            if not m:
                continue
            path = table + _split_key(m.group(1))
        if path == keys:
            return number
        if path == keys[: len(path)] and (best is None or len(path) > best[0]):
            best = (len(path), number)
    return best[1] if best else None


def _split_key(key: str) -> list[str]:
    """Split a TOML (dotted) key into its parts, honouring quotes: ``a."b.c"`` -> a, b.c."""
    parts: list[str] = []
    for m in re.finditer(r'\s*(?:"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([^.\s"\']+))\s*(?:\.|$)', key):
        parts.append(next(g for g in m.groups() if g is not None))
    return parts
