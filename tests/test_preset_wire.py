"""The codex, gemini, qwen, claude and copilot presets on the wire, against strict providers (``strict_providers.py``).

Each strict provider accepts only what the provider's own client sends (the
Codex CLI, Gemini CLI, Qwen Code, Claude Code, Copilot's client as
copilot-api has it: sources in ``strict_providers.py``) and
answers anything else 400 ``invalid_request`` naming the rule. The config
written here takes the preset and overrides **only** the endpoint URLs (to
point at the strict provider on 127.0.0.1), so scopes, extra authorization
parameters, encodings, the redirect URI's host, port and path, and PKCE on the
device flow all come from the preset: that is what is under test.

The installed ``credproxy`` runs as subprocesses: ``credproxy login P
--no-browser`` (the test reads the URL it prints, checks it, and plays the
browser: the strict provider's authorize endpoint, then the redirect on
127.0.0.1), and ``credproxy run --allow P -- credproxy token P`` for a refresh
in the background daemon. Test names carry the number of the defect they pin.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from strict_providers import (
    FORM,
    JSON,
    AuthCodeProvider,
    Claude,
    Codex,
    Copilot,
    DeviceGrant,
    DeviceProvider,
    Gemini,
    Qwen,
    Seen,
    StrictProvider,
    canary,
    s256,
)

from conftest import CREDPROXY, Dirs, Login, StartLogin, cli

CODEX_REDIRECT = "http://localhost:1455/auth/callback"
CODEX_FALLBACK_REDIRECT = "http://localhost:1457/auth/callback"
GEMINI_SECRET = "fake-gemini-client-secret-CANARY-5d1e"
#: The fields of a code exchange with PKCE (RFC 6749 section 4.1.3, RFC 7636 section 4.5).
CODE_EXCHANGE = {"grant_type", "code", "redirect_uri", "client_id", "code_verifier"}


# -- running `credproxy login` ------------------------------------------------------------


LoginTo = Callable[[StrictProvider], Login]


@pytest.fixture
def login_to(background_daemon: Dirs, start_login: StartLogin) -> LoginTo:
    """``login_to(provider)``: configure *provider*, then start ``credproxy login NAME --no-browser``.

    In the background daemon's directories, with ``--timeout 20``.
    """

    def start(provider: StrictProvider) -> Login:
        configure(background_daemon, provider)
        return start_login(background_daemon, provider.name, "--timeout", "20")

    return start


# -- helpers ------------------------------------------------------------------------------


def serving(name: str, make: Callable[[], StrictProvider]) -> Any:
    """The fixture *name*: the strict provider *make* starts, serving during the test, stopped after."""

    def provider() -> Iterator[StrictProvider]:
        with make() as server:
            yield server

    return pytest.fixture(provider, name=name)


codex = serving("codex", Codex)
gemini = serving("gemini", lambda: Gemini(GEMINI_SECRET))
qwen = serving("qwen", Qwen)
claude = serving("claude", Claude)
copilot = serving("copilot", Copilot)


def configure(dirs: Dirs, provider: StrictProvider) -> None:
    """The provider's table: the preset and this server's endpoints.

    Gemini's also has the client secret in a file, as a user writes it (`grep > file`).
    """
    extra: dict[str, str] = {}
    if isinstance(provider, Gemini):
        secret = dirs.root / "gemini.secret"
        secret.write_text(GEMINI_SECRET + "\n")
        secret.chmod(0o600)
        extra["client_secret_file"] = str(secret)
    dirs.config.write_text(provider.config_toml(**extra))


def listener() -> socket.socket:
    """A TCP socket that binds as servers do (SO_REUSEADDR: a TIME_WAIT left by a login is no obstacle)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return s


def port_free(port: int) -> bool:
    with listener() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def need_port(port: int) -> None:
    if not port_free(port):
        pytest.skip(f"127.0.0.1:{port} is in use on this machine (the codex login needs it)")


def query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def browse_to(location: str) -> httpx.Response:
    """The browser lands on the redirect URI; credproxy listens on 127.0.0.1 even for `localhost`."""
    parts = urlsplit(location)
    assert parts.hostname in ("localhost", "127.0.0.1"), location
    target = urlunsplit(parts._replace(netloc=f"127.0.0.1:{parts.port}"))
    return httpx.get(target, timeout=20, trust_env=False)


def authorize_in_browser(url: str) -> httpx.Response:
    """The person opens *url* (the strict authorize endpoint) and approves; then the redirect."""
    answer = httpx.get(url, timeout=10, trust_env=False)
    assert answer.status_code == 302, f"authorize refused: {answer.status_code} {answer.text}"
    return browse_to(answer.headers["location"])


def stored(dirs: Dirs, provider: str) -> dict[str, Any]:
    token: dict[str, Any] = json.loads(
        (dirs.state / "tokens" / provider / "default.json").read_text()
    )
    return token


def assert_no_canary(*texts: str) -> None:
    """No token, code, device code or client secret reached a terminal."""
    for text in texts:
        assert "CANARY" not in text, text


def assert_logged_in(dirs: Dirs, provider: StrictProvider, login: Login) -> None:
    assert provider.refusals == [], provider.describe()
    assert login.finish() == 0, login.stderr
    token = stored(dirs, provider.name)
    assert token["access_token"] == provider.issued[-1]["access_token"]
    assert token["refresh_token"] == provider.issued[-1]["refresh_token"]
    assert_no_canary(login.stdout, login.stderr)


def assert_approved_and_logged_in(
    dirs: Dirs, provider: AuthCodeProvider, login: Login, url: str
) -> None:
    """*url* breaks none of the provider's rules; the person approves it and the login completes."""
    assert provider.authorize_problems(url) == [], url
    page = authorize_in_browser(url)
    assert page.status_code == 200, page.text
    assert_logged_in(dirs, provider, login)


def code_exchange(
    provider: AuthCodeProvider, login: Login, encoding: str
) -> tuple[dict[str, str], Seen]:
    """The authorization request's parameters, and the one code exchange after its redirect.

    The browser is sent straight to the redirect for the URL as printed (the
    code is issued for it unchecked: the authorize tests check it). The
    exchange was sent in *encoding*.
    """
    params = query(login.auth_url())
    page = browse_to(provider.redirect_for(params))
    assert page.status_code == 200, page.text
    exchange = provider.only("exchange")
    assert exchange.content_type == encoding, provider.describe()
    return params, exchange


