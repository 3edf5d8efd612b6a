"""Development issuers for the signing grants: they verify what they receive.

:class:`DevIssuers` is the other side of ``credproxy/core/assertions.py``,
written from the specifications, not from that module, so that a test minting
against it checks credproxy's JWTs the way a strict issuer would:

- the **JWT bearer grant** (RFC 7523 section 2.1) and the **client credentials
  grant** (RFC 6749 section 4.4) with a client secret or a ``private_key_jwt``
  client assertion (RFC 7523 section 2.2), at the token endpoint. An assertion
  must be signed by the public key registered for its ``iss`` (with the
  algorithm of that key's type: never ``none``, never HMAC), name this token
  endpoint as ``aud``, carry ``iat``, ``exp`` and ``jti``, expire at most
  :data:`MAX_ASSERTION_AHEAD` seconds ahead, not be expired nor issued in the
  future, and carry a ``jti`` never seen before. A client assertion's
  ``iss`` and ``sub`` are the client id.
- **GitHub App installation tokens**: ``POST
  /app/installations/{id}/access_tokens`` with ``Authorization: Bearer`` an
  App JWT (RS256, ``iss`` the App, ``exp`` at most 10 minutes after ``iat``
  and ahead of now, ``iat`` not in the future); ``repositories``,
  ``repository_ids`` and ``permissions`` in the body narrow the token, and
  asking for more than the installation has is refused (422), as GitHub does.
  ``GET /repos/OWNER/REPO`` and ``PUT /repos/OWNER/REPO/contents/PATH`` then
  answer as GitHub would for such a token (404 outside its repositories, 403
  without ``contents: write``).
- **signed JWTs checked by a resource server** (``GET /resource``): a JWT
  whose ``iss`` is registered, signed by its key, living at most its
  registered lifetime (Snowflake: ``iss = ACCOUNT.USER.SHA256:<fingerprint>``,
  ``sub = ACCOUNT.USER``, at most an hour). The same route also accepts the
  opaque tokens this module minted.

Sans-IO like :mod:`.idp`: forms, headers and bodies in, (status, JSON) out,
the clock injected; :mod:`.server` routes HTTP to it. Nothing here records a
token or a secret: ``events`` name fingerprints only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

__all__ = [
    "CLIENT_ASSERTION_TYPE",
    "JWT_BEARER",
    "MAX_ASSERTION_AHEAD",
    "DevIssuers",
    "Installation",
    "public_key_fingerprint",
]

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: An assertion may expire at most this many seconds after it is received.
MAX_ASSERTION_AHEAD = 300
#: GitHub: an App JWT's exp is at most 10 minutes after its iat.
MAX_APP_JWT = 600
#: Seconds an ``iat`` may be ahead of this issuer's clock (clocks differ a little).
IAT_LEEWAY = 5
_LEVELS = {"read": 1, "write": 2, "admin": 3}
_INSTALLATION_PATH = re.compile(r"/app/installations/(\d+)/access_tokens")
_REPO_PATH = re.compile(r"/repos/([^/]+)/([^/]+)(/contents/.+)?")

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


def public_key_fingerprint(public_key: PublicKey) -> str:
    """``SHA256:`` + base64 of SHA-256 of the DER SubjectPublicKeyInfo (Snowflake's fingerprint)."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")


def _fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


def _algorithms(public_key: PublicKey) -> list[str]:
    """The one JWS algorithm a key of this type verifies."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return ["RS256"]
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return [
            {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}[
                public_key.curve.name
            ]
        ]
    return ["EdDSA"]


class _Refused(Exception):
    """A check failed: the reason goes into the answer's error_description."""


@dataclass
class Installation:
    """A GitHub App installation: its App, account, repositories (name -> id) and permissions."""

    app_id: str
    account: str
    repositories: dict[str, int]
    permissions: dict[str, str]


@dataclass
class _Minted:
    """A token this issuer minted: who it is for and what it may do."""

    kind: str  # "jwt-bearer" | "client_credentials" | "github-app"
    subject: str
    expiry: float
    scope: str | None = None
    account: str = ""
    repositories: dict[str, int] = field(default_factory=dict)
    permissions: dict[str, str] = field(default_factory=dict)


@dataclass
class _SignedJwtUser:
    public_key: PublicKey
    subject: str | None
    audience: str | None
    max_lifetime: float


class DevIssuers:
    """The signing grants' issuers, in one state machine (see the module docstring).

    *clock* gives this issuer's epoch time (a test sets it apart from the
    client's to show a clock skew); *lifetime* is the life of the tokens it
    mints (GitHub's installation tokens: an hour).

    Observable: ``events`` (one line per mint or refusal, fingerprints only),
    ``refusals`` (the reasons, in order), ``mint_count``.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, lifetime: float = 3600) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.events: list[str] = []
        self.refusals: list[str] = []
        self.mint_count = 0
        self._assertion_issuers: dict[str, tuple[PublicKey, str | None]] = {}
        self._clients: dict[str, tuple[str | None, PublicKey | None]] = {}
        self._apps: dict[str, PublicKey] = {}
        self._installations: dict[int, Installation] = {}
        self._signed_jwt: dict[str, _SignedJwtUser] = {}
        self._seen_jti: dict[str, float] = {}  # jti -> exp, forgotten once expired
        self._minted: dict[str, _Minted] = {}
        self._fail_next: list[int] = []

    def __repr__(self) -> str:
        return f"<DevIssuers minted={self.mint_count} refused={len(self.refusals)}>"

    # -- registration ------------------------------------------------------------------

    def register_assertion_issuer(
        self, issuer: str, public_key: PublicKey, *, subject: str | None = None
    ) -> None:
        """Accept JWT bearer assertions of *issuer* signed by *public_key* (``sub`` *subject*)."""
        self._assertion_issuers[issuer] = (public_key, subject)

    def register_client(
        self, client_id: str, *, secret: str | None = None, public_key: PublicKey | None = None
    ) -> None:
        """A client of the client credentials grant: a secret, or a key for private_key_jwt."""
        self._clients[client_id] = (secret, public_key)

    def register_app(self, app_id: int | str, public_key: PublicKey) -> None:
        """A GitHub App (its id, or client id) and the public half of its private key."""
        self._apps[str(app_id)] = public_key

    def add_installation(
        self,
        installation_id: int,
        app_id: int | str,
        *,
        account: str = "dev-org",
        repositories: Mapping[str, int],
        permissions: Mapping[str, str],
    ) -> None:
        """An installation of *app_id* on *account* with these repositories and permissions."""
        self._installations[installation_id] = Installation(
            str(app_id), account, dict(repositories), dict(permissions)
        )

    def register_signed_jwt(
        self,
        issuer: str,
        public_key: PublicKey,
        *,
        subject: str | None = None,
        audience: str | None = None,
        max_lifetime: float = 3600,
    ) -> None:
        """Accept at ``/resource`` JWTs of *issuer* signed by *public_key* (``max_lifetime``)."""
        self._signed_jwt[issuer] = _SignedJwtUser(public_key, subject, audience, max_lifetime)

    def register_snowflake_user(self, qualified_user: str, public_key: PublicKey) -> str:
        """Snowflake's key-pair JWT for ``ACCOUNT.USER``: returns the ``iss`` it must carry."""
        issuer = f"{qualified_user}.{public_key_fingerprint(public_key)}"
        self.register_signed_jwt(issuer, public_key, subject=qualified_user, max_lifetime=3600)
        return issuer

    def fail_next(self, status: int = 500, count: int = 1) -> None:
        """The next *count* token or installation-token requests answer *status* (no check made)."""
        self._fail_next.extend([status] * count)

    # -- the token endpoint ------------------------------------------------------------

    def handles_grant(self, grant_type: str | None) -> bool:
        """Whether a ``POST /token`` with this grant_type is for these issuers."""
        return grant_type in (JWT_BEARER, "client_credentials")

    def answer_token_request(
        self, form: Mapping[str, str], token_url: str
    ) -> tuple[int, dict[str, Any]]:
        """``POST /token`` of the JWT bearer or client credentials grant: (status, JSON)."""
        if self._fail_next:
            status = self._fail_next.pop(0)
            return status, {"error": "server_error", "error_description": "scripted failure"}
        grant_type = form.get("grant_type")
        try:
            if grant_type == JWT_BEARER:
                return self._jwt_bearer(form, token_url)
            if grant_type == "client_credentials":
                return self._client_credentials(form, token_url)
        except _Refused as exc:
            reason = str(exc)
            self.refusals.append(reason)
            self.events.append(f"{grant_type} refused: {reason}")
            if grant_type == "client_credentials":
                return 401, {"error": "invalid_client", "error_description": reason}
            return 400, {"error": "invalid_grant", "error_description": reason}
        return 400, {"error": "unsupported_grant_type"}

    def _jwt_bearer(self, form: Mapping[str, str], token_url: str) -> tuple[int, dict[str, Any]]:
        assertion = form.get("assertion", "")
        issuer = self._unverified_issuer(assertion)
        registered = self._assertion_issuers.get(issuer)
        if registered is None:
            raise _Refused(f"no key is registered for issuer {issuer!r}")
        public_key, subject = registered
        claims = self._verify_assertion(assertion, public_key, issuer, token_url)
        if subject is not None and claims.get("sub") != subject:
            raise _Refused("sub is not the registered subject")
        scope = form.get("scope") or claims.get("scope")
        return self._mint("jwt-bearer", claims.get("sub") or issuer, scope)

    def _client_credentials(
        self, form: Mapping[str, str], token_url: str
    ) -> tuple[int, dict[str, Any]]:
        client_id = form.get("client_id", "")
        registered = self._clients.get(client_id)
        if registered is None:
            raise _Refused("unknown client_id")
        secret, public_key = registered
        if "client_assertion" in form or "client_assertion_type" in form:
            if public_key is None:
                raise _Refused("this client authenticates with a secret")
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                raise _Refused("client_assertion_type is not RFC 7523's jwt-bearer")
            if "client_secret" in form:
                raise _Refused("a client authenticates one way only")
            claims = self._verify_assertion(
                form.get("client_assertion", ""), public_key, client_id, token_url
            )
            if claims.get("sub") != client_id:
                raise _Refused("a client assertion's sub must be the client_id")
        else:
            if secret is None:
                raise _Refused("this client authenticates with private_key_jwt")
            given = form.get("client_secret", "")
            if not hmac.compare_digest(given.encode("utf-8"), secret.encode("utf-8")):
                raise _Refused("client authentication failed")
        return self._mint("client_credentials", client_id, form.get("scope"))

    def _mint(self, kind: str, subject: str, scope: str | None) -> tuple[int, dict[str, Any]]:
        token = "devst-" + secrets.token_urlsafe(24)
        expiry = self.clock() + self.lifetime
        self._minted[token] = _Minted(kind, subject, expiry, scope)
        self.mint_count += 1
        self.events.append(f"{kind} token {_fingerprint(token)} minted for {subject}")
        answer: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(self.lifetime),
        }
        if scope:
            answer["scope"] = scope
        return 200, answer

    # -- checking a JWT ----------------------------------------------------------------

    def _unverified_issuer(self, token: str) -> str:
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _Refused("not a JWT") from None
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer:
            raise _Refused("no iss")
        return issuer

    def _verify(
        self,
        token: str,
        public_key: PublicKey,
        *,
        issuer: str,
        audience: str | None,
        require: list[str],
    ) -> dict[str, Any]:
        """The claims of *token* if *public_key* signed it (its type's algorithm) for *issuer*."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _Refused("not a JWT") from None
        algorithms = _algorithms(public_key)
        if header.get("alg") not in algorithms:
            raise _Refused(f"alg {header.get('alg')!r} is not {algorithms[0]} (the key's type)")
        now = self.clock()
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                public_key,
                algorithms=algorithms,
                audience=audience,
                issuer=issuer,
                options={
                    "require": require,
                    "verify_aud": audience is not None,
                    # Times are checked below against this issuer's clock.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise _Refused("the signature does not verify with the registered key") from None
        except jwt.InvalidAudienceError:
            raise _Refused(f"aud must be {audience}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _Refused(f"the {exc.claim} claim is missing") from None
        except jwt.PyJWTError as exc:
            raise _Refused(f"the JWT is not valid ({type(exc).__name__})") from None
        for name in ("iat", "exp"):
            if name in claims and (
                not isinstance(claims[name], int | float) or isinstance(claims[name], bool)
            ):
                raise _Refused(f"{name} is not a number")
        if "exp" in claims and claims["exp"] <= now:
            raise _Refused("the JWT has expired (exp is past): check the clock")
        if "iat" in claims and claims["iat"] > now + IAT_LEEWAY:
            raise _Refused("iat is in the future: check the clock")
        return claims

    def _verify_assertion(
        self, token: str, public_key: PublicKey, issuer: str, token_url: str
    ) -> dict[str, Any]:
        claims = self._verify(
            token,
            public_key,
            issuer=issuer,
            audience=token_url,
            require=["iss", "aud", "exp", "iat", "jti"],
        )
        now = self.clock()
        if claims["exp"] > now + MAX_ASSERTION_AHEAD:
            raise _Refused(f"exp is more than {MAX_ASSERTION_AHEAD} s ahead")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise _Refused("jti must be a non-empty string")
        self._seen_jti = {j: exp for j, exp in self._seen_jti.items() if exp > now}
        if jti in self._seen_jti:
            raise _Refused("jti was used before: an assertion is good for one request")
        self._seen_jti[jti] = float(claims["exp"])
        return claims

    # -- GitHub App installation tokens -------------------------------------------------

    def is_installation_path(self, path: str) -> bool:
        return _INSTALLATION_PATH.fullmatch(path) is not None

    def answer_installation_token(
        self, path: str, authorization: str, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """``POST /app/installations/{id}/access_tokens``: (status, JSON) as GitHub answers."""
        if self._fail_next:
            return self._fail_next.pop(0), {"message": "scripted failure"}
        match = _INSTALLATION_PATH.fullmatch(path)
        if match is None:
            return 404, {"message": "Not Found"}
        try:
            app_id = self._check_app_jwt(authorization)
        except _Refused as exc:
            return self._github_refusal(401, str(exc))
        installation = self._installations.get(int(match.group(1)))
        if installation is None or installation.app_id != app_id:
            return self._github_refusal(404, "Not Found")
        try:
            request = json.loads(body) if body.strip() else {}
        except ValueError:
            return self._github_refusal(400, "Problems parsing JSON")
        if not isinstance(request, dict):
            return self._github_refusal(400, "Problems parsing JSON")
        repos = dict(installation.repositories)
        names = request.get("repositories")
        ids = request.get("repository_ids")
        if names is not None or ids is not None:
            wanted: dict[str, int] = {}
            by_id = {i: n for n, i in installation.repositories.items()}
            for name in names or []:
                if name not in installation.repositories:
                    return self._no_such_repository()
                wanted[name] = installation.repositories[name]
            for repo_id in ids or []:
                if repo_id not in by_id:
                    return self._no_such_repository()
                wanted[by_id[repo_id]] = repo_id
            repos = wanted
        permissions = dict(installation.permissions)
        asked = request.get("permissions")
        if asked is not None:
            if not isinstance(asked, dict):
                return self._github_refusal(422, "permissions must be an object")
            for name, level in asked.items():
                have = installation.permissions.get(name)
                if have is None or level not in _LEVELS or _LEVELS[level] > _LEVELS[have]:
                    return self._github_refusal(
                        422, "The permissions requested are not granted to this installation."
                    )
            permissions = dict(asked)
        token = "ghs_" + secrets.token_urlsafe(27)[:36]
        expiry = self.clock() + self.lifetime
        narrowed = names is not None or ids is not None
        self._minted[token] = _Minted(
            "github-app",
            f"app {app_id}",
            expiry,
            account=installation.account,
            repositories=repos,
            permissions=permissions,
        )
        self.mint_count += 1
        self.events.append(
            f"installation token {_fingerprint(token)} for app {app_id}: "
            f"{sorted(repos)} {sorted(permissions.items())}"
        )
        answer: dict[str, Any] = {
            "token": token,
            "expires_at": datetime.fromtimestamp(int(expiry), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "permissions": permissions,
            "repository_selection": "selected" if narrowed else "all",
        }
        if narrowed:
            answer["repositories"] = [
                {"id": i, "name": n, "full_name": f"{installation.account}/{n}"}
                for n, i in sorted(repos.items())
            ]
        return 201, answer

    def _no_such_repository(self) -> tuple[int, dict[str, Any]]:
        return self._github_refusal(
            422,
            "There is at least one repository that does not exist or is not accessible "
            "to the parent installation.",
        )

    def _github_refusal(self, status: int, message: str) -> tuple[int, dict[str, Any]]:
        self.refusals.append(message)
        self.events.append(f"installation token refused ({status}): {message}")
        return status, {"message": message, "documentation_url": "https://docs.github.com/rest"}

    def _check_app_jwt(self, authorization: str) -> str:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refused("A JSON web token could not be decoded")
        token = token.strip()
        app_id = self._unverified_issuer(token)
        public_key = self._apps.get(app_id)
        if public_key is None:
            raise _Refused(f"Integration not found for iss {app_id!r}")
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise _Refused("an App key is an RSA key")
        claims = self._verify(
            token, public_key, issuer=app_id, audience=None, require=["iss", "iat", "exp"]
        )
        if (
            claims["exp"] - claims["iat"] > MAX_APP_JWT
            or claims["exp"] > self.clock() + MAX_APP_JWT
        ):
            raise _Refused("'Expiration time' claim ('exp') is too far in the future")
        return app_id

    def answer_github_request(
        self, method: str, path: str, authorization: str
    ) -> tuple[int, dict[str, Any]]:
        """``GET /repos/OWNER/REPO`` or ``PUT /repos/OWNER/REPO/contents/PATH``, a minted token."""
        match = _REPO_PATH.fullmatch(path)
        minted = self._bearer(authorization)
        if minted is None or minted.kind != "github-app":
            return 401, {"message": "Bad credentials"}
        if match is None:
            return 404, {"message": "Not Found"}
        owner, repo, contents = match.groups()
        if owner != minted.account or repo not in minted.repositories:
            return 404, {"message": "Not Found"}
        if method == "GET" and contents is None:
            return 200, {
                "name": repo,
                "full_name": f"{owner}/{repo}",
                "id": minted.repositories[repo],
            }
        if method == "PUT" and contents is not None:
            if _LEVELS.get(minted.permissions.get("contents", ""), 0) < _LEVELS["write"]:
                return 403, {"message": "Resource not accessible by integration"}
            return 200, {"content": {"path": contents.removeprefix("/contents/")}}
        return 404, {"message": "Not Found"}

    # -- the resource server ------------------------------------------------------------

    def answer_resource(self, authorization: str) -> tuple[int, dict[str, Any]]:
        """``GET /resource``: 200 with who the bearer is, or 401 with why not."""
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return 401, {"error": "invalid_token", "error_description": "no bearer token"}
        minted = self._bearer(authorization)
        if minted is not None:
            return 200, {"sub": minted.subject, "kind": minted.kind, "scope": minted.scope}
        try:
            issuer = self._unverified_issuer(token)
            user = self._signed_jwt.get(issuer)
            if user is None:
                raise _Refused(f"no key is registered for issuer {issuer!r}")
            claims = self._verify(
                token,
                user.public_key,
                issuer=issuer,
                audience=user.audience,
                require=["iss", "iat", "exp"],
            )
            if claims["exp"] - claims["iat"] > user.max_lifetime:
                raise _Refused(f"the JWT lives longer than {user.max_lifetime:g} s")
            if user.subject is not None and claims.get("sub") != user.subject:
                raise _Refused("sub is not the registered user")
        except _Refused as exc:
            self.refusals.append(str(exc))
            return 401, {"error": "invalid_token", "error_description": str(exc)}
        return 200, {"sub": claims.get("sub") or issuer, "kind": "signed-jwt"}

    def _bearer(self, authorization: str) -> _Minted | None:
        """The unexpired token minted here that *authorization* carries (Bearer or token)."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() not in ("bearer", "token"):
            return None
        minted = self._minted.get(token.strip())
        if minted is None or minted.expiry <= self.clock():
            return None
        return minted
