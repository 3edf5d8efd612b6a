"""`credproxy run --capability`: the token reaches CMD on fd 3, never in its environment.

Real processes throughout: the installed ``credproxy`` executable, the daemon it
starts in the background, shells and Python children that read fd 3 the way
credproxy's own client and llxprt's CLI do, and a bubblewrap sandbox.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sandbox import bwrap

from conftest import CREDPROXY, Dirs, cli

REPO = str(Path(__file__).resolve().parents[1])
SERVED_AT = "AT-capfd-served-3e1f0a"
FD3_CONTENT = re.compile(r"^[0-9a-f]{64}\n$")
CAP_VARS = ("CREDPROXY_CAPABILITY", "CREDPROXY_CAPABILITY_FD", "LLXPRT_CAPABILITY_FD")

# Reports what a process started by `credproxy run` sees: its fd 3, its
# environment, and what `credproxy token` (argv[1]) answers when run with fd 3
# passed on (Python's subprocess closes descriptors above 2 unless told).
CHILD = r"""
import json, os, subprocess, sys
report = {
    "fd3": os.pread(3, 200, 0).decode(),
    "fd3_link": os.readlink("/proc/self/fd/3"),
    "environ": open("/proc/self/environ", "rb").read().decode(),
    "vars": {k: os.environ.get(k) for k in sys.argv[2:]},
}
served = subprocess.run([sys.argv[1], "token", "dev"], capture_output=True, text=True, pass_fds=(3,))
report["token"] = [served.returncode, served.stdout.strip(), served.stderr]
print(json.dumps(report))
"""

# Reads fd 3 the way llxprt's CLI does (credential-store-factory.ts): plain
# read() from the current offset until end of file, at most 128 bytes, must
# match ^[0-9a-f]{64}\n$, then close the descriptor.
LLXPRT_READER = r"""
import os, re, sys
data = b""
while len(data) < 129:
    chunk = os.read(3, 64)
    if not chunk:
        break
    data += chunk
os.close(3)
sys.exit(0 if re.fullmatch(rb"[0-9a-f]{64}\n", data) else 1)
"""


def _login(dirs: Dirs) -> None:
    """A provider `dev` whose stored token is valid for an hour (no refresh is needed)."""
    dirs.config.write_text(
        '[providers.dev]\ntoken_url = "http://127.0.0.1:9/token"\nclient_id = "dev-client"\n'
    )
    token = {"access_token": SERVED_AT, "refresh_token": "RT-capfd", "expires_in": 3600}
    stored = cli(dirs, "import", "dev", input=json.dumps(token))
    assert stored.returncode == 0, stored.stderr


def _run_capability(dirs: Dirs, *cmd: str) -> subprocess.CompletedProcess[str]:
    return cli(dirs, "run", "--capability", "--allow", "dev", "--", *cmd, timeout=60)


def _child_report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def test_child_reads_the_token_on_fd3_and_is_served(background_daemon: Dirs) -> None:
    """CMD finds 64 lowercase hex and a newline on fd 3 (a memfd), both fd variables say 3, and `credproxy token` is served with it."""
    dirs = background_daemon
    _login(dirs)
    report = _child_report(_run_capability(dirs, sys.executable, "-c", CHILD, CREDPROXY, *CAP_VARS))
    assert FD3_CONTENT.match(report["fd3"])
    assert report["fd3_link"].startswith("/memfd:credproxy-capability")
    assert report["vars"] == {
        "CREDPROXY_CAPABILITY": None,
        "CREDPROXY_CAPABILITY_FD": "3",
        "LLXPRT_CAPABILITY_FD": "3",
    }
    assert report["token"] == [0, SERVED_AT, ""]


def test_the_token_is_not_in_the_environment(background_daemon: Dirs) -> None:
    """The capability token appears nowhere in CMD's /proc/self/environ, in the daemon's, nor in the daemon log."""
    dirs = background_daemon
    _login(dirs)
    script = (
        CHILD
        + r"""