def assert_exchange_matches(exchange: Seen, params: dict[str, str]) -> None:
    """The exchange's redirect_uri is the authorization request's; its verifier, the challenge's."""
    assert exchange.fields["redirect_uri"] == params["redirect_uri"]
    assert s256(exchange.fields["code_verifier"]) == params["code_challenge"]


def import_expired(
    dirs: Dirs, provider: StrictProvider, refresh_token: str, kind: str = "at-old"
) -> subprocess.CompletedProcess[str]:
    """``credproxy import`` an access token (a *kind* canary) that expired a minute ago."""
    old = {
        "access_token": canary(kind),
        "refresh_token": refresh_token,
        "expiry": int(time.time()) - 60,
    }
    imported = cli(dirs, "import", provider.name, input=json.dumps(old))
    assert imported.returncode == 0, imported.stderr
    return imported


def token_in_session(dirs: Dirs, provider: str) -> subprocess.CompletedProcess[str]:
    """``credproxy run --allow P -- credproxy token P``: what a sandbox is served."""
    return cli(dirs, "run", "--allow", provider, "--", CREDPROXY, "token", provider)


def refresh_through_daemon(
    dirs: Dirs, provider: StrictProvider
) -> subprocess.CompletedProcess[str]:
    """Import a token that has expired, then have a sandbox ask for it.

    The daemon (started by ``credproxy run``) refreshes it at the strict
    provider before serving it. (A token with a few seconds left would be
    served as it is: the serve margin is capped at half the lifetime observed.)
    """
    imported = import_expired(dirs, provider, provider.seed_refresh_token())
    assert provider.requests == []  # import alone does not refresh
    proc = token_in_session(dirs, provider.name)
    assert_no_canary(imported.stdout, imported.stderr, proc.stderr)
    return proc


def refreshed_once(dirs: Dirs, provider: StrictProvider, encoding: str, fields: set[str]) -> Seen:
    """The refresh of :func:`refresh_through_daemon`: in *encoding*, with exactly *fields*.

    Exactly one refresh, accepted, and the sandbox was given the new access token.
    """
    configure(dirs, provider)
    proc = refresh_through_daemon(dirs, provider)
    refreshes = provider.seen("refresh")
    assert refreshes, f"no refresh reached the provider: {provider.describe()} {proc.stderr}"
    assert refreshes[0].content_type == encoding, provider.describe()
    assert set(refreshes[0].fields) == fields, provider.describe()
    assert provider.refusals == [], provider.describe()
    assert len(provider.seen("refresh")) == 1, provider.describe()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == provider.issued[-1]["access_token"]
    return refreshes[0]


def user_code_shown(provider: DeviceProvider, login: Login) -> DeviceGrant:
    """The device authorization, once credproxy login has shown the person its user code."""
    (grant,) = provider.devices.values()
    login.line(lambda s: grant.user_code in s)
    return grant


def approve_device_login(provider: DeviceProvider, login: Login) -> tuple[DeviceGrant, list[Seen]]:
    """The person is shown the code and approves it after a pending poll; the login succeeds.

    Nothing was refused. Returns the device authorization and every poll.
    """
    grant = user_code_shown(provider, login)
    provider.wait_for("poll")  # at least one pending poll first
    provider.approve(grant.user_code)
    code = login.finish()
    assert provider.refusals == [], provider.describe()
    assert code == 0, login.stderr
    return grant, provider.seen("poll")


# -- Codex --------------------------------------------------------------------------------


def test_4_codex_authorize_asks_for_offline_access_and_codex_extras(
    codex: Codex, background_daemon: Dirs, login_to: LoginTo
) -> None:
    """Item 4: the authorization URL is the Codex CLI's, parameter for parameter.

    codex-rs/login/src/server.rs ``build_authorize_url``: scope "openid profile
    email offline_access api.connectors.read api.connectors.invoke" (without
    offline_access there is no refresh token), S256 PKCE, state, and the extras
    id_token_add_organizations=true, codex_cli_simplified_flow=true,
    originator=codex_cli_rs; redirect_uri http://localhost:1455/auth/callback.
    No other parameter. The strict authorize endpoint then issues a code and
    the login completes.
    """
    need_port(1455)
    login = login_to(codex)
    url = login.auth_url()
    params = query(url)
    assert url.startswith(codex.url("/oauth/authorize") + "?"), url
    assert params.get("scope") == Codex.scope, params
    assert "offline_access" in params.get("scope", "").split(" ")
    for extra, value in (
        ("id_token_add_organizations", "true"),
        ("codex_cli_simplified_flow", "true"),
        ("originator", "codex_cli_rs"),
    ):
        assert params.get(extra) == value, (extra, params)
    assert params.get("redirect_uri") == CODEX_REDIRECT, params
    assert params.get("code_challenge_method") == "S256", params
    assert_approved_and_logged_in(background_daemon, codex, login, url)


def test_4_codex_redirect_falls_back_to_1457_when_1455_is_taken(
    codex: Codex, background_daemon: Dirs, login_to: LoginTo
) -> None:
    """Item 4: with 127.0.0.1:1455 taken, the Codex CLI listens on 1457 and says so in redirect_uri.

    server.rs: DEFAULT_PORT 1455, FALLBACK_PORT 1457; both are registered for
    the client, any other port is refused by the server.
    """
    if not port_free(1457):
        pytest.skip("127.0.0.1:1457 is in use on this machine: the fallback cannot be tested")
    blocker = listener()
    try:
        try:
            blocker.bind(("127.0.0.1", 1455))
        except OSError:
            pytest.skip("127.0.0.1:1455 is in use by another program: cannot take it for the test")
        blocker.listen(1)
        login = login_to(codex)
        url = login.auth_url()
        assert query(url).get("redirect_uri") == CODEX_FALLBACK_REDIRECT, url
        assert_approved_and_logged_in(background_daemon, codex, login, url)
    finally:
        blocker.close()


