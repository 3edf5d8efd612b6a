"""The `credproxy` command line and the Python client, end to end in subprocesses.

Every secret here is a canary string; the tests assert that none of them ever
appears on stdout or stderr of a host command.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import CREDPROXY, Dirs, StartDaemon, cli
from credproxy.errors import EXIT_NOT_FOUND, DaemonUnavailable, NotFound
from credproxy.inner.client import Client

EXPIRY = int(time.time()) + 3600
TOKEN = {
    "access_token": "AT-CANARY-1",
    "refresh_token": "RT-CANARY-1",
    "expiry": EXPIRY,
    "token_type": "Bearer",
    "account_id": "acct-7",
}
CANARIES = ("AT-CANARY", "RT-CANARY", "KEY-CANARY")


def assert_no_secrets(*results: subprocess.CompletedProcess[str]) -> None:
    for r in results:
        for canary in CANARIES:
            assert canary not in r.stdout, (canary, r.args)
            assert canary not in r.stderr, (canary, r.args)


def one_line(stderr: str) -> str:
    """The single line a failing command printed on stderr."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def store_token(dirs: Dirs, provider: str = "prov", bucket: str = "default", **extra: Any) -> Path:
    """Put a token on disk the way `credproxy import` would (without paying for a process)."""
    from credproxy.shell.store import TokenStore

    store = TokenStore(dirs.state)
    store.write(provider, bucket, dict(TOKEN, **extra))
    return store.token_path(provider, bucket)


# -- import / logout / key ----------------------------------------------------------------


def test_import_from_stdin_stores_the_token(dirs: Dirs) -> None:
    """`credproxy import PROVIDER` reads JSON on stdin, turns expires_in into expiry and stores it 0600."""
    raw = {"access_token": "AT-CANARY-1", "refresh_token": "RT-CANARY-1", "expires_in": 3600}
    before = time.time()
    result = cli(dirs, "import", "prov", input=json.dumps(raw))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("stored prov:default (expires in ")
    assert "with refresh token" in result.stdout
    path = dirs.state / "tokens" / "prov" / "default.json"
    stored = json.loads(path.read_text())
    assert stored["access_token"] == "AT-CANARY-1"
    assert stored["refresh_token"] == "RT-CANARY-1"
    assert before + 3600 - 1 <= stored["expiry"] <= time.time() + 3600
    assert "expires_in" not in stored
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert_no_secrets(result)


def test_import_from_a_file_into_a_bucket(dirs: Dirs) -> None:
    """`credproxy import --bucket B PROVIDER FILE` stores the file's token under that bucket, fields kept."""
    source = dirs.root / "token.json"
    source.write_text(json.dumps(TOKEN))
    result = cli(dirs, "import", "--bucket", "work", "prov", str(source))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("stored prov:work ")
    stored = json.loads((dirs.state / "tokens" / "prov" / "work.json").read_text())
    assert stored == TOKEN
    assert not (dirs.state / "tokens" / "prov" / "default.json").exists()
    assert_no_secrets(result)


def test_import_accepts_the_documented_argument_order(dirs: Dirs) -> None:
    """`credproxy import PROVIDER --bucket B FILE`, the order the README shows, stores the token."""
    source = dirs.root / "token.json"
    source.write_text(json.dumps(TOKEN))
    result = cli(dirs, "import", "prov", "--bucket", "work", str(source))
    assert result.returncode == 0, result.stderr
    assert json.loads((dirs.state / "tokens" / "prov" / "work.json").read_text()) == TOKEN


BAD_IMPORTS = {
    "invalid-json": (["prov"], '{"access_token": "AT-CANARY-1",'),
    "no-access-token": (["prov"], '{"refresh_token": "RT-CANARY-1"}'),
    "bad-provider": (["../x"], json.dumps(TOKEN)),
    "missing-file": (["prov", "/nonexistent/token.json"], ""),
}


