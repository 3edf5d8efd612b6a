"""The OAuth 2.0 refresh grant (RFC 6749 section 6) as a sans-IO codec.

This module builds the request form and judges the response; it never opens a
connection. ``credproxy/shell/http.py`` moves the bytes, and tests can feed
:func:`parse_refresh_response` any status and body they like.

Error classification
--------------------

The daemon needs one question answered about a failed refresh: *will trying
again help?*

- :class:`~credproxy.errors.ReauthRequired` (no): the identity provider says
  the grant or the client is no good (``invalid_grant``, ``invalid_client``,
  ``unauthorized_client``) or answers 401. Retrying a revoked refresh token
  only hammers the IdP; the user has to log in again.
- :class:`~credproxy.errors.RefreshFailed` (yes): everything else. 5xx, 429,
  a 200 without a usable token, HTML from a captive portal, an unknown 400.

Messages name the HTTP status and the OAuth ``error`` code and nothing else
from the response. Bodies and ``error_description`` are never quoted: an IdP
(or a proxy in front of it) may echo the request, refresh token included,
and messages end up in logs and on sandbox sockets.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from credproxy.core.config import Provider
from credproxy.core.presets import PRESETS
from credproxy.errors import ReauthRequired, RefreshFailed, RotatedUnusable

__all__ = [
    "REAUTH_ERRORS",
    "TokenEndpoint",
    "merge_refreshed",
    "parse_refresh_response",
    "refresh_form",
    "refresh_headers",
]

#: OAuth ``error`` codes that mean the refresh token or the client was rejected.
REAUTH_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})

# Registered error codes (RFC 6749 5.2, RFC 6750, RFC 8628, vendor additions
# such as GitHub's "bad_refresh_token") are lowercase words joined by "_", "."
# or "-". Only values of that shape are quoted in messages. Merely stripping
# characters outside [A-Za-z0-9_.-] would not do: a refresh token echoed into
# "error" is usually made of exactly those characters, and almost always
# contains a digit or a capital letter, which this shape refuses.
_ERROR_CODE_RE = re.compile(r"[a-z]+(?:[_.-][a-z]+)*")
_MAX_ERROR_CODE = 64

# RFC 6749 7.1: the type the client must use; "Bearer" when the IdP omits it.
_DEFAULT_TOKEN_TYPE = "Bearer"  # noqa: S105 (a token type, not a secret)


def refresh_form(
    provider: Provider, refresh_token: str, client_secret: str | None, granted: Any = None
) -> dict[str, str]:
    """The fields of a refresh request (sent as ``refresh_body`` says: form or JSON).

    The client authenticates with ``client_secret_post`` when *client_secret*
    is given; ``scope`` is ``refresh_scopes`` when that is a list, else
    ``scopes`` when ``refresh_scopes`` is true (omitting it asks for the scope
    originally granted, RFC 6749 section 6). A preset whose tool keeps some
    scopes only if the token was granted them (Claude Code's
    ``user:projects:*`` and ``user:privacy_consents:write``:
    :attr:`~credproxy.core.presets.Preset.refresh_keeps_granted`) adds those
    found in *granted*, the stored token's ``scope``, in its order.
    """
    form = {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": provider.client_id,
    }
    if client_secret is not None:
        form["client_secret"] = client_secret
    scopes = (
        provider.refresh_scopes
        if isinstance(provider.refresh_scopes, list)
        else provider.scopes
        if provider.refresh_scopes
        else []
    )
    if scopes:
        preset = PRESETS.get(provider.preset) if provider.preset else None
        if preset is not None and preset.refresh_keeps_granted and isinstance(granted, str):
            keeps = preset.refresh_keeps_granted
            scopes = [*scopes, *(s for s in granted.split() if s in keeps and s not in scopes)]
        form["scope"] = " ".join(scopes)
    return form


def refresh_headers(provider: Provider) -> dict[str, str]:
    """The headers a refresh adds to credproxy's own ``Accept`` and ``User-Agent``.

    Those of the provider's preset (:attr:`~credproxy.core.presets.Preset.refresh_headers`,
    Codex's ``originator``); none without a preset.
    """
    preset = PRESETS.get(provider.preset) if provider.preset else None
    return dict(preset.refresh_headers) if preset is not None else {}


def parse_refresh_response(status: int, body: bytes, now: float) -> dict[str, Any]:
    """Turn the token endpoint's answer into a token dict (not yet merged).

    *now* is the wall-clock time the request was sent; ``expires_in`` is
    counted from it, so the computed ``expiry`` errs on the early side.

    On success (200 with a JSON object carrying a string ``access_token``)
    the result keeps every field of the answer except ``expires_in``, which
    becomes an absolute ``expiry`` (an ``expiry`` sent by the IdP is kept when
    there is no ``expires_in``; with neither, the token has no expiry).
    ``token_type`` defaults to ``"Bearer"``. An empty or null
    ``refresh_token`` is dropped, so that :func:`merge_refreshed` keeps the
    old one.

    Raises:
        ReauthRequired: 401, or a 400 (or 200) whose ``error`` is one of
            :data:`REAUTH_ERRORS`.
        RefreshFailed: anything else that is not a usable token;
            :class:`~credproxy.errors.RotatedUnusable` when that answer is a 200
            carrying a new refresh token, which the caller must keep.
    """
    payload = json_object(body)
    error = payload.get("error") if payload is not None else None
    try:
        return _refreshed(status, payload, error, now)
    except RefreshFailed as exc:
        rotated = payload.get("refresh_token") if status == 200 and payload is not None else None
        if isinstance(rotated, str) and rotated:
            # The identity provider may have spent the old refresh token: the
            # new one is kept, whatever else is wrong with the answer.
            raise RotatedUnusable(str(exc), rotated) from None
        raise


def _refreshed(
    status: int, payload: dict[str, Any] | None, error: object, now: float
) -> dict[str, Any]:
    """:func:`parse_refresh_response`'s reading of an answer (without the rotation rule)."""

    if status != 200 or payload is None or "access_token" not in payload:
        code = error_code(error)
        where = f"HTTP {status}" + (f", error {code}" if code else "")
        if status == 401 or (status in (200, 400) and error in REAUTH_ERRORS):
            raise ReauthRequired(f"the identity provider rejected the refresh token ({where})")
        if status == 200:
            what = "no JSON object" if payload is None else "no access_token"
            raise RefreshFailed(f"the token endpoint answered {where} with {what}")
        raise RefreshFailed(f"the token endpoint answered {where}")

    access_token = payload["access_token"]
    if not isinstance(access_token, str) or not access_token:
        raise RefreshFailed("the token endpoint answered HTTP 200 with an unusable access_token")

    token = dict(payload)
    expires_in = token.pop("expires_in", None)
    if expires_in is not None:
        seconds = seconds_value(expires_in)
        if seconds is None:
            raise RefreshFailed("the token endpoint answered HTTP 200 with an invalid expires_in")
        token["expiry"] = now + seconds
    elif "expiry" in token:
        seconds = seconds_value(token["expiry"])
        if seconds is None:
            raise RefreshFailed("the token endpoint answered HTTP 200 with an invalid expiry")
        token["expiry"] = seconds

    token_type = token.get("token_type")
    if not isinstance(token_type, str) or not token_type:
        token["token_type"] = _DEFAULT_TOKEN_TYPE

    refresh_token = token.get("refresh_token", "")
    if refresh_token is None or refresh_token == "":
        token.pop("refresh_token", None)
    elif not isinstance(refresh_token, str):
        raise RefreshFailed("the token endpoint answered HTTP 200 with an invalid refresh_token")
    return token


