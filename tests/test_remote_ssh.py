"""A sandbox on another host reaches its session over SSH: `ssh -R REMOTE_PATH:{socket}`.

docs/remote.md's recipe with a real OpenSSH: the test starts its own ``sshd``
on 127.0.0.1 (its own config file, a host key and an authorized user key made
with ``ssh-keygen`` in the test's directory, in the foreground with ``-D -e``,
ended by its pid), and ``credproxy run --allow dev -- ssh -R REMOTE:{socket}
... COMMAND`` runs COMMAND on the "remote" side, which is this machine: it asks
for a token and sends a request to the API proxy through the forwarded socket.

The forwarded connection reaches the session socket from the ssh client, a
process of the daemon's own uid, so the session serves it as the user's own.
What guards the remote end is the remote socket's mode (sshd's
``StreamLocalBindMask``): the sshd here listens on two ports, the second with
``StreamLocalBindMask 0111`` (a 0666 socket), and another uid on the remote side
is refused by the first and served by the second. One sshd serves the module.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from echo_upstream import configure_dev_api, echo_upstream

from conftest import CREDPROXY, Dirs, cli

REPO = Path(__file__).resolve().parents[1]
AT = "AT-SSH-CANARY-8c2e4b"
RT = "RT-SSH-CANARY-31f9d7"
OTHER_UID = 4242

# Runs on the "remote" side with CREDPROXY_SOCKET naming the forwarded socket.
REMOTE = r"""
import http.client, json, os, socket, stat, subprocess, sys

path = os.environ["CREDPROXY_SOCKET"]
st = os.stat(path)
out = {"uid": os.getuid(), "mode": oct(stat.S_IMODE(st.st_mode)), "owner": st.st_uid}
from credproxy.client import Client
try:
    with Client() as c:
        out["token"] = c.get_token("dev")["access_token"]
        out["providers"] = c.list_providers()
except Exception as exc:
    out["error"] = str(exc)
