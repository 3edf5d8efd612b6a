"""The agents themselves (issue 19): Claude Code, Codex and Gemini CLI, unmodified, through credproxy.

Each test installs one agent CLI from npm at a pinned version (once, into
``~/.cache/credproxy-tests/npm/PACKAGE@VERSION``, or under ``$XDG_CACHE_HOME``),
then runs ONE non-interactive prompt with it, as docs/integrations.md says:
``credproxy run --allow api:P -- bwrap ... --unshare-net ... credproxy forward
-- AGENT``. The installed ``credproxy`` runs the daemon; the upstream is
``agent_upstreams.py``, a fake HTTPS API (certificate from a ``trustme`` CA the
daemon trusts through ``SSL_CERT_FILE``) that streams a fixed reply in that
provider's wire format.

Asserted, as a user could see it: the agent printed the fixed reply; the
upstream got the prompt, streamed (Anthropic and OpenAI ``"stream": true``,
Gemini's ``:streamGenerateContent?alt=sse``), with the credential the daemon
injected (a stored token or API key, a canary) and never the placeholder the
agent was given; and no canary reached the agent's output or any file it
wrote. The sandbox has its own network namespace (only loopback) and an empty
environment besides what is set here, so it holds no credential at all.

Skipped, with the reason, when bwrap, node or npm is missing or the pinned
package cannot be installed (no registry). Installing takes about 15 s per
agent the first time; a run takes seconds.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_upstreams import PROMPT, REPLY
from test_proxy_e2e import (
    Upstream,  # the fake upstream\'s address, CA and log
    fake_upstream,
)

from conftest import CREDPROXY, Dirs, cli

UPSTREAM = str(Path(__file__).with_name("agent_upstreams.py"))
REPO = str(Path(__file__).resolve().parents[1])
VENV_BIN = str(Path(CREDPROXY).parent)

CLAUDE_AT = "AT-AGENT-CLAUDE-CANARY-0d4e7b"
CLAUDE_RT = "RT-AGENT-CLAUDE-CANARY-a91c33"
OPENAI_KEY = "KEY-AGENT-OPENAI-CANARY-5be210"
GEMINI_KEY = "KEY-AGENT-GEMINI-CANARY-e8f6a4"
CANARIES = (CLAUDE_AT, CLAUDE_RT, OPENAI_KEY, GEMINI_KEY)
# What the agents are given as their API key inside the sandbox: it must never go upstream.
PLACEHOLDER = "credproxy-placeholder"
PORT = 8787  # forward's port inside the sandbox's own network namespace
RUN_TIMEOUT = 120


@dataclass(frozen=True)
class Agent:
    package: str
    version: str
    bin: str

    @property
    def spec(self) -> str:
        return f"{self.package}@{self.version}"


# The newest versions when these tests were written, each run here end to end.
CLAUDE = Agent("@anthropic-ai/claude-code", "2.1.332", "claude")
CODEX = Agent("@openai/codex", "0.171.0", "codex")
GEMINI = Agent("@google/gemini-cli", "0.61.0", "gemini")


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "credproxy-tests" / "npm"


_NOT_INSTALLED: dict[str, str] = {}  # why an install failed, so it is tried once per run


def installed(agent: Agent) -> Path:
    """The directory of *agent*'s executable, installed from npm once (or skip, saying why)."""
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed: the agents run in it with --unshare-net")
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip(f"node and npm are needed to install and run {agent.spec}")
    if agent.spec in _NOT_INSTALLED:
        pytest.skip(_NOT_INSTALLED[agent.spec])
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    where = root / agent.spec.replace("/", "+")
    bin_dir = where / "node_modules" / ".bin"
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time, even across processes
        if not (where / "ok").exists():
            why = _install(agent, where)
            if why is not None:
                _NOT_INSTALLED[agent.spec] = why
                pytest.skip(why)
            (where / "ok").write_text(agent.version + "\n")
    return bin_dir