def test_codex_code_exchange_is_form_with_exactly_the_codex_fields(
    codex: Codex, background_daemon: Dirs, login_to: LoginTo
) -> None:
    """The code exchange is the Codex CLI's: form-encoded, exactly grant_type, code, redirect_uri, client_id, code_verifier.

    server.rs ``exchange_code_for_tokens``: no state, no scope, no secret; the
    redirect_uri is the authorization request's, the verifier matches its
    S256 challenge. The code is issued for the URL as printed (unchecked here:
    the authorize test checks it), so this test is about the exchange only.
    """
    need_port(1455)
    login = login_to(codex)
    params, exchange = code_exchange(codex, login, FORM)
    assert set(exchange.fields) == CODE_EXCHANGE, codex.describe()
    assert_exchange_matches(exchange, params)
    assert_logged_in(background_daemon, codex, login)


def test_3_codex_refresh_is_json_without_scope(codex: Codex, background_daemon: Dirs) -> None:
    """Item 3: the Codex CLI refreshes with a JSON body {client_id, grant_type, refresh_token}, no scope.

    codex-rs/login manager.rs: ``RefreshRequest { client_id, grant_type:
    "refresh_token", refresh_token }`` sent with ``.json(...)``, i.e.
    Content-Type application/json. A form body, or a scope, is refused.
    """
    refreshed_once(background_daemon, codex, JSON, {"client_id", "grant_type", "refresh_token"})


def test_codex_refresh_says_originator_codex_cli_rs_under_credproxys_own_user_agent(
    codex: Codex, background_daemon: Dirs
) -> None:
    """The Codex CLI's refresh carries the header ``originator: codex_cli_rs``; so does credproxy's.

    manager.rs sends the refresh with the client of ``create_client()``, whose
    ``default_headers`` (default_client.rs) put ``originator`` on every
    request. The strict provider refuses a refresh without it. The
    User-Agent stays credproxy's own: credproxy does not pretend to be Codex.
    """
    fields = {"client_id", "grant_type", "refresh_token"}
    refresh = refreshed_once(background_daemon, codex, JSON, fields)
    assert refresh.headers.get("originator") == "codex_cli_rs", refresh.headers.keys()
    user_agent = refresh.headers.get("user-agent", "")
    assert user_agent.startswith("credproxy"), user_agent


# -- Gemini CLI ---------------------------------------------------------------------------


def test_5_gemini_redirect_is_127_0_0_1_oauth2callback_and_authorize_is_gemini_clis(
    gemini: Gemini, background_daemon: Dirs, login_to: LoginTo
) -> None:
    """Item 5: Gemini CLI's web login redirects to http://127.0.0.1:<free port>/oauth2callback.

    gemini-cli oauth2.ts ``authWithWeb``: redirect_uri
    http://127.0.0.1:PORT/oauth2callback (not /callback), and the URL of
    google-auth-library's generateAuthUrl: access_type=offline (else no
    refresh token), the three scopes, state, response_type=code, client_id.
    S256 PKCE is allowed (Google accepts it), nothing else is.
    """
    login = login_to(gemini)
    url = login.auth_url()
    params = query(url)
    redirect = urlsplit(params.get("redirect_uri", ""))
    assert (redirect.scheme, redirect.hostname, redirect.path) == (
        "http",
        "127.0.0.1",
        "/oauth2callback",
    ), params
    assert redirect.port, params
    assert params.get("access_type") == "offline", params
    assert params.get("scope") == Gemini.scope, params
    assert_approved_and_logged_in(background_daemon, gemini, login, url)


def test_gemini_code_exchange_sends_the_client_secret(
    gemini: Gemini, background_daemon: Dirs, login_to: LoginTo
) -> None:
    """The exchange is google-auth-library's getToken: form, client_id, code, grant_type, redirect_uri, client_secret.

    Plus code_verifier exactly when the authorization request had a
    code_challenge (then it must match). The secret is the file's content.
    """
    login = login_to(gemini)
    params, exchange = code_exchange(gemini, login, FORM)
    expected = {"client_id", "code", "grant_type", "redirect_uri", "client_secret"}
    if "code_challenge" in params:
        expected.add("code_verifier")
    assert set(exchange.fields) == expected, gemini.describe()
    assert exchange.fields.get("client_secret") == GEMINI_SECRET, gemini.describe()
    assert_logged_in(background_daemon, gemini, login)


def test_gemini_refresh_is_form_with_client_secret_and_no_scope(
    gemini: Gemini, background_daemon: Dirs
) -> None:
    """google-auth-library refreshTokenNoCache: form {refresh_token, client_id, client_secret, grant_type}, no scope."""
    fields = {"refresh_token", "client_id", "client_secret", "grant_type"}
    refreshed_once(background_daemon, gemini, FORM, fields)


# -- Qwen Code ----------------------------------------------------------------------------


def test_6_qwen_device_authorization_sends_pkce_and_the_poll_its_verifier(
    qwen: Qwen, background_daemon: Dirs, login_to: LoginTo
) -> None:
    """Item 6: Qwen Code's device flow carries PKCE; the server refuses it without.

    qwenOAuth2.ts ``requestDeviceAuthorization``: form {client_id, scope
    "openid profile email model.completion", code_challenge,
    code_challenge_method=S256}; ``pollDeviceToken``: form {grant_type
    device_code, client_id, device_code, code_verifier} with the verifier of
    that challenge. Polls are pending until the person approves the user code
    credproxy shows.
    """
    login = login_to(qwen)
    device = qwen.wait_for("device")[0]
    assert device.content_type == FORM, qwen.describe()
    assert set(device.fields) == {
        "client_id",
        "scope",
        "code_challenge",
        "code_challenge_method",
    }, qwen.describe()
    assert device.fields.get("code_challenge_method") == "S256", qwen.describe()
    assert qwen.refusals == [], qwen.describe()
    _, polls = approve_device_login(qwen, login)
    assert {p.status for p in polls[:-1]} <= {400} and polls[-1].status == 200, qwen.describe()
    for poll in polls:
        assert poll.content_type == FORM
        assert set(poll.fields) == {"grant_type", "client_id", "device_code", "code_verifier"}
        assert s256(poll.fields["code_verifier"]) == device.fields["code_challenge"]
    token = stored(background_daemon, "qwen")
    assert token["access_token"] == qwen.issued[-1]["access_token"]
    assert token.get("resource_url") == "portal.qwen.ai"
    assert_no_canary(login.stdout, login.stderr)


