"""`credproxy import PROVIDER --from TOOL`: adopting the login of Claude Code, Codex or Gemini CLI.

Every credentials file here is written by the test in the shape the tool
writes (docs/providers.md names the sources), with fake values; the installed
``credproxy`` executable runs in a subprocess against the test's directories.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import Dirs, StartDaemon, cli
from credproxy.core.adopt import RETIRED_MARKER, retire_text
from credproxy.shell.adopt import BACKUP_SUFFIX

CODEX_EXP = 1_900_000_123


def _jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        raw = json.dumps(obj).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.fakesig"


CODEX_AT = _jwt({"exp": CODEX_EXP, "sub": "fake"})

# tool -> (file document, where the tool keeps the refresh token, expected stored token)
FORMATS: dict[str, tuple[dict[str, Any], tuple[str, ...], dict[str, Any]]] = {
    "claude-code": (
        {
            "claudeAiOauth": {
                "accessToken": "fake-at-claude",
                "refreshToken": "fake-rt-claude",
                "expiresAt": 1_900_000_000_456,
                "scopes": ["user:inference", "user:profile"],
                "subscriptionType": "max",
            },
            "organizationUuid": "org-fake",
        },
        ("claudeAiOauth", "refreshToken"),
        {
            "access_token": "fake-at-claude",
            "refresh_token": "fake-rt-claude",
            "expiry": 1_900_000_000,
            "scope": "user:inference user:profile",
            "token_type": "Bearer",
        },
    ),
    "codex": (
        {
            "OPENAI_API_KEY": None,
            "tokens": {
                "id_token": "fake-id-codex",
                "access_token": CODEX_AT,
                "refresh_token": "fake-rt-codex",
                "account_id": "acct-fake",
            },
            "last_refresh": "2026-12-01T00:00:00Z",
        },
        ("tokens", "refresh_token"),
        {
            "access_token": CODEX_AT,
            "refresh_token": "fake-rt-codex",
            "id_token": "fake-id-codex",
            "account_id": "acct-fake",
            "expiry": CODEX_EXP,
            "token_type": "Bearer",
        },
    ),
    "gemini-cli": (
        {
            "access_token": "fake-at-gemini",
            "refresh_token": "fake-rt-gemini",
            "scope": "openid https://www.googleapis.com/auth/cloud-platform",
            "token_type": "Bearer",
            "id_token": "fake-id-gemini",
            "expiry_date": 1_900_000_000_789.5,
        },
        ("refresh_token",),
        {
            "access_token": "fake-at-gemini",
            "refresh_token": "fake-rt-gemini",
            "scope": "openid https://www.googleapis.com/auth/cloud-platform",
            "token_type": "Bearer",
            "id_token": "fake-id-gemini",
            "expiry": 1_900_000_000,
        },
    ),
    "qwen-code": (
        # qwen-code packages/core/src/qwen/qwenOAuth2.ts QwenCredentials, as the device
        # flow writes it (no id_token there, though the type declares one)
        {
            "access_token": "fake-at-qwen",
            "refresh_token": "fake-rt-qwen",
            "token_type": "Bearer",
            "resource_url": "portal.qwen.ai",
            "expiry_date": 1_900_000_000_321,
        },
        ("refresh_token",),
        {
            "access_token": "fake-at-qwen",
            "refresh_token": "fake-rt-qwen",
            "token_type": "Bearer",
            "resource_url": "portal.qwen.ai",
            "expiry": 1_900_000_000,
        },
    ),
}

# Where each tool keeps its file, relative to HOME (codex: CODEX_HOME).
DEFAULT_FILES = {
    "claude-code": ".claude/.credentials.json",
    "codex": ".codex/auth.json",
    "gemini-cli": ".gemini/oauth_creds.json",
    "qwen-code": ".qwen/oauth_creds.json",
}


def _write(path: Path, doc: Any, indent: int | None = 2) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(doc, indent=indent) + "\n").encode()
    path.write_bytes(data)
    path.chmod(0o600)
    return data


def _stored(dirs: Dirs, provider: str = "p", bucket: str = "default") -> dict[str, Any] | None:
    path = dirs.state / "tokens" / provider / f"{bucket}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _secrets_of(doc: Any) -> list[str]:
    """Every string value in *doc* whose key names a token."""
    found: list[str] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if isinstance(value, str) and "token" in key.lower() and "type" not in key.lower():
                found.append(value)
            found += _secrets_of(value)
    return found


def _at(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@pytest.mark.parametrize("tool", sorted(FORMATS))
def test_adopt_stores_the_tools_login(dirs: Dirs, tool: str) -> None:
    """Each tool's credentials file is stored as the token it holds, and the source is left as it was."""
    doc, _, expected = FORMATS[tool]
    source = dirs.root / "creds.json"
    original = _write(source, doc)
    result = cli(dirs, "import", "p", "--from", tool, str(source))
    assert result.returncode == 0, result.stderr
    assert _stored(dirs) == expected
    assert source.read_bytes() == original
    assert "must no longer refresh its copy" in result.stdout
    assert str(source) in result.stdout
    for secret in _secrets_of(doc):
        assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize("tool", sorted(FORMATS))
