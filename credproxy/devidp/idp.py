"""The development IdP's state machine: forms in, answers out, no I/O.

:class:`DevIdP` holds every token family, authorization code and device grant,
and the scripted faults; it takes a request's form (or query) and returns an
HTTP status and a JSON object (or a line for a page). The clock is injected,
nothing here sleeps, touches a socket or imports trio: :mod:`.server` puts it on
HTTP and waits out a ``"slow"`` fault, :mod:`.cli` runs it as a process.

Nothing here records a token: requests are kept with every secret replaced by
a short SHA-256 :func:`fingerprint`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

__all__ = ["DEVICE_ACTIONS", "FAULT_KINDS", "DevIdP", "Fault", "fingerprint"]

#: What :meth:`DevIdP.fail_next` can script.
FAULT_KINDS = frozenset(
    {"server_error", "invalid_grant", "slow", "malformed", "no_refresh_token", "bad_expiry"}
)

#: What ``GET /device?user_code=X&action=...`` can do to a pending device flow.
DEVICE_ACTIONS = frozenset({"approve", "deny", "expire", "slow_down"})

_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 6.1: a short code from an alphabet without vowels and look-alikes.
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
_CODE_LIFETIME = 120.0  # seconds an authorization code stays usable
_POLL_TOLERANCE = 0.5  # seconds a poll may come early before it counts as too fast
_SECRET_FORM_KEYS = ("refresh_token", "client_secret", "code", "code_verifier", "device_code")


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for *secret*: 12 hex digits of SHA-256."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()[:12]


@dataclass
class _Family:
    """Every token descending from one login (one :meth:`DevIdP.mint`)."""

    number: int
    current_refresh_token: str
    revoked: bool = False


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour (:meth:`DevIdP.fail_next`), taken by one token request."""

    kind: str  # one of FAULT_KINDS
    delay: float = 0.0  # seconds a "slow" fault waits before answering


@dataclass
class _DeviceGrant:
    """One device flow in progress (keyed by its device code)."""

    client_id: str
    user_code: str
    scope: str | None
    expires_at: float
    interval: float
    state: str = "pending"  # pending | approved | denied | expired
    slow_down_next: bool = False
    last_poll: float | None = None