def _install(agent: Agent, where: Path) -> str | None:
    """``npm install`` *agent* into *where*; None if it runs, else why not."""
    shutil.rmtree(where, ignore_errors=True)
    exe = where / "node_modules" / ".bin" / agent.bin
    try:
        proc = subprocess.run(
            [
                *("npm", "install", "--prefix", str(where), "--no-audit", "--no-fund"),
                *("--fetch-retries=1", "--fetch-timeout=30000", agent.spec),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"npm install {agent.spec} took over 600 s (is the npm registry reachable?)"
    if proc.returncode != 0 or not exe.exists():
        said = [
            line
            for line in proc.stderr.splitlines()
            if line.startswith("npm error")
            and "complete log" not in line
            and line.split()[2:3] not in (["syscall"], ["errno"])
        ]
        return f"npm install {agent.spec} failed ({proc.returncode}): " + " / ".join(said[:3])
    version = subprocess.run(
        [str(exe), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    if agent.version not in version.stdout:
        got = version.stdout.strip() or version.stderr.strip()
        return f"{agent.spec} was installed but `{agent.bin} --version` said {got!r}"
    return None


@pytest.fixture
def upstream(dirs: Dirs) -> Iterator[Upstream]:
    """agent_upstreams.py as a subprocess on an ephemeral loopback port (ended by its pid)."""
    with fake_upstream(dirs, UPSTREAM) as up:
        yield up


def _configure(dirs: Dirs, up: Upstream) -> None:
    """The daemon's providers, as docs/integrations.md gives them, pointed at the fake.

    claude: a stored login (its access token goes out as Bearer); openai and
    gemini: API keys stored with `credproxy key set`, and nothing else (a
    provider whose API headers name only keys needs no login and no token_url).
    """
    dirs.config.write_text(
        "[providers.claude]\n"
        'preset = "claude"\n'
        "[providers.claude.api]\n"
        f'base_url = "{up.root}"\n'
        'headers = { Authorization = "Bearer {access_token}",'
        ' anthropic-beta = "oauth-2025-04-20,{client}" }\n'
        "[providers.openai.api]\n"
        f'base_url = "{up.root}/v1"\n'
        'headers = { Authorization = "Bearer {key:openai}" }\n'
        "[providers.gemini.api]\n"
        f'base_url = "{up.root}"\n'
        'headers = { x-goog-api-key = "{key:gemini}" }\n'
    )
    token = {"access_token": CLAUDE_AT, "refresh_token": CLAUDE_RT, "expires_in": 3600}
    for args, value in (
        (("import", "claude"), json.dumps(token)),
        (("key", "set", "openai"), OPENAI_KEY),
        (("key", "set", "gemini"), GEMINI_KEY),
    ):
        proc = cli(dirs, *args, input=value)
        assert proc.returncode == 0, proc.stderr


def _sandbox(
    dirs: Dirs,
    bin_dir: Path,
    home: Path,
    env: dict[str, str],
    cmd: list[str],
    share_net: bool = False,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """bwrap with only loopback, an empty environment but *env*, and *home* as a throwaway HOME.

    With *share_net* the host's network instead; *extra* are more bwrap options.

    The host's HOME (its agent logins) and the daemon's state are hidden; the
    agent's install, node, Python (venv and base) and the checkout are read-only.
    """
    path = f"{bin_dir}:{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"
    base_env = {"PATH": path, "HOME": "/tmp/home", "LANG": "C.UTF-8", "TERM": "dumb"}
    setenv = [a for k, v in {**base_env, **env}.items() for a in ("--setenv", k, v)]
    node = Path(shutil.which("node") or "/usr/bin/node").resolve().parents[1]
    keep = (str(bin_dir.parents[1]), sys.prefix, sys.base_prefix, str(node), REPO)
    ro = [a for p in dict.fromkeys(keep) for a in ("--ro-bind", p, p)]
    return [
        "bwrap",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        "--tmpfs", "/run",
        "--tmpfs", str(dirs.root),  # the state directory (refresh tokens, keys), the runtime
        "--tmpfs", str(Path.home()),  # the host user's own agent logins
        *ro,
        "--bind", str(home), "/tmp/home",
        "--dir", "/tmp/work",
        "--chdir", "/tmp/work",
        "--bind", "{socket}", "/run/credproxy.sock",
        "--clearenv",
        *setenv,
        "--setenv", "CREDPROXY_SOCKET", "/run/credproxy.sock",
        *extra,
        "--unshare-all",
        *(["--share-net"] if share_net else ["--unshare-net"]),
        "--die-with-parent",
        *cmd,
    ]  # fmt: skip


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _run(dirs: Dirs, up: Upstream, grants: list[str], sandbox: list[str]) -> Ran:
    """`credproxy run GRANTS -- SANDBOX`, its daemon trusting the fake's CA; killed after RUN_TIMEOUT."""
    start = time.monotonic()
    with subprocess.Popen(
        [CREDPROXY, "run", *grants, "--", *sandbox],
        env=dirs.env(SSL_CERT_FILE=str(up.ca_file)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()  # bwrap's --die-with-parent ends the sandbox with it
            out, err = proc.communicate()
            raise AssertionError(
                f"the agent did not finish within {RUN_TIMEOUT} s\nstdout: {out[-3000:]}\n"
                f"stderr: {err[-3000:]}\nupstream got: {[(r['method'], r['path']) for r in up.requests()]}"
            ) from None
    return Ran(proc.returncode, out, err, time.monotonic() - start)


def _assert_no_canary(where: str, text: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"{canary} in {where}"


def _assert_home_clean(home: Path) -> None:
    """No file the agent wrote in its HOME holds a token or key."""
    for f in home.rglob("*"):
        if f.is_file() and not f.is_symlink():
            _assert_no_canary(str(f), f.read_bytes().decode("latin-1"))


def _api_lines(dirs: Dirs) -> list[dict[str, Any]]:
    log = dirs.runtime / "daemon.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if e.get("event") == "api_request"]


def _check(
    dirs: Dirs, up: Upstream, ran: Ran, home: Path, header: str, value: str
) -> list[dict[str, Any]]:
    """What every agent test asserts; returns the upstream's requests."""
    seen = up.requests()
    context = (
        f"exit {ran.returncode}\nstdout: {ran.stdout[-3000:]}\nstderr: {ran.stderr[-3000:]}\n"
        f"upstream got: {[(r['method'], r['path'], r['stream']) for r in seen]}"
    )
    assert ran.returncode == 0, context
    assert REPLY in ran.stdout, context
    assert seen, context
    for r in seen:  # the daemon's credential on every request, never the sandbox's placeholder
        assert r["headers"].get(header) == value, (r["method"], r["path"], sorted(r["headers"]))
        assert PLACEHOLDER not in json.dumps(r), r
    _assert_no_canary("the agent's stdout", ran.stdout)
    _assert_no_canary("the agent's stderr", ran.stderr)
    _assert_home_clean(home)
    log = (dirs.runtime / "daemon.log").read_text()
    _assert_no_canary("the daemon's log", log)
    audit = [(e["method"], e["path"], e["status"]) for e in _api_lines(dirs)]
    print(
        f"\n{ran.seconds:.1f} s; upstream got {[(r['method'], r['path']) for r in seen]}; "
        f"daemon audit {audit}"
    )
    return seen


def test_claude_code_prints_the_streamed_reply_with_the_hosts_token(
    background_daemon: Dirs, upstream: Upstream, tmp_path: Path
) -> None:
    """`claude -p` under credproxy forward (ANTHROPIC_BASE_URL) gets the streamed reply; the upstream sees the stored token as Bearer, never the sandbox's key."""
    bin_dir = installed(CLAUDE)
    dirs = background_daemon
    _configure(dirs, upstream)
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "ANTHROPIC_API_KEY": PLACEHOLDER,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    cmd = [CREDPROXY, "forward", "--port", str(PORT), "--provider", "claude", "--"]
    cmd += ["claude", "-p", PROMPT]
    ran = _run(dirs, upstream, ["--allow", "api:claude"], _sandbox(dirs, bin_dir, home, env, cmd))
    seen = _check(dirs, upstream, ran, home, "authorization", f"Bearer {CLAUDE_AT}")
    asked = [
        r for r in seen if r["path"].startswith("/v1/messages?") or r["path"] == "/v1/messages"
    ]
    assert any(r["prompt"] and r["stream"] is True for r in asked), seen
    assert all("x-api-key" not in r["headers"] for r in seen)
    for r in asked:  # the host's beta first, then Claude Code's own ({client})
        betas = [b.strip() for b in r["headers"]["anthropic-beta"].split(",")]
        assert betas[0] == "oauth-2025-04-20" and "claude-code-20250219" in betas, betas


def test_claude_code_api_key_helper_sends_the_served_token_as_bearer_and_x_api_key(
    background_daemon: Dirs, upstream: Upstream, tmp_path: Path
) -> None:
    """The token route: `apiKeyHelper = "credproxy token claude"` in the sandbox (host network, straight to the fake); Claude Code sends what it prints as both Authorization: Bearer and x-api-key."""
    bin_dir = installed(CLAUDE)
    dirs = background_daemon
    _configure(dirs, upstream)
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    helper = {"apiKeyHelper": "credproxy token claude"}
    (home / ".claude" / "settings.json").write_text(json.dumps(helper))
    env = {
        "ANTHROPIC_BASE_URL": upstream.root,
        "NODE_EXTRA_CA_CERTS": "/tmp/ca.pem",  # the fake's CA (bun reads it too)
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }
    cmd = ["claude", "-p", PROMPT]
    ca = ("--ro-bind", str(upstream.ca_file), "/tmp/ca.pem")
    sandbox = _sandbox(dirs, bin_dir, home, env, cmd, share_net=True, extra=ca)
    ran = _run(dirs, upstream, ["--allow", "claude"], sandbox)
    seen = upstream.requests()
    assert ran.returncode == 0 and REPLY in ran.stdout, (ran, seen)
    asked = [r for r in seen if r["path"].partition("?")[0] == "/v1/messages"]
    assert any(r["prompt"] and r["stream"] is True for r in asked), seen
    for r in seen:
        assert r["headers"]["authorization"] == f"Bearer {CLAUDE_AT}", r
        assert r["headers"]["x-api-key"] == CLAUDE_AT, r
    assert CLAUDE_RT not in ran.stdout + ran.stderr  # the refresh token stays on the host
    for f in home.rglob("*"):
        if f.is_file() and not f.is_symlink():
            assert CLAUDE_RT not in f.read_bytes().decode("latin-1"), f


# Codex 0.171 ignores OPENAI_BASE_URL. Either of these two reaches forward's port:
CODEX_CONFIGS = {
    # a model provider of one's own: HTTP streaming only (custom providers do not try
    # WebSocket unless supports_websockets = true);
    "custom-provider": f"""\
model = "gpt-5.5"
model_provider = "credproxy"
check_for_update_on_startup = false

[model_providers.credproxy]
name = "OpenAI through credproxy"
base_url = "http://127.0.0.1:{PORT}/openai"
wire_api = "responses"
env_key = "OPENAI_API_KEY"
supports_websockets = false

[analytics]
enabled = false
""",
    # the built-in provider at another base URL: it tries the Responses WebSocket
    # first (GET /v1/responses, Upgrade: websocket), which the fake refuses with 426,
    # and then streams over HTTP.
    "openai_base_url": f"""\
model = "gpt-5.5"
openai_base_url = "http://127.0.0.1:{PORT}/openai"
check_for_update_on_startup = false

[analytics]
enabled = false
""",
}


@pytest.mark.parametrize("setting", list(CODEX_CONFIGS))
def test_codex_exec_prints_the_streamed_reply_with_the_hosts_key(
    background_daemon: Dirs, upstream: Upstream, tmp_path: Path, setting: str
) -> None:
    """`codex exec` pointed at forward's port (a custom model provider, or openai_base_url) gets the Responses API stream; the upstream sees the stored key, never the sandbox's."""
    bin_dir = installed(CODEX)
    dirs = background_daemon
    _configure(dirs, upstream)
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(CODEX_CONFIGS[setting])
    env = {"OPENAI_API_KEY": PLACEHOLDER}
    cmd = [CREDPROXY, "forward", "--port", str(PORT), "--provider", "openai", "--"]
    cmd += ["codex", "exec", "--skip-git-repo-check", "--ephemeral", "-s", "read-only", PROMPT]
    grants = ["--allow", "api:openai", "--allow", "key:openai"]
    ran = _run(dirs, upstream, grants, _sandbox(dirs, bin_dir, home, env, cmd))
    seen = _check(dirs, upstream, ran, home, "authorization", f"Bearer {OPENAI_KEY}")
    asked = [r for r in seen if r["path"] == "/v1/responses" and r["method"] == "POST"]
    assert any(r["prompt"] and r["stream"] is True for r in asked), seen
    upgrades = [r for r in seen if r["method"] == "GET" and r["path"] == "/v1/responses"]
    if setting == "custom-provider":
        assert upgrades == [], seen
    else:  # one handshake, refused; then HTTP at once
        assert len(upgrades) == 1 and upgrades[0]["headers"]["upgrade"] == "websocket", seen
        assert ran.seconds < 30, ran


GEMINI_SETTINGS: dict[str, Any] = {
    "security": {"auth": {"selectedType": "gemini-api-key"}},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False},
    "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False},
}


@pytest.mark.parametrize("auth", ["gemini-api-key", "unset"])
def test_gemini_cli_prints_the_streamed_reply_with_the_hosts_key(
    background_daemon: Dirs, upstream: Upstream, tmp_path: Path, auth: str
) -> None:
    """`gemini -p` under credproxy forward (GOOGLE_GEMINI_BASE_URL) gets streamGenerateContent's events; the upstream sees the stored key, never the sandbox's. Without selectedType = gemini-api-key, Gemini CLI refuses to start."""
    bin_dir = installed(GEMINI)
    dirs = background_daemon
    _configure(dirs, upstream)
    home = tmp_path / "home"
    (home / ".gemini").mkdir(parents=True)
    settings = dict(GEMINI_SETTINGS)
    if auth == "unset":
        del settings["security"]
    (home / ".gemini" / "settings.json").write_text(json.dumps(settings))
    env = {"GEMINI_API_KEY": PLACEHOLDER}
    cmd = [CREDPROXY, "forward", "--port", str(PORT), "--provider", "gemini", "--"]
    cmd += ["gemini", "--skip-trust", "-p", PROMPT, "-m", "gemini-2.5-flash"]
    grants = ["--allow", "api:gemini", "--allow", "key:gemini"]
    ran = _run(dirs, upstream, grants, _sandbox(dirs, bin_dir, home, env, cmd))
    if auth == "unset":  # GOOGLE_GEMINI_BASE_URL alone selects the "gateway" type, refused
        assert ran.returncode == 41, ran
        assert "Invalid auth method selected." in ran.stderr, ran
        assert upstream.requests() == []
        return
    seen = _check(dirs, upstream, ran, home, "x-goog-api-key", GEMINI_KEY)
    asked = [r for r in seen if ":streamGenerateContent?" in r["path"]]
    assert any(r["prompt"] and "alt=sse" in r["path"] for r in asked), seen
