"""The signing grants as a sans-IO codec: claims in, a signed JWT and a request out, answers judged.

Four grants mint a token from a key (or a client secret) kept on the host
(docs/signing.md):

- ``jwt-bearer`` (RFC 7523 section 2.1): a JWT signed with the key is the
  grant; ``POST token_url`` with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``
  and ``assertion``. Google's service accounts work this way.
- ``client_credentials`` (RFC 6749 section 4.4): the client authenticates
  with its secret (``client_secret_post``) or with a signed JWT
  (``private_key_jwt``, RFC 7523 section 2.2: ``client_assertion_type`` and
  ``client_assertion``).
- ``github-app``: an App JWT (RS256, ``iss`` the App) is the bearer of ``POST
  {api_url}/app/installations/{id}/access_tokens``, which answers a one-hour
  installation token, narrowed per bucket if the config says so.
- ``signed-jwt``: the JWT itself is the token (Snowflake's key-pair JWTs).

Every JWT made here carries ``iat`` backdated by :data:`SKEW` seconds, so an
issuer whose clock is a little behind does not see it as issued in the future.
An assertion (``jwt-bearer``, ``private_key_jwt``) expires at most
:data:`ASSERTION_LIFETIME` seconds after the moment it is made and carries a
``jti`` drawn from the random source passed in, so an issuer that remembers
``jti`` values refuses a replay. The GitHub App JWT follows GitHub's rules
instead (``exp`` no more than 10 minutes ahead, no ``jti``), and a signed JWT
lives ``lifetime`` seconds from its ``iat``.

Pure: the key object, the time and the random source are arguments; nothing
here reads a file, a clock or the environment. ``credproxy/shell/signing_keys.py``
loads the key, ``credproxy/shell/http.py`` sends the request.

Errors are :class:`MintFailed`, which says what went wrong (``cause``) and
what to do (in the message). An issuer's own error text is quoted, after
:func:`issuer_text` removes whatever was sent that must stay secret (the
client secret, the assertion) and anything shaped like a token; the private
key never leaves this process, so it cannot be echoed.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from credproxy.core.config import GITHUB_API_URL, Provider
from credproxy.core.oauth import error_code, json_object, seconds_value
from credproxy.errors import RefreshFailed

__all__ = [
    "ASSERTION_LIFETIME",
    "CLIENT_ASSERTION_TYPE",
    "GITHUB_JWT_LIFETIME",
    "JWT_BEARER_GRANT",
    "SKEW",
    "MintFailed",
    "MintRequest",
    "SigningKey",
    "algorithm_for",
    "build_request",
    "issuer_text",
    "key_fingerprint",
    "parse_answer",
    "signed_jwt_token",
]

#: Seconds ``iat`` is backdated, for an issuer whose clock is a little behind ours.
SKEW = 60
#: The longest an assertion (jwt-bearer, private_key_jwt) lives: seconds after it is made.
ASSERTION_LIFETIME = 300
#: GitHub: "no more than 10 minutes into the future"; ``exp - iat`` is this, ``exp`` is
#: ``GITHUB_JWT_LIFETIME - SKEW`` ahead.
GITHUB_JWT_LIFETIME = 600
#: A clock further than this from the issuer's (its HTTP ``Date``) is named as the cause.
CLOCK_TOLERANCE = 30

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"  # RFC 7523 2.1
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # RFC 7523 2.2
# GitHub's REST API: the media type and the API version its docs send.
GITHUB_ACCEPT = "application/vnd.github+json"
GITHUB_API_VERSION = "2022-11-28"

Cause = Literal["key", "clock_skew", "refused", "transient"]
#: The kinds of private key a JWT can be signed with.
SignableKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

# RFC 6749 5.2 codes that say the assertion or the client was not accepted.
_REFUSALS = frozenset(
    {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope", "access_denied"}
)
# Words of an issuer's error text that point at the JWT's times (GitHub: "'Expiration
# time' claim ('exp') is too far in the future"; Google: "Token must be a short-lived
# token (60 minutes) and in a reasonable timeframe. Check your iat and exp values").
_TIME_WORDS = re.compile(
    r"\b(iat|exp|nbf|issued at|expiration time|too far in the future|not yet valid|"
    r"timeframe|clock)\b",
    re.IGNORECASE,
)
# Shapes redacted from an issuer's text: a JWT (three base64url parts), a long run of
# token characters with a digit or a capital in it (a secret or a token echoed back;
# "an-installation-access-token-for-an-app" is words, and stays).
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
_LONG_RUN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")
_NOT_WORDS = re.compile(r"[A-Z0-9+/=]")
_MAX_TEXT = 200


class MintFailed(RefreshFailed):
    """Minting a token failed; the message says why and what to do, never a secret.

    ``cause`` is one of ``"key"`` (the key cannot be read or used: fix the
    file), ``"clock_skew"`` (the issuer refused the times: set this host's
    clock), ``"refused"`` (the issuer refused the key, the client or the
    request: fix its registration or the config) and ``"transient"`` (worth
    trying again: unreachable, 5xx, 429, a garbled answer).
    """

    def __init__(self, message: str, cause: Cause = "transient") -> None:
        super().__init__(message)
        self.cause: Cause = cause


@dataclass(frozen=True, repr=False)
class SigningKey:
    """A private key loaded from its file, and what the file said besides.

    ``client_email``, ``token_uri`` and ``key_id`` come from Google's JSON key
    (``private_key_id``); a PEM file gives none. The repr names the file and
    the algorithm, never the key.
    """

    private_key: SignableKey
    path: str
    client_email: str | None = None
    token_uri: str | None = None
    key_id: str | None = None

    def __repr__(self) -> str:
        try:
            alg = algorithm_for(self.private_key)
        except MintFailed:
            alg = "unsupported"
        return f"<SigningKey {alg} {self.path}>"


@dataclass(frozen=True, repr=False)
class MintRequest:
    """One HTTP request of a signing grant, ready to send (``form`` or ``json``, not both).

    ``secrets`` are the values sent that an answer must never be allowed to
    quote back (the client secret, the assertion). The repr shows the method
    and URL only.
    """

    grant: str
    method: str
    url: str
    form: dict[str, str] | None = None
    json: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<MintRequest {self.grant} {self.method} {self.url}>"


# -- keys and JWTs -----------------------------------------------------------------------


def signable(key: PrivateKeyTypes) -> SignableKey:
    """*key* itself if a JWT can be signed with it (:func:`algorithm_for` says with what).

    Raises:
        MintFailed: another kind of key (DSA, X25519, ...), an RSA key under 2048
            bits, an EC curve without a JWS algorithm.
    """
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        algorithm_for(key)
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return key
    raise MintFailed(
        f"a {type(key).__name__.lstrip('_')} cannot sign a JWT; use an RSA, EC (P-256) or "
        "Ed25519 key",
        "key",
    )


def algorithm_for(key: SignableKey) -> str:
    """The JWS algorithm of a key: RSA RS256, EC ES256 (P-256, or ES384, ES512), Ed25519 EdDSA.

    Raises:
        MintFailed: an RSA key under 2048 bits, an EC curve other than P-256/384/521.
    """
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise MintFailed(
                f"the RSA key has {key.key_size} bits; issuers want at least 2048", "key"
            )
        return "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        alg = by_curve.get(key.curve.name)
        if alg is None:
            raise MintFailed(
                f"the EC key's curve {key.curve.name} has no JWS algorithm; use P-256", "key"
            )
        return alg
    return "EdDSA"


def key_fingerprint(key: SignableKey) -> str:
    """``SHA256:`` and base64 (standard, padded) of SHA-256 of the DER SubjectPublicKeyInfo.

    What Snowflake calls the public key's fingerprint (``RSA_PUBLIC_KEY_FP`` of
    ``DESCRIBE USER``); the same as ``openssl pkey -pubout -outform DER |
    openssl dgst -sha256 -binary | openssl enc -base64``.
    """
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def new_jti(random: Callable[[int], bytes]) -> str:
    """A ``jti``: 128 bits from *random*, base64url without padding."""
    return base64.urlsafe_b64encode(random(16)).rstrip(b"=").decode("ascii")


def sign(claims: Mapping[str, Any], key: SigningKey, *, kid: str | None = None) -> str:
    """*claims* as a compact JWS, signed with *key* by PyJWT (the algorithm from the key type).

    Raises:
        MintFailed: the key is of no usable kind or the signing failed (cause ``"key"``).
    """
    alg = algorithm_for(key.private_key)
    headers = {"kid": kid} if kid else None
    try:
        return jwt.encode(dict(claims), key.private_key, algorithm=alg, headers=headers)
    except (jwt.PyJWTError, TypeError, ValueError) as exc:
        # The exception may hold the key object; its message and class are enough.
        raise MintFailed(
            f"signing with the key of {key.path} failed ({type(exc).__name__})", "key"
        ) from None


def _fill(template: str, key: SigningKey, subject: str | None) -> str:
    """``{key_fingerprint}`` and ``{subject}`` in *template*, filled in (nothing else is)."""
    out = template
    if "{key_fingerprint}" in out:
        out = out.replace("{key_fingerprint}", key_fingerprint(key.private_key))
    if "{subject}" in out:
        out = out.replace("{subject}", subject or "")
    return out


def _claims(
    *,
    issuer: str,
    subject: str | None,
    audience: str | None,
    iat: int,
    exp: int,
    jti: str | None,
) -> dict[str, Any]:
    claims: dict[str, Any] = {"iss": issuer}
    if subject:
        claims["sub"] = subject
    if audience:
        claims["aud"] = audience
    claims["iat"] = iat
    claims["exp"] = exp
    if jti is not None:
        claims["jti"] = jti
    return claims


def assertion(
    *,
    key: SigningKey,
    issuer: str,
    subject: str | None,
    audience: str,
    now: float,
    random: Callable[[int], bytes],
    kid: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A signed assertion: ``iat`` now - :data:`SKEW`, ``exp`` now + :data:`ASSERTION_LIFETIME`.

    And a fresh ``jti`` from *random*.
    """
    t = int(now)
    claims = _claims(
        issuer=issuer,
        subject=subject,
        audience=audience,
        iat=t - SKEW,
        exp=t + ASSERTION_LIFETIME,
        jti=new_jti(random),
    )
    claims.update(extra or {})
    return sign(claims, key, kid=kid)


