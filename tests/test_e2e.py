"""End to end, as a user runs it: the installed executable, real processes, a real sandbox."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        "bwrap",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/run",
        "--tmpfs",
        str(dirs.root),
        "--ro-bind",
        sys.prefix,
        sys.prefix,  # the virtual environment may live under /tmp
        "--ro-bind",
        REPO,
        REPO,  # so may the checkout (the editable install and the probe)
        "--bind",
        "{socket}",
        "/run/credproxy.sock",
        "--setenv",
        "CREDPROXY_SOCKET",
        "/run/credproxy.sock",
        "--unsetenv",
        "LLXPRT_CREDENTIAL_SOCKET",
        "--unshare-all",
        "--die-with-parent",
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
    wire = bytes.fromhex(probe["received_hex"])
    log = (dirs.runtime / "daemon.log").read_text()
    assert "token_served" in log
    for canary in _all_canaries():
        assert canary.encode() not in wire, canary
        assert canary not in env_text, canary
        assert canary not in log, canary
        assert canary not in proc.stderr, canary
    assert SERVED_AT not in log  # the audit line carries a fingerprint, not the token


def test_other_uid_is_refused_unless_allowed(background_daemon: Dirs) -> None:
    """A client running as `nobody` is refused with UNAUTHORIZED by credproxy's own check, and served once --allow-uid names it."""
    dirs = background_daemon
    _setup_canaries(dirs)
    # Open the file-system permissions so that the refusal under test is credproxy's own.
    for path in (dirs.root, dirs.runtime, dirs.runtime / "s"):
        path.mkdir(parents=True, exist_ok=True)
    script = (
        f'chmod 0711 {dirs.root} {dirs.root}/run {dirs.root}/run/s && chmod 0666 "$CREDPROXY_SOCKET" && '
        "setpriv --reuid=65534 --regid=65534 --clear-groups "
        f'{sys.executable} {PROBE} \'get_token:{{"provider":"demo"}}\''
    )
    refused = cli(dirs, "run", "--allow", "demo", "--", "sh", "-c", script, timeout=60)
    # The daemon sends its refusal and closes: the probe fails before any token arrives.
    assert refused.returncode != 0
    assert SERVED_AT not in refused.stdout
    log = (dirs.runtime / "daemon.log").read_text()
    assert '"peer_refused"' in log and '"uid":65534' in log
    allowed = cli(
        dirs, "run", "--allow", "demo", "--allow-uid", "65534", "--", "sh", "-c", script, timeout=60
    )
    assert allowed.returncode == 0, allowed.stderr
    reply = json.loads(allowed.stdout)["replies"][1]
    assert reply["data"]["access_token"] == SERVED_AT


def test_refused_peer_gets_a_clear_error(background_daemon: Dirs) -> None:
    """The refused peer reads one handshake-shaped UNAUTHORIZED frame that says which uid and what to do."""
    dirs = background_daemon
    _setup_canaries(dirs)
    script = (
        f'chmod 0711 {dirs.root} {dirs.root}/run {dirs.root}/run/s && chmod 0666 "$CREDPROXY_SOCKET" && '
        f"setpriv --reuid=65534 --regid=65534 --clear-groups {sys.executable} -c "
        '\'import os,socket;s=socket.socket(socket.AF_UNIX);s.connect(os.environ["CREDPROXY_SOCKET"]);'
        'h=s.recv(4);print(s.recv(int.from_bytes(h,"big")).decode())\''
    )
    proc = cli(dirs, "run", "--allow", "demo", "--", "sh", "-c", script, timeout=60)
    assert proc.returncode == 0, proc.stderr
    frame = json.loads(proc.stdout)
    assert frame["ok"] is False and frame["code"] == "UNAUTHORIZED"
    assert "65534" in frame["error"] and "--allow-uid" in frame["error"]


def _hold_session(dirs: Dirs) -> tuple[subprocess.Popen[str], str]:
    """Start `credproxy run` with a command that holds its session open; return it and its socket."""
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
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def _end(*procs: subprocess.Popen[str]) -> None:
    for p in procs:
        p.kill()
        p.wait()
        if p.stdout:
            p.stdout.close()
    # The `sleep` children of killed launchers are orphans: end them too.
    subprocess.run(["pkill", "-f", "exec sleep 60"], check=False)


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
