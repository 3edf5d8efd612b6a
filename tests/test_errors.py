"""Errors that say why and what next (issue 19): every message here is read as a user reads it.

The command line runs as a real process (``cli``), sessions are opened by a
real ``credproxy run`` with its background daemon, the API proxy answers on a
real session socket, and the network failures are real ones on loopback (a
closed port, a server that never answers, a TLS certificate nobody trusts).
Secrets are canary strings, and none may appear in an error.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme

import credproxy.errors as errors
from conftest import CREDPROXY, Dirs, StartDaemon, cli
from credproxy.core.config import Provider
from credproxy.shell.http import HttpTokenEndpoint, network_failure

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def run_in(dirs: Dirs, *args: str) -> Any:
    """`credproxy run ARGS` whose command finds `credproxy` on PATH, as in a sandbox."""
    path = f"{Path(CREDPROXY).parent}:{os.environ.get('PATH', '')}"
    return cli(dirs, "run", *args, PATH=path)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- --help -----------------------------------------------------------------------------------


def _commands_in_help(text: str) -> set[str]:
    """The command names of `credproxy --help`'s COMMAND list."""
    block = text.split("COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    return {m.group(1) for m in re.finditer(r"^    ([a-z][a-z-]*)", block, re.M)}


def test_help_lists_every_command(dirs: Dirs) -> None:
    """`credproxy --help` lists every command, those dispatched before argparse (token, forward, git-credential) included, and each has its own --help."""
    out = cli(dirs, "--help")
    assert out.returncode == 0
    listed = _commands_in_help(out.stdout)
    source = (ROOT / "credproxy" / "cli.py").read_text()
    early = set(re.findall(r'args\[:1\] == \["([a-z-]+)"\]', source))
    parsers = set(re.findall(r'\bsub\.add_parser\(\s*"([a-z-]+)"', source))
    assert {"token", "forward", "git-credential"} <= early
    assert early | parsers == listed
    assert "key get NAME" not in listed  # (sub-actions are under `key`)
    for command in sorted(listed):
        sub = cli(dirs, command, "--help")
        assert sub.returncode == 0, (command, sub.stderr)
        assert "usage: credproxy" in sub.stdout, command
    key = cli(dirs, "key", "--help")
    assert re.search(r"^    get +\(inside a sandbox\) print a granted API key", key.stdout, re.M)


def test_run_help_shows_the_grant_syntax(dirs: Dirs) -> None:
    """`credproxy run --help` lists each grant form with a one-line meaning."""
    out = cli(dirs, "run", "--help").stdout
    block = out.split("GRANT is one of:\n", 1)[1]
    forms = {
        "PROVIDER": "every bucket",
        "PROVIDER:BUCKET": "one bucket",
        "PROVIDER:B1,B2": "profile",
        "api:PROVIDER": "API through the HTTP proxy only",
        "api:PROVIDER:BUCKET": "one bucket's API through the HTTP proxy only",
        "key:NAME": "API key NAME",
        "'*'": "everything",
    }
    for form, meaning in forms.items():
        (line,) = [ln for ln in block.splitlines() if ln.split()[:1] == [form]]
        assert meaning in line, line


# -- the exit-code table ----------------------------------------------------------------------


def _doc_exit_codes() -> dict[str, int]:
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text.split("## Exit codes", 1)[1]
    rows = re.findall(r"^\| (\d+) \| `(EXIT_[A-Z_]+)` \| ", section, re.M)
    return {name: int(code) for code, name in rows}


def test_one_exit_code_table_in_the_docs_and_the_code() -> None:
    """docs/cli.md's exit-code table and credproxy/errors.py hold the same names and numbers, and every error class exits with one of them."""
    table = _doc_exit_codes()
    in_code = {n: v for n, v in vars(errors).items() if n.startswith("EXIT_")}
    assert table == in_code
    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.CredproxyError)
    ]
    assert {c.exit_code for c in classes} <= set(table.values())
    # The README points at that table rather than keeping a copy of its own.
    readme = (ROOT / "README.md").read_text()
    assert "docs/cli.md#exit-codes" in readme
    assert "2 usage error, 3 not found" not in readme