def test_import_refuses_bad_input_with_exit_2_and_one_line(dirs: Dirs) -> None:
    """Invalid JSON, a non-token or a bad name: exit 2 (a missing file: 3, not found), one stderr line, nothing stored, no secret echoed."""
    with ThreadPoolExecutor(4) as pool:
        results = dict(
            zip(
                BAD_IMPORTS,
                pool.map(
                    lambda case: cli(dirs, "import", *case[0], input=case[1]), BAD_IMPORTS.values()
                ),
                strict=True,
            )
        )
    for name, result in results.items():
        assert result.returncode == (3 if name == "missing-file" else 2), (name, result.stderr)
        assert one_line(result.stderr).startswith("credproxy import: "), name
        assert result.stdout == "", name
    assert "not valid JSON" in results["invalid-json"].stderr
    assert "access_token" in results["no-access-token"].stderr
    assert_no_secrets(*results.values())
    assert (
        not (dirs.state / "tokens").exists() or list((dirs.state / "tokens").rglob("*.json")) == []
    )
    assert not (dirs.root / "x.json").exists()


def test_logout_removes_the_token_then_reports_it_missing(dirs: Dirs) -> None:
    """`credproxy logout` deletes the token (exit 0); a second logout exits 3 with one line."""
    path = store_token(dirs)
    first = cli(dirs, "logout", "prov")
    assert first.returncode == 0, first.stderr
    assert first.stdout == "removed prov:default\n"
    assert not path.exists()
    again = cli(dirs, "logout", "prov")
    assert again.returncode == EXIT_NOT_FOUND
    assert "prov:default" in one_line(again.stderr)
    assert_no_secrets(first, again)


