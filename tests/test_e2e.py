"""End to end, as a user runs it: the installed executable, real processes, a real sandbox."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox import bwrap

from conftest import CREDPROXY, Dirs, cli, stop_daemon

PROBE = str(Path(__file__).with_name("sandbox_probe.py"))
REPO = str(Path(__file__).resolve().parents[1])
RT_CANARY = "RT-CANARY-7f3a9c"
SECRET_CANARY = "CS-CANARY-41d2e8"
OTHER_AT_CANARY = "AT-OTHER-CANARY-5b6e"
KEY_CANARY = "KEY-CANARY-0c9d"
SERVED_AT = "AT-served-2b7c1d"


def _setup_canaries(dirs: Dirs) -> None:
    secret_file = dirs.root / "client.secret"
    secret_file.write_text(SECRET_CANARY)
    dirs.config.write_text(
        "[providers.demo]\n"
        'token_url = "http://127.0.0.1:9/token"\n'
        'client_id = "demo-client"\n'
        f'client_secret_file = "{secret_file}"\n'
    )
    token = {
        "access_token": SERVED_AT,
        "refresh_token": RT_CANARY,
        "expires_in": 3600,
        "scope": "read",
    }
    assert cli(dirs, "import", "demo", input=json.dumps(token)).returncode == 0
    other = {"access_token": OTHER_AT_CANARY, "refresh_token": RT_CANARY + "-2", "expires_in": 3600}
    assert cli(dirs, "import", "other", input=json.dumps(other)).returncode == 0
    assert cli(dirs, "key", "set", "secret-key", input=KEY_CANARY).returncode == 0


def _all_canaries() -> list[str]:
    return [RT_CANARY, SECRET_CANARY, OTHER_AT_CANARY, KEY_CANARY]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_bwrap_sandbox_gets_token_and_nothing_else(background_daemon: Dirs) -> None:
    """A bwrap sandbox started by `credproxy run` reads its granted token; no other secret crosses the socket, reaches its environment, or the logs."""
    dirs = background_daemon
    _setup_canaries(dirs)
    inner = (
        f'{sys.executable} {PROBE} \'get_token:{{"provider":"demo"}}\' '
        '\'get_token:{"provider":"other"}\' \'get_api_key:{"name":"secret-key"}\' '
        "'list_providers:' 'list_api_keys:' > /tmp/probe.json && "
        f"{CREDPROXY} token demo > /tmp/token.txt && env > /tmp/env.txt && "
        "cat /tmp/probe.json && echo '--TOKEN--' && cat /tmp/token.txt && echo '--ENV--' && cat /tmp/env.txt"
    )
    proc = cli(
        dirs,
        "run",
        "--allow",
        "demo",
        "--",
        *bwrap(
            dirs,
            options=("--setenv", "LLXPRT_CREDENTIAL_SOCKET", "/run/credproxy.sock"),
        ),
        "sh",
        "-c",
        inner,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    probe_text, _, rest = proc.stdout.partition("--TOKEN--")
    token_text, _, env_text = rest.partition("--ENV--")
    probe = json.loads(probe_text)
    replies = probe["replies"]
    assert replies[0]["ok"] is True and replies[0]["data"] == {"version": 2}
    served = replies[1]["data"]
    assert served["access_token"] == SERVED_AT
    assert "refresh_token" not in served
    assert served["scope"] == "read"
    assert replies[2]["code"] == "NOT_FOUND"
    assert replies[3]["code"] == "NOT_FOUND"
    assert replies[4]["data"] == {"providers": ["demo"]}
    assert replies[5]["data"] == {"keys": []}
    assert token_text.strip() == SERVED_AT
    assert "CREDPROXY_SOCKET=/run/credproxy.sock" in env_text
    assert "LLXPRT_CREDENTIAL_SOCKET=/run/credproxy.sock" in env_text
    wire = bytes.fromhex(probe["received_hex"])
    log = (dirs.runtime / "daemon.log").read_text()
    assert "token_served" in log
    for canary in _all_canaries():
        assert canary.encode() not in wire, canary
        assert canary not in env_text, canary
        assert canary not in log, canary
        assert canary not in proc.stderr, canary
    assert SERVED_AT not in log  # the audit line carries a fingerprint, not the token


AS_ROOT = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a client as another uid",
)


def _as(uid: int, *argv: str) -> str:
    """A shell command that runs *argv* as *uid* (and that uid as its only group)."""
    return shlex.join(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, *argv]
    )


# Connect and print the first frame the daemon sends, without sending anything:
# a refused peer is sent one frame and closed, so writing first could race the close.
READ_FIRST_FRAME = (
    "import os,socket;s=socket.socket(socket.AF_UNIX);s.connect(os.environ['CREDPROXY_SOCKET']);"
    "h=s.recv(4);print(s.recv(int.from_bytes(h,'big')).decode())"
)


@pytest.fixture
def searchable_runtime(dirs: Dirs) -> Iterator[Dirs]:
    """Like background_daemon, but the runtime directory is created by credproxy directly under /tmp, which every uid may search."""
    runtime = Path("/tmp") / f"cprt-{secrets.token_hex(6)}"
    shared = Dirs(dirs.root, dirs.state, runtime, dirs.config)
    try:
        yield shared
    finally:
        stop_daemon(shared)
        shutil.rmtree(runtime, ignore_errors=True)


@AS_ROOT
def test_allow_uid_lets_that_uid_in_and_no_other(searchable_runtime: Dirs) -> None:
    """With --allow-uid 65534, uid 65534 is served through the socket's own path; uid 65533 is still refused by credproxy, and the control socket stays private."""
    dirs = searchable_runtime
    _setup_canaries(dirs)
    rt = dirs.runtime
    script = " ; ".join(
        [
            _as(65534, PROBE, 'get_token:{"provider":"demo"}'),
            "echo ---",
            _as(65533, "-c", READ_FIRST_FRAME),
            "echo ---",
            _as(65534, "-c", f"import os; os.listdir({str(rt)!r})") + " 2>&1 | tail -n 1",
            "echo ---",
            f'stat -c "%a %n" {rt} {rt}/s {rt}/credproxy.sock {rt}/daemon.lock "$CREDPROXY_SOCKET"',
        ]
    )
    proc = cli(
        dirs, "run", "--allow", "demo", "--allow-uid", "65534", "--", "sh", "-c", script, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    allowed, other, listing, modes = proc.stdout.split("---\n")
    assert json.loads(allowed)["replies"][1]["data"]["access_token"] == SERVED_AT
    refused = json.loads(other)
    assert refused["ok"] is False and refused["code"] == "UNAUTHORIZED"
    assert "65533" in refused["error"]
    assert "PermissionError" in listing  # the runtime directory can be passed, not listed
    mode = dict(line.split(" ", 1)[::-1] for line in modes.splitlines())
    assert mode[str(rt)] == mode[f"{rt}/s"] == "711"
    assert mode[f"{rt}/credproxy.sock"] == mode[f"{rt}/daemon.lock"] == "600"
    assert len([m for m in mode.values() if m == "666"]) == 1  # the session socket
    log = (rt / "daemon.log").read_text()
    assert '"peer_refused"' in log and '"uid":65533' in log
    assert SERVED_AT not in log
    # The next session that admits no other uid finds the directories closed again.
    after = cli(dirs, "run", "--allow", "demo", "--", "stat", "-c", "%a", str(rt), f"{rt}/s")
    assert after.stdout.split() == ["700", "700"], after.stderr


@AS_ROOT
def test_other_uid_is_refused_without_allow_uid(searchable_runtime: Dirs) -> None:
    """Without --allow-uid another uid cannot even connect: the socket is 0600 in a 0700 directory."""
    dirs = searchable_runtime
    _setup_canaries(dirs)
    script = _as(65534, PROBE, 'get_token:{"provider":"demo"}')
    refused = cli(dirs, "run", "--allow", "demo", "--", "sh", "-c", script, timeout=60)
    assert refused.returncode != 0
    assert "PermissionError" in refused.stderr
    assert SERVED_AT not in refused.stdout


@AS_ROOT
def test_refused_peer_gets_a_clear_error(searchable_runtime: Dirs) -> None:
    """A uid the session does not name reads one handshake-shaped UNAUTHORIZED frame that says which uid and what to do."""
    dirs = searchable_runtime
    _setup_canaries(dirs)
    script = _as(65534, "-c", READ_FIRST_FRAME)
    proc = cli(
        dirs, "run", "--allow", "demo", "--allow-uid", "1234", "--", "sh", "-c", script, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    frame = json.loads(proc.stdout)
    assert frame["ok"] is False and frame["code"] == "UNAUTHORIZED"
    assert "65534" in frame["error"] and "--allow-uid" in frame["error"]


def test_allow_uid_says_when_a_parent_directory_is_closed(background_daemon: Dirs) -> None:
    """When a directory above the runtime directory is 0700, `credproxy run --allow-uid` says that uid cannot reach the socket by its path."""
    dirs = background_daemon
    _setup_canaries(dirs)
    assert stat.S_IMODE(os.stat(dirs.root).st_mode) == 0o700  # made by mkdtemp
    proc = cli(dirs, "run", "--allow", "demo", "--allow-uid", "1234", "--", "true", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "other uids cannot reach" in proc.stderr
    assert f"because {dirs.root} is not searchable" in proc.stderr
    quiet = cli(dirs, "run", "--allow", "demo", "--", "true", timeout=60)
    assert quiet.stderr == ""


def _hold_session(dirs: Dirs) -> tuple[subprocess.Popen[str], str]:
    """Start `credproxy run` in a process group of its own, with a command that holds its session open; return it and its socket."""
    proc = subprocess.Popen(
        [
            CREDPROXY,
            "run",
            "--allow",
            "demo",
            "--",
            "sh",
            "-c",
            'echo "$CREDPROXY_SOCKET"; exec sleep 60',
        ],
        env=dirs.env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that _end can end its command with it, and nothing else
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _end(*procs: subprocess.Popen[str]) -> None:
    """End each launcher and the command it started (its process group), nothing else."""
    for p in procs:
        # The `sleep` of a launcher killed with SIGKILL lives on in its group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        if p.stdout:
            p.stdout.close()


def _live_members(pgid: int) -> list[int]:
    """Pids of the processes of group *pgid* that are still running (zombies do not count)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it has just exited
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def test_end_stops_only_the_group_it_started(background_daemon: Dirs) -> None:
    """The helper that ends a held session stops its launcher and its command, and leaves an identical command it did not start running."""
    dirs = background_daemon
    _setup_canaries(dirs)
    bystander = subprocess.Popen(["sh", "-c", "exec sleep 60"])
    try:
        runner, sock = _hold_session(dirs)
        assert os.path.exists(sock)
        _end(runner)
        deadline = time.monotonic() + 5
        while os.path.exists(sock):  # the daemon closes the session of a dead launcher
            assert time.monotonic() < deadline, "the held session outlived _end"
            time.sleep(0.01)
        assert _live_members(runner.pid) == []  # nothing is left in the group
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_sigkill_of_launcher_closes_its_session_within_a_second(background_daemon: Dirs) -> None:
    """Killing `credproxy run` with SIGKILL removes its session socket within 1 s; other sessions keep being served."""
    dirs = background_daemon
    _setup_canaries(dirs)
    keeper, keeper_sock = _hold_session(dirs)
    victim, victim_sock = _hold_session(dirs)
    try:
        assert os.path.exists(victim_sock) and stat.S_ISSOCK(os.stat(victim_sock).st_mode)
        victim.kill()  # SIGKILL: no chance to close its session
        victim.wait()
        killed_at = time.monotonic()
        while os.path.exists(victim_sock):
            assert time.monotonic() - killed_at < 1.0, (
                "session socket still there 1 s after SIGKILL"
            )
            time.sleep(0.01)
        token = subprocess.run(
            [CREDPROXY, "token", "demo"],
            env=dirs.env(CREDPROXY_SOCKET=keeper_sock),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert (token.returncode, token.stdout.strip()) == (0, SERVED_AT)
        status = json.loads(cli(dirs, "status", "--json").stdout)
        assert [s["socket"] for s in status["sessions"]] == [keeper_sock]
    finally:
        _end(keeper, victim)


def test_sigterm_stops_the_daemon_cleanly(background_daemon: Dirs) -> None:
    """SIGTERM makes the daemon close its sessions, remove the sockets it created, and exit."""
    dirs = background_daemon
    _setup_canaries(dirs)
    runner, sock = _hold_session(dirs)
    try:
        assert os.path.exists(sock)
        assert stop_daemon(dirs) is not None
        assert not os.path.exists(sock)
        assert not (dirs.runtime / "credproxy.sock").exists()
        log = (dirs.runtime / "daemon.log").read_text()
        assert '"signal_received"' in log and '"daemon_stopped"' in log
    finally:
        _end(runner)