# -- the requests of each grant ----------------------------------------------------------


def token_url_of(provider: Provider, key: SigningKey | None) -> str:
    """The token endpoint: ``token_url``, else a key file's ``token_uri``.

    Raises:
        MintFailed: neither is set, or the key file's is not https (loopback http aside).
    """
    url = provider.token_url or (key.token_uri if key is not None else None) or ""
    if not url:
        raise MintFailed("no token_url, and the key file names no token_uri", "refused")
    if not provider.token_url:
        parts = urlsplit(url)
        loopback = parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")
        if not (parts.scheme == "https" and parts.hostname) and not loopback:
            raise MintFailed("the key file's token_uri is not an https:// URL", "refused")
    return url


def build_request(
    provider: Provider,
    bucket: str,
    *,
    key: SigningKey | None,
    client_secret: str | None,
    now: float,
    random: Callable[[int], bytes],
) -> MintRequest:
    """The request that mints a token for *provider*'s *bucket* (any signing grant but signed-jwt).

    *key* is the loaded ``private_key`` or ``key_file`` (None for a
    client_credentials client with a secret); *client_secret* is that
    secret (from ``client_secret`` or ``client_secret_file``).

    Raises:
        MintFailed: the key cannot sign, or what the grant needs is missing.
    """
    grant = provider.grant
    if grant == "jwt-bearer":
        return _jwt_bearer(provider, _need_key(key), now, random)
    if grant == "client_credentials":
        return _client_credentials(provider, key, client_secret, now, random)
    if grant == "github-app":
        return _github_app(provider, bucket, _need_key(key), now)
    raise MintFailed(f"grant {grant!r} does not mint with a request", "refused")


