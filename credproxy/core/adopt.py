"""Adopting another tool's login: read its credentials file, retire its refresh token.

``credproxy import PROVIDER --from TOOL [PATH]`` takes over a login that
Claude Code, Codex, Gemini CLI or Qwen Code made, so that from then on only credproxy
spends its refresh token. Two tools refreshing one rotating (or single-use)
refresh token is exactly what logs people out (``invalid_grant``, "refresh
token already used"), so the other tool must stop refreshing its copy; with
``--retire-source`` credproxy replaces that copy with :data:`RETIRED_MARKER`.

This module is pure: it turns a file's text into a token dict (the JSON that
``credproxy import`` takes) and a file's text into its retired text. Reading,
the backup and the atomic replace live in ``credproxy/shell/adopt.py``.

File shapes (see ``docs/providers.md`` for the sources):

- ``claude-code``: ``~/.claude/.credentials.json``,
  ``{"claudeAiOauth": {"accessToken", "refreshToken", "expiresAt" (epoch ms),
  "scopes": [...], ...}, ...}``.
- ``codex``: ``$CODEX_HOME/auth.json`` (default ``~/.codex``),
  ``{"OPENAI_API_KEY": null, "tokens": {"id_token", "access_token",
  "refresh_token", "account_id"}, "last_refresh": "..."}``; the access token
  is a JWT whose ``exp`` claim is its expiry.
- ``gemini-cli``: ``$GEMINI_CLI_HOME/.gemini/oauth_creds.json`` (Gemini CLI's
  ``homedir()`` is ``GEMINI_CLI_HOME`` when set, else the home directory),
  google-auth-library's ``{"access_token", "refresh_token", "expiry_date"
  (epoch ms), "token_type", "scope", "id_token"}``.
- ``qwen-code``: ``$QWEN_HOME/oauth_creds.json`` (``QWEN_HOME`` is the
  ``.qwen`` directory itself; default ``~/.qwen``), ``{"access_token",
  "refresh_token", "id_token", "expiry_date" (epoch ms), "token_type",
  "resource_url"}``; ``resource_url`` is the host of the API the token is for.

Error messages name the field at fault and never quote a value.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from credproxy.core.policy import expiry_value
from credproxy.errors import UsageError

__all__ = [
    "RETIRED_MARKER",
    "TOOLS",
    "AdoptError",
    "Tool",
    "default_path",
    "parse_source",
    "refresh_token_of",
    "retire_text",
]

#: What ``--retire-source`` writes in place of the other tool's refresh token.
#: The tool's next refresh fails (the IdP rejects it), which prompts the user
#: to log in there again rather than silently spending credproxy's token.
RETIRED_MARKER = "credproxy-adopted: this login is owned by credproxy; do not use"


class AdoptError(UsageError):
    """The source file is not a credentials file of the named tool (one line, no values)."""


class Tool(NamedTuple):
    """One tool whose login can be adopted."""

    title: str
    #: Path of the refresh token inside the file's JSON.
    refresh_path: tuple[str, ...]
    #: File text -> token dict (as ``credproxy import`` takes it); raises AdoptError.
    parse: Callable[[Any, str], dict[str, Any]]


def _field(obj: Any, where: str, path: tuple[str, ...]) -> Any:
    """The value at *path*, or AdoptError naming the first missing or non-object step."""
    for depth, key in enumerate(path):
        if not isinstance(obj, dict):
            parent = ".".join(path[:depth]) or "the top level"
            raise AdoptError(f"{where}: field {parent} must be a JSON object")
        if key not in obj:
            raise AdoptError(f"{where}: field {'.'.join(path[: depth + 1])} is missing")
        obj = obj[key]
    return obj


def _string(obj: Any, where: str, *path: str, required: bool = True) -> str | None:
    value = _field(obj, where, path) if required else _optional(obj, path)
    if not required and (value is None or value == ""):
        return None
    if not isinstance(value, str) or not value:
        raise AdoptError(f"{where}: field {'.'.join(path)} must be a non-empty string")
    return value


def _optional(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _millis(obj: Any, where: str, *path: str) -> float | None:
    """An epoch-milliseconds field (optional) as epoch seconds."""
    value = _optional(obj, path)
    if value is None:
        return None
    millis = expiry_value(value)  # a finite, non-negative number (no bool, NaN, infinity)
    if millis is None:
        raise AdoptError(f"{where}: field {'.'.join(path)} must be epoch milliseconds")
    return millis / 1000.0


def _parse_claude(raw: Any, where: str) -> dict[str, Any]:
    at = _string(raw, where, "claudeAiOauth", "accessToken")
    rt = _string(raw, where, "claudeAiOauth", "refreshToken")
    token: dict[str, Any] = {"access_token": at, "refresh_token": rt, "token_type": "Bearer"}
    expiry = _millis(raw, where, "claudeAiOauth", "expiresAt")
    if expiry is not None:
        token["expiry"] = int(expiry)
    scopes = _optional(raw, ("claudeAiOauth", "scopes"))
    if scopes is not None:
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise AdoptError(f"{where}: field claudeAiOauth.scopes must be a list of strings")
        token["scope"] = " ".join(scopes)
    return token


def _parse_codex(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, dict) and raw.get("tokens") is None and raw.get("OPENAI_API_KEY"):
        raise AdoptError(
            f"{where}: field tokens is missing: this is an API-key login, not a ChatGPT "
            "login (store the key with `credproxy key set NAME` instead)"
        )
    at = _string(raw, where, "tokens", "access_token")
    rt = _string(raw, where, "tokens", "refresh_token")
    token: dict[str, Any] = {"access_token": at, "refresh_token": rt, "token_type": "Bearer"}
    id_token = _string(raw, where, "tokens", "id_token", required=False)
    if id_token is not None:
        token["id_token"] = id_token
    # Calls to the ChatGPT backend need a ChatGPT-Account-Id header (providers.md).
    account_id = _string(raw, where, "tokens", "account_id", required=False)
    if account_id is not None:
        token["account_id"] = account_id
    expiry = _jwt_exp(at or "")
    if expiry is not None:
        token["expiry"] = expiry
    return token


def _parse_gemini(raw: Any, where: str) -> dict[str, Any]:
    at = _string(raw, where, "access_token")
    rt = _string(raw, where, "refresh_token")
    token: dict[str, Any] = {"access_token": at, "refresh_token": rt}
    tt = _optional(raw, ("token_type",))
    token["token_type"] = tt if isinstance(tt, str) and tt else "Bearer"
    expiry = _millis(raw, where, "expiry_date")
    if expiry is not None:
        token["expiry"] = int(expiry)
    for extra in ("scope", "id_token"):
        value = _string(raw, where, extra, required=False)
        if value is not None:
            token[extra] = value
    return token


def _parse_qwen(raw: Any, where: str) -> dict[str, Any]:
    token = _parse_gemini(raw, where)  # the same fields, google-auth-library's shape
    resource = _string(raw, where, "resource_url", required=False)
    if resource is not None:
        token["resource_url"] = resource
    return token


def _jwt_exp(jwt: str) -> int | None:
    """The ``exp`` claim of a JWT, read without verifying it (it only schedules renewal).

    None when *jwt* is not a JWT or has no usable ``exp`` (a finite positive
    number): the token is then stored without an expiry, like an imported one
    without ``expiry``.
    """
    parts = jwt.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (ValueError, TypeError):
        return None
    exp = expiry_value(claims.get("exp")) if isinstance(claims, dict) else None
    if exp is None or exp <= 0:
        return None
    return int(exp)


#: Every tool whose login can be adopted, by the name given to ``--from``.
TOOLS: dict[str, Tool] = {
    "claude-code": Tool("Claude Code", ("claudeAiOauth", "refreshToken"), _parse_claude),
    "codex": Tool("Codex", ("tokens", "refresh_token"), _parse_codex),
    "gemini-cli": Tool("Gemini CLI", ("refresh_token",), _parse_gemini),
    "qwen-code": Tool("Qwen Code", ("refresh_token",), _parse_qwen),
}


def _tool(name: str) -> Tool:
    tool = TOOLS.get(name)
    if tool is None:
        raise AdoptError(f"unknown tool {name!r}; --from takes one of: {', '.join(TOOLS)}")
    return tool


def default_path(tool: str, home: Path, env: Mapping[str, str]) -> Path:
    """Where *tool* keeps its credentials file, as the tool itself finds it.

    ``CODEX_HOME`` is Codex's directory; ``GEMINI_CLI_HOME`` stands for the
    home directory under which Gemini CLI keeps ``.gemini`` (used as given,
    like Gemini CLI's ``homedir()``); ``QWEN_HOME`` is Qwen Code's directory.
    """
    _tool(tool)
    if tool == "codex":
        return Path(env.get("CODEX_HOME") or home / ".codex") / "auth.json"
    if tool == "claude-code":
        return home / ".claude" / ".credentials.json"
    if tool == "qwen-code":
        return Path(env.get("QWEN_HOME") or home / ".qwen").expanduser() / "oauth_creds.json"
    return Path(env.get("GEMINI_CLI_HOME") or home) / ".gemini" / "oauth_creds.json"


def _load(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise AdoptError(
            f"{where} is not valid JSON (line {getattr(exc, 'lineno', '?')})"
        ) from None


def parse_source(tool: str, text: str, where: str) -> dict[str, Any]:
    """The token in *tool*'s credentials file *text* (read from *where*, for messages).

    The result is token JSON as ``credproxy import`` takes it: ``access_token``,
    ``refresh_token``, ``expiry`` in epoch seconds when the file gives one,
    ``token_type``, and the extra fields a caller of the API needs (``scope``,
    ``id_token``, Codex's ``account_id``).

    Raises:
        AdoptError: unknown tool, not JSON, or a field missing or of the wrong
            type (the message names the field, never a value). A file whose
            refresh token is already :data:`RETIRED_MARKER` is refused too.
    """
    spec = _tool(tool)
    raw = _load(text, where)
    if not isinstance(raw, dict):
        raise AdoptError(f"{where}: the top level must be a JSON object")
    token = spec.parse(raw, where)
    if token.get("refresh_token") == RETIRED_MARKER:
        raise AdoptError(
            f"{where}: field {'.'.join(spec.refresh_path)} was already retired by credproxy "
            f"(log in with {spec.title} again, or use `credproxy login`)"
        )
    return token


def refresh_token_of(tool: str, text: str, where: str) -> str:
    """The refresh token in *tool*'s file *text* (to check that it did not change)."""
    rt = parse_source(tool, text, where)["refresh_token"]
    assert isinstance(rt, str)
    return rt


def retire_text(tool: str, text: str, where: str) -> str:
    """*text* with the refresh token replaced by :data:`RETIRED_MARKER`, all else kept.

    The result keeps the file's formatting when the token's JSON string occurs
    exactly once (the usual case: it is replaced in place); otherwise the
    document is written again as JSON with two-space indentation, every other
    field unchanged.

    Raises:
        AdoptError: as :func:`parse_source`.
    """
    spec = _tool(tool)
    rt = refresh_token_of(tool, text, where)
    doc = json.loads(text)
    target = doc
    for key in spec.refresh_path[:-1]:
        target = target[key]
    target[spec.refresh_path[-1]] = RETIRED_MARKER
    encoded = json.dumps(rt)
    if text.count(encoded) == 1:
        candidate = text.replace(encoded, json.dumps(RETIRED_MARKER))
        try:
            if json.loads(candidate) == doc:
                return candidate
        except ValueError:
            pass
    return json.dumps(doc, indent=2) + ("\n" if text.endswith("\n") else "")
