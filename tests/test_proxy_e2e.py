"""The HTTP API proxy end to end (issue 13): real clients, unmodified, and the canary check.

The installed ``credproxy`` executable runs the daemon (started by ``credproxy
run``); a fake OpenAI / Anthropic API (``https_upstream.py``) runs as a
subprocess over HTTPS on loopback with a certificate from a test CA
(``trustme``), which the daemon trusts through ``SSL_CERT_FILE``. The clients
are ``curl --unix-socket`` and the real ``openai`` and ``anthropic`` SDKs behind
``credproxy forward`` in a bubblewrap sandbox with its own network namespace.
The tokens and the injected API key are canaries: no byte the sandbox reads may
contain one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from https_upstream import ANTHROPIC_TEXT, OPENAI_TEXT
from sandbox import bwrap

from conftest import CREDPROXY, Dirs, cli

UPSTREAM = str(Path(__file__).with_name("https_upstream.py"))
REPO = str(Path(__file__).resolve().parents[1])

OPENAI_AT = "AT-OPENAI-CANARY-3e8f1a"
OPENAI_RT = "RT-OPENAI-CANARY-9b2c4d"
CLAUDE_AT = "AT-CLAUDE-CANARY-71d0e6"
CLAUDE_RT = "RT-CLAUDE-CANARY-c5a8f2"
KEY_CANARY = "KEY-CANARY-4f6e9a"
CANARIES = (OPENAI_AT, OPENAI_RT, CLAUDE_AT, CLAUDE_RT, KEY_CANARY)
NO_BWRAP = "bubblewrap (bwrap) is not installed: the SDKs run under credproxy run without it"


@dataclass
class Upstream:
    """The fake API's address, the CA that signed its certificate, and what it received."""

    port: int
    ca_file: Path
    log_file: Path

    @property
    def root(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]