def _need_key(key: SigningKey | None) -> SigningKey:
    if key is None:
        raise MintFailed("this grant needs a private key, and none was loaded", "key")
    return key


def _jwt_bearer(
    provider: Provider, key: SigningKey, now: float, random: Callable[[int], bytes]
) -> MintRequest:
    url = token_url_of(provider, key)
    subject = _fill(provider.subject, key, None) if provider.subject else None
    issuer = provider.issuer or key.client_email
    if not issuer:
        raise MintFailed("no issuer, and the key file names no client_email", "refused")
    issuer = _fill(issuer, key, subject)
    extra: dict[str, Any] = {}
    if provider.scopes and provider.scope_in_assertion:
        extra["scope"] = " ".join(provider.scopes)
    signed = assertion(
        key=key,
        issuer=issuer,
        subject=subject,
        audience=provider.audience or url,
        now=now,
        random=random,
        kid=provider.key_id or key.key_id,
        extra=extra,
    )
    form = {"grant_type": JWT_BEARER_GRANT, "assertion": signed}
    if provider.scopes and not provider.scope_in_assertion:
        form["scope"] = " ".join(provider.scopes)
    if provider.client_id:
        form["client_id"] = provider.client_id
    return MintRequest(grant="jwt-bearer", method="POST", url=url, form=form, secrets=(signed,))