else:
    class UnixHTTP(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(path)

    conn = UnixHTTP("credproxy")
    conn.request("POST", "/dev/v1/echo", body=b'{"hi": 1}',
                 headers={"Authorization": "Bearer sandbox-own", "Content-Type": "application/json"})
    r = conn.getresponse()
    out["proxied"] = [r.status, r.read().decode()]
print(json.dumps(out))
"""


@dataclass
class Sshd:
    """The test's sshd: its ports (the second binds forwarded sockets 0666) and the client's options."""

    where: Path
    port: int
    open_port: int
    user: str
    log: list[str]

    def ssh(self, port: int, forward: str, command: str) -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(port),
            "-i",
            str(self.where / "id_ed25519"),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"UserKnownHostsFile={self.where / 'known_hosts'}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
            "-R",
            forward,
            f"{self.user}@127.0.0.1",
            command,
        ]


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    """sshd on 127.0.0.1 with its own config, host key and authorized key; killed by its pid."""
    missing = [t for t in ("ssh", "ssh-keygen") if shutil.which(t) is None]
    sshd_bin = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/sbin")
    if sshd_bin is None:
        missing.append("sshd")
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install openssh-server)")
    where = Path(tempfile.mkdtemp(prefix="cpssh", dir="/tmp"))
    where.chmod(0o711)  # another uid reaches remote/ (the other-uid test), nothing else
    proc = None
    try:
        for name in ("host_ed25519", "id_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(where / name)],
                check=True,
                timeout=30,
            )
        shutil.copy(where / "id_ed25519.pub", where / "authorized_keys")
        port, open_port = _free_ports(2)
        host_key = (where / "host_ed25519.pub").read_text().split()[:2]
        (where / "known_hosts").write_text(
            "".join(f"[127.0.0.1]:{p} {' '.join(host_key)}\n" for p in (port, open_port))
        )
        user = os.environ.get("USER") or os.environ.get("LOGNAME") or "root"
        if os.getuid() == 0:
            user = "root"
            # sshd started as root needs its privilege separation directory.
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        (where / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1:{port}\n"
            f"ListenAddress 127.0.0.1:{open_port}\n"
            f"HostKey {where}/host_ed25519\n"
            "PidFile none\n"
            f"AuthorizedKeysFile {where}/authorized_keys\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\n"
            "AllowTcpForwarding remote\n"
            "PermitListen none\n"
            "AllowAgentForwarding no\n"
            "X11Forwarding no\n"
            "AllowStreamLocalForwarding remote\n"
            "StreamLocalBindUnlink yes\n"
            "StreamLocalBindMask 0177\n"
            "PrintMotd no\n"
            f"Match LocalPort {open_port}\n"
            "    StreamLocalBindMask 0111\n"
        )
        lines: list[str] = []
        proc = subprocess.Popen(
            [sshd_bin, "-D", "-e", "-f", str(where / "sshd_config")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        reader = threading.Thread(
            target=lambda: lines.extend(proc.stderr or ()), daemon=True
        )  # sshd's log, read so that its pipe never fills
        reader.start()
        deadline = time.monotonic() + 10
        while sum("Server listening" in line for line in lines) < 2:
            if proc.poll() is not None:
                reader.join(2)
                pytest.skip(f"sshd did not start here: {''.join(lines).strip()[-300:]}")
            assert time.monotonic() < deadline, f"sshd did not listen within 10 s: {lines}"
            time.sleep(0.02)
        (where / "remote").mkdir(mode=0o755)
        yield Sshd(where, port, open_port, user, lines)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            reader.join(5)
            if proc.stderr is not None:
                proc.stderr.close()
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def upstream() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """The fake API on an ephemeral loopback port (plain HTTP is allowed on loopback)."""
    with echo_upstream() as up:
        yield up


def _setup(dirs: Dirs, port: int) -> None:
    configure_dev_api(dirs, port, AT, RT)


def _remote(
    dirs: Dirs, sshd: Sshd, port: int, remote: Path, remote_cmd: list[str], *run_args: str
) -> subprocess.CompletedProcess[str]:
    """`credproxy run RUN_ARGS -- ssh -R REMOTE:{socket} ... CREDPROXY_SOCKET=REMOTE REMOTE_CMD`."""
    command = shlex.join(
        ["env", f"CREDPROXY_SOCKET={remote}", f"LLXPRT_CREDENTIAL_SOCKET={remote}", *remote_cmd]
    )
    argv = sshd.ssh(port, f"{remote}:{{socket}}", command)
    proc = cli(dirs, "run", *run_args, "--", *argv, timeout=60)
    if "forwarding failed" in proc.stderr:
        proc.stderr += "\nsshd: " + "".join(sshd.log[-5:])
    assert RT not in proc.stdout + proc.stderr
    return proc


def _python_remote(upstream_port: int) -> list[str]:
    return [
        "env",
        f"PYTHONPATH={REPO}",
        sys.executable,
        "-c",
        REMOTE.replace("UPSTREAM_PORT", str(upstream_port)),
    ]


def test_ssh_R_remote_side_gets_the_token_and_the_api(
    sshd: Sshd, background_daemon: Dirs, upstream: tuple[int, list[dict[str, Any]]]
) -> None:
    """`ssh -R REMOTE:{socket}`: `credproxy token`, the stdlib client and the API proxy work through the remote path, whose socket sshd binds 0600 (StreamLocalBindMask 0177)."""
    dirs = background_daemon
    up_port, seen = upstream
    _setup(dirs, up_port)
    remote = sshd.where / "remote" / "credproxy.sock"
    tok = _remote(dirs, sshd, sshd.port, remote, [CREDPROXY, "token", "dev"], "--allow", "dev")
    assert (tok.returncode, tok.stdout.strip()) == (0, AT), tok.stderr
    proc = _remote(dirs, sshd, sshd.port, remote, _python_remote(up_port), "--allow", "dev")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "0o600" and out["owner"] == os.getuid()
    assert out["token"] == AT
    assert out["providers"] == ["dev"]
    assert out["proxied"][0] == 200
    assert json.loads(out["proxied"][1]) == {"echo": '{"hi": 1}', "path": "/v1/echo"}
    assert [(r["path"], r["headers"]["authorization"]) for r in seen] == [
        ("/v1/echo", f"Bearer {AT}")
    ]
    log = (dirs.runtime / "daemon.log").read_text()
    assert AT not in log and RT not in log


def test_ssh_R_replaces_the_socket_a_previous_connection_left(
    sshd: Sshd, background_daemon: Dirs, upstream: tuple[int, list[dict[str, Any]]]
) -> None:
    """sshd leaves the remote socket file when the connection ends; the next `ssh -R` to that path works because of StreamLocalBindUnlink yes (ExitOnForwardFailure would end it otherwise)."""
    dirs = background_daemon
    _setup(dirs, upstream[0])
    remote = sshd.where / "remote" / "again.sock"
    for _ in range(2):
        proc = _remote(dirs, sshd, sshd.port, remote, [CREDPROXY, "token", "dev"], "--allow", "dev")
        assert (proc.returncode, proc.stdout.strip()) == (0, AT), proc.stderr
        assert stat.S_ISSOCK(os.lstat(remote).st_mode)  # left behind, and nothing listens on it
        with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(str(remote))


def _other_uid_python() -> list[str]:
    """A python that uid 4242 can run, with credproxy importable; skip if there is none."""
    setpriv = shutil.which("setpriv")
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.getuid() != 0 or setpriv is None or python is None:
        pytest.skip("needs root, setpriv and /usr/bin/python3 to run a client as another uid")
    as_other = [
        setpriv,
        f"--reuid={OTHER_UID}",
        f"--regid={OTHER_UID}",
        "--clear-groups",
        "env",
        f"PYTHONPATH={REPO}",
        "PYTHONDONTWRITEBYTECODE=1",
        python,
    ]
    probe = subprocess.run(
        [*as_other, "-c", "import credproxy.client"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"uid {OTHER_UID} cannot import credproxy from {REPO}: {probe.stderr[-200:]}")
    return as_other


def test_ssh_R_whoever_can_open_the_remote_socket_uses_the_session(
    sshd: Sshd, background_daemon: Dirs, upstream: tuple[int, list[dict[str, Any]]]
) -> None:
    """The daemon sees the ssh client's uid, so the remote socket's mode is the boundary: another uid is refused at a 0600 socket and served at a 0666 one (StreamLocalBindMask 0111), with no --allow-uid."""
    as_other = _other_uid_python()
    dirs = background_daemon
    up_port, _ = upstream
    _setup(dirs, up_port)
    remote = sshd.where / "remote" / "shared.sock"
    script = REMOTE.replace("UPSTREAM_PORT", str(up_port))
    refused = _remote(dirs, sshd, sshd.port, remote, [*as_other, "-c", script], "--allow", "dev")
    assert refused.returncode == 0, refused.stderr
    out = json.loads(refused.stdout.strip().splitlines()[-1])
    assert (out["uid"], out["mode"]) == (OTHER_UID, "0o600")
    assert "token" not in out and "Permission denied" in out["error"]
    served = _remote(
        dirs, sshd, sshd.open_port, remote, [*as_other, "-c", script], "--allow", "dev"
    )
    assert served.returncode == 0, served.stderr
    out = json.loads(served.stdout.strip().splitlines()[-1])
    assert (out["uid"], out["mode"], out["token"]) == (OTHER_UID, "0o666", AT)