def test_qwen_refresh_is_form_without_scope(qwen: Qwen, background_daemon: Dirs) -> None:
    """qwenOAuth2.ts ``refreshAccessToken``: form {grant_type=refresh_token, refresh_token, client_id}, no scope."""
    refreshed_once(background_daemon, qwen, FORM, {"grant_type", "refresh_token", "client_id"})


def test_qwen_login_says_the_free_tier_ended_on_2026_04_15(qwen: Qwen, login_to: LoginTo) -> None:
    """Qwen's free OAuth tier ended on 2026-04-15 (qwen-code PR #3291): the login says so first.

    The notice names the date and what still works (an API key), and comes on
    stderr before the user code is shown.
    """
    login = login_to(qwen)
    qwen.wait_for("device")
    grant = user_code_shown(qwen, login)
    before_code = "".join(login.seen).split(grant.user_code, 1)[0]
    assert "2026-04-15" in before_code, login.seen
    assert "api key" in before_code.lower(), login.seen
    login.close()


# -- Claude Code --------------------------------------------------------------------------


def claude_redirect_ok(uri: str) -> bool:
    """Claude Code's redirect: http://localhost:<port>/callback, nothing else."""
    parts = urlsplit(uri)
    return (
        (parts.scheme, parts.hostname, parts.path) == ("http", "localhost", "/callback")
        and parts.port is not None
        and not parts.query
        and not parts.fragment
    )


def test_1_2_claude_authorize_is_claude_codes_with_file_upload_scope(
    claude: Claude, background_daemon: Dirs, login_to: LoginTo
) -> None:
    """Items 1 and 2: the authorization URL is Claude Code's, parameter for parameter.

    cli.js (2.1.112): ``code=true``, client_id 9d1c250a-..., response_type=code,
    redirect_uri http://localhost:<port>/callback (host localhost, not
    127.0.0.1), S256 PKCE, state. The scope is 2.1.332's ``allOAuthScopes()``,
    exactly "org:create_api_key user:profile user:inference
    user:sessions:claude_code user:mcp_servers user:file_upload user:plugins
    user:privacy_consents:write" (item 2: with user:file_upload). No other
    parameter. Only the host and path come from the test's
    ``authorization_url``. Then the login completes.
    """
    login = login_to(claude)
    url = login.auth_url()
    params = query(url)
    assert url.startswith(claude.url("/cai/oauth/authorize") + "?"), url
    assert params.get("code") == "true", params
    assert params.get("client_id") == Claude.client_id, params
    assert params.get("response_type") == "code", params
    assert params.get("scope") == Claude.scope, params
    assert params.get("scope", "").split(" ")[-3:] == [
        "user:file_upload",
        "user:plugins",
        "user:privacy_consents:write",
    ], params
    assert claude_redirect_ok(params.get("redirect_uri", "")), params
    assert params.get("code_challenge_method") == "S256", params
    assert params.get("state"), params
    assert set(params) == {
        "code",
        "client_id",
        "response_type",
        "redirect_uri",
        "scope",
        "code_challenge",
        "code_challenge_method",
        "state",
    }, params
    assert_approved_and_logged_in(background_daemon, claude, login, url)


def test_1_claude_code_exchange_is_json_with_state_and_the_localhost_redirect(
    claude: Claude, background_daemon: Dirs, login_to: LoginTo
) -> None:
    """Item 1: Claude Code exchanges the code with a JSON body that carries the state.

    cli.js: ``POST`` TOKEN_URL, ``Content-Type: application/json``, exactly
    {grant_type=authorization_code, code, redirect_uri, client_id,
    code_verifier, state}: the redirect_uri and state identical to the
    authorization request's (redirect on localhost), the verifier matching
    its S256 challenge. A form body, or a missing state, is refused.
    """
    login = login_to(claude)
    params, exchange = code_exchange(claude, login, JSON)
    assert set(exchange.fields) == CODE_EXCHANGE | {"state"}, claude.describe()
    assert exchange.fields["grant_type"] == "authorization_code"
    assert exchange.fields["client_id"] == Claude.client_id
    assert exchange.fields["state"] == params["state"]
    assert claude_redirect_ok(exchange.fields["redirect_uri"]), exchange.fields["redirect_uri"]
    assert_exchange_matches(exchange, params)
    assert_logged_in(background_daemon, claude, login)


def test_2_claude_refresh_is_json_with_the_claude_ai_scopes(
    claude: Claude, background_daemon: Dirs
) -> None:
    """Item 2: Claude Code refreshes with JSON {grant_type, refresh_token, client_id, scope}.

    Content-Type application/json (cli.js, 2.1.112). The scope is 2.1.332's
    ``firstPartyRefreshScopes`` for a login that was granted none of
    user:projects:read, user:projects:write, user:privacy_consents:write (the
    strict provider's seeded token, a 2.1.112 login): "user:profile
    user:inference user:sessions:claude_code user:mcp_servers user:file_upload
    user:plugins".
    """
    fields = {"grant_type", "refresh_token", "client_id", "scope"}
    refresh = refreshed_once(background_daemon, claude, JSON, fields)
    scope = refresh.fields.get("scope")
    assert scope == Claude.refresh_scope, scope
    assert (scope or "").split(" ")[-2:] == ["user:file_upload", "user:plugins"]