def _client_credentials(
    provider: Provider,
    key: SigningKey | None,
    client_secret: str | None,
    now: float,
    random: Callable[[int], bytes],
) -> MintRequest:
    url = token_url_of(provider, key)
    form = {"grant_type": "client_credentials", "client_id": provider.client_id}
    if provider.scopes:
        form["scope"] = " ".join(provider.scopes)
    if key is not None:
        # RFC 7523 3 (2.2): iss and sub are the client id, aud the token endpoint.
        signed = assertion(
            key=key,
            issuer=provider.client_id,
            subject=provider.client_id,
            audience=provider.audience or url,
            now=now,
            random=random,
            kid=provider.key_id or key.key_id,
        )
        form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        form["client_assertion"] = signed
        sent: tuple[str, ...] = (signed,)
    elif client_secret:
        form["client_secret"] = client_secret
        sent = (client_secret,)
    else:
        raise MintFailed("client_credentials needs a client secret or a private key", "refused")
    return MintRequest(grant="client_credentials", method="POST", url=url, form=form, secrets=sent)


def github_app_jwt(provider: Provider, key: SigningKey, now: float) -> str:
    """The App JWT: RS256, ``iss`` the App, ``iat`` now - 60 s, ``exp`` 10 minutes after ``iat``.

    Raises:
        MintFailed: the key is not an RSA key (GitHub takes RS256 only).
    """
    if not isinstance(key.private_key, rsa.RSAPrivateKey):
        raise MintFailed(
            f"GitHub signs App JWTs with RS256 only: {key.path} must be the App's RSA "
            "private key (the .pem GitHub generated)",
            "key",
        )
    t = int(now)
    claims = _claims(
        issuer=str(provider.app_id),
        subject=None,
        audience=None,
        iat=t - SKEW,
        exp=t - SKEW + GITHUB_JWT_LIFETIME,
        jti=None,
    )
    return sign(claims, key)


def github_api_url(provider: Provider) -> str:
    return (provider.api_url or GITHUB_API_URL).rstrip("/")