def test_a_missing_input_file_exits_not_found(dirs: Dirs) -> None:
    """`import FILE` and `import --from TOOL FILE` of a file that does not exist exit 3 with one line naming it."""
    gone = dirs.root / "nope.json"
    plain = cli(dirs, "import", "p", str(gone))
    assert plain.returncode == errors.EXIT_NOT_FOUND == 3
    assert one_line(plain.stderr) == (
        f"credproxy import: {gone} does not exist (give the token file's path)"
    )
    adopt = cli(dirs, "import", "p", "--from", "claude-code", str(gone))
    assert adopt.returncode == 3
    assert one_line(adopt.stderr) == (
        f"credproxy import: {gone} does not exist (give the file's path after the provider)"
    )


# -- expiry ------------------------------------------------------------------------------------


def test_an_expired_import_says_how_long_ago(dirs: Dirs) -> None:
    """A token that expired 38 s ago says so; one with 62 minutes left says hours and minutes."""
    past = {"access_token": "AT-CANARY", "expiry": time.time() - 38}
    old = cli(dirs, "import", "p", input=json.dumps(past))
    assert old.returncode == 0, old.stderr
    assert re.fullmatch(
        r"stored p:default \(expired (38|39|40) s ago, without refresh token\)\n", old.stdout
    )
    soon = {"access_token": "AT-CANARY", "refresh_token": "RT-CANARY", "expires_in": 3725}
    new = cli(dirs, "import", "q", input=json.dumps(soon))
    assert new.stdout == "stored q:default (expires in 1 h 2 min, with refresh token)\n"
    status = cli(dirs, "status").stdout
    assert "p:default: expired " in status and " ago, not refreshable" in status
    assert "q:default: expires in 1 h 2 min, refreshable" in status


# -- credproxy run: the config and the grants ---------------------------------------------------


def test_run_prints_the_config_error_itself(dirs: Dirs) -> None:
    """With a bad config and no daemon, `run` prints the file, line and field and what to do (exit 2), and starts nothing."""
    dirs.config.write_text('[providers.dev]\ntoken_url = "https://x.example/t"\nclient_id = 7\n')
    out = cli(dirs, "run", "--allow", "dev", "--", "true")
    assert out.returncode == 2
    assert one_line(out.stderr) == (
        f"credproxy run: {dirs.config}:3: field providers.dev.client_id: "
        f"Expected `str`, got `int`; fix {dirs.config}, then run this again"
    )
    assert not (dirs.runtime / "credproxy.sock").exists()


def _config_with_dev(dirs: Dirs) -> None:
    dirs.config.write_text(
        '[providers.dev]\ntoken_url = "https://idp.example/token"\nclient_id = "c"\n'
        '[providers.other]\ntoken_url = "https://idp.example/token"\nclient_id = "c"\n'
    )