def test_adopt_reads_the_tools_default_path(dirs: Dirs, tool: str) -> None:
    """Without FILE, the tool's own file under HOME (CODEX_HOME for codex) is adopted."""
    doc, _, expected = FORMATS[tool]
    home = dirs.root / "home"
    env = {"HOME": str(home)}
    if tool == "codex":
        env["CODEX_HOME"] = str(dirs.root / "codex-home")
        _write(dirs.root / "codex-home" / "auth.json", doc)
    else:
        _write(home / DEFAULT_FILES[tool], doc)
    result = cli(dirs, "import", "p", "--bucket", "work", "--from", tool, **env)
    assert result.returncode == 0, result.stderr
    assert _stored(dirs, bucket="work") == expected


@pytest.mark.parametrize(
    ("tool", "variable", "relative"),
    [
        # Gemini CLI's homedir() is GEMINI_CLI_HOME when set: .gemini goes under it
        ("gemini-cli", "GEMINI_CLI_HOME", ".gemini/oauth_creds.json"),
        # Qwen Code's QWEN_HOME is its directory itself
        ("qwen-code", "QWEN_HOME", "oauth_creds.json"),
    ],
)
def test_adopt_follows_the_tools_home_variable(
    dirs: Dirs, tool: str, variable: str, relative: str
) -> None:
    """GEMINI_CLI_HOME and QWEN_HOME move the file as they move it for the tool; HOME's copy is not read."""
    doc, _, expected = FORMATS[tool]
    home = dirs.root / "home"
    _write(home / DEFAULT_FILES[tool], {"not": "this one"})
    elsewhere = dirs.root / "elsewhere"
    _write(elsewhere / relative, doc)
    result = cli(dirs, "import", "p", "--from", tool, HOME=str(home), **{variable: str(elsewhere)})
    assert result.returncode == 0, result.stderr
    assert _stored(dirs) == expected


@pytest.mark.parametrize("tool", sorted(FORMATS))
def test_retire_source_keeps_a_backup_and_disables_the_copy(dirs: Dirs, tool: str) -> None:
    """--retire-source leaves a 0600 backup and the marker in place of the refresh token, other fields and formatting kept."""
    doc, rt_path, expected = FORMATS[tool]
    source = dirs.root / "creds.json"
    original = _write(source, doc)
    result = cli(dirs, "import", "p", "--from", tool, "--retire-source", str(source))
    assert result.returncode == 0, result.stderr
    assert _stored(dirs) == expected

    backup = source.with_name(source.name + BACKUP_SUFFIX)
    assert backup.read_bytes() == original
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(source.stat().st_mode) == 0o600

    retired = json.loads(source.read_text())
    assert _at(retired, rt_path) == RETIRED_MARKER
    want = json.loads(original)
    target = want
    for key in rt_path[:-1]:
        target = target[key]
    target[rt_path[-1]] = RETIRED_MARKER
    assert retired == want
    # Same layout: only the refresh token's string differs.
    old_rt = json.dumps(_at(doc, rt_path))
    assert source.read_text() == original.decode().replace(old_rt, json.dumps(RETIRED_MARKER))
    assert str(backup) in result.stdout
    for secret in _secrets_of(doc):
        assert secret not in result.stdout + result.stderr
    # No temp file left behind.
    assert sorted(p.name for p in dirs.root.iterdir() if p.name.startswith("creds")) == [
        "creds.json",
        "creds.json" + BACKUP_SUFFIX,
    ]


def test_a_retired_file_is_not_adopted_again(dirs: Dirs) -> None:
    """Importing a file whose refresh token credproxy already retired fails naming the field, and a second backup never overwrites the first."""
    doc, _, _ = FORMATS["claude-code"]
    source = dirs.root / "creds.json"
    _write(source, doc)
    assert (
        cli(dirs, "import", "p", "--from", "claude-code", "--retire-source", str(source)).returncode
        == 0
    )
    again = cli(dirs, "import", "q", "--from", "claude-code", "--retire-source", str(source))
    assert again.returncode == 2
    assert "field claudeAiOauth.refreshToken was already retired" in again.stderr
    assert _stored(dirs, "q") is None
    assert not source.with_name(source.name + BACKUP_SUFFIX + ".1").exists()