@contextlib.contextmanager
def fake_upstream(dirs: Dirs, script: str, pem_copies: int = 1) -> Iterator[Upstream]:
    """*script* as a subprocess on an ephemeral loopback port, with a test CA (ended by its pid).

    Its arguments: the server's PEM (key and chain), *pem_copies* times, then the
    port file it writes once it listens and its request log.
    """
    where = dirs.root / "upstream"
    where.mkdir(parents=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    pem = where / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    port_file, log_file = where / "port", where / "requests.jsonl"
    argv = [sys.executable, script, *[str(pem)] * pem_copies, str(port_file), str(log_file)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert proc.poll() is None, "the fake upstream exited before it listened"
            assert time.monotonic() < deadline, "the fake upstream did not listen within 10 s"
            time.sleep(0.02)
        yield Upstream(int(port_file.read_text()), where / "ca.pem", log_file)
    finally:
        proc.terminate()
        _wait_or_kill(proc, 5)


@pytest.fixture
def upstream(dirs: Dirs) -> Iterator[Upstream]:
    """The fake HTTPS API (certificate and key files given apart, the same PEM twice)."""
    with fake_upstream(dirs, UPSTREAM, pem_copies=2) as up:
        yield up


def _wait_or_kill(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait for *proc* to exit; if it has not within *timeout* seconds, kill it (by its handle)."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _setup(dirs: Dirs, up: Upstream) -> None:
    """Config with `openai` and `claude` pointed at the fake, their tokens, and the canary key."""
    dirs.config.write_text(
        "[providers.openai]\n"
        'token_url = "http://127.0.0.1:9/token"\n'
        'client_id = "openai-client"\n'
        "[providers.openai.api]\n"
        f'base_url = "{up.root}/v1"\n'
        'headers = { Authorization = "Bearer {access_token}", x-canary-key = "{key:canary-key}" }\n'
        "[providers.claude]\n"
        'token_url = "http://127.0.0.1:9/token"\n'
        'client_id = "claude-client"\n'
        "[providers.claude.api]\n"
        f'base_url = "{up.root}"\n'
        'headers = { Authorization = "Bearer {access_token}", anthropic-beta = "oauth-2025-04-20",'
        ' x-canary-key = "{key:canary-key}" }\n'
    )
    for provider, at, rt in (("openai", OPENAI_AT, OPENAI_RT), ("claude", CLAUDE_AT, CLAUDE_RT)):
        token = {"access_token": at, "refresh_token": rt, "expires_in": 3600}
        proc = cli(dirs, "import", provider, input=json.dumps(token))
        assert proc.returncode == 0, proc.stderr
    proc = cli(dirs, "key", "set", "canary-key", input=KEY_CANARY)
    assert proc.returncode == 0, proc.stderr


def _run(dirs: Dirs, up: Upstream, *args: str) -> subprocess.CompletedProcess[str]:
    """`credproxy run ARGS` whose daemon trusts the fake's CA (SSL_CERT_FILE)."""
    return cli(dirs, "run", *args, timeout=120, SSL_CERT_FILE=str(up.ca_file))


def _api_lines(dirs: Dirs) -> list[dict[str, Any]]:
    lines = (dirs.runtime / "daemon.log").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == "api_request"]


def _wait_api_lines(dirs: Dirs, count: int, timeout: float = 5) -> list[dict[str, Any]]:
    """The daemon's api_request lines, once *count* are written (each after its answer).

    After *timeout* seconds, those written so far.
    """
    deadline = time.monotonic() + timeout
    while len(lines := _api_lines(dirs)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return lines


def _assert_no_canary(where: str, text: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"{canary} in {where}"


def test_curl_on_the_session_socket_gets_the_answer_and_never_the_token(
    background_daemon: Dirs, upstream: Upstream
) -> None:
    """`curl --unix-socket $CREDPROXY_SOCKET` reaches the fake API with the stored token added outside the sandbox, and neither its environment nor its output holds a token."""
    dirs = background_daemon
    _setup(dirs, upstream)
    body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    script = (
        'curl -sS -i --compressed --unix-socket "$CREDPROXY_SOCKET" '
        '-H "Authorization: Bearer sandbox-own" -H "content-type: application/json" '
        f"-d '{body}' 'http://credproxy/openai/chat/completions?trace=q-7'"
        "; echo; echo ---ENV---; env; echo ---PROC---; tr '\\0' '\\n' < /proc/self/environ"
    )
    proc = _run(
        dirs, upstream, "--allow", "openai", "--allow", "key:canary-key", "--", "sh", "-c", script
    )
    assert proc.returncode == 0, proc.stderr
    answer, _, env = proc.stdout.partition("---ENV---")
    head, _, payload = answer.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), answer
    assert json.loads(payload)["choices"][0]["message"]["content"] == OPENAI_TEXT
    (seen,) = upstream.requests()
    assert (seen["method"], seen["path"]) == ("POST", "/v1/chat/completions?trace=q-7")
    assert seen["headers"]["authorization"] == f"Bearer {OPENAI_AT}"
    assert seen["headers"]["x-canary-key"] == KEY_CANARY
    assert seen["headers"]["host"] == f"127.0.0.1:{upstream.port}"
    assert "sandbox-own" not in json.dumps(seen)
    assert "CREDPROXY_SOCKET=" in env
    _assert_no_canary("curl's output and environment", proc.stdout)
    _assert_no_canary("stderr", proc.stderr)
    (line,) = _wait_api_lines(dirs, 1)
    assert (line["provider"], line["method"], line["path"], line["status"]) == (
        "openai",
        "POST",
        "/chat/completions",
        200,
    )
    log = (dirs.runtime / "daemon.log").read_text()
    assert "q-7" not in log  # the path is logged without its query
    _assert_no_canary("the daemon's log", log)


# Runs inside the sandbox, under `credproxy forward`: the SDKs as anyone calls
# them (base URLs from the environment), then everything the sandbox can read.
SDK_SCRIPT = """
import glob, json, os, socket
import anthropic, openai

out = {}
oa = openai.OpenAI()
ask = [{"role": "user", "content": "hi"}]
out["openai"] = oa.chat.completions.create(model="gpt-test", messages=ask).choices[0].message.content
out["openai_stream"] = [
    c.choices[0].delta.content
    for c in oa.chat.completions.create(model="gpt-test", messages=ask, stream=True)
    if c.choices and c.choices[0].delta.content
]
an = anthropic.Anthropic()
m = an.messages.create(model="claude-test", max_tokens=32, messages=ask)
out["anthropic"] = m.content[0].text
with an.messages.stream(model="claude-test", max_tokens=32, messages=ask) as s:
    out["anthropic_stream"] = list(s.text_stream)

def raw(path, body):
    # The session's own bytes: a request straight on the socket, every byte of the answer.
    data = json.dumps(body).encode()
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.environ["CREDPROXY_SOCKET"])
    s.sendall(
        b"POST " + path.encode() + b" HTTP/1.1\\r\\nhost: credproxy\\r\\n"
        b"authorization: Bearer sandbox-own\\r\\nx-api-key: sandbox-key\\r\\n"
        b"content-type: application/json\\r\\naccept-encoding: identity\\r\\n"
        b"connection: close\\r\\n"
        b"content-length: " + str(len(data)).encode() + b"\\r\\n\\r\\n" + data
    )
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got.decode("latin-1")

out["raw"] = [
    raw("/openai/chat/completions?trace=q-7", {"model": "gpt-test", "messages": ask}),
    raw("/claude/v1/messages", {"model": "claude-test", "max_tokens": 32, "messages": ask, "stream": True}),
    raw("/nope/v1/messages", {}),
]
try:
    socket.create_connection(("127.0.0.1", UPSTREAM_PORT), timeout=2).close()
    out["direct"] = "connected"
except OSError as exc:
    out["direct"] = type(exc).__name__
out["env"] = dict(os.environ)
procs = {}
for d in glob.glob("/proc/[0-9]*"):
    for f in ("environ", "cmdline"):
        try:
            procs[d + "/" + f] = open(d + "/" + f, "rb").read().decode("latin-1")
        except OSError:
            pass
out["proc"] = procs
print(json.dumps(out))
"""


def _bwrap(dirs: Dirs, *cmd: str) -> list[str]:
    """A bubblewrap sandbox with its own network namespace (loopback only), as test_e2e builds it."""
    return bwrap(
        dirs,
        *cmd,
        options=(
            "--unsetenv",
            "LLXPRT_CREDENTIAL_SOCKET",
            "--unsetenv",
            "SSL_CERT_FILE",  # the daemon's trust, not the sandbox's (its CA file is not in there)
        ),
    )


@pytest.mark.parametrize(
    "sandbox",
    [
        pytest.param(
            "bwrap",
            marks=pytest.mark.skipif(shutil.which("bwrap") is None, reason=NO_BWRAP),
        ),
        "none",
    ],
)
def test_openai_and_anthropic_sdks_unmodified_through_credproxy_forward(
    background_daemon: Dirs, upstream: Upstream, sandbox: str
) -> None:
    """The real openai and anthropic SDKs, behind credproxy forward (in bwrap with --unshare-net), get the fake's answers streaming and not, and nothing the sandbox can read holds a token or the injected key."""
    dirs = background_daemon
    _setup(dirs, upstream)
    forward = [
        CREDPROXY,
        "forward",
        "--provider",
        "openai",
        "--provider",
        "claude",
        "--",
        sys.executable,
        "-c",
        SDK_SCRIPT.replace("UPSTREAM_PORT", str(upstream.port)),
    ]
    keys = ["OPENAI_API_KEY", "placeholder-openai", "ANTHROPIC_API_KEY", "placeholder-anthropic"]
    if sandbox == "bwrap":
        cmd = _bwrap(dirs, "--setenv", *keys[:2], "--setenv", *keys[2:], *forward)
    else:
        cmd = [
            "env",
            "-u",
            "SSL_CERT_FILE",
            f"{keys[0]}={keys[1]}",
            f"{keys[2]}={keys[3]}",
            *forward,
        ]
    grants = ["--allow", "openai", "--allow", "claude", "--allow", "key:canary-key"]
    proc = _run(dirs, upstream, *grants, "--", *cmd)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)

    assert out["openai"] == OPENAI_TEXT
    assert "".join(out["openai_stream"]) == OPENAI_TEXT and len(out["openai_stream"]) > 1
    assert out["anthropic"] == ANTHROPIC_TEXT
    assert "".join(out["anthropic_stream"]) == ANTHROPIC_TEXT and len(out["anthropic_stream"]) > 1
    openai_raw, claude_raw, nope_raw = out["raw"]
    assert openai_raw.startswith("HTTP/1.1 200") and OPENAI_TEXT in openai_raw
    assert claude_raw.startswith("HTTP/1.1 200") and "message_stop" in claude_raw
    assert nope_raw.startswith("HTTP/1.1 404")
    if sandbox == "bwrap":
        assert out["direct"] == "ConnectionRefusedError"  # only loopback, and not the host's
    assert out["env"]["OPENAI_BASE_URL"].endswith("/openai")
    assert out["env"]["ANTHROPIC_BASE_URL"].endswith("/claude")

    # What reached the upstream: the template's headers, never the sandbox's own.
    seen = upstream.requests()
    assert [(r["method"], r["path"].partition("?")[0], r["stream"]) for r in seen] == [
        ("POST", "/v1/chat/completions", False),
        ("POST", "/v1/chat/completions", True),
        ("POST", "/v1/messages", False),
        ("POST", "/v1/messages", True),
        ("POST", "/v1/chat/completions", False),
        ("POST", "/v1/messages", True),
    ]
    for r in seen:
        at = OPENAI_AT if "chat" in r["path"] else CLAUDE_AT
        assert r["headers"]["authorization"] == f"Bearer {at}"
        assert r["headers"]["x-canary-key"] == KEY_CANARY
        assert "x-api-key" not in r["headers"]
        assert "placeholder" not in json.dumps(r) and "sandbox-" not in json.dumps(r)
    assert all(r["headers"]["anthropic-beta"] == "oauth-2025-04-20" for r in seen[2:4])

    # The canary: nothing the sandbox read holds a token or the key.
    _assert_no_canary("the sandbox's output", proc.stdout)
    _assert_no_canary("the sandbox's stderr", proc.stderr)
    assert out["proc"], "no /proc file was readable in the sandbox"

    # One audit line per request: provider, path without query, status; no token.
    lines = _wait_api_lines(dirs, 7)
    got = Counter((e["provider"], e["method"], e["path"], e["status"]) for e in lines)
    assert got == {
        ("openai", "POST", "/chat/completions", 200): 3,
        ("claude", "POST", "/v1/messages", 200): 3,
        (None, "POST", "-", 404): 1,  # the provider no session has
    }
    log = (dirs.runtime / "daemon.log").read_text()
    assert "q-7" not in log
    _assert_no_canary("the daemon's log", log)


def test_curl_without_accept_encoding_gets_a_body_it_can_read(
    background_daemon: Dirs, upstream: Upstream
) -> None:
    """A client that sends no Accept-Encoding (plain curl) gets the answer as plain JSON, not compressed."""
    dirs = background_daemon
    _setup(dirs, upstream)
    body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
    script = (
        'curl -sS --unix-socket "$CREDPROXY_SOCKET" -H "content-type: application/json" '
        f"-d '{body}' http://credproxy/openai/chat/completions | base64"
    )
    proc = _run(
        dirs, upstream, "--allow", "openai", "--allow", "key:canary-key", "--", "sh", "-c", script
    )
    assert proc.returncode == 0, proc.stderr
    answer = base64.b64decode(proc.stdout)
    assert json.loads(answer)["choices"][0]["message"]["content"] == OPENAI_TEXT


def test_a_key_template_is_filled_only_for_a_session_granted_that_key(
    background_daemon: Dirs, upstream: Upstream
) -> None:
    """A session granted `openai` but not `key:canary-key` never has that key sent upstream for it."""
    dirs = background_daemon
    _setup(dirs, upstream)
    script = (
        'curl -sS --compressed --unix-socket "$CREDPROXY_SOCKET" '
        "-d '{}' http://credproxy/openai/chat/completions"
    )
    proc = _run(dirs, upstream, "--allow", "openai", "--", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    _assert_no_canary("curl's output", proc.stdout)
    assert all(KEY_CANARY not in json.dumps(r) for r in upstream.requests())