def test_run_warns_at_once_about_grants_that_give_nothing(background_daemon: Dirs) -> None:
    """`--allow nosuch`, `api:dev` without an api section, a key never stored and `dev` without a stored login are each one warning on run's stderr, with the fix; the command still runs."""
    dirs = background_daemon
    _config_with_dev(dirs)
    out = cli(
        dirs,
        "run",
        "--allow", "nosuch", "--allow", "api:dev", "--allow", "key:openai", "--allow", "dev",
        "--", "sh", "-c", "echo ran",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ran\n"
    cfg = dirs.config
    assert out.stderr.splitlines() == [
        "credproxy run: warning: grant 'dev': provider dev has no stored login; log in on the "
        'host: credproxy login dev (the sandbox is told only "not found"; running anyway)',
        "credproxy run: warning: grant 'nosuch': provider nosuch is not configured and has no "
        f"stored login; add [providers.nosuch] to {cfg} (a preset is quickest: see "
        'docs/providers.md), or fix the grant (the sandbox is told only "not found"; '
        "running anyway)",
        "credproxy run: warning: grant 'key:openai': no API key openai is stored; store it on "
        'the host: credproxy key set openai < FILE (the sandbox is told only "not found"; '
        "running anyway)",
        "credproxy run: warning: grant 'api:dev': provider dev has no api section; add "
        f"[providers.dev.api] (base_url, headers) to {cfg} (its API requests get a 404 that "
        "says so; running anyway)",
    ]


def test_a_grant_for_a_stored_login_without_config_is_not_warned(background_daemon: Dirs) -> None:
    """A provider with a stored token (served, not refreshed) is no mistake: no warning."""
    dirs = background_daemon
    stored = cli(dirs, "import", "solo", input=json.dumps({"access_token": "AT-CANARY"}))
    assert stored.returncode == 0, stored.stderr
    out = run_in(dirs, "--allow", "solo", "--", "credproxy", "token", "solo")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout == "AT-CANARY\n"


def test_status_and_the_log_name_the_cause_the_sandbox_is_not_told(
    background_daemon: Dirs,
) -> None:
    """The daemon logs grant_unknown with the fix; status lists it under the session; inside, an unknown provider and one not granted answer alike."""
    dirs = background_daemon
    _config_with_dev(dirs)
    script = (
        "credproxy status; "
        "credproxy token nosuch 2>&1; echo rc=$?; "
        "credproxy token other 2>&1; echo rc=$?"
    )
    out = run_in(dirs, "--allow", "nosuch", "--allow", "dev", "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    problem = (
        "    grant 'nosuch': provider nosuch is not configured and has no stored login; "
        f"add [providers.nosuch] to {dirs.config} (a preset is quickest: see "
        "docs/providers.md), or fix the grant"
    )
    assert problem in out.stdout.splitlines()
    inside = out.stdout.split("keys: -\n", 1)[1].splitlines()
    assert inside[1] == inside[3] == "rc=3"
    assert inside[0].replace("nosuch", "P") == inside[2].replace("other", "P")
    assert inside[0] == (
        "credproxy token: no token for nosuch:default in this session: the session must be "
        "granted nosuch, and logged in on the host; `credproxy status` on the host says "
        "which is missing"
    )
    events = [json.loads(line) for line in (dirs.runtime / "daemon.log").read_text().splitlines()]
    (logged,) = [e for e in events if e.get("event") == "grant_unknown"]
    assert logged["grant"] == "nosuch"
    assert logged["cause"] == "not_configured"
    assert logged["fix"].startswith(f"add [providers.nosuch] to {dirs.config}")


# -- API keys inside a sandbox ---------------------------------------------------------------


def test_key_get_reads_a_granted_key_and_token_key_points_there(background_daemon: Dirs) -> None:
    """`credproxy key get NAME` prints a granted key; not granted and not stored answer alike (exit 3); `credproxy token key:NAME` is a one-line hint."""
    dirs = background_daemon
    for name in ("openai", "anthropic"):
        stored = cli(dirs, "key", "set", name, input=f"KEY-CANARY-{name}\n")
        assert stored.returncode == 0, stored.stderr
    script = (
        "credproxy key get openai; echo rc=$?; "
        "credproxy key get anthropic 2>&1; echo rc=$?; "
        "credproxy key get nokey 2>&1; echo rc=$?; "
        "credproxy token key:openai 2>&1; echo rc=$?"
    )
    out = run_in(dirs, "--allow", "key:openai", "--allow", "key:nokey", "--", "sh", "-c", script)
    lines = out.stdout.splitlines()
    assert lines[:2] == ["KEY-CANARY-openai", "rc=0"]
    assert lines[3] == lines[5] == "rc=3"
    assert lines[2].replace("anthropic", "N") == lines[4].replace("nokey", "N")
    assert lines[2] == (
        "credproxy key get: no API key anthropic in this session: the session must be granted "
        "key:anthropic, and the key stored on the host (credproxy key set anthropic); "
        "`credproxy status` on the host says which is missing"
    )
    assert lines[6:] == [
        "credproxy token: key:openai is an API key: print it with `credproxy key get openai` "
        "(usage: credproxy token PROVIDER [--bucket BUCKET] "
        "[--format raw|json|header|env|kubectl|aws-process|docker] [--json])",
        "rc=2",
    ]
    assert "KEY-CANARY" not in out.stderr


# -- the API proxy's 404s ----------------------------------------------------------------------


async def _http(path: Path, target: str) -> bytes:
    """One request on the session socket; the whole answer (the proxy closes after it)."""
    stream = await trio.open_unix_socket(str(path))
    async with stream:
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: credproxy\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                answer += chunk
    return answer


async def test_proxy_says_no_api_section_plainly_and_keeps_unknown_like_not_granted(
    start_daemon: StartDaemon, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """Granted without an api section (or without a login): a 404 that says so; unknown and not granted: one identical 404; the host's log names each cause and fix once per minute."""
    h = await start_daemon(
        providers={
            "other": {
                "token_url": "https://idp.example/token",
                "client_id": "x",
                "api": {"base_url": "https://api.example"},
            },
        }
    )
    s = await h.session("dev")
    no_api = await _http(s.socket_path, "/dev/v1/x")
    assert no_api.startswith(b"HTTP/1.1 404 ")
    body = json.loads(no_api.split(b"\r\n\r\n", 1)[1])
    assert body == {
        "error": {"type": "credproxy", "message": "dev has no api section in the host's config"}
    }
    unknown = await _http(s.socket_path, "/nosuch/v1/x")
    not_granted = await _http(s.socket_path, "/other/v1/x")
    assert unknown == not_granted
    assert unknown.startswith(b"HTTP/1.1 404 ")
    assert json.loads(unknown.split(b"\r\n\r\n", 1)[1])["error"]["message"] == (
        "no such API in this session (http://credproxy/PROVIDER/...)"
    )
    await _http(s.socket_path, "/nosuch/v1/again")  # within the minute: counted, not logged
    said = [e for e in no_secrets_in_logs if e["event"] == "api_not_served"]
    assert [(e["provider"], e["cause"]) for e in said] == [
        ("dev", "no_api_section"),
        ("nosuch", "not_configured"),
        ("other", "not_granted"),
    ]
    assert said[0]["fix"] == "add [providers.dev.api] (base_url, headers) to the config file"
    assert said[2]["fix"] == (
        "grant it to the session: credproxy run --allow other (or --allow api:other)"
    )
    # Granted, configured with an api section, never logged in: said plainly too.
    granted = await h.session("api:other")
    no_login = await _http(granted.socket_path, "/other/v1/x")
    assert no_login.startswith(b"HTTP/1.1 404 ")
    assert json.loads(no_login.split(b"\r\n\r\n", 1)[1])["error"]["message"] == (
        "other:default has no stored login on the host"
    )
    (last,) = [e for e in no_secrets_in_logs if e["event"] == "api_not_served"][3:]
    assert (last["cause"], last["fix"]) == (
        "no_login",
        "log in on the host: credproxy login other --bucket default",
    )


# -- network failures --------------------------------------------------------------------------


def test_offline_login_names_the_host_the_cause_and_the_next_step(dirs: Dirs) -> None:
    """A device login whose IdP cannot be reached says where, why (connection refused) and what to do, in one line."""
    port = closed_port()
    dirs.config.write_text(
        "[providers.dev]\n"
        f'token_url = "http://127.0.0.1:{port}/token"\n'
        f'device_authorization_url = "http://127.0.0.1:{port}/device"\n'
        'client_id = "c"\n'
    )
    out = cli(dirs, "login", "dev", "--no-browser")
    assert out.returncode == 1
    assert one_line(out.stderr) == (
        "credproxy login: the login request to 127.0.0.1 failed: connection refused "
        "(ConnectError); check the host and port in the config, then try again"
    )


@pytest.fixture
def untrusted_tls() -> Iterator[int]:
    """An HTTPS server on loopback whose certificate no system CA signed; yields its port."""
    cert = trustme.CA().issue_cert("127.0.0.1")
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


async def test_refresh_failures_say_the_cause_in_words(untrusted_tls: int) -> None:
    """Refused, timed out and an untrusted certificate are each said in words with the next step, and a password in the URL is never repeated."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts, never answers
    ep = HttpTokenEndpoint(timeout=1)
    cases = {
        f"http://user:PW-CANARY@127.0.0.1:{closed_port()}/t": "connection refused (ConnectError); "
        "check the host and port in the config, then try again",
        f"http://127.0.0.1:{silent.getsockname()[1]}/t": "no answer in time (ReadTimeout); "
        "the server is slow or unreachable; try again later",
        f"https://127.0.0.1:{untrusted_tls}/t": "TLS certificate verification failed, unable to "
        "get local issuer certificate (ConnectError); check this host's clock and CA "
        "certificates (SSL_CERT_FILE names extra ones; a proxy that intercepts TLS needs its "
        "CA there), then try again",
    }
    try:
        for url, said in cases.items():
            with pytest.raises(errors.RefreshFailed) as info:
                await ep.refresh(Provider(token_url=url, client_id="x"), "RT-CANARY")
            assert str(info.value) == f"the refresh to 127.0.0.1 failed: {said}"
            assert "CANARY" not in str(info.value)
    finally:
        await ep.aclose()
        silent.close()


def test_dns_and_proxy_failures_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that does not resolve is a DNS failure; through HTTPS_PROXY, the proxy is named as the one that failed (httpx's exceptions as httpx raises them, with their causes)."""
    try:
        raise httpx.ConnectError("[Errno -2] Name or service not known") from socket.gaierror(
            -2, "Name or service not known"
        )
    except httpx.ConnectError as exc:
        dns = exc
    assert network_failure("the login request", "https://chat.qwen.ai/api/v1/x", dns) == (
        "the login request to chat.qwen.ai failed: DNS lookup failed, no network or no such "
        "host (ConnectError); check the network connection and the host name in the config, "
        "then try again"
    )
    monkeypatch.setenv("HTTPS_PROXY", "http://u:PW-CANARY@proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        raise httpx.ConnectError("all attempts failed") from ExceptionGroup(
            "all attempts failed", [ConnectionRefusedError(111, "Connection refused")]
        )
    except httpx.ConnectError as exc:
        refused = exc
    said = network_failure("the refresh", "https://oauth2.example/token", refused)
    assert said == (
        "the refresh to oauth2.example (through the proxy that HTTPS_PROXY names) failed: "
        "connection to the proxy refused (ConnectError); check the network and the proxy "
        "settings (HTTPS_PROXY, NO_PROXY), then try again"
    )


def test_run_of_a_command_with_a_long_file_name_runs_it(background_daemon: Dirs) -> None:
    """A command whose file name is 150 characters runs (its session is named after the first 128 of them); before, `run` refused it over a name the user never gave."""
    dirs = background_daemon
    _config_with_dev(dirs)
    script = dirs.root / ("x" * 150)
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    out = cli(dirs, "run", "--allow", "dev", "--", str(script))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ran\n"


def test_run_says_when_its_session_ended_before_its_command(dirs: Dirs) -> None:
    """`credproxy stop` while a sandbox runs: the command finishes (its own exit status), and `run` says on stderr that the session ended first, so a failure inside the sandbox has its reason."""
    import subprocess

    _config_with_dev(dirs)
    with (dirs.root / "run.err").open("wb") as err:
        proc = subprocess.Popen(
            [CREDPROXY, "run", "--allow", "dev", "--", "sh", "-c", "sleep 2; exit 3"],
            env=dirs.env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 15
        while not list((dirs.runtime / "s").glob("*.sock")):
            assert time.monotonic() < deadline, "the session did not open"
            time.sleep(0.05)
        assert cli(dirs, "stop").returncode == 0
        assert proc.wait(timeout=20) == 3
    finally:
        proc.kill()
        proc.wait()
    stderr = (dirs.root / "run.err").read_text()
    assert "warning: the session ended before the command did" in stderr, stderr


@pytest.mark.parametrize("preset", ["google", "entra"])
def test_login_says_what_the_preset_needs_before_starting(dirs: Dirs, preset: str) -> None:
    """A provider from a preset whose login needs scopes, without them: `credproxy login` says which key and where to set it (exit 2), before any flow starts."""
    dirs.config.write_text(f'[providers.work]\npreset = "{preset}"\nclient_id = "c"\n')
    out = cli(dirs, "login", "work", "--no-browser", "--timeout", "5")
    assert out.returncode == 2, out.stderr
    line = one_line(out.stderr)
    assert line.startswith("credproxy login: provider work needs scopes to log in: "), line
    assert f"set it in [providers.work] of {dirs.config}" in line


def test_a_grant_of_a_provider_without_a_stored_login_is_a_problem_said_on_the_host() -> None:
    """A login provider without a stored login gives the sandbox nothing: the host is told how to log in; one served by API keys alone, a signing provider and one with a login are fine."""
    from pathlib import Path

    from credproxy.core.config import parse
    from credproxy.core.grantcheck import grant_problems
    from credproxy.core.grants import Grants
    from credproxy.core.names import Key

    cfg = parse(
        '[providers.dev]\ntoken_url = "https://idp.example/t"\nclient_id = "c"\n'
        '[providers.keys]\n[providers.keys.api]\nbase_url = "https://api.example"\n'
        'headers = { X-Api-Key = "{key:k}" }\n'
        '[providers.gh]\ngrant = "github-app"\napp_id = 1\ninstallation_id = 2\n'
        'private_key = "/k.pem"\n',
        Path("config.toml"),
    )
    grants = Grants.parse(["dev", "keys", "gh", "dev:work"])
    problems = grant_problems(grants, cfg.providers, [], ["k"], "config.toml")
    assert [(p.grant, p.cause) for p in problems] == [("dev", "no_login"), ("dev:work", "no_login")]
    assert problems[0].line() == (
        "grant 'dev': provider dev has no stored login; log in on the host: credproxy login dev"
    )
    logged_in = [Key("dev"), Key("dev", "work")]
    assert grant_problems(grants, cfg.providers, logged_in, ["k"], "config.toml") == []


def test_a_grant_of_a_bucket_without_a_stored_login_is_a_problem_said_on_the_host() -> None:
    """Logins are per bucket: with only dev:default stored, dev:work (and home of the profile dev:default,home) is a no_login problem naming the bucket to log in; the bare grant dev and a signing provider's buckets are fine."""
    from pathlib import Path

    from credproxy.core.config import parse
    from credproxy.core.grantcheck import grant_problems
    from credproxy.core.grants import Grants
    from credproxy.core.names import Key

    cfg = parse(
        '[providers.dev]\ntoken_url = "https://idp.example/t"\nclient_id = "c"\n'
        '[providers.gh]\ngrant = "github-app"\napp_id = 1\ninstallation_id = 2\n'
        'private_key = "/k.pem"\n',
        Path("config.toml"),
    )
    grants = Grants.parse(["dev", "dev:work", "dev:default,home", "gh:default", "dev:default"])
    problems = grant_problems(grants, cfg.providers, [Key("dev")], [], "config.toml")
    assert [p.line() for p in problems] == [
        "grant 'dev:work': provider dev has no stored login for bucket work; "
        "log in on the host: credproxy login dev --bucket work",
        "grant 'dev:default,home': provider dev has no stored login for bucket home; "
        "log in on the host: credproxy login dev --bucket home",
    ]
    assert {p.cause for p in problems} == {"no_login"}
    nothing = grant_problems(Grants.parse(["dev:work"]), cfg.providers, [], [], "config.toml")
    assert [p.line() for p in nothing] == [
        "grant 'dev:work': provider dev has no stored login for bucket work; "
        "log in on the host: credproxy login dev --bucket work"
    ]
    logged_in = [Key("dev"), Key("dev", "work"), Key("dev", "home")]
    assert grant_problems(grants, cfg.providers, logged_in, [], "config.toml") == []


def test_an_api_grant_of_a_bucket_without_a_login_is_a_problem_said_on_the_host() -> None:
    """api:dev:work with only dev:default logged in is a no_login problem, as dev:work is; api:dev is fine then, and an API served by keys alone needs no login."""
    from pathlib import Path

    from credproxy.core.config import parse
    from credproxy.core.grantcheck import grant_problems
    from credproxy.core.grants import Grants
    from credproxy.core.names import Key

    cfg = parse(
        '[providers.dev]\ntoken_url = "https://idp.example/t"\nclient_id = "c"\n'
        '[providers.dev.api]\nbase_url = "https://api.example"\n'
        '[providers.keys]\n[providers.keys.api]\nbase_url = "https://keys.example"\n'
        'headers = { X-Api-Key = "{key:k}" }\n',
        Path("config.toml"),
    )
    grants = Grants.parse(["api:dev:work", "api:dev", "api:keys"])
    problems = grant_problems(grants, cfg.providers, [Key("dev")], ["k"], "config.toml")
    assert [p.line() for p in problems] == [
        "grant 'api:dev:work': provider dev has no stored login for bucket work; "
        "log in on the host: credproxy login dev --bucket work"
    ]
    nothing = grant_problems(Grants.parse(["api:dev"]), cfg.providers, [], ["k"], "config.toml")
    assert [(p.grant, p.cause) for p in nothing] == [("api:dev", "no_login")]


def test_a_bucket_of_a_provider_known_only_from_the_store_or_of_its_profile_needs_a_login() -> None:
    """dev taken out of the config but dev:default still stored: dev:work is a no_login problem. A bare grant of a provider with configured buckets is its profile: each bucket of it is checked, as dev:a,b's are."""
    from pathlib import Path

    from credproxy.core.config import parse
    from credproxy.core.grantcheck import grant_problems
    from credproxy.core.grants import Grants
    from credproxy.core.names import Key

    gone = grant_problems(Grants.parse(["dev:work"]), {}, [Key("dev")], [], "config.toml")
    assert [(p.grant, p.cause) for p in gone] == [("dev:work", "no_login")]
    cfg = parse(
        '[providers.dev]\ntoken_url = "https://idp.example/t"\nclient_id = "c"\n'
        'buckets = ["a", "b"]\n',
        Path("config.toml"),
    )
    stored = [Key("dev", "a")]
    for grant in ("dev:a,b", "dev"):
        problems = grant_problems(Grants.parse([grant]), cfg.providers, stored, [], "c")
        assert [p.message for p in problems] == ["provider dev has no stored login for bucket b"]


def test_run_warns_about_a_granted_bucket_without_a_login(background_daemon: Dirs) -> None:
    """With only dev:default stored, `run --allow dev:work` warns with the `credproxy login dev --bucket work` to run, and the daemon logs it; `--allow dev:default` does not warn."""
    dirs = background_daemon
    _config_with_dev(dirs)
    stored = cli(dirs, "import", "dev", input=json.dumps({"access_token": "AT-CANARY"}))
    assert stored.returncode == 0, stored.stderr
    work = cli(dirs, "run", "--allow", "dev:work", "--", "true")
    assert work.returncode == 0, work.stderr
    assert one_line(work.stderr) == (
        "credproxy run: warning: grant 'dev:work': provider dev has no stored login for bucket "
        "work; log in on the host: credproxy login dev --bucket work (the sandbox is told only "
        '"not found"; running anyway)'
    )
    default = cli(dirs, "run", "--allow", "dev:default", "--", "true")
    assert (default.returncode, default.stderr) == (0, "")
    events = [json.loads(line) for line in (dirs.runtime / "daemon.log").read_text().splitlines()]
    logged = [e for e in events if e.get("event") == "grant_no_login"]
    assert [(e["grant"], e["fix"]) for e in logged] == [
        ("dev:work", "log in on the host: credproxy login dev --bucket work")
    ], "the daemon logs the same, once, for the session that has the problem"