def test_retire_source_needs_from(dirs: Dirs) -> None:
    """--retire-source without --from is a usage error and stores nothing."""
    source = dirs.root / "token.json"
    _write(source, {"access_token": "fake-at", "refresh_token": "fake-rt"})
    result = cli(dirs, "import", "p", "--retire-source", str(source))
    assert result.returncode == 2
    assert "--retire-source goes with --from" in result.stderr
    assert _stored(dirs) is None


def test_unknown_tool_is_refused(dirs: Dirs) -> None:
    """An unknown --from tool is a one-line usage error listing the known tools."""
    result = cli(dirs, "import", "p", "--from", "vim", str(dirs.root / "x.json"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "credproxy import: unknown tool 'vim'; --from takes one of: claude-code, codex, gemini-cli, qwen-code"
    ]


MALFORMED = [
    ("claude-code", {}, "field claudeAiOauth is missing"),
    ("claude-code", {"claudeAiOauth": []}, "field claudeAiOauth must be a JSON object"),
    (
        "claude-code",
        {"claudeAiOauth": {"accessToken": "fake-at-1"}},
        "field claudeAiOauth.refreshToken is missing",
    ),
    (
        "claude-code",
        {
            "claudeAiOauth": {
                "accessToken": "fake-at-1",
                "refreshToken": "fake-rt-1",
                "expiresAt": "soon",
            }
        },
        "field claudeAiOauth.expiresAt must be epoch milliseconds",
    ),
    (
        "codex",
        {"tokens": {"access_token": "fake-at-1", "refresh_token": 5}},
        "field tokens.refresh_token must be a non-empty string",
    ),
    ("codex", {"OPENAI_API_KEY": "sk-fake-CANARY"}, "field tokens is missing"),
    ("gemini-cli", [1, 2], "the top level must be a JSON object"),
    (
        "gemini-cli",
        {"access_token": "", "refresh_token": "fake-rt-1"},
        "field access_token must be a non-empty string",
    ),
    (
        "gemini-cli",
        {"access_token": "fake-at-1", "refresh_token": "fake-rt-1", "expiry_date": -1},
        "field expiry_date must be epoch milliseconds",
    ),
    # Not finite numbers (json writes NaN and Infinity; tools' JSON parsers read them).
    (
        "claude-code",
        {
            "claudeAiOauth": {
                "accessToken": "fake-at-1",
                "refreshToken": "fake-rt-1",
                "expiresAt": float("nan"),
            }
        },
        "field claudeAiOauth.expiresAt must be epoch milliseconds",
    ),
    (
        "gemini-cli",
        {"access_token": "fake-at-1", "refresh_token": "fake-rt-1", "expiry_date": float("inf")},
        "field expiry_date must be epoch milliseconds",
    ),
    (
        "gemini-cli",
        {"access_token": "fake-at-1", "refresh_token": "fake-rt-1", "expiry_date": True},
        "field expiry_date must be epoch milliseconds",
    ),
]


@pytest.mark.parametrize("exp", [float("nan"), float("inf"), "soon", True, 0])
def test_codex_jwt_without_a_usable_exp_is_stored_without_expiry(dirs: Dirs, exp: Any) -> None:
    """A Codex access token whose exp claim is not a finite positive number gives no expiry (and no crash)."""
    source = dirs.root / "auth.json"
    at = _jwt({"exp": exp, "sub": "fake"})
    _write(source, {"tokens": {"access_token": at, "refresh_token": "fake-rt-codex"}})
    result = cli(dirs, "import", "p", "--from", "codex", str(source))
    assert result.returncode == 0, result.stderr
    stored = _stored(dirs)
    assert stored is not None and "expiry" not in stored
    assert "fake-" not in result.stdout + result.stderr


@pytest.mark.parametrize(("tool", "doc", "message"), MALFORMED)
def test_malformed_files_get_one_line_naming_the_field(
    dirs: Dirs, tool: str, doc: Any, message: str
) -> None:
    """A file of the wrong shape is refused with one line naming the field; nothing is stored or changed."""
    source = dirs.root / "creds.json"
    original = _write(source, doc)
    result = cli(dirs, "import", "p", "--from", tool, "--retire-source", str(source))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"credproxy import: {source}: {message}")
    assert "CANARY" not in result.stdout + result.stderr
    assert "fake-" not in result.stderr
    assert _stored(dirs) is None
    assert source.read_bytes() == original
    assert not source.with_name(source.name + BACKUP_SUFFIX).exists()