@dataclass
class _AuthCode:
    """One authorization code issued by ``/authorize``, not yet exchanged."""

    client_id: str
    redirect_uri: str
    challenge: str
    scope: str | None
    expires_at: float


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
      :func:`~credproxy.devidp.server.serve` logs);
    - ``login_count``: tokens issued by the code and device grants;
    - ``too_fast_polls``: device polls that came sooner than the interval.

    *device_interval* and *device_expires_in* are what a device
    authorization response announces (RFC 8628 3.2).
    """

    def __init__(
        self,
        *,
        lifetime: float = 60,
        clock: Callable[[], float] = time.time,
        client_id: str = "credproxy-dev",
        client_secret: str | None = None,
        device_interval: float = 5,
        device_expires_in: float = 600,
    ) -> None:
        self.lifetime = lifetime
        self.clock = clock
        self.client_id = client_id
        self._client_secret = client_secret
        self.device_interval = device_interval
        self.device_expires_in = device_expires_in
        self.login_count = 0
        self.too_fast_polls = 0
        self._device_grants: dict[str, _DeviceGrant] = {}  # device code -> grant
        self._user_codes: dict[str, str] = {}  # user code -> device code
        self._auth_codes: dict[str, _AuthCode] = {}
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
        self._faults: deque[Fault] = deque()

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
        seconds on the trio clock (in :func:`~credproxy.devidp.server.serve`; no
        wait when called directly) and then answers normally, rotating the
        refresh token even if the client has stopped waiting, as a real IdP would;
        ``"malformed"`` answers 200 with a body that is not JSON (an empty
        object when called directly); ``"no_refresh_token"`` answers
        normally but does not rotate, omitting ``refresh_token``;
        ``"bad_expiry"`` rotates the refresh token and answers with an
        ``expires_in`` that is not a number (a token the client cannot use,
        whose refresh token it must keep all the same).
        Faults queue up in order, one per request. ``"server_error"``,
        ``"invalid_grant"`` and ``"malformed"`` change no token's state.

        Raises:
            ValueError: unknown *kind*, or a negative *count* or *delay*.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if count < 0 or delay < 0:
            raise ValueError("count and delay must not be negative")
        self._faults.extend(Fault(kind, delay) for _ in range(count))

    def take_fault(self) -> Fault | None:
        """The next scripted fault, removed from the queue; None when none is queued.

        :func:`~credproxy.devidp.server.serve` takes it before answering, so it
        can wait out a ``"slow"`` one, then passes it to :meth:`answer_token_request`.
        """
        return self._faults.popleft() if self._faults else None

    # -- the token endpoint ----------------------------------------------------

    def handle_token_request(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        """Answer one ``POST /token`` with form fields *form*: (HTTP status, JSON object).

        Implements the ``refresh_token`` grant with rotation and family
        revocation, after applying the next scripted fault, if any.
        Errors are OAuth error objects (RFC 6749 5.2), never exceptions.
        """
        return self.answer_token_request(form, self.take_fault())

    def answer_token_request(
        self, form: Mapping[str, str], fault: Fault | None
    ) -> tuple[int, dict[str, Any]]:
        """:meth:`handle_token_request` with *fault* already taken (:meth:`take_fault`).

        A ``"slow"`` fault answers normally here: the wait is the caller's.
        """
        self.requests.append(_redact(form))
        kind = fault.kind if fault else None
        if kind == "server_error":
            return 500, {"error": "server_error", "error_description": "scripted failure"}
        if kind == "invalid_grant":
            return 400, {"error": "invalid_grant", "error_description": "scripted failure"}
        if kind == "malformed":
            return 200, {}

        grant_type = form.get("grant_type")
        if grant_type not in ("refresh_token", "authorization_code", _DEVICE_GRANT):
            return 400, {"error": "unsupported_grant_type"}
        if not self._client_ok(form):
            return 401, {"error": "invalid_client"}
        if grant_type == "authorization_code":
            return self._code_grant(form)
        if grant_type == _DEVICE_GRANT:
            return self._device_grant(form)
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
        if kind == "bad_expiry":
            answer["expires_in"] = "soon"
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

    # -- logging in ------------------------------------------------------------------

    def _login_answer(self, how: str, scope: str | None) -> tuple[int, dict[str, Any]]:
        token = self.mint()
        self.login_count += 1
        answer: dict[str, Any] = {
            "access_token": token["access_token"],
            "refresh_token": token["refresh_token"],
            "token_type": "Bearer",
            "expires_in": int(self.lifetime)
            if float(self.lifetime).is_integer()
            else self.lifetime,
        }
        if scope:
            answer["scope"] = scope
        self.events.append(
            f"login family {len(self._families)} by {how}: "
            f"refresh token {fingerprint(token['refresh_token'])}"
        )
        return 200, answer

    def handle_authorize(self, query: Mapping[str, str]) -> tuple[int, str]:
        """Answer ``GET /authorize?...``: (302, Location) or (400, a reason for the page).

        Approves at once: there is no person to ask. An unknown client or a
        redirect URI that is neither loopback ``http`` nor ``https`` gets a 400
        page and no redirect (RFC 6749 4.1.2.1); other errors redirect with
        ``error``.
        """
        if not hmac.compare_digest(query.get("client_id", ""), self.client_id):
            return 400, "unknown client_id"
        redirect_uri = query.get("redirect_uri", "")
        target = urlsplit(redirect_uri)
        loopback = target.scheme == "http" and target.hostname in ("127.0.0.1", "localhost", "::1")
        if not loopback and target.scheme != "https":
            # https: a page of the provider's that shows the code (a paste flow).
            return 400, "redirect_uri must be loopback http:// (RFC 8252 7.3) or https://"
        state = query.get("state")

        def back(**params: str) -> tuple[int, str]:
            if state is not None:
                params["state"] = state
            joined = "&".join(p for p in (target.query, urlencode(params)) if p)
            return 302, urlunsplit(target._replace(query=joined))

        if query.get("response_type") != "code":
            return back(error="unsupported_response_type")
        challenge = query.get("code_challenge", "")
        if query.get("code_challenge_method") != "S256" or not challenge:
            return back(error="invalid_request", error_description="PKCE S256 required")
        if query.get("devidp_action") == "deny":
            self.events.append("authorization denied (scripted)")
            return back(error="access_denied")
        code = "devac-" + secrets.token_urlsafe(24)
        self._auth_codes[code] = _AuthCode(
            client_id=self.client_id,
            redirect_uri=redirect_uri,
            challenge=challenge,
            scope=query.get("scope"),
            expires_at=self.clock() + _CODE_LIFETIME,
        )
        self.events.append(f"authorization code {fingerprint(code)} issued")
        return back(code=code)

    def _code_grant(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        # Codes are single-use: popped before any check, so a failed try burns it.
        issued = self._auth_codes.pop(form.get("code", ""), None)
        if issued is None or self.clock() >= issued.expires_at:
            return 400, {"error": "invalid_grant", "error_description": "unknown or expired code"}
        if not hmac.compare_digest(form.get("redirect_uri", ""), issued.redirect_uri):
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri mismatch"}
        verifier = form.get("code_verifier", "")
        digest = hashlib.sha256(verifier.encode("utf-8")).digest()
        computed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
        if not verifier or not hmac.compare_digest(computed, issued.challenge):
            self.events.append("code exchange refused: PKCE verifier does not match")
            return 400, {"error": "invalid_grant", "error_description": "PKCE check failed"}
        return self._login_answer("authorization code", issued.scope)

    def handle_device_authorization(
        self, form: Mapping[str, str], base_url: str
    ) -> tuple[int, dict[str, Any]]:
        """Answer ``POST /device_authorization`` (RFC 8628 3.1, 3.2).

        *base_url* (``http://HOST:PORT``) is where the approval page lives.
        """
        self.requests.append(_redact(form))
        if not self._client_ok(form):
            return 401, {"error": "invalid_client"}
        device_code = "devdc-" + secrets.token_urlsafe(24)
        raw = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(8))
        user_code = f"{raw[:4]}-{raw[4:]}"
        self._device_grants[device_code] = _DeviceGrant(
            client_id=self.client_id,
            user_code=user_code,
            scope=form.get("scope"),
            expires_at=self.clock() + self.device_expires_in,
            interval=self.device_interval,
        )
        self._user_codes[user_code] = device_code
        self.events.append(f"device flow started: user code {user_code}")
        return 200, {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": f"{base_url}/device",
            "verification_uri_complete": f"{base_url}/device?{urlencode({'user_code': user_code})}",
            "expires_in": _number(self.device_expires_in),
            "interval": _number(self.device_interval),
        }

    def device_action(self, user_code: str, action: str) -> tuple[int, str]:
        """The person's answer on the approval page: (HTTP status, one line for the page).

        ``approve`` and ``deny`` decide the flow; ``expire`` makes the next
        poll answer ``expired_token``; ``slow_down`` makes it answer
        ``slow_down`` once.
        """
        device_code = self._user_codes.get(user_code.strip().upper())
        grant = self._device_grants.get(device_code or "")
        if grant is None:
            return 404, "unknown or finished user code"
        if action not in DEVICE_ACTIONS:
            return 400, f"unknown action; use one of {', '.join(sorted(DEVICE_ACTIONS))}"
        if action == "slow_down":
            grant.slow_down_next = True
        else:
            grant.state = {"approve": "approved", "deny": "denied", "expire": "expired"}[action]
        self.events.append(f"device flow {grant.user_code}: {action}")
        return 200, f"{grant.user_code}: {action} recorded; return to your terminal"

    def _device_grant(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
        device_code = form.get("device_code", "")
        grant = self._device_grants.get(device_code)
        if grant is None:
            return 400, {"error": "invalid_grant", "error_description": "unknown device code"}
        now = self.clock()
        too_fast = grant.last_poll is not None and now - grant.last_poll < (
            grant.interval - _POLL_TOLERANCE
        )
        grant.last_poll = now
        if grant.state == "expired" or now >= grant.expires_at:
            return self._end_device(device_code, "expired_token")
        if grant.state == "denied":
            return self._end_device(device_code, "access_denied")
        if too_fast or grant.slow_down_next:
            if too_fast:
                self.too_fast_polls += 1
            grant.slow_down_next = False
            grant.interval += 5  # RFC 8628 3.5: the client must add 5 s too
            why = "polled too fast" if too_fast else "scripted"
            self.events.append(f"device poll {grant.user_code}: slow_down ({why})")
            return 400, {"error": "slow_down"}
        if grant.state == "pending":
            self.events.append(f"device poll {grant.user_code}: authorization_pending")
            return 400, {"error": "authorization_pending"}
        self._forget_device(device_code)
        self.events.append(f"device poll {grant.user_code}: approved")
        return self._login_answer("device code", grant.scope)

    def _end_device(self, device_code: str, error: str) -> tuple[int, dict[str, Any]]:
        grant = self._forget_device(device_code)
        self.events.append(f"device poll {grant.user_code}: {error}")
        return 400, {"error": error}

    def _forget_device(self, device_code: str) -> _DeviceGrant:
        grant = self._device_grants.pop(device_code)
        self._user_codes.pop(grant.user_code, None)
        return grant

    def _client_ok(self, form: Mapping[str, str]) -> bool:
        if not hmac.compare_digest(form.get("client_id", ""), self.client_id):
            return False
        if self._client_secret is None:
            return True
        return hmac.compare_digest(form.get("client_secret", ""), self._client_secret)


def _redact(form: Mapping[str, str]) -> dict[str, str]:
    return {
        key: fingerprint(value) if key in _SECRET_FORM_KEYS else value
        for key, value in form.items()
    }


def _number(seconds: float) -> float | int:
    """Whole seconds as an integer, as real IdPs send them."""
    return int(seconds) if float(seconds).is_integer() else seconds
