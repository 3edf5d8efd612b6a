"""The configuration file: msgspec structs decoded from TOML.

A bad file is refused as a whole with a :class:`~credproxy.errors.ConfigError`
that names the file, the line and the field, so the daemon never starts on a
half-understood configuration. A missing file means "all defaults".
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from credproxy.core.names import NAME_RULE, is_name
from credproxy.errors import ConfigError

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


class Provider(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An OAuth 2.0 client: where and as whom to refresh tokens."""

    token_url: str
    client_id: str
    client_secret_file: str | None = None
    scopes: list[str] = msgspec.field(default_factory=list)


class Renewal(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Renewal constants, all in seconds (PRODUCT.md section 6)."""

    min_lead: float = 300
    lead_fraction: float = 0.1
    max_jitter: float = 30
    retry_base: float = 30
    retry_cap: float = 1800
    max_failures: int = 10
    serve_margin: float = 60
    refresh_cooldown: float = 30


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Limits per connection (every socket) and per session (the connection cap)."""

    requests_per_second: float = 200  # sustained rate per connection; 0 disables
    request_burst: int = 400  # bucket size of that rate
    max_connections: int = 128  # open connections per session
    idle_timeout: float = 600  # seconds without a request before a connection is closed
    max_in_flight: int = 16  # requests in flight per connection (llxprt's figure)


class Sandbox(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Defaults for ``credproxy run``."""

    default_allow: list[str] = msgspec.field(default_factory=list)


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    providers: dict[str, Provider] = msgspec.field(default_factory=dict)
    renewal: Renewal = msgspec.field(default_factory=Renewal)
    limits: Limits = msgspec.field(default_factory=Limits)
    sandbox: Sandbox = msgspec.field(default_factory=Sandbox)


def load(path: Path) -> Config:
    """Read and validate *path*; a missing file gives the defaults.

    Raises:
        ConfigError: naming the file, the line and the field at fault.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Config:
    """Decode TOML *text* (read from *path*, used in messages) into a :class:`Config`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib says "... (at line N, column M)": lead with FILE:N like every other error.
        m = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{path}:{m.group(1)}" if m else str(path)
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    # Providers are converted one by one so that an error names the provider
    # (msgspec reports dictionary keys as "[...]").
    providers = raw.get("providers", {})
    if isinstance(providers, dict):
        for name, table in providers.items():
            _convert(table, Provider, path, text, ["providers", name])
    cfg: Config = _convert(raw, Config, path, text, [])
    for problem, keys in _problems(cfg):
        raise ConfigError(_locate(path, text, keys, problem))
    return cfg


def _convert(raw: Any, kind: type[Any], path: Path, text: str, prefix: list[str]) -> Any:
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at ")
        keys = prefix + _path_keys(where)
        unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
        if unknown:
            keys.append(unknown.group(1))
            message = "unknown field (check the spelling against the documentation)"
        raise ConfigError(_locate(path, text, keys, message)) from None


def _problems(cfg: Config) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = []
    for name, prov in cfg.providers.items():
        if not is_name(name):
            out.append((f"provider name {name!r} must be {NAME_RULE}", ["providers", name]))
        url = urlsplit(prov.token_url)
        if not url.hostname:
            out.append(("token_url has no host", ["providers", name, "token_url"]))
        elif url.scheme != "https" and not (
            url.scheme == "http" and url.hostname in LOOPBACK_HOSTS
        ):
            out.append(
                (
                    "token_url must be an https:// URL (plain http is allowed for loopback only)",
                    ["providers", name, "token_url"],
                )
            )
    r = cfg.renewal
    for field in ("min_lead", "max_jitter", "retry_base", "retry_cap", "serve_margin"):
        if getattr(r, field) < 0:
            out.append((f"{field} must not be negative", ["renewal", field]))
    if r.retry_cap < r.retry_base:
        out.append(("retry_cap must be at least retry_base", ["renewal", "retry_cap"]))
    if not 0 <= r.lead_fraction < 1:
        out.append(("lead_fraction must be in [0, 1)", ["renewal", "lead_fraction"]))
    if r.max_failures < 1:
        out.append(("max_failures must be at least 1", ["renewal", "max_failures"]))
    lim = cfg.limits
    if lim.requests_per_second < 0:
        out.append(("requests_per_second must not be negative", ["limits", "requests_per_second"]))
    for field in ("request_burst", "max_connections", "max_in_flight"):
        if getattr(lim, field) < 1:
            out.append((f"{field} must be at least 1", ["limits", field]))
    if lim.idle_timeout <= 0:
        out.append(("idle_timeout must be positive", ["limits", "idle_timeout"]))
    return out


def _path_keys(where: str) -> list[str]:
    # msgspec paths look like "$.providers.example.token_url" or "$.sandbox.default_allow[0]".
    where = where.strip().strip("`")
    if where.startswith("$"):
        where = where[1:]
    return [k for k in re.split(r"\.|\[\d+\]", where) if k]


def _locate(path: Path, text: str, keys: list[str], message: str) -> str:
    """Format "FILE:LINE: field a.b.c: message", finding the line by a scan of the text."""
    line = _find_line(text, keys)
    field = ".".join(keys) or "(top level)"
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: field {field}: {message}"


def _find_line(text: str, keys: list[str]) -> int | None:
    """The line that sets the field *keys* (or the closest enclosing table or key)."""
    if not keys:
        return None
    table: list[str] = []
    best: tuple[int, int] | None = None  # (keys matched, line number)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[") and not line.startswith("[["):
            table = _split_key(line[1 : line.find("]")] if "]" in line else line[1:])
            path = table
        else:
            m = re.match(r"^([^=#\[]+?)\s*=", line)
            if not m:
                continue
            path = table + _split_key(m.group(1))
        if path == keys:
            return number
        if path == keys[: len(path)] and (best is None or len(path) > best[0]):
            best = (len(path), number)
    return best[1] if best else None


def _split_key(key: str) -> list[str]:
    """Split a TOML (dotted) key into its parts, honouring quotes: ``a."b.c"`` -> a, b.c."""
    parts: list[str] = []
    for m in re.finditer(r'\s*(?:"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([^.\s"\']+))\s*(?:\.|$)', key):
        parts.append(next(g for g in m.groups() if g is not None))
    return parts