def test_not_json_and_missing_files_are_one_line(dirs: Dirs) -> None:
    """A file that is not JSON, or does not exist, is a one-line error naming it."""
    source = dirs.root / "creds.json"
    source.write_text("{not json\n")
    bad = cli(dirs, "import", "p", "--from", "gemini-cli", str(source))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"credproxy import: {source} is not valid JSON (line 1)"
    ]
    gone = cli(dirs, "import", "p", "--from", "gemini-cli", str(dirs.root / "nope.json"))
    assert gone.returncode == 3  # the "not found" exit code (docs/cli.md)
    assert len(gone.stderr.strip().splitlines()) == 1
    assert "does not exist" in gone.stderr
    assert _stored(dirs) is None


def test_retire_keeps_other_fields_when_the_token_string_repeats() -> None:
    """When the refresh token's string occurs twice, the file is rewritten as indented JSON with only that field changed."""
    doc = {"refresh_token": "fake-rt-same", "access_token": "fake-at", "note": "fake-rt-same"}
    text = json.dumps(doc)
    retired = json.loads(retire_text("gemini-cli", text, "f.json"))
    assert retired == {**doc, "refresh_token": RETIRED_MARKER}


async def test_adopting_tells_the_running_daemon(
    start_daemon: StartDaemon, dirs: Dirs, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """With a daemon running, an adopted login is announced to it and a sandbox session is served the adopted access token."""
    h = await start_daemon(
        providers={"p": {"token_url": "http://127.0.0.1:9/token", "client_id": "fake-client"}}
    )
    doc, _, expected = FORMATS["claude-code"]
    source = dirs.root / "creds.json"
    _write(source, doc)
    result = await trio.to_thread.run_sync(
        functools.partial(
            cli, dirs, "import", "p", "--from", "claude-code", "--retire-source", str(source)
        )
    )
    assert result.returncode == 0, result.stderr
    replaced = [e for e in no_secrets_in_logs if e["event"] == "token_replaced"]
    assert [(e["provider"], e["bucket"]) for e in replaced] == [("p", "default")]

    session = await h.session("p")
    peer = await h.peer(session)
    reply = await peer.call("get_token", {"provider": "p"})
    assert reply["ok"] is True, reply
    assert reply["data"]["access_token"] == expected["access_token"]
    assert "refresh_token" not in reply["data"]
    assert os.stat(source).st_mode & 0o777 == 0o600


def test_an_import_older_than_the_stored_token_is_refused_unless_forced(dirs: Dirs) -> None:
    """The stored token expires in 8 h (say credproxy refreshed it, rotating its refresh token); importing the tool's older copy, expired an hour ago, is refused with exit 2 and stores nothing, for a JSON import and an adopt alike; --force stores it."""
    now = int(time.time())
    newer = {
        "access_token": "fake-new-at",
        "refresh_token": "fake-new-rt",
        "expiry": now + 8 * 3600,
    }
    older = {"access_token": "fake-old-at", "refresh_token": "fake-old-rt", "expiry": now - 3600}
    source = dirs.root / "token.json"
    _write(source, newer)
    assert cli(dirs, "import", "p", str(source)).returncode == 0
    _write(source, older)
    refused = cli(dirs, "import", "p", str(source))
    assert refused.returncode == 2
    assert "already holds a token that expires later" in refused.stderr
    assert "--force" in refused.stderr
    assert _stored(dirs)["refresh_token"] == "fake-new-rt"
    doc, _, _ = FORMATS["claude-code"]
    claude = dirs.root / "claude.json"
    _write(
        claude, {**doc, "claudeAiOauth": {**doc["claudeAiOauth"], "expiresAt": (now - 3600) * 1000}}
    )
    assert cli(dirs, "import", "p", "--from", "claude-code", str(claude)).returncode == 2
    assert _stored(dirs)["refresh_token"] == "fake-new-rt"
    forced = cli(dirs, "import", "p", "--force", str(source))
    assert forced.returncode == 0, forced.stderr
    assert _stored(dirs)["refresh_token"] == "fake-old-rt"
    for secret in ("fake-new-rt", "fake-old-rt", "fake-new-at", "fake-old-at"):
        assert secret not in refused.stdout + refused.stderr + forced.stdout + forced.stderr