def test_key_set_reads_stdin_and_key_rm_removes_it(dirs: Dirs) -> None:
    """`key set NAME` stores the stdin value (minus its newline) 0600 without echoing it; `key rm` deletes it, then exits 3."""
    result = cli(dirs, "key", "set", "api-key", input="KEY-CANARY-1\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "stored key api-key\n"
    key_file = dirs.state / "keys" / "api-key"
    assert key_file.read_text() == "KEY-CANARY-1"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with ThreadPoolExecutor(2) as pool:
        empty = pool.submit(cli, dirs, "key", "set", "other", input="")
        removed = cli(dirs, "key", "rm", "api-key")
    assert removed.returncode == 0, removed.stderr
    assert not key_file.exists()
    assert empty.result().returncode == 2
    assert "empty" in one_line(empty.result().stderr)
    again = cli(dirs, "key", "rm", "api-key")
    assert again.returncode == EXIT_NOT_FOUND
    assert "api-key" in one_line(again.stderr)
    assert_no_secrets(result, removed, again)


# -- status -----------------------------------------------------------------------------------


def test_status_without_daemon_shows_names_never_secrets(dirs: Dirs) -> None:
    """`status` and `status --json` with no daemon list tokens and key names, and no secret value."""
    from credproxy.shell.store import TokenStore

    store_token(dirs)
    store_token(dirs, "other", "work")
    TokenStore(dirs.state).write_key("api-key", "KEY-CANARY-1")
    with ThreadPoolExecutor(2) as pool:
        text_future = pool.submit(cli, dirs, "status")
        as_json = cli(dirs, "status", "--json")
    text = text_future.result()
    assert (text.returncode, as_json.returncode) == (0, 0), text.stderr + as_json.stderr
    assert "daemon: not running" in text.stdout
    assert "prov:default" in text.stdout
    assert "other:work" in text.stdout
    assert "keys: api-key" in text.stdout
    status = json.loads(as_json.stdout)
    assert status["daemon"] is None
    assert status["sessions"] == []
    assert status["keys"] == ["api-key"]
    assert [(t["provider"], t["bucket"]) for t in status["tokens"]] == [
        ("other", "work"),
        ("prov", "default"),
    ]
    assert all(t["refreshable"] is True for t in status["tokens"])
    assert_no_secrets(text, as_json)


# -- credproxy token (inner side) ----------------------------------------------------------------


def test_token_without_a_socket_variable_exits_1_naming_it(dirs: Dirs) -> None:
    """`credproxy token` with neither CREDPROXY_SOCKET nor LLXPRT_CREDENTIAL_SOCKET set exits 1 and says so."""
    result = cli(dirs, "token", "prov")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith("credproxy token: ")
    assert "CREDPROXY_SOCKET" in line
    assert result.stdout == ""


def test_token_against_a_dead_socket_exits_1(dirs: Dirs) -> None:
    """`credproxy token` exits 1 with one line when nothing listens: no file, or a stale socket file."""
    dirs.root.mkdir(exist_ok=True)
    stale = dirs.root / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound, never listening, then closed: connect() is refused
    missing = dirs.root / "missing.sock"
    for path, env in [
        (missing, {"CREDPROXY_SOCKET": str(missing)}),
        (stale, {"CREDPROXY_SOCKET": str(stale)}),
        (missing, {"LLXPRT_CREDENTIAL_SOCKET": str(missing)}),
    ]:
        result = cli(dirs, "token", "prov", **env)
        assert result.returncode == 1, (env, result.stderr)
        line = one_line(result.stderr)
        assert line.startswith("credproxy token: cannot reach credproxy at "), line
        assert str(path) in line


@pytest.mark.parametrize(
    "args",
    [[], ["a", "b"], ["--bogus", "prov"], ["prov", "--bucket"], ["prov", "--bucket="]],
    ids=["no-provider", "extra-argument", "unknown-option", "bucket-no-value", "bucket-empty"],
)
def test_token_usage_errors_exit_2(dirs: Dirs, args: list[str]) -> None:
    """Malformed `credproxy token` arguments exit 2 and say what is wrong, before any connection."""
    result = cli(dirs, "token", *args, CREDPROXY_SOCKET=str(dirs.root / "never-used.sock"))
    assert result.returncode == 2
    first = result.stderr.splitlines()[0]
    assert first.startswith("credproxy token: ")
    assert "cannot reach" not in result.stderr
    assert "usage: credproxy token PROVIDER" in result.stderr


def test_token_help_exits_0(dirs: Dirs) -> None:
    """`credproxy token --help` prints the usage and exits 0."""
    result = cli(dirs, "token", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: credproxy token PROVIDER")


# -- credproxy run ---------------------------------------------------------------------------------


def test_run_without_grants_exits_2_and_starts_nothing(dirs: Dirs) -> None:
    """`credproxy run` with no --allow and no default_allow refuses with a message that says what to pass."""
    result = cli(dirs, "run", "--", "sh", "-c", "echo ran")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "--allow" in line
    assert "default_allow" in line
    assert "ran" not in result.stdout
    assert not (dirs.runtime / "credproxy.sock").exists()


def test_version_prints_the_package_version(dirs: Dirs) -> None:
    """`credproxy --version` prints `credproxy X.Y.Z` (the installed distribution's version)."""
    result = cli(dirs, "--version")
    assert result.returncode == 0
    assert result.stdout == f"credproxy {version('credproxy')}\n"


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _daemon_pids(dirs: Dirs) -> list[int]:
    """Daemons `credproxy run` started for this test (from their log), still running."""
    log = dirs.runtime / "daemon.log"
    pids = []
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "daemon_ready":
                    pids.append(int(event["pid"]))
    alive = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"credproxy" in cmdline and b"serve" in cmdline and _pid_alive(pid):
                alive.append(pid)
    return alive


@pytest.fixture
def stop_daemons(dirs: Dirs) -> Iterator[Callable[[], list[int]]]:
    """A function that SIGTERMs the background daemons of this test and waits for them; also run at teardown."""

    def stop() -> list[int]:
        pids = _daemon_pids(dirs)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for pid in pids:
            while _pid_alive(pid):
                assert time.monotonic() < deadline, f"daemon {pid} ignored SIGTERM"
                time.sleep(0.01)
        return pids

    yield stop
    stop()


def test_run_serves_tokens_to_the_command_and_passes_its_exit_status(
    dirs: Dirs, stop_daemons: Callable[[], list[int]]
) -> None:
    """Inside `credproxy run --allow prov`, `credproxy token` prints the access token; CMD's status is run's status."""
    store_token(dirs)

    # The access token, then the served JSON: never the refresh token.
    served = cli(
        dirs,
        "run",
        "--allow",
        "prov",
        "--",
        "sh",
        "-c",
        '"$0" token prov && "$0" token prov --json',
        CREDPROXY,
    )
    assert served.returncode == 0, served.stderr
    first, second = served.stdout.splitlines()
    assert first == "AT-CANARY-1"
    assert json.loads(second) == {k: v for k, v in TOKEN.items() if k != "refresh_token"}
    assert "RT-CANARY" not in served.stdout + served.stderr

    # Now that the daemon is up, two more sessions at once:
    # - {socket} is substituted, both variables name the session socket, and exit 7 comes back as 7;
    # - a provider the session was not granted answers like a missing one: exit 3.
    with ThreadPoolExecutor(2) as pool:
        seven_future = pool.submit(
            cli,
            dirs,
            "run",
            "--allow",
            "prov",
            "--",
            "sh",
            "-c",
            'test -S "$1" && test "$1" = "$CREDPROXY_SOCKET" '
            '&& test "$1" = "$LLXPRT_CREDENTIAL_SOCKET" || exit 99; exit 7',
            "sh",
            "{socket}",
        )
        other = cli(dirs, "run", "--allow", "prov", "--", CREDPROXY, "token", "other")
    seven = seven_future.result()
    assert seven.returncode == 7, seven.stderr
    assert other.returncode == EXIT_NOT_FOUND
    assert one_line(other.stderr).startswith("credproxy token: ")
    assert other.stdout == ""

    status = cli(dirs, "status", "--json")
    assert status.returncode == 0, status.stderr
    running = json.loads(status.stdout)
    assert running["sessions"] == []  # every session closed when its command exited
    assert [(t["provider"], t["bucket"]) for t in running["tokens"]] == [("prov", "default")]
    assert_no_secrets(seven, other, status)

    assert stop_daemons() == [running["daemon"]["pid"]]
    assert not (dirs.runtime / "credproxy.sock").exists()


# -- the Python client ---------------------------------------------------------------------------


async def test_python_client_gets_tokens_and_raises_not_found(start_daemon: StartDaemon) -> None:
    """Client(path).get_token returns the token without refresh_token, and raises NotFound for ungranted or missing ones."""
    h = await start_daemon()
    h.store.write("prov", "default", dict(TOKEN, expiry=1_800_003_600))
    h.store.write("hidden", "default", TOKEN)
    session = await h.session("prov")

    def use_client() -> tuple[int, dict[str, Any], list[NotFound]]:
        errors = []
        with Client(session.socket_path, timeout=10) as client:
            token = client.get_token("prov")
            for provider in ("hidden", "missing"):
                with pytest.raises(NotFound) as info:
                    client.get_token(provider)
                errors.append(info.value)
            return client.version, token, errors

    negotiated, token, errors = await trio.to_thread.run_sync(use_client)
    assert negotiated == 2
    assert token == {
        "access_token": "AT-CANARY-1",
        "expiry": 1_800_003_600,
        "token_type": "Bearer",
        "account_id": "acct-7",
    }
    assert [e.exit_code for e in errors] == [EXIT_NOT_FOUND, EXIT_NOT_FOUND]
    assert str(errors[0]).replace("hidden", "X") == str(errors[1]).replace("missing", "X")
    assert all("CANARY" not in str(e) for e in errors)


def test_python_client_raises_daemon_unavailable_when_nothing_listens(tmp_short: Path) -> None:
    """Client(path) on a socket path with no listener raises DaemonUnavailable naming the path."""
    path = tmp_short / "nobody.sock"
    with pytest.raises(DaemonUnavailable, match=str(path)), Client(path, timeout=5) as client:
        client.get_token("prov")


def test_client_module_imports_only_the_standard_library() -> None:
    """Importing credproxy.inner.client (and running `credproxy token --help`) loads no third-party module."""
    probe = """
import json, sys
before = set(sys.modules)
import credproxy.inner.client
from credproxy.cli import main
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["token", "--help"]) == 0
loaded = set(sys.modules) - before
foreign = sorted(
    m for m in loaded
    if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "credproxy"
)
print(json.dumps({"foreign": foreign, "credproxy": sorted(m for m in loaded if m.startswith("credproxy"))}))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["foreign"] == []  # so no trio, httpx, structlog, msgspec or platformdirs
    assert "credproxy.shell.daemon" not in report["credproxy"]
