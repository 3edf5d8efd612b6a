"""GitHub Copilot's second exchange, sans I/O: a GitHub token in, a Copilot token out.

GitHub's device flow for Copilot's client ends in a long-lived GitHub token
(no refresh token, no expiry). The Copilot API does not take it: it takes a
short-lived Copilot token (about 30 minutes) that the GitHub token mints::

    GET https://api.github.com/copilot_internal/v2/token
    Authorization: token <GitHub token>

    {"token": "tid=...;exp=...", "expires_at": <epoch s>, "refresh_in": 1500,
     "endpoints": {"api": "https://api.individual.githubcopilot.com", ...}, ...}

credproxy stores the GitHub token as the key's ``refresh_token`` (never served)
and the Copilot token as its ``access_token`` with ``expiry = expires_at``, so
renewal, single flight, the per-key lock and "durable before served" work as
for any refresh: the "refresh" of a ``grant = "copilot"`` provider is this
exchange again. Renewal starts ``min_lead`` (300 s) before ``expires_at``,
which is when Copilot's own clients renew (``refresh_in`` is 300 s short of
``expires_at`` in every answer seen).

The headers are those of ericc-ch/copilot-api (``src/lib/api-config.ts``
``githubHeaders``), the peer the API proxy recipes follow.
"""

from __future__ import annotations

from typing import Any

from credproxy.core.oauth import json_object, seconds_value
from credproxy.errors import ReauthRequired, RefreshFailed

__all__ = ["MINT_URL", "mint_headers", "parse_mint_response"]

MINT_URL = "https://api.github.com/copilot_internal/v2/token"
EDITOR_VERSION = "vscode/1.104.3"
PLUGIN_VERSION = "copilot-chat/0.26.7"


def mint_headers(github_token: str) -> dict[str, str]:
    """The headers of the exchange (GitHub's ``token`` scheme, as Copilot's clients send)."""
    return {
        "Authorization": f"token {github_token}",
        "Accept": "application/json",
        "Content-Type": "application/json",
        "Editor-Version": EDITOR_VERSION,
        "Editor-Plugin-Version": PLUGIN_VERSION,
        "User-Agent": "GitHubCopilotChat/0.26.7",
        "X-GitHub-Api-Version": "2025-04-01",
        "X-Vscode-User-Agent-Library-Version": "electron-fetch",
    }


def parse_mint_response(status: int, body: bytes) -> dict[str, Any]:
    """The token to store (not yet merged) from the exchange's answer.

    ``token`` becomes ``access_token`` and ``expires_at`` the ``expiry``;
    ``refresh_in`` and ``endpoints`` are kept (the API's base URL is
    ``endpoints.api``).

    Raises:
        ReauthRequired: 401 or 403 (the GitHub token was revoked, or the
            account has no Copilot subscription): a new login is needed.
        RefreshFailed: anything else that is not a usable answer.
    """
    payload = json_object(body)
    if status in (401, 403):
        raise ReauthRequired(
            f"GitHub refused to mint a Copilot token (HTTP {status}): the GitHub login was "
            "revoked, or the account has no Copilot subscription"
        )
    if status != 200 or payload is None:
        raise RefreshFailed(f"the Copilot token endpoint answered HTTP {status}")
    token = payload.get("token")
    expires_at = seconds_value(payload.get("expires_at"))
    if not isinstance(token, str) or not token or expires_at is None:
        raise RefreshFailed("the Copilot token endpoint answered without a usable token")
    out: dict[str, Any] = {"access_token": token, "token_type": "Bearer", "expiry": expires_at}
    refresh_in = seconds_value(payload.get("refresh_in"))
    if refresh_in is not None:
        out["refresh_in"] = refresh_in
    endpoints = payload.get("endpoints")
    if isinstance(endpoints, dict) and all(isinstance(v, str) for v in endpoints.values()):
        out["endpoints"] = endpoints
    return out