def merge_refreshed(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The token to store after a refresh: ``{**old, **new}``, with two exceptions.

    - The old ``refresh_token`` is kept when *new* has none (or an empty one):
      an IdP that does not rotate simply omits it (RFC 6749 section 6), and
      losing it would log the user out.
    - The old ``expiry`` is dropped when *new* has none: it describes the old
      access token, and keeping it would make the fresh token look expired and
      trigger another refresh at once.
    """
    merged = {**old, **new}
    if not new.get("refresh_token") and old.get("refresh_token"):
        merged["refresh_token"] = old["refresh_token"]
    if "expiry" not in new:
        merged.pop("expiry", None)
    merged.pop("expires_in", None)
    return merged


class TokenEndpoint(Protocol):
    """Something that performs the refresh grant against an identity provider.

    ``credproxy.shell.http.HttpTokenEndpoint`` is the real one; tests of the renewal
    machinery use in-memory fakes with the same shape.
    """

    async def refresh(
        self,
        provider: Provider,
        refresh_token: str,
        granted: Any = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> dict[str, Any]:
        """Exchange *refresh_token* for a new token (parsed, not merged with the old one).

        *granted* is the stored token's ``scope``, if any (:func:`refresh_form`).
        *clock*, if given, is the wall clock read as the request goes out (the
        answer's ``expires_in`` counts from that reading): the caller's, so
        that it knows when that was.

        Raises:
            RefreshFailed: a transient failure; worth retrying later.
            ReauthRequired: the refresh token or the client was rejected.
        """
        ...

    async def mint(
        self, provider: Provider, bucket: str, *, clock: Callable[[], float] | None = None
    ) -> dict[str, Any]:
        """A new token for a signing grant (docs/signing.md), in the shape the store keeps.

        *clock* as for :meth:`refresh` (its reading also dates the JWTs signed).

        Raises:
            RefreshFailed: minting failed (``MintFailed`` says why and what to do).
        """
        ...


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and UnicodeDecodeError.
        return None
    return value if isinstance(value, dict) else None


def error_code(error: object) -> str:
    """*error* if it has the shape of a registered OAuth error code, else a placeholder."""
    if error is None:
        return ""
    if isinstance(error, str) and len(error) <= _MAX_ERROR_CODE and _ERROR_CODE_RE.fullmatch(error):
        return error
    return "(unrecognised code)"


def seconds_value(value: object) -> float | None:
    """A non-negative finite number of seconds from a JSON number or numeric string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        # Some IdPs send "3600"; accept plain decimal integers only.
        if not value.isascii() or not value.isdigit() or len(value) > 15:
            return None
        value = int(value)
    if not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds
