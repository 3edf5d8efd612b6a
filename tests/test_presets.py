"""Provider presets: every preset decodes, config keys win, and generic IdPs refresh as documented.

Configurations go through :func:`credproxy.shell.paths.load_config` on a TOML file
written by the test. The refresh requests of the generic-IdP presets are
recorded by a real HTTP server (trio + h11) on 127.0.0.1.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import msgspec
import pytest
import trio

from credproxy.core import config, login
from credproxy.core.presets import PRESETS, apply_preset
from credproxy.errors import ConfigError
from credproxy.shell.http import HttpTokenEndpoint
from credproxy.shell.paths import load_config

NOW = 1_700_000_000.0
DOCS = Path(__file__).resolve().parent.parent / "docs" / "providers.md"

# What a user adds to each preset so that it decodes (the values the preset leaves to them).
USER_VALUES: dict[str, dict[str, Any]] = {
    "claude": {},
    "codex": {},
    "gemini": {"client_secret_file": "~/.config/credproxy/gemini.secret"},
    "copilot": {},
    "qwen": {},
    "github": {"client_id": "Iv1.fake"},
    "google": {"client_id": "fake.apps.googleusercontent.com"},
    "entra": {"client_id": "00000000-0000-0000-0000-000000000000"},
    "gitlab": {"client_id": "fake-app-id"},
    "google-service-account": {
        "key_file": "~/.config/credproxy/keys/sa.json",
        "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
    },
    "github-app": {
        "app_id": 12345,
        "installation_id": 678,
        "private_key": "~/.config/credproxy/keys/app.pem",
    },
    "snowflake": {"subject": "MYORG-ACCT.ALICE", "private_key": "~/.config/credproxy/keys/sf.p8"},
}

# The verified facts each preset must carry (sources in docs/providers.md). Pinned here so
# that an edit to a preset is a deliberate one.
FACTS: dict[str, dict[str, Any]] = {
    "claude": {
        "token_url": "https://platform.claude.com/v1/oauth/token",
        "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "authorization_url": "https://claude.com/cai/oauth/authorize",
        "authorize_params": {"code": "true"},
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
        "redirect_uri": "http://localhost/callback",
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
    "codex": {
        "token_url": "https://auth.openai.com/oauth/token",
        "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
        "authorization_url": "https://auth.openai.com/oauth/authorize",
        "authorize_params": {
            "id_token_add_organizations": "true",
            "codex_cli_simplified_flow": "true",
            "originator": "codex_cli_rs",
        },
        "scopes": [
            "openid",
            "profile",
            "email",
            "offline_access",
            "api.connectors.read",
            "api.connectors.invoke",
        ],
        "flow": "loopback",
        "redirect_uri": "http://localhost:1455/auth/callback",
        "fallback_ports": [1457],
        "refresh_body": "json",
        "refresh_scopes": False,
    },
    "gemini": {
        "token_url": "https://oauth2.googleapis.com/token",
        "client_id": "681255809395-oo8ft2oprdrnp9e3aqf6av3hmdib135j.apps.googleusercontent.com",
        "authorization_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "authorize_params": {"access_type": "offline"},
        "scopes": [
            "https://www.googleapis.com/auth/cloud-platform",
            "https://www.googleapis.com/auth/userinfo.email",
            "https://www.googleapis.com/auth/userinfo.profile",
        ],
        "flow": "loopback",
        "redirect_uri": "http://127.0.0.1/oauth2callback",
        "refresh_scopes": False,
    },
    "copilot": {
        "token_url": "https://github.com/login/oauth/access_token",
        "client_id": "Iv1.b507a08c87ecfe98",
        "device_authorization_url": "https://github.com/login/device/code",
        "scopes": ["read:user"],
        "flow": "device",
        "exchange_body": "json",
        "grant": "copilot",
        "mint_url": "https://api.github.com/copilot_internal/v2/token",
    },
    "qwen": {
        "token_url": "https://chat.qwen.ai/api/v1/oauth2/token",
        "client_id": "f0304373b74a44d2b584a3fb70ca9e56",
        "device_authorization_url": "https://chat.qwen.ai/api/v1/oauth2/device/code",
        "scopes": ["openid", "profile", "email", "model.completion"],
        "flow": "device",
        "device_pkce": True,
        "refresh_scopes": False,
    },
    "github": {
        "token_url": "https://github.com/login/oauth/access_token",
        "device_authorization_url": "https://github.com/login/device/code",
        "flow": "device",
    },
    "google": {
        "token_url": "https://oauth2.googleapis.com/token",
        "authorization_url": "https://accounts.google.com/o/oauth2/v2/auth",
        "flow": "loopback",
    },
    "entra": {
        "token_url": "https://login.microsoftonline.com/organizations/oauth2/v2.0/token",
        "device_authorization_url": (
            "https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode"
        ),
        "flow": "device",
    },
    "gitlab": {
        "token_url": "https://gitlab.com/oauth/token",
        "authorization_url": "https://gitlab.com/oauth/authorize",
        "device_authorization_url": "https://gitlab.com/oauth/authorize_device",
        "flow": "device",
    },
    # The signing grants (docs/signing.md): no login, so no flow.
    "google-service-account": {
        "grant": "jwt-bearer",
        "token_url": "https://oauth2.googleapis.com/token",
        "scope_in_assertion": True,
    },
    "github-app": {
        "grant": "github-app",
        "api_url": "https://api.github.com",
        "api": {
            "base_url": "https://api.github.com",
            "headers": {"Authorization": "Bearer {access_token}"},
        },
    },
    "snowflake": {
        "grant": "signed-jwt",
        "issuer": "{subject}.{key_fingerprint}",
        "lifetime": 3600,
    },
}

# Headers a preset adds to its refresh (not config keys; sources in docs/providers.md).
REFRESH_HEADERS: dict[str, dict[str, str]] = {
    "codex": {"originator": "codex_cli_rs"},
}

# Presets that need nothing from the user, neither to refresh nor to log in.
COMPLETE = ("claude", "copilot", "qwen")


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def _write_config(tmp_path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for name, table in tables.items():
        lines.append(f"[providers.{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines))
    return path


def test_every_preset_has_user_values_in_this_test() -> None:
    """The tables above cover every preset, so a new preset cannot skip the decode test."""
    assert set(USER_VALUES) == set(PRESETS) == set(FACTS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_carry_exactly_the_verified_facts(name: str) -> None:
    """Each preset fills in exactly the sourced values, and leaves to the user exactly what USER_VALUES supplies."""
    preset = PRESETS[name]
    assert dict(preset.defaults) == FACTS[name]
    assert set(preset.required) == set(USER_VALUES[name])
    assert not set(preset.required) & set(preset.defaults)
    assert not set(preset.login_needs) & set(preset.defaults)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_add_exactly_the_verified_refresh_headers(name: str) -> None:
    """Only the codex preset adds a header to its refresh (Codex's originator), and exactly that one."""
    assert dict(PRESETS[name].refresh_headers) == REFRESH_HEADERS.get(name, {})


@pytest.mark.parametrize("name", COMPLETE)
def test_complete_presets_need_no_user_values(tmp_path: Path, name: str) -> None:
    """A table with only `preset` loads and has both what refresh and what its login flow needs."""
    provider = load_config(_write_config(tmp_path, {"p": {"preset": name}})).providers["p"]
    assert not PRESETS[name].login_needs
    assert provider.token_url and provider.client_id
    if provider.flow == "device":
        assert provider.device_authorization_url
    else:
        assert provider.authorization_url


def test_entra_tenant_is_overridden_by_setting_both_urls(tmp_path: Path) -> None:
    """A single-tenant app registration replaces the 'organizations' alias in both URLs, as docs/providers.md says."""
    base = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0"
    table = {
        "preset": "entra",
        "client_id": "00000000-0000-0000-0000-000000000000",
        "token_url": f"{base}/token",
        "device_authorization_url": f"{base}/devicecode",
    }
    provider = load_config(_write_config(tmp_path, {"work": table})).providers["work"]
    assert provider.token_url == f"{base}/token"
    assert provider.device_authorization_url == f"{base}/devicecode"
    assert provider.flow == "device"


def test_github_app_on_github_enterprise_proxies_its_api_there(tmp_path: Path) -> None:
    """api_url set for GitHub Enterprise: the API proxy goes to that host too, so its installation tokens are never sent to api.github.com."""
    table = {
        "preset": "github-app",
        "app_id": 42,
        "installation_id": 7,
        "private_key": str(tmp_path / "app.pem"),
        "api_url": "https://github.example.com/api/v3",
    }
    api = load_config(_write_config(tmp_path, {"ghe": table})).providers["ghe"].api
    assert api is not None and api.base_url == "https://github.example.com/api/v3"
    assert api.headers == {"Authorization": "Bearer {access_token}"}


def test_claude_authorization_request_keeps_claude_codes_fixed_parameter(tmp_path: Path) -> None:
    """The browser URL for Claude carries code=true (as Claude Code sends it) plus the standard PKCE request and the scopes."""
    provider = load_config(_write_config(tmp_path, {"c": {"preset": "claude"}})).providers["c"]
    pkce = login.Pkce(verifier="v" * 43, challenge="fake-challenge")
    url = login.authorization_url(provider, "http://localhost:5555/callback", "fake-state", pkce)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    assert (parts.scheme, parts.netloc, parts.path) == (
        "https",
        "claude.com",
        "/cai/oauth/authorize",
    )
    assert query["code"] == "true"
    assert query["client_id"] == "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
    assert query["scope"] == (
        "org:create_api_key user:profile user:inference user:sessions:claude_code "
        "user:mcp_servers user:file_upload user:plugins user:privacy_consents:write"
    )
    assert query["code_challenge_method"] == "S256"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_decodes_into_a_valid_config(tmp_path: Path, name: str) -> None:
    """A provider table with only `preset` (plus the values the preset leaves to the user) loads, filled in from the preset."""
    path = _write_config(tmp_path, {"p": {"preset": name, **USER_VALUES[name]}})
    provider = load_config(path).providers["p"]
    want = {**PRESETS[name].defaults, **USER_VALUES[name], "preset": name}
    for key, value in want.items():
        got = getattr(provider, key)
        assert (msgspec.to_builtins(got) if key == "api" else got) == value, key


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_use_https_and_name_a_flow(name: str) -> None:
    """Every endpoint a preset fills in is https (a redirect URI may be loopback http), and every preset with a login names its flow."""
    preset = PRESETS[name]
    if preset.defaults.get("grant") not in config.SIGNING_GRANTS:
        assert preset.defaults["flow"] in ("device", "loopback", "paste")
    for key in config.PROVIDER_URL_FIELDS:
        if key in preset.defaults:
            url = urlsplit(preset.defaults[key])
            loopback = key == "redirect_uri" and url.hostname in ("localhost", "127.0.0.1")
            assert url.scheme == ("http" if loopback else "https"), key


def test_config_keys_override_the_preset(tmp_path: Path) -> None:
    """Every key written in the provider's table wins over the preset's value; the rest stays."""
    table = {
        "preset": "qwen",
        "token_url": "https://qwen.example/token",
        "client_id": "my-client",
        "scopes": ["openid"],
        "flow": "paste",
        "redirect_port": 8765,
    }
    provider = load_config(_write_config(tmp_path, {"mine": table})).providers["mine"]
    assert provider.token_url == "https://qwen.example/token"
    assert provider.client_id == "my-client"
    assert provider.scopes == ["openid"]
    assert provider.flow == "paste"
    assert provider.redirect_port == 8765
    assert provider.device_authorization_url == PRESETS["qwen"].defaults["device_authorization_url"]


def test_apply_preset_leaves_tables_without_a_preset_alone() -> None:
    """A table without `preset` comes back equal (and as a copy)."""
    table = {"token_url": "https://idp.example/token", "client_id": "c"}
    result = apply_preset("p", table)
    assert result == table
    assert result is not table


def test_unknown_preset_is_a_clear_config_error(tmp_path: Path) -> None:
    """An unknown preset names the file, the line, the field and lists the known presets."""
    path = tmp_path / "config.toml"
    path.write_text('[providers.work]\nclient_id = "c"\npreset = "gitlub"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    known = ", ".join(sorted(PRESETS))
    assert str(info.value) == (
        f"{path}:3: field providers.work.preset: unknown preset 'gitlub'; known presets: {known}"
    )


def test_a_preset_that_is_not_a_string_is_refused(tmp_path: Path) -> None:
    """`preset = 3` is a ConfigError at its line."""
    path = tmp_path / "config.toml"
    path.write_text("[providers.work]\npreset = 3\n")
    with pytest.raises(
        ConfigError, match=r":2: field providers.work.preset: preset must be a string"
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("name", "missing"),
    [("entra", "client_id"), ("github", "client_id"), ("gemini", "client_secret_file")],
)
def test_a_value_the_preset_leaves_to_the_user_is_asked_for(
    tmp_path: Path, name: str, missing: str
) -> None:
    """Leaving out a value the preset cannot supply is a ConfigError that names the field and says what to set."""
    table = {"preset": name, **USER_VALUES[name]}
    del table[missing]
    path = _write_config(tmp_path, {"acct": table})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(
        f"{path}:1: field providers.acct.{missing}: preset {name!r} does not set {missing}"
    )
    assert PRESETS[name].required[missing] in message


def test_docs_describe_every_preset() -> None:
    """docs/providers.md has a section for every preset, citing its source."""
    text = DOCS.read_text()
    headings = set(re.findall(r"^### `([a-z-]+)`", text, flags=re.MULTILINE))
    assert headings >= set(PRESETS)
    for name in PRESETS:
        section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        assert "Source" in section, name


# --- the refresh request of each generic-IdP preset, recorded over HTTP ------------------


@dataclass
class Recorded:
    method: str
    target: str
    headers: dict[str, str]
    form: dict[str, str]


TOKEN_ANSWER = b'{"access_token": "fake-at-new", "expires_in": 3600, "token_type": "Bearer"}'


async def _handle(requests: list[Recorded], stream: trio.SocketStream) -> None:
    async with stream:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return
        assert request is not None
        requests.append(
            Recorded(
                request.method.decode(),
                request.target.decode(),
                {k.decode().lower(): v.decode() for k, v in request.headers},
                dict(parse_qsl(body.decode(), keep_blank_values=True)),
            )
        )
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(TOKEN_ANSWER))),
            ("Connection", "close"),
        ]
        out = conn.send(h11.Response(status_code=200, headers=headers)) or b""
        out += conn.send(h11.Data(data=TOKEN_ANSWER)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)