status = json.loads(subprocess.run([sys.argv[1], "status", "--json"], capture_output=True).stdout)
daemon = status["daemon"]["pid"]
print(json.dumps({"daemon_environ": open(f"/proc/{daemon}/environ", "rb").read().decode()}))
"""
    )
    proc = _run_capability(dirs, sys.executable, "-c", script, CREDPROXY)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    report, daemon = json.loads(first), json.loads(second)
    token = report["fd3"].strip()
    assert len(token) == 64
    assert token not in report["environ"]
    assert "CREDPROXY_CAPABILITY=" not in report["environ"]
    assert token not in daemon["daemon_environ"]
    assert token not in (dirs.runtime / "daemon.log").read_text()
    assert token not in proc.stderr


def test_several_processes_in_one_session_each_read_the_token(background_daemon: Dirs) -> None:
    """Three `credproxy token` processes in a row, after a reader that consumed fd 3 the way llxprt does, are all served (one through LLXPRT_CAPABILITY_FD alone)."""
    dirs = background_daemon
    _login(dirs)
    script = (
        f'{sys.executable} -c "$LLXPRT_READER" && echo llxprt-ok && '
        f"{CREDPROXY} token dev && {CREDPROXY} token dev && "
        f"env -u CREDPROXY_CAPABILITY_FD {CREDPROXY} token dev"
    )
    proc = cli(
        dirs,
        "run",
        "--capability",
        "--allow",
        "dev",
        "--",
        "sh",
        "-c",
        script,
        timeout=60,
        LLXPRT_READER=LLXPRT_READER,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["llxprt-ok", SERVED_AT, SERVED_AT, SERVED_AT]


def test_a_client_without_the_token_is_refused(background_daemon: Dirs) -> None:
    """In a session opened with --capability, `credproxy token` without a token (no fd variable) exits 4 with UNAUTHORIZED's message."""
    dirs = background_daemon
    _login(dirs)
    proc = _run_capability(
        dirs,
        "env",
        "-u",
        "CREDPROXY_CAPABILITY_FD",
        "-u",
        "LLXPRT_CAPABILITY_FD",
        CREDPROXY,
        "token",
        "dev",
    )
    assert proc.returncode == 4
    assert "capability token" in proc.stderr
    assert SERVED_AT not in proc.stdout


def test_the_environment_variable_comes_before_the_fd(background_daemon: Dirs) -> None:
    """A CREDPROXY_CAPABILITY set by the user wins over fd 3: a wrong one is refused although fd 3 holds the right token."""
    dirs = background_daemon
    _login(dirs)
    proc = _run_capability(
        dirs, "env", f"CREDPROXY_CAPABILITY={'0' * 64}", CREDPROXY, "token", "dev"
    )
    assert proc.returncode == 4
    assert SERVED_AT not in proc.stdout