def _github_app(provider: Provider, bucket: str, key: SigningKey, now: float) -> MintRequest:
    app_jwt = github_app_jwt(provider, key, now)
    url = f"{github_api_url(provider)}/app/installations/{provider.installation_id}/access_tokens"
    body: dict[str, Any] = {}
    narrowing = provider.narrow.get(bucket)
    if narrowing is not None:
        if narrowing.repositories:
            body["repositories"] = list(narrowing.repositories)
        if narrowing.repository_ids:
            body["repository_ids"] = list(narrowing.repository_ids)
        if narrowing.permissions:
            body["permissions"] = dict(narrowing.permissions)
    headers = {
        "Accept": GITHUB_ACCEPT,
        "Authorization": f"Bearer {app_jwt}",
        "X-GitHub-Api-Version": GITHUB_API_VERSION,
    }
    return MintRequest(
        grant="github-app", method="POST", url=url, json=body, headers=headers, secrets=(app_jwt,)
    )


def signed_jwt_token(
    provider: Provider, key: SigningKey, *, now: float, random: Callable[[int], bytes]
) -> dict[str, Any]:
    """A ``signed-jwt`` provider's token: the JWT itself, ``lifetime`` seconds from its ``iat``.

    ``iss`` and ``sub`` are ``issuer`` and ``subject`` with ``{key_fingerprint}``
    and ``{subject}`` filled in (Snowflake: ``ACCOUNT.USER.SHA256:<fingerprint>``
    and ``ACCOUNT.USER``); ``aud`` when ``audience`` is set.
    """
    if provider.preset == "snowflake" and not isinstance(key.private_key, rsa.RSAPrivateKey):
        raise MintFailed(
            f"Snowflake takes RSA key pairs only; {key.path} is another kind of key", "key"
        )
    lifetime = provider.lifetime or 3600
    subject = _fill(provider.subject, key, None) if provider.subject else None
    issuer = _fill(provider.issuer or "", key, subject)
    if not issuer:
        raise MintFailed("a signed-jwt provider needs an issuer", "refused")
    iat = int(now) - SKEW
    claims = _claims(
        issuer=issuer,
        subject=subject,
        audience=provider.audience,
        iat=iat,
        exp=iat + lifetime,
        jti=new_jti(random),
    )
    token = sign(claims, key, kid=provider.key_id or key.key_id)
    return {"access_token": token, "token_type": "Bearer", "expiry": float(iat + lifetime)}


# -- the answers -------------------------------------------------------------------------


def parse_answer(
    request: MintRequest,
    status: int,
    body: bytes,
    *,
    now: float,
    server_date: float | None = None,
) -> dict[str, Any]:
    """The token a mint answered, in the shape the store keeps.

    ``access_token``, ``expiry`` (epoch seconds), ``token_type``; no
    ``refresh_token`` (a minted token is minted again, never refreshed). An
    RFC 6749 answer keeps its other fields (``scope``); GitHub's ``{token,
    expires_at}`` keeps ``permissions``, ``repository_selection`` and the
    repositories' names. *now* is when the request was sent (``expires_in``
    counts from it); *server_date* the answer's HTTP ``Date``, to name a
    clock skew.

    Raises:
        MintFailed: anything but a usable token, with the cause and the issuer's
            error text (:func:`issuer_text`).
    """
    payload = json_object(body)
    host = urlsplit(request.url).hostname or "the issuer"
    if request.grant == "github-app":
        if status in (200, 201) and payload is not None and "token" in payload:
            return _github_token(payload, host)
        raise _refusal(request, host, status, payload, now, server_date)
    if status == 200 and payload is not None and "access_token" in payload:
        return _oauth_token(payload, host, now)
    raise _refusal(request, host, status, payload, now, server_date)


def _oauth_token(payload: dict[str, Any], host: str, now: float) -> dict[str, Any]:
    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise MintFailed(f"{host} answered HTTP 200 with an unusable access_token")
    token = {k: v for k, v in payload.items() if k not in ("expires_in", "refresh_token")}
    expires_in = seconds_value(payload.get("expires_in"))
    if expires_in is None:
        raise MintFailed(f"{host} answered HTTP 200 without a usable expires_in")
    token["expiry"] = now + expires_in
    if not isinstance(token.get("token_type"), str) or not token["token_type"]:
        token["token_type"] = "Bearer"  # noqa: S105 (a token type)
    return token