def test_claude_refresh_keeps_the_privacy_consents_scope_its_login_was_granted(
    claude: Claude, background_daemon: Dirs
) -> None:
    """Claude Code 2.1.332 refreshes a login granted user:privacy_consents:write with that scope kept.

    ``firstPartyRefreshScopes(granted)``: the Claude.ai login's scopes, then
    user:privacy_consents:write, because the stored token's ``scope`` (the
    grant of a 2.1.332 login) has it.
    """
    dirs = background_daemon
    configure(dirs, claude)
    refresh_token = claude.seed_refresh_token(granted=Claude.scope)
    old = {
        "access_token": canary("at-old"),
        "refresh_token": refresh_token,
        "expiry": int(time.time()) - 60,
        "scope": Claude.scope,
    }
    imported = cli(dirs, "import", "claude", input=json.dumps(old))
    assert imported.returncode == 0, imported.stderr
    proc = token_in_session(dirs, "claude")
    refreshes = claude.seen("refresh")
    assert refreshes, f"no refresh reached the provider: {claude.describe()} {proc.stderr}"
    assert claude.refusals == [], claude.describe()
    assert refreshes[0].fields.get("scope") == f"{Claude.refresh_scope} user:privacy_consents:write"
    assert proc.stdout.strip() == claude.issued[-1]["access_token"]


# -- Copilot ------------------------------------------------------------------------------


def assert_minted_with(copilot: Copilot, mint: Seen, github_token: str) -> None:
    """A right second exchange: ``Authorization: token <GitHub token>`` and the editor headers."""
    assert mint.method == "GET", copilot.describe()
    assert mint.headers.get("authorization") == f"token {github_token}", copilot.describe()
    for name in Copilot.mint_headers:
        assert mint.headers.get(name.lower()), (name, copilot.describe())
    library = mint.headers.get("x-vscode-user-agent-library-version")
    assert library == "electron-fetch", copilot.describe()
    assert not mint.refused, copilot.describe()


def assert_served_minted(
    proc: subprocess.CompletedProcess[str], minted: dict[str, Any], github_token: str
) -> None:
    """The session was given the minted Copilot token, never the GitHub token."""
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == minted["token"]
    assert github_token not in proc.stdout + proc.stderr


def assert_stored_minted(dirs: Dirs, minted: dict[str, Any], github_token: str) -> None:
    """The store holds the minted token and its expiry, with the GitHub token as the refresh token."""
    token = stored(dirs, "copilot")
    assert token["access_token"] == minted["token"], "the stored access token is not the minted one"
    assert token["refresh_token"] == github_token, "the GitHub token is not the refresh token"
    assert token["expiry"] == minted["expires_at"], (token["expiry"], minted["expires_at"])