def test_no_process_in_the_session_can_change_the_token(background_daemon: Dirs) -> None:
    """Writing, truncating or growing fd 3 fails (the memfd is sealed), and `credproxy token` is still served after the attempts."""
    dirs = background_daemon
    _login(dirs)
    script = r"""
import os, sys
attempts = [lambda: os.pwrite(3, b"0" * 64, 0), lambda: os.ftruncate(3, 0),
            lambda: os.ftruncate(3, 4096), lambda: os.write(3, b"more")]
for attempt in attempts:
    try:
        attempt()
    except PermissionError:
        continue
    sys.exit("fd 3 accepted a change")
os.execv(sys.argv[1], [sys.argv[1], "token", "dev"])
"""
    proc = _run_capability(dirs, sys.executable, "-c", script, CREDPROXY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == SERVED_AT


def test_the_memfd_is_held_by_the_child_only(background_daemon: Dirs) -> None:
    """Neither the daemon that `credproxy run` started nor `credproxy run` itself holds the capability memfd while CMD runs."""
    dirs = background_daemon
    _login(dirs)
    script = r"""
import json, os, subprocess, sys
status = json.loads(subprocess.run([sys.argv[1], "status", "--json"], capture_output=True).stdout)
def links(pid):
    base = f"/proc/{pid}/fd"
    return [os.readlink(f"{base}/{n}") for n in os.listdir(base) if os.path.exists(f"{base}/{n}")]
print(json.dumps({"self": links(os.getpid()), "launcher": links(os.getppid()),
                  "daemon": links(status["daemon"]["pid"])}))
"""
    proc = _run_capability(dirs, sys.executable, "-c", script, CREDPROXY)
    assert proc.returncode == 0, proc.stderr
    held = json.loads(proc.stdout)
    assert any("credproxy-capability" in link for link in held["self"])
    assert not any("credproxy-capability" in link for link in held["launcher"])
    assert not any("credproxy-capability" in link for link in held["daemon"])


def test_an_inherited_fd3_is_reported_and_left_alone(background_daemon: Dirs) -> None:
    """When `credproxy run` itself was given an fd 3, CMD still gets the capability there, a note on stderr says so, and the file is untouched."""
    dirs = background_daemon
    _login(dirs)
    mine = dirs.root / "mine.txt"
    mine.write_text("the user's own fd 3\n")
    proc = subprocess.run(
        [
            "sh",
            "-c",
            'exec "$0" run --capability --allow dev -- "$1" -c "$2" "$0" 3<"$3"',
            CREDPROXY,
            sys.executable,
            CHILD,
            str(mine),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dirs.env(),
        check=False,
    )
    report = _child_report(proc)
    assert FD3_CONTENT.match(report["fd3"])
    assert report["token"][:2] == [0, SERVED_AT]
    assert "note: CMD gets the capability token on fd 3" in proc.stderr
    assert mine.read_text() == "the user's own fd 3\n"


def test_without_capability_no_fd_or_variable_reaches_cmd(background_daemon: Dirs) -> None:
    """Without --capability, capability variables inherited by `credproxy run` are dropped, CMD's fd 3 is closed, and it is served."""
    dirs = background_daemon
    _login(dirs)
    script = r"""
import json, os, subprocess, sys
try:
    os.fstat(3)
    fd3 = "open"
except OSError:
    fd3 = "closed"
served = subprocess.run([sys.argv[1], "token", "dev"], capture_output=True, text=True)
print(json.dumps({"fd3": fd3, "vars": [k for k in os.environ if "CAPABILITY" in k],
                  "token": served.stdout.strip()}))
"""
    proc = cli(
        dirs,
        "run",
        "--allow",
        "dev",
        "--",
        sys.executable,
        "-c",
        script,
        CREDPROXY,
        timeout=60,
        CREDPROXY_CAPABILITY="ab" * 32,
        CREDPROXY_CAPABILITY_FD="3",
        LLXPRT_CAPABILITY_FD="3",
    )
    assert _child_report(proc) == {"fd3": "closed", "vars": [], "token": SERVED_AT}


def test_a_pipe_on_the_fd_serves_its_first_reader(background_daemon: Dirs) -> None:
    """The client also reads a token given on a pipe (a shell here-document), which pread cannot read."""
    dirs = background_daemon
    _login(dirs)
    script = 'tok=$(head -c 64 /proc/self/fd/3) && exec 3<&- && "$0" token dev 3<<EOF\n$tok\nEOF\n'
    proc = _run_capability(dirs, "sh", "-c", script, CREDPROXY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == SERVED_AT


BAD_FD_CASES = [
    ("CREDPROXY_CAPABILITY_FD", '"$0" token dev 3<"$1"', "does not hold a capability token"),
    ("LLXPRT_CAPABILITY_FD", '"$0" token dev 3<"$1"', "does not hold a capability token"),
    ("CREDPROXY_CAPABILITY_FD", '"$0" token dev 3<&-', "is not open"),
    ("CREDPROXY_CAPABILITY_FD", '"$0" token dev 3</dev/null', "is empty"),
]


def test_a_bad_capability_fd_is_a_clear_error(background_daemon: Dirs) -> None:
    """In a session that requires a token, a capability fd that is closed, empty or holds something else fails with exit 4 and one line naming the variable, never what was read."""
    dirs = background_daemon
    _login(dirs)
    bad = dirs.root / "bad.txt"
    almost = "AB" * 32  # upper case: not a capability token, but shaped like one
    bad.write_text(almost + "\n")
    for variable, command, expected in BAD_FD_CASES:
        other = next(v for v in CAP_VARS[1:] if v != variable)
        script = f"unset {other}; {command}"
        proc = _run_capability(dirs, "sh", "-c", script, CREDPROXY, str(bad))
        assert proc.returncode == 4, (variable, command, proc.stderr)
        prefix = "credproxy token: this session requires a capability token: "
        assert proc.stderr.startswith(f"{prefix}{variable}=3: file descriptor 3 "), proc.stderr
        assert expected in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
        assert almost not in proc.stderr
        assert SERVED_AT not in proc.stdout


def test_a_token_put_in_the_fd_variable_is_not_echoed(background_daemon: Dirs) -> None:
    """A capability fd variable holding something other than a descriptor number is refused without quoting its value."""
    dirs = background_daemon
    _login(dirs)
    value = "cd" * 32
    proc = _run_capability(
        dirs, "env", f"CREDPROXY_CAPABILITY_FD={value}", CREDPROXY, "token", "dev"
    )
    assert proc.returncode == 4
    assert "CREDPROXY_CAPABILITY_FD is not a file descriptor number" in proc.stderr
    assert value not in proc.stderr


def test_host_commands_do_not_need_the_fd(background_daemon: Dirs) -> None:
    """`credproxy status` run inside a capability session with fd 3 closed still answers: the control socket needs no capability."""
    dirs = background_daemon
    _login(dirs)
    proc = _run_capability(dirs, "sh", "-c", 'exec "$0" status --json 3<&-', CREDPROXY)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["sessions"]) == 1


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
def test_bwrap_sandbox_reads_the_token_on_fd3(background_daemon: Dirs) -> None:
    """bwrap passes fd 3 through: three `credproxy token` processes inside the sandbox are served, and the token is not in its environment."""
    dirs = background_daemon
    _login(dirs)
    inner = (
        "readlink /proc/self/fd/3 && head -c 64 /proc/self/fd/3 && echo && "
        f"{CREDPROXY} token dev && {CREDPROXY} token dev && {CREDPROXY} token dev && "
        "echo --ENV-- && tr '\\0' '\\n' < /proc/self/environ"
    )
    proc = _run_capability(
        dirs,
        *bwrap(
            dirs,
            options=("--unsetenv", "LLXPRT_CREDENTIAL_SOCKET"),
        ),
        "sh",
        "-c",
        inner,
    )
    assert proc.returncode == 0, proc.stderr
    head, _, env_text = proc.stdout.partition("--ENV--\n")
    link, token, *served = head.splitlines()
    assert link.startswith("/memfd:credproxy-capability")
    assert re.fullmatch("[0-9a-f]{64}", token)
    assert served == [SERVED_AT, SERVED_AT, SERVED_AT]
    assert token not in env_text
    assert "CREDPROXY_CAPABILITY_FD=3" in env_text
    assert "LLXPRT_CAPABILITY_FD=3" in env_text