def _github_token(payload: dict[str, Any], host: str) -> dict[str, Any]:
    token = payload.get("token")
    expires_at = payload.get("expires_at")
    expiry = _iso_seconds(expires_at) if isinstance(expires_at, str) else None
    if not isinstance(token, str) or not token or expiry is None:
        raise MintFailed(f"{host} answered without a usable token and expires_at")
    out: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expiry": expiry}
    permissions = payload.get("permissions")
    if isinstance(permissions, dict) and all(isinstance(v, str) for v in permissions.values()):
        out["permissions"] = permissions
    selection = payload.get("repository_selection")
    if isinstance(selection, str):
        out["repository_selection"] = selection
    repos = payload.get("repositories")
    if isinstance(repos, list):
        names = [r.get("name") for r in repos if isinstance(r, dict)]
        out["repositories"] = [n for n in names if isinstance(n, str)]
    return out


def _iso_seconds(text: str) -> float | None:
    """Epoch seconds of an ISO 8601 time with a zone (GitHub's ``2016-07-11T22:14:10Z``)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.timestamp()


def _refusal(
    request: MintRequest,
    host: str,
    status: int,
    payload: dict[str, Any] | None,
    now: float,
    server_date: float | None,
) -> MintFailed:
    """The :class:`MintFailed` of an answer that is not a token."""
    code = error_code(payload.get("error")) if payload is not None else ""
    raw_text = None
    if payload is not None:
        raw_text = payload.get("error_description") or payload.get("message")
    text = issuer_text(raw_text, request.secrets)
    said = f"HTTP {status}" + (f", error {code}" if code else "") + (f": {text!r}" if text else "")
    what = f"{host} refused the {request.grant} request ({said})"
    refused = status in (401, 403) or code in _REFUSALS
    if request.grant == "github-app":
        refused = refused or status in (404, 422)
    if not refused:
        if status in (200, 201):
            return MintFailed(f"{host} answered {said} without a usable token")
        return MintFailed(f"{host} answered {said}; trying again later", "transient")
    skew = None if server_date is None else now - server_date
    if skew is not None and abs(skew) > CLOCK_TOLERANCE:
        side = "ahead of" if skew > 0 else "behind"
        return MintFailed(
            f"{what}; this host's clock is {abs(skew):.0f} s {side} {host}'s: set the clock "
            "(NTP) and the JWT's iat and exp will be accepted",
            "clock_skew",
        )
    if text and _TIME_WORDS.search(text):
        return MintFailed(
            f"{what}; the JWT's times were refused: check this host's clock (NTP)", "clock_skew"
        )
    return MintFailed(f"{what}; {_what_to_do(request, status)}", "refused")


def _what_to_do(request: MintRequest, status: int) -> str:
    if request.grant == "github-app":
        if status == 401:
            return "check app_id and that private_key is a current key of that App"
        if status == 404:
            return "check installation_id: the App must be installed on that account"
        if status == 422:
            return "the narrowing asks for repositories or permissions the installation lacks"
        return "check the App's installation and permissions"
    if request.grant == "client_credentials" and request.form is not None:
        if "client_assertion" in request.form:
            return "check client_id and that the client has this key's public key registered"
        return "check client_id and the client secret"
    return "check issuer, audience and that the issuer has this key's public key registered"


def issuer_text(value: object, sent: tuple[str, ...] = ()) -> str:
    """An issuer's error text, safe to log: printable, at most 200 characters, nothing secret.

    Removed: every value in *sent* (what the request carried that must stay
    secret), anything shaped like a JWT and any run of 32 or more token
    characters with a digit, a capital or ``+/=`` in it.
    """
    if not isinstance(value, str):
        return ""
    text = value
    for secret in sent:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _JWT_SHAPE.sub("[redacted]", text)
    text = _LONG_RUN.sub(lambda m: "[redacted]" if _NOT_WORDS.search(m[0]) else m[0], text)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    if len(text) > _MAX_TEXT:
        text = text[: _MAX_TEXT - 1] + "…"
    return text