def status_entry(dirs: Dirs, provider: str) -> tuple[dict[str, Any], str]:
    """The ``tokens`` entry of *provider* in ``credproxy status --json``, and the raw output."""
    proc = cli(dirs, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    entries = [
        t for t in json.loads(proc.stdout).get("tokens", []) if t.get("provider") == provider
    ]
    assert len(entries) == 1, proc.stdout
    return entries[0], proc.stdout + proc.stderr


def test_8_copilot_login_stores_the_minted_token_and_keeps_the_github_token_back(
    copilot: Copilot, background_daemon: Dirs, login_to: LoginTo
) -> None:
    """Item 8: the login is GitHub's device flow, then Copilot's second exchange; the minted token is served.

    copilot-api: device authorization, a JSON body {client_id=Iv1.b507a08c87ecfe98,
    scope=read:user} with Accept: application/json; polls, JSON bodies {client_id,
    device_code, grant_type=device_code}, pending answered HTTP 200; then
    ``GET /copilot_internal/v2/token`` with ``Authorization: token <GitHub
    token>`` and Editor-Version, Editor-Plugin-Version, User-Agent,
    X-Vscode-User-Agent-Library-Version. Stored:
    access_token = the Copilot token, refresh_token = the GitHub token, expiry
    = expires_at (status shows it, refreshable). ``credproxy token copilot``
    in a session prints the Copilot token, never the GitHub token.
    """
    dirs = background_daemon
    login = login_to(copilot)
    device = copilot.wait_for("device")[0]
    assert device.content_type == JSON, copilot.describe()
    assert set(device.fields) == {"client_id", "scope"}, copilot.describe()
    assert device.fields == {"client_id": Copilot.client_id, "scope": "read:user"}
    assert "application/json" in device.headers.get("accept", ""), device.headers.get("accept")
    assert copilot.refusals == [], copilot.describe()
    grant, polls = approve_device_login(copilot, login)  # pending polls are HTTP 200
    assert len(polls) >= 2 and {p.status for p in polls} == {200}, copilot.describe()
    for poll in polls:
        assert poll.content_type == JSON, copilot.describe()
        assert "application/json" in poll.headers.get("accept", ""), poll.headers.get("accept")
        assert poll.fields == {
            "client_id": Copilot.client_id,
            "device_code": grant.device_code,
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        }, copilot.describe()
    github_token = copilot.github_token
    assert_minted_with(copilot, copilot.only("mint"), github_token)
    (minted,) = copilot.minted
    assert copilot.seen("refresh") == [], copilot.describe()

    assert_stored_minted(dirs, minted, github_token)
    assert stored(dirs, "copilot")["access_token"] != github_token
    entry, status_text = status_entry(dirs, "copilot")
    assert entry.get("refreshable") is True, entry
    left = minted["expires_at"] - time.time()
    assert left - 10 <= entry.get("expires_in", -1) <= left + 1, entry  # the minted expiry
    # status says the expiry in ISO 8601, as the daemon's status does
    expected = datetime.fromtimestamp(minted["expires_at"], UTC).isoformat(timespec="seconds")
    assert entry["expiry"] == expected, entry
    assert_no_canary(login.stdout, login.stderr, status_text)

    proc = token_in_session(dirs, "copilot")
    assert_served_minted(proc, minted, github_token)
    assert_no_canary(proc.stderr)
    assert len(copilot.seen("mint")) == 1, copilot.describe()  # 30 minutes left: served as is


def test_8_copilot_renewal_is_the_second_exchange_with_the_github_token(
    copilot: Copilot, background_daemon: Dirs
) -> None:
    """Item 8: an expired Copilot token is renewed by minting again with the stored GitHub token.

    Exactly one ``GET /copilot_internal/v2/token`` with ``Authorization: token
    <GitHub token>`` (no refresh grant at GitHub's token endpoint); the
    session gets the new Copilot token; the GitHub token stays the refresh
    token and never reaches the terminal.
    """
    dirs = background_daemon
    configure(dirs, copilot)
    proc = refresh_through_daemon(dirs, copilot)  # imports an expired token, then asks for it
    (github_token,) = copilot.github_tokens
    assert copilot.refusals == [], copilot.describe()
    assert [r.endpoint for r in copilot.requests] == ["mint"], copilot.describe()
    assert_minted_with(copilot, copilot.only("mint"), github_token)
    (minted,) = copilot.minted
    assert_served_minted(proc, minted, github_token)
    assert_stored_minted(dirs, minted, github_token)
    log = dirs.runtime / "daemon.log"
    if log.exists():
        assert github_token not in log.read_text()


def test_8_copilot_mint_refused_401_means_login_again(
    copilot: Copilot, background_daemon: Dirs
) -> None:
    """Item 8: a 401 from the second exchange (GitHub login revoked) means re-authentication.

    ``credproxy token copilot`` exits 4 (README "Exit codes": re-authentication
    required) with one line on stderr naming ``credproxy login copilot``; no
    token is printed.
    """
    dirs = background_daemon
    configure(dirs, copilot)
    github_token = copilot.seed_refresh_token()
    copilot.revoke(github_token)  # the person revoked the GitHub login since
    imported = import_expired(dirs, copilot, github_token, "old-copilot")
    proc = token_in_session(dirs, "copilot")
    mints = copilot.seen("mint")
    assert mints, f"no mint reached the provider: {copilot.describe()} {proc.stderr}"
    for mint in mints:
        assert mint.status == 401
        assert mint.problems == ["unknown or revoked GitHub token"], copilot.describe()
    assert proc.returncode == 4, (proc.returncode, proc.stderr)
    assert "credproxy login copilot" in proc.stderr, proc.stderr
    assert proc.stdout == ""
    assert_no_canary(imported.stdout, imported.stderr, proc.stdout, proc.stderr)


# -- the strict providers themselves ----------------------------------------------------


def _post(
    provider: StrictProvider,
    path: str,
    fields: dict[str, str],
    as_json: bool = False,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    url = provider.url(path)
    if as_json:
        return httpx.post(url, json=fields, headers=headers, trust_env=False)
    return httpx.post(url, data=fields, headers=headers, trust_env=False)


def _get(provider: StrictProvider, path: str, params: dict[str, str]) -> httpx.Response:
    return httpx.get(provider.url(path), params=params, trust_env=False)


def assert_answers(cases: list[tuple[httpx.Response, str | None]]) -> None:
    """Each answer with no rule was accepted (200 or 302); each other, 400 invalid_request naming its rule."""
    for answer, rule in cases:
        if rule is None:
            assert answer.status_code in (200, 302), answer.text
        else:
            assert answer.status_code == 400, answer.text
            body = answer.json()
            assert body["error"] == "invalid_request", body
            assert rule in body["error_description"], (rule, body)


def test_the_strict_providers_refuse_what_their_clients_do_not_send(
    codex: Codex, gemini: Gemini, qwen: Qwen
) -> None:
    """A check of the checker: each strict provider answers 400 invalid_request naming the rule.

    Right requests pass; a form refresh to Codex, a scope on a refresh, a
    Codex refresh without its originator header, a missing client secret, a
    /callback redirect for Gemini, a device request without PKCE or with a
    wrong verifier are refused.
    """
    verifier = "v" * 43 + "-abc"
    challenge = s256(verifier)
    codex_rt, gemini_rt, qwen_rt = (p.seed_refresh_token() for p in (codex, gemini, qwen))
    cases: list[tuple[httpx.Response, str | None]] = []

    refresh = {"client_id": Codex.client_id, "grant_type": "refresh_token"}
    originator = {"originator": "codex_cli_rs"}
    right = {**refresh, "refresh_token": codex_rt}
    cases.append((_post(codex, "/oauth/token", right, True), "header originator must be"))
    cases.append((_post(codex, "/oauth/token", right, True, originator), None))
    form = {**refresh, "refresh_token": "x"}
    cases.append((_post(codex, "/oauth/token", form, False, originator), "Content-Type must be"))
    scoped = {**refresh, "refresh_token": codex_rt, "scope": "openid"}
    cases.append((_post(codex, "/oauth/token", scoped, True, originator), "unexpected field scope"))

    authorize = {
        "response_type": "code",
        "client_id": Codex.client_id,
        "redirect_uri": CODEX_REDIRECT,
        "scope": Codex.scope,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "id_token_add_organizations": "true",
        "codex_cli_simplified_flow": "true",
        "state": "st",
        "originator": "codex_cli_rs",
    }
    ok = _get(codex, "/oauth/authorize", authorize)
    assert ok.status_code == 302 and ok.headers["location"].startswith(CODEX_REDIRECT + "?code=")
    code = query(ok.headers["location"])["code"]
    exchange = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": CODEX_REDIRECT,
        "client_id": Codex.client_id,
        "code_verifier": verifier[:-1] + "x",
    }
    cases.append((_post(codex, "/oauth/token", exchange), "code_verifier does not match"))
    no_extra = {k: v for k, v in authorize.items() if k != "originator"}
    cases.append((_get(codex, "/oauth/authorize", no_extra), "missing field originator"))
    bad_url = codex.url("/oauth/authorize") + "?" + urlencode({**authorize, "scope": "openid"})
    assert any("scope must be" in p for p in codex.authorize_problems(bad_url))

    g_refresh = {
        "refresh_token": gemini_rt,
        "client_id": Gemini.client_id,
        "grant_type": "refresh_token",
    }
    cases.append((_post(gemini, "/token", {**g_refresh, "client_secret": GEMINI_SECRET}), None))
    cases.append((_post(gemini, "/token", g_refresh), "missing field client_secret"))
    wrong_secret = {**g_refresh, "client_secret": "not-the-secret"}
    cases.append((_post(gemini, "/token", wrong_secret), "client_secret is wrong"))
    assert "not-the-secret" not in cases[-1][0].text  # a secret is never echoed
    g_authorize = {
        "redirect_uri": "http://127.0.0.1:4242/callback",
        "access_type": "offline",
        "scope": Gemini.scope,
        "state": "st",
        "response_type": "code",
        "client_id": Gemini.client_id,
    }
    rule = "redirect_uri must be http://127.0.0.1:<port>/oauth2callback"
    cases.append((_get(gemini, "/o/oauth2/v2/auth", g_authorize), rule))
    g_ok = {**g_authorize, "redirect_uri": "http://127.0.0.1:4242/oauth2callback"}
    assert gemini.authorize_problems(gemini.url("/o/oauth2/v2/auth?") + urlencode(g_ok)) == []
    g_pkce = {**g_ok, "code_challenge": challenge, "code_challenge_method": "S256"}
    assert gemini.authorize_problems(gemini.url("/o/oauth2/v2/auth?") + urlencode(g_pkce)) == []

    q_device = {"client_id": Qwen.client_id, "scope": Qwen.scope}
    path = "/api/v1/oauth2/device/code"
    cases.append((_post(qwen, path, q_device), "missing field code_challenge"))
    q_ok = {**q_device, "code_challenge": challenge, "code_challenge_method": "S256"}
    cases.append((_post(qwen, path, q_ok), None))
    device_code = cases[-1][0].json()["device_code"]
    poll = {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "client_id": Qwen.client_id,
        "device_code": device_code,
    }
    token_path = "/api/v1/oauth2/token"
    cases.append((_post(qwen, token_path, poll), "missing field code_verifier"))
    pending = _post(qwen, token_path, {**poll, "code_verifier": verifier})
    assert (pending.status_code, pending.json()) == (400, {"error": "authorization_pending"})
    q_refresh = {"grant_type": "refresh_token", "refresh_token": qwen_rt, "client_id": "other"}
    cases.append((_post(qwen, token_path, q_refresh), "client_id must be"))

    assert_answers(cases)


def test_strict_provider_config_overrides_only_the_endpoints(
    codex: Codex, gemini: Gemini, qwen: Qwen, tmp_path: Path
) -> None:
    """The provider tables the tests write: the preset plus endpoint URLs on 127.0.0.1 (and gemini's secret file)."""
    assert codex.config_toml().splitlines() == [
        "[providers.codex]",
        'preset = "codex"',
        f'token_url = "{codex.base}/oauth/token"',
        f'authorization_url = "{codex.base}/oauth/authorize"',
    ]
    secret = tmp_path / "s"
    assert gemini.config_toml(client_secret_file=str(secret)).splitlines()[2:] == [
        f'token_url = "{gemini.base}/token"',
        f'authorization_url = "{gemini.base}/o/oauth2/v2/auth"',
        f'client_secret_file = "{secret}"',
    ]
    assert qwen.config_toml().splitlines()[2:] == [
        f'device_authorization_url = "{qwen.base}/api/v1/oauth2/device/code"',
        f'token_url = "{qwen.base}/api/v1/oauth2/token"',
    ]


def test_the_claude_and_copilot_stand_ins_refuse_what_their_clients_do_not_send(
    claude: Claude, copilot: Copilot
) -> None:
    """A check of the checker, for the Claude and Copilot stand-ins.

    Claude: a 127.0.0.1 redirect, a missing ``code=true``, 2.1.112's scopes, a
    form exchange, an exchange without or with another state, a refresh
    without the scope, with the login's, with 2.1.112's or without the
    preserved scopes of its grant, a form refresh: 400 invalid_request naming
    the rule; the token answers name the scope granted. Copilot: a form device
    request or poll, a missing Accept or another scope refused; pending is
    HTTP 200; a refresh grant is unsupported; a mint with ``Bearer``, without
    Editor-Version, without ``X-Vscode-User-Agent-Library-Version:
    electron-fetch`` or with a revoked token is 401 "Bad credentials"; each
    right mint is a new token.
    """
    verifier = "w" * 43 + "-xyz"
    challenge = s256(verifier)
    cases: list[tuple[httpx.Response, str | None]] = []
    redirect = "http://localhost:54545/callback"
    authorize = {
        "code": "true",
        "client_id": Claude.client_id,
        "response_type": "code",
        "redirect_uri": redirect,
        "scope": Claude.scope,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "st-1",
    }
    ok = _get(claude, "/cai/oauth/authorize", authorize)
    assert ok.status_code == 302, ok.text
    assert query(ok.headers["location"])["state"] == "st-1"
    for bad, broken in (
        ({**authorize, "redirect_uri": "http://127.0.0.1:54545/callback"}, "redirect_uri must be"),
        ({k: v for k, v in authorize.items() if k != "code"}, "missing field code"),
        ({**authorize, "scope": Claude.refresh_scope}, "scope must be"),
        ({**authorize, "scope": Claude.seed_scope}, "scope must be"),  # 2.1.112's
    ):
        answer = _get(claude, "/cai/oauth/authorize", bad)
        cases.append((answer, broken))

    def code() -> str:
        return query(claude.redirect_for(authorize))["code"]

    exchange = {
        "grant_type": "authorization_code",
        "redirect_uri": redirect,
        "client_id": Claude.client_id,
        "code_verifier": verifier,
        "state": "st-1",
    }
    path = "/v1/oauth/token"
    cases.append((_post(claude, path, {**exchange, "code": code()}), "Content-Type must be"))
    no_state = {k: v for k, v in exchange.items() if k != "state"}
    cases.append((_post(claude, path, {**no_state, "code": code()}, True), "missing field state"))
    other = {**exchange, "state": "st-2", "code": code()}
    cases.append((_post(claude, path, other, True), "state must be"))
    exchanged = _post(claude, path, {**exchange, "code": code()}, True)
    cases.append((exchanged, None))
    assert exchanged.json()["scope"] == Claude.scope  # granted what the login asked for

    refresh = {
        "grant_type": "refresh_token",
        "client_id": Claude.client_id,
        "scope": Claude.refresh_scope,
    }
    rt = claude.seed_refresh_token()
    no_scope = {k: v for k, v in refresh.items() if k != "scope"}
    cases.append(
        (_post(claude, path, {**no_scope, "refresh_token": rt}, True), "missing field scope")
    )
    login_scope = {**refresh, "refresh_token": rt, "scope": Claude.scope}
    cases.append((_post(claude, path, login_scope, True), "scope must be"))
    cases.append((_post(claude, path, {**refresh, "refresh_token": rt}), "Content-Type must be"))
    old_scope = " ".join(Claude.refresh_scope.split()[:-1])  # 2.1.112's: no user:plugins
    old = {**refresh, "refresh_token": rt, "scope": old_scope}
    cases.append((_post(claude, path, old, True), "scope must be"))
    cases.append((_post(claude, path, {**refresh, "refresh_token": rt}, True), None))
    # A grant with scopes a refresh keeps: they follow, in the grant's order.
    granted = f"{Claude.scope} user:projects:read"
    kept = claude.seed_refresh_token(granted=granted)
    cases.append((_post(claude, path, {**refresh, "refresh_token": kept}, True), "scope must be"))
    preserving = f"{Claude.refresh_scope} user:privacy_consents:write user:projects:read"
    renewed = _post(claude, path, {**refresh, "refresh_token": kept, "scope": preserving}, True)
    cases.append((renewed, None))
    assert renewed.json()["scope"] == preserving
    # The token from that login's exchange keeps user:privacy_consents:write too.
    after_login = exchanged.json()["refresh_token"]
    from_login = {**refresh, "refresh_token": after_login, "scope": preserving.rsplit(" ", 1)[0]}
    cases.append((_post(claude, path, from_login, True), None))

    accept = {"Accept": "application/json"}
    device = {"client_id": Copilot.client_id, "scope": "read:user"}
    device_url = copilot.url("/login/device/code")
    as_form = httpx.post(device_url, data=device, headers=accept, trust_env=False)
    as_json = httpx.post(device_url, json=device, headers=accept, trust_env=False)
    cases += [(as_form, "Content-Type must be application/json"), (as_json, None)]
    assert set(as_json.json()) == {
        "device_code",
        "user_code",
        "verification_uri",
        "expires_in",
        "interval",
    }
    assert as_json.json()["interval"] == 1
    cases.append((httpx.post(device_url, json=device, trust_env=False), "Accept must include"))
    email = {**device, "scope": "user:email"}
    cases.append(
        (httpx.post(device_url, json=email, headers=accept, trust_env=False), "scope must be")
    )

    token_url = copilot.url("/login/oauth/access_token")
    poll = {
        "client_id": Copilot.client_id,
        "device_code": as_json.json()["device_code"],
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
    }
    form_poll = httpx.post(token_url, data=poll, headers=accept, trust_env=False)
    cases.append((form_poll, "Content-Type must be application/json"))
    pending = httpx.post(token_url, json=poll, headers=accept, trust_env=False)
    assert (pending.status_code, pending.json()) == (200, {"error": "authorization_pending"})
    copilot.approve(as_json.json()["user_code"])
    approved = httpx.post(token_url, json=poll, headers=accept, trust_env=False)
    assert approved.status_code == 200, approved.text
    github = approved.json()
    assert set(github) == {"access_token", "token_type", "scope"}, github  # no refresh, no expiry
    assert github["access_token"] == copilot.github_token
    unsupported = httpx.post(
        token_url,
        data={"grant_type": "refresh_token", "refresh_token": github["access_token"]},
        headers=accept,
        trust_env=False,
    )
    assert unsupported.status_code == 400
    assert unsupported.json()["error"] == "unsupported_grant_type"

    mint_url = copilot.url("/copilot_internal/v2/token")
    editor = {
        "Editor-Version": "vscode/1.104.3",
        "Editor-Plugin-Version": "copilot-chat/0.26.7",
        "User-Agent": "GitHubCopilotChat/0.26.7",
        "X-Vscode-User-Agent-Library-Version": "electron-fetch",
    }
    gh = github["access_token"]
    no_library = {k: v for k, v in editor.items() if not k.startswith("X-Vscode")}
    refused = [
        {**editor, "Authorization": f"Bearer {gh}"},
        {"Authorization": f"token {gh}", "User-Agent": "x"},
        {**editor, "Authorization": "token ghu_unknown"},
        {**no_library, "Authorization": f"token {gh}"},
    ]
    for headers in refused:
        answer = httpx.get(mint_url, headers=headers, trust_env=False)
        assert (answer.status_code, answer.json()) == (401, {"message": "Bad credentials"})
        assert gh not in answer.text
    problems = [m.problems for m in copilot.seen("mint")]
    assert "scheme 'Bearer'" in problems[0][0], problems
    assert "missing header Editor-Version" in problems[1], problems
    assert problems[2] == ["unknown or revoked GitHub token"], problems
    library_rule = "header X-Vscode-User-Agent-Library-Version must be 'electron-fetch', got None"
    assert problems[3] == [library_rule], problems
    first, second = (
        httpx.get(mint_url, headers={**editor, "Authorization": f"token {gh}"}, trust_env=False)
        for _ in range(2)
    )
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["token"] != second.json()["token"]
    assert first.json()["refresh_in"] == 1500
    assert first.json()["endpoints"] == {"api": "https://api.individual.githubcopilot.com"}
    assert abs(first.json()["expires_at"] - (time.time() + 1800)) < 60
    copilot.revoke(gh)
    revoked = httpx.get(
        mint_url, headers={**editor, "Authorization": f"token {gh}"}, trust_env=False
    )
    assert revoked.status_code == 401

    assert_answers(cases)


def test_claude_and_copilot_config_override_only_the_endpoints(
    claude: Claude, copilot: Copilot
) -> None:
    """The provider tables the tests write for claude and copilot: the preset plus endpoint URLs."""
    assert claude.config_toml().splitlines() == [
        "[providers.claude]",
        'preset = "claude"',
        f'token_url = "{claude.base}/v1/oauth/token"',
        f'authorization_url = "{claude.base}/cai/oauth/authorize"',
    ]
    assert copilot.config_toml().splitlines() == [
        "[providers.copilot]",
        'preset = "copilot"',
        f'device_authorization_url = "{copilot.base}/login/device/code"',
        f'token_url = "{copilot.base}/login/oauth/access_token"',
        f'mint_url = "{copilot.base}/copilot_internal/v2/token"',
    ]