async def _recorder(
    requests: list[Recorded], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_handle, requests), listeners)


@pytest.fixture
async def endpoint() -> AsyncIterator[HttpTokenEndpoint]:
    ep = HttpTokenEndpoint(wall_clock=lambda: NOW)
    try:
        yield ep
    finally:
        await ep.aclose()


# name -> (extra table keys, form fields beyond grant_type / refresh_token / client_id).
# The token endpoint is the preset's, moved to the loopback host with its path kept.
GENERIC: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "github": (
        {"client_id": "Iv1.fake", "scopes": ["repo", "read:org"]},
        {"scope": "repo read:org"},
    ),
    "google": (
        {"client_id": "fake.apps.googleusercontent.com", "client_secret_file": "SECRET"},
        {"client_secret": "fake-google-client-secret"},
    ),
    "entra": (
        {
            "client_id": "00000000-0000-0000-0000-000000000000",
            "scopes": ["offline_access", "User.Read"],
        },
        {"scope": "offline_access User.Read"},
    ),
    "gitlab": ({"client_id": "fake-app-id"}, {}),
}


@pytest.mark.parametrize("name", sorted(GENERIC))
async def test_generic_idp_presets_send_the_documented_refresh_request(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint, tmp_path: Path, name: str
) -> None:
    """Each generic-IdP preset refreshes with one form POST to its token endpoint: grant_type, refresh_token, client_id, then scope and client_secret when configured."""
    requests: list[Recorded] = []
    port = await nursery.start(_recorder, requests)
    extra, more_fields = GENERIC[name]
    table: dict[str, Any] = {"preset": name, **extra}
    if table.get("client_secret_file") == "SECRET":
        secret = tmp_path / "client.secret"
        secret.write_text("fake-google-client-secret\n")
        table["client_secret_file"] = str(secret)
    # Same path as the preset's real endpoint, on loopback.
    real = PRESETS[name].defaults["token_url"]
    path = urlsplit(real).path
    table["token_url"] = f"http://127.0.0.1:{port}{path}"
    provider = load_config(_write_config(tmp_path, {"acct": table})).providers["acct"]

    token = await endpoint.refresh(provider, "fake-rt-old")

    assert token == {"access_token": "fake-at-new", "token_type": "Bearer", "expiry": NOW + 3600}
    assert len(requests) == 1
    got = requests[0]
    assert (got.method, got.target) == ("POST", path)
    assert got.headers["content-type"] == "application/x-www-form-urlencoded"
    assert got.headers["accept"] == "application/json"
    assert "authorization" not in got.headers
    assert "originator" not in got.headers
    assert got.form == {
        "grant_type": "refresh_token",
        "refresh_token": "fake-rt-old",
        "client_id": extra["client_id"],
        **more_fields,
    }
