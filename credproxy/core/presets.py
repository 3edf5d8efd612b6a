"""Provider presets: ``[providers.NAME] preset = "…"`` fills in what is known.

A preset is data: the config keys it fills in (endpoints, client id, flow,
fixed loopback port), the keys the user must still set, and where the facts
come from. :func:`apply_preset` merges it *under* the provider's own table, so
any key written in the config file wins over the preset, key by key (a list
such as ``scopes`` is replaced, not extended).

Every value here comes from a public source: the provider's own documentation,
the tool's own source, or (where ``docs/providers.md`` says so) a peer's;
``docs/providers.md`` cites the source of each preset. A preset sends what the
tool's own client sends, field for field: the scopes of its authorization
request, extra parameters (``authorize_params``), the body encoding of the
login's requests (the code exchange, or the device flow's request and polls)
and of a refresh (``exchange_body``, ``refresh_body``), whether a refresh
repeats the scopes (``refresh_scopes``), ``state`` in the exchange, PKCE on
the device flow, and the redirect's host, port and path. Headers the tool
adds to its refresh (Codex's ``originator``) are not a config key: they are
:attr:`Preset.refresh_headers`, sent for every provider of that preset.
Where a fact is not published (an installed-app client secret kept out of
this repository, your own client id), the preset leaves the key unset and
says so: a key that refresh needs (``token_url``, ``client_id``,
``client_secret_file`` where the client has a secret) is listed in
:attr:`Preset.required`, and a missing one is a :class:`PresetError` at load
time with a hint; a key that only a login flow needs is listed in
:attr:`Preset.login_needs` and left to ``credproxy login`` to ask for.

Pure: no I/O, no clock. ``credproxy.core.config.parse`` calls
:func:`apply_preset` on every ``[providers.X]`` table before decoding it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from credproxy.errors import ConfigError

__all__ = ["PRESETS", "Preset", "PresetError", "apply_preset"]


class PresetError(ConfigError):
    """A ``preset`` key names no preset, or a preset lacks a value the user must set.

    ``keys`` is the config path of the field at fault (``["providers", NAME,
    "preset"]``), so that the config loader can add the file and line.
    """

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys


class Preset(NamedTuple):
    """What a preset knows about one provider, and what it leaves to the user."""

    title: str
    #: Config keys filled in when the provider's table does not set them.
    defaults: Mapping[str, Any]
    #: Keys refresh cannot do without that the preset does not know: key -> hint.
    required: Mapping[str, str]
    #: Keys only a login flow needs that the preset does not know: key -> hint.
    login_needs: Mapping[str, str]
    #: Where the facts come from (the section of docs/providers.md that cites them).
    source: str
    #: Said to the person by ``credproxy login`` before it starts (e.g. a service that ended).
    notice: str = ""
    #: Headers the tool's own client sends with a refresh, beside credproxy's own
    #: ``Accept`` and ``User-Agent``. Not a config key: a provider of this preset
    #: always sends them (:func:`credproxy.core.oauth.refresh_headers`).
    refresh_headers: Mapping[str, str] = MappingProxyType({})
    #: Scopes the tool's refresh keeps only if the stored token was granted them
    #: (its ``scope``), after ``refresh_scopes`` (:func:`credproxy.core.oauth.refresh_form`).
    refresh_keeps_granted: tuple[str, ...] = ()


# GitHub: "Authorizing OAuth apps" (device flow) and "Refreshing user access tokens",
# github/docs; the same URLs are golang.org/x/oauth2's endpoints.GitHub.
_GITHUB_DEVICE_CODE = "https://github.com/login/device/code"
_GITHUB_TOKEN = "https://github.com/login/oauth/access_token"  # noqa: S105 (a URL)
# Google: google-auth-library-nodejs OAuth2Client (the library Gemini CLI logs in with).
_GOOGLE_AUTHORIZE = "https://accounts.google.com/o/oauth2/v2/auth"
_GOOGLE_TOKEN = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
# Microsoft identity platform v2.0 endpoints, for the "organizations" tenant alias (any
# work or school account; the one alias both the protocol docs and MSAL accept for the
# device flow). A single-tenant app registration sets both URLs with its own tenant.
_ENTRA = "https://login.microsoftonline.com/organizations/oauth2/v2.0"
# GitLab.com: GitLab's doc/api/oauth2.md gives the paths; golang.org/x/oauth2's
# endpoints.GitLab the gitlab.com host.
_GITLAB = "https://gitlab.com/oauth"

#: Every known preset, by the name used in ``preset = "…"``.
PRESETS: dict[str, Preset] = {
    "claude": Preset(
        title="Claude (Claude Code's public client)",
        defaults={
            "token_url": "https://platform.claude.com/v1/oauth/token",
            "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
            # Claude Code's CLAUDE_AI_AUTHORIZE_URL (the Claude.ai subscription login).
            "authorization_url": "https://claude.com/cai/oauth/authorize",
            # Claude Code adds code=true to every authorization request.
            "authorize_params": {"code": "true"},
            # allOAuthScopes() of 2.1.332: the Console scopes and the Claude.ai
            # login's (claudeAiLoginScopes(), user:plugins last), without
            # duplicates, then user:privacy_consents:write.
            "scopes": [
                "org:create_api_key",
                "user:profile",
                "user:inference",
                "user:sessions:claude_code",
                "user:mcp_servers",
                "user:file_upload",
                "user:plugins",
                "user:privacy_consents:write",
            ],
            "flow": "loopback",
            # http://localhost:<any free port>/callback, as Claude Code's listener.
            "redirect_uri": "http://localhost/callback",
            # Its token requests are JSON; the exchange carries the login's state,
            # and a refresh asks for the Claude.ai login's scopes
            # (claudeAiLoginScopes()), then those of user:projects:* and
            # user:privacy_consents:write the stored token was granted
            # (firstPartyRefreshScopes: refresh_keeps_granted below).
            "exchange_body": "json",
            "exchange_state": True,
            "refresh_body": "json",
            "refresh_scopes": [
                "user:profile",
                "user:inference",
                "user:sessions:claude_code",
                "user:mcp_servers",
                "user:file_upload",
                "user:plugins",
            ],
        },
        required={},
        login_needs={},
        source="docs/providers.md (Claude): Claude Code's own client, cli.js of "
        "@anthropic-ai/claude-code 2.1.112 on npm (the last release with a readable "
        "cli.js): its OAuth constants, authorization-URL, code-exchange and refresh functions; "
        "the scopes of 2.1.332 (the JavaScript in the native binary of "
        "@anthropic-ai/claude-code-linux-x64): allOAuthScopes, claudeAiLoginScopes, "
        "firstPartyRefreshScopes",
        refresh_keeps_granted=(
            "user:projects:read",
            "user:projects:write",
            "user:privacy_consents:write",
        ),
    ),
    "codex": Preset(
        title="Codex / ChatGPT login",
        defaults={
            "token_url": "https://auth.openai.com/oauth/token",
            "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
            "authorization_url": "https://auth.openai.com/oauth/authorize",
            "authorize_params": {
                "id_token_add_organizations": "true",
                "codex_cli_simplified_flow": "true",
                "originator": "codex_cli_rs",
            },
            # What `codex login` asks for; offline_access is what brings a refresh token.
            "scopes": [
                "openid",
                "profile",
                "email",
                "offline_access",
                "api.connectors.read",
                "api.connectors.invoke",
            ],
            "flow": "loopback",
            # The client's registered redirect, sent as it is and listened on; Codex
            # falls back to 1457 (also registered) when 1455 is taken.
            "redirect_uri": "http://localhost:1455/auth/callback",
            "fallback_ports": [1457],
            # The code exchange is a form; a refresh is JSON, without a scope.
            "refresh_body": "json",
            "refresh_scopes": False,
        },
        required={},
        login_needs={},
        source="docs/providers.md (Codex): openai/codex codex-rs/login/src/server.rs "
        "(build_authorize_url, exchange_code_for_tokens, bind_server), "
        "codex-rs/login/src/auth/manager.rs (request_chatgpt_token_refresh) at 250de82b; "
        "codex-rs/login/src/auth/default_client.rs (default_headers) read at 0157182c",
        # The refresh goes through create_client(), whose default headers name the
        # originator on every request (credproxy keeps its own User-Agent).
        refresh_headers=MappingProxyType({"originator": "codex_cli_rs"}),
    ),
    "gemini": Preset(
        title="Gemini CLI (Google installed-app client)",
        defaults={
            "token_url": _GOOGLE_TOKEN,
            "client_id": "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com",
            "authorization_url": _GOOGLE_AUTHORIZE,
            # Gemini CLI asks for offline access on every authorization request.
            "authorize_params": {"access_type": "offline"},
            "scopes": [
                "https://www.googleapis.com/auth/cloud-platform",
                "https://www.googleapis.com/auth/userinfo.email",
                "https://www.googleapis.com/auth/userinfo.profile",
            ],
            "flow": "loopback",
            # http://127.0.0.1:<any free port>/oauth2callback, as Gemini CLI's web login.
            "redirect_uri": "http://127.0.0.1/oauth2callback",
            # google-auth-library refreshes without a scope.
            "refresh_scopes": False,
        },
        required={
            "client_secret_file": "a file holding Gemini CLI's installed-app client secret "
            "(OAUTH_CLIENT_SECRET in google-gemini/gemini-cli "
            "packages/core/src/code_assist/oauth2.ts; see docs/providers.md)",
        },
        login_needs={},
        source="docs/providers.md (Gemini CLI): google-gemini/gemini-cli "
        "packages/core/src/code_assist/oauth2.ts (authWithWeb, OAUTH_SCOPE) at 5411f113; "
        "google-auth-library-nodejs src/auth/oauth2client.ts (getToken, refreshTokenNoCache)",
    ),
    "copilot": Preset(
        title="GitHub Copilot (GitHub device flow, then Copilot's token exchange)",
        defaults={
            "token_url": _GITHUB_TOKEN,
            "client_id": "Iv1.b507a08c87ecfe98",
            "device_authorization_url": _GITHUB_DEVICE_CODE,
            "scopes": ["read:user"],
            "flow": "device",
            # copilot-api sends the device request and its polls as JSON.
            "exchange_body": "json",
            # The GitHub token mints the short-lived token the Copilot API takes.
            "grant": "copilot",
            "mint_url": "https://api.github.com/copilot_internal/v2/token",
        },
        required={},
        login_needs={},
        source="docs/providers.md (Copilot): ericc-ch/copilot-api src/services/github/ "
        "(get-device-code.ts, poll-access-token.ts, get-copilot-token.ts) and "
        "src/lib/api-config.ts at 0ea08feb; GitHub's device flow docs",
    ),
    "qwen": Preset(
        title="Qwen (device code with PKCE; the free OAuth tier ended on 2026-04-15)",
        defaults={
            "token_url": "https://chat.qwen.ai/api/v1/oauth2/token",
            "client_id": "f0304373b74a44d2b584a3fb70ca9e56",
            "device_authorization_url": "https://chat.qwen.ai/api/v1/oauth2/device/code",
            "scopes": ["openid", "profile", "email", "model.completion"],
            "flow": "device",
            # qwen-code sends an S256 challenge with the device request and the
            # verifier with every poll; a refresh carries no scope.
            "device_pkce": True,
            "refresh_scopes": False,
        },
        required={},
        login_needs={},
        source="docs/providers.md (Qwen): QwenLM/qwen-code packages/core/src/qwen/qwenOAuth2.ts "
        "(requestDeviceAuthorization, pollDeviceToken, refreshAccessToken); the end of the "
        "free tier: qwen-code PR #3291 (2026-04-15)",
        notice="Qwen's free OAuth tier ended on 2026-04-15 (qwen-code PR #3291): new logins "
        "are refused and old tokens stop working when the server says so. What still works: "
        "an API key (`credproxy key set NAME`, e.g. Alibaba Cloud Model Studio, OpenRouter), "
        "or an OAuth client of your own in [providers.NAME]. Trying the device flow anyway.",
    ),
    "github": Preset(
        title="GitHub OAuth app or GitHub App (your client id)",
        defaults={
            "token_url": _GITHUB_TOKEN,
            "device_authorization_url": _GITHUB_DEVICE_CODE,
            "flow": "device",
        },
        required={
            "client_id": "your OAuth app's client id (enable the device flow in its settings)",
        },
        login_needs={},
        source="docs/providers.md (github): endpoints from github/docs "
        "authorizing-oauth-apps.md and refreshing-user-access-tokens.md",
    ),
    "google": Preset(
        title="Google (your OAuth client)",
        defaults={
            "token_url": _GOOGLE_TOKEN,
            "authorization_url": _GOOGLE_AUTHORIZE,
            "flow": "loopback",
        },
        required={
            "client_id": "your OAuth client's id",
        },
        login_needs={
            "scopes": "the scopes to consent to (e.g. "
            '["https://www.googleapis.com/auth/cloud-platform"]); Google refuses a login '
            "without scope",
        },
        source="docs/providers.md (google): endpoints from google-auth-library-nodejs "
        "src/auth/oauth2client.ts",
    ),
    "entra": Preset(
        title="Microsoft Entra (your app registration; tenant 'organizations')",
        defaults={
            "token_url": f"{_ENTRA}/token",
            "device_authorization_url": f"{_ENTRA}/devicecode",
            "flow": "device",
        },
        required={
            "client_id": "your app registration's client id",
        },
        login_needs={
            "scopes": "the scopes to consent to, with offline_access for a refresh token "
            '(e.g. ["offline_access", "User.Read"]); Entra requires scope on the device request',
        },
        source="docs/providers.md (entra): endpoints and tenant aliases from "
        "MicrosoftDocs/entra-docs docs/identity-platform/v2-oauth2-device-code.md",
    ),
    "gitlab": Preset(
        title="GitLab.com (your OAuth application; device flow since 17.2)",
        defaults={
            "token_url": f"{_GITLAB}/token",
            "authorization_url": f"{_GITLAB}/authorize",
            "device_authorization_url": f"{_GITLAB}/authorize_device",
            "flow": "device",
        },
        required={
            "client_id": "your OAuth application's id",
        },
        login_needs={},
        source="docs/providers.md (gitlab): paths from GitLab's doc/api/oauth2.md, "
        "gitlab.com host from golang.org/x/oauth2 endpoints.GitLab",
    ),
    # -- the signing grants (docs/signing.md): a key on the host mints the token --------
    "google-service-account": Preset(
        title="Google service account (JWT bearer with its JSON key)",
        defaults={
            "grant": "jwt-bearer",
            "token_url": _GOOGLE_TOKEN,
            # Google's library puts the scopes in the assertion's `scope` claim and
            # sends only grant_type and assertion; iss is the key's client_email.
            "scope_in_assertion": True,
        },
        required={
            "key_file": "the service account's JSON key file (mode 0600)",
            "scopes": 'the scopes to ask for, e.g. ["https://www.googleapis.com/auth/cloud-platform"]',
        },
        login_needs={},
        source="docs/signing.md (google-service-account): googleapis/google-auth-library-python "
        "google/oauth2/service_account.py (_make_authorization_grant_assertion) and "
        "google/oauth2/_client.py (jwt_grant); Google's 'Using OAuth 2.0 for Server to Server "
        "Applications'",
    ),
    "github-app": Preset(
        title="GitHub App installation tokens (github.com; api_url for GitHub Enterprise)",
        defaults={
            "grant": "github-app",
            "api_url": "https://api.github.com",
            # The REST API through the API proxy (GitHub takes an installation
            # token as a Bearer); another api_url (GitHub Enterprise) moves it.
            "api": {
                "base_url": "https://api.github.com",
                "headers": {"Authorization": "Bearer {access_token}"},
            },
        },
        required={
            "app_id": "the App's id, or its client id (the App's settings page)",
            "installation_id": "the installation's id (the number at the end of the "
            "installation's settings URL)",
            "private_key": "the App's private key, the .pem GitHub generated (mode 0600)",
        },
        login_needs={},
        source="docs/signing.md (github-app): github/docs generating-a-json-web-token-jwt-for-"
        "a-github-app.md and generating-an-installation-access-token-for-a-github-app.md; the "
        "REST endpoint POST /app/installations/{installation_id}/access_tokens",
    ),
    "snowflake": Preset(
        title="Snowflake key-pair JWT (the JWT is the token)",
        defaults={
            "grant": "signed-jwt",
            # ACCOUNT.USER.SHA256:<fingerprint of the public key>; {subject} is ACCOUNT.USER.
            "issuer": "{subject}.{key_fingerprint}",
            "lifetime": 3600,
        },
        required={
            "subject": "ACCOUNT.USER in uppercase: your account identifier and user name",
            "private_key": "the RSA private key whose public key is set on the user (mode 0600)",
        },
        login_needs={},
        source="docs/signing.md (snowflake): Snowflake's 'Authenticating to the server' "
        "(SQL API, key-pair authentication) and 'Authenticating Snowflake REST APIs'",
    ),
}


def apply_preset(name: str, table: dict[str, Any]) -> dict[str, Any]:
    """The ``[providers.NAME]`` *table* with its preset's defaults filled in.

    *name* is the provider's name (used in messages); the preset is the
    table's ``preset`` key, which is kept in the result. A table without one
    is returned as a copy, unchanged. Keys the table sets win over the preset.

    Raises:
        PresetError: ``preset`` is not a string or names no preset (the
            message lists the known ones), or the preset lacks a key refresh
            needs and the table does not set it (the message says what to set).
    """
    chosen = table.get("preset")
    if chosen is None:
        return dict(table)
    where = ["providers", name, "preset"]
    known = ", ".join(sorted(PRESETS))
    if not isinstance(chosen, str):
        raise PresetError(f"preset must be a string, one of: {known}", where)
    preset = PRESETS.get(chosen)
    if preset is None:
        raise PresetError(f"unknown preset {chosen!r}; known presets: {known}", where)
    merged = {**preset.defaults, **table}
    api = preset.defaults.get("api")
    if (
        "api_url" in table
        and "api" not in table
        and isinstance(api, dict)
        and api.get("base_url") == preset.defaults.get("api_url")
    ):
        # The preset's API is its api_url's (github-app): another api_url
        # (GitHub Enterprise) moves the API proxy there too, so that its
        # tokens never go to the default host.
        merged["api"] = {**api, "base_url": table["api_url"]}
    for key, hint in preset.required.items():
        if key not in merged:
            raise PresetError(
                f"preset {chosen!r} does not set {key}; set it in [providers.{name}]: {hint}",
                ["providers", name, key],
            )
    return merged
