"""credproxy.shell.systemd against real sockets: sd_notify datagrams, socket activation, watchdog."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from credproxy.shell.systemd import listen_fds, notify, watchdog_interval

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate not installed (Debian/Ubuntu package: systemd)",
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a path short enough for AF_UNIX (108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[socket.socket]:
    """A datagram socket bound to a filesystem path, playing the service manager."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(short_dir / "notify"))
        sock.settimeout(5)
        yield sock


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket bound to a unique abstract name, and its ``@name`` spelling."""
    name = f"credproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield "@" + name, sock


# --- notify() ---------------------------------------------------------------------


def test_notify_sends_fields_as_one_datagram_to_a_path(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """notify() sends its fields joined by newlines as a single datagram to a path socket."""
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    assert notify("READY=1", "STATUS=serving") is True
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_sends_to_an_abstract_socket(
    abstract_receiver: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``@name`` NOTIFY_SOCKET reaches the abstract socket ``\\0name``."""
    address, sock = abstract_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert notify("WATCHDOG=1") is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_encodes_utf8(receiver: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-ASCII STATUS text arrives UTF-8 encoded."""
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    assert notify("STATUS=3 sandboxes · ok") is True
    assert receiver.recv(4096) == "STATUS=3 sandboxes · ok".encode()


def test_notify_without_notify_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd (no NOTIFY_SOCKET, or an empty one) notify() is a no-op returning False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_notify_ignores_addresses_that_are_not_unix_sockets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A vsock: or relative NOTIFY_SOCKET is not for a user service: False, nothing sent."""
    for value in ("vsock:2:1234", "relative/notify"):
        monkeypatch.setenv("NOTIFY_SOCKET", value)
        assert notify("READY=1") is False


def test_notify_with_no_fields_sends_nothing(
    receiver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """notify() with no fields returns False and the manager receives no datagram."""
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.getsockname())
    assert notify() is False
    receiver.settimeout(0.05)
    with pytest.raises(TimeoutError):
        receiver.recv(4096)


def test_notify_send_failure_returns_false(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NOTIFY_SOCKET nobody listens on makes notify() return False instead of raising."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "gone"))
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@credproxy-test-nobody-{os.getpid()}")
    assert notify("READY=1") is False


# --- listen_fds() -----------------------------------------------------------------

# Run in the activated process: take the sockets, report what a caller sees,
# notify readiness, then serve one connection so the test knows it really got
# the listening socket.
CHILD = """
import json, os, socket, sys
from credproxy.shell.systemd import listen_fds, notify
fds = listen_fds()
report = {
    "names": [name for name, _ in fds],
    "fds": [s.fileno() for _, s in fds],
    "family": [s.family == socket.AF_UNIX for _, s in fds],
    "stream": [s.type == socket.SOCK_STREAM for _, s in fds],
    "inheritable": [os.get_inheritable(s.fileno()) for _, s in fds],
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
print(json.dumps(report), flush=True)
notify("READY=1", "STATUS=serving")
for name, listener in fds:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(name.encode())
    listener.close()
"""


def _wait_for_path(path: Path, proc: subprocess.Popen[str]) -> None:
    """Wait until systemd-socket-activate has bound ``path`` (or fail if it died)."""
    deadline = time.monotonic() + 10
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


@needs_socket_activate
def test_listen_fds_under_systemd_socket_activate(
    short_dir: Path, abstract_receiver: tuple[str, socket.socket]
) -> None:
    """An activated process gets its named socket at fd 3, close-on-exec, and no LISTEN_* left."""
    notify_address, notify_sock = abstract_receiver
    path = short_dir / "credproxy.sock"
    command = [SOCKET_ACTIVATE or "", "-l", str(path), "--fdname=credproxy"]
    command += ["-E", f"NOTIFY_SOCKET={notify_address}", "--", sys.executable, "-c", CHILD]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            _wait_for_path(path, proc)
            # The first connection is what starts the program (no --accept).
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(10)
                client.connect(str(path))
                assert _read_all(client) == b"credproxy"
            stdout, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr
    assert json.loads(stdout) == {
        "names": ["credproxy"],
        "fds": [3],
        "family": [True],
        "stream": [True],
        "inheritable": [False],
        "env": [],
    }
    # Newer systemd-socket-activate sends its own READY=1 (systemd PR #38148), so
    # look for ours among whatever arrived rather than expecting exactly one.
    received: list[bytes] = []
    notify_sock.settimeout(1)
    while b"STATUS=serving" not in b"".join(received):
        try:
            received.append(notify_sock.recv(4096))
        except TimeoutError:
            break
    assert b"READY=1\nSTATUS=serving" in received


@needs_socket_activate
def test_listen_fds_names_several_sockets_in_order(short_dir: Path) -> None:
    """Two -l sockets with --fdname=a:b come back as [("a", fd 3), ("b", fd 4)]."""
    first, second = short_dir / "a.sock", short_dir / "b.sock"
    command = [SOCKET_ACTIVATE or "", "-l", str(first), "-l", str(second), "--fdname=a:b"]
    command += ["--", sys.executable, "-c", CHILD]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            _wait_for_path(second, proc)
            for path, name in ((first, b"a"), (second, b"b")):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                    client.settimeout(10)
                    client.connect(str(path))
                    assert _read_all(client) == name
            stdout, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["names"] == ["a", "b"]
    assert report["fds"] == [3, 4]
    assert report["env"] == []


# Put a listening socket at fd 3 and set the variables the way systemd does before
# exec (same pid), with the given LISTEN_PID offset, LISTEN_FDS and LISTEN_FDNAMES.
SIMULATED = """
import json, os, socket, sys
from credproxy.shell.systemd import listen_fds
path, pid_offset, count, names = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen()
fd = s.detach()
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)  # as systemd hands it over
os.environ["LISTEN_PID"] = str(os.getpid() + pid_offset)
os.environ["LISTEN_FDS"] = count
if names != "-":
    os.environ["LISTEN_FDNAMES"] = names
try:
    fds = listen_fds()
    error = None
except OSError as e:
    fds, error = [], e.strerror
print(json.dumps({
    "names": [name for name, _ in fds],
    "error": error,
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "fd3": os.get_inheritable(3) if os.path.exists("/proc/self/fd/3") else "closed",
}))
for _, sock in fds:
    sock.close()
"""


def _simulate(path: Path, pid_offset: int, count: int, names: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", SIMULATED, str(path), str(pid_offset), str(count), names],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_listen_fds_without_names_calls_the_socket_unknown(short_dir: Path) -> None:
    """Without LISTEN_FDNAMES the passed socket is named "unknown", like sd_listen_fds does."""
    report = _simulate(short_dir / "s", 0, 1, "-")
    assert report == {"names": ["unknown"], "error": None, "env": [], "fd3": False}


def test_listen_fds_for_another_pid_takes_nothing(short_dir: Path) -> None:
    """With LISTEN_PID naming another process, fd 3 is left alone but the variables go."""
    report = _simulate(short_dir / "s", 1, 1, "credproxy")
    # fd 3 still inheritable: listen_fds() did not touch it.
    assert report == {"names": [], "error": None, "env": [], "fd3": True}


def test_listen_fds_missing_descriptor_raises_and_closes_the_others(short_dir: Path) -> None:
    """LISTEN_FDS=2 with only fd 3 open raises OSError and closes the socket it had wrapped."""
    report = _simulate(short_dir / "s", 0, 2, "credproxy:missing")
    assert report == {"names": [], "error": "Bad file descriptor", "env": [], "fd3": "closed"}


def test_listen_fds_outside_systemd_returns_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without LISTEN_PID/LISTEN_FDS listen_fds() returns [] and clears a stray LISTEN_FDNAMES."""
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.setenv("LISTEN_FDNAMES", "credproxy")
    assert listen_fds() == []
    assert "LISTEN_FDNAMES" not in os.environ


def test_listen_fds_malformed_values_return_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-numeric or zero LISTEN_* values mean "no sockets", and are removed all the same."""
    for pid, count in (("abc", "1"), (str(os.getpid()), "x"), (str(os.getpid()), "0")):
        monkeypatch.setenv("LISTEN_PID", pid)
        monkeypatch.setenv("LISTEN_FDS", count)
        assert listen_fds() == []
        assert "LISTEN_PID" not in os.environ
        assert "LISTEN_FDS" not in os.environ


# --- watchdog_interval() ----------------------------------------------------------


def test_watchdog_interval_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=30000000 for our pid, or with no WATCHDOG_PID, is 30 seconds."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_USEC", "1500")
    assert watchdog_interval() == 0.0015


def test_watchdog_interval_for_another_pid_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """A watchdog meant for another process (an inherited environment) is not ours to ping."""
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None


def test_watchdog_interval_without_a_usable_value_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing, zero, negative or garbled WATCHDOG_USEC (or WATCHDOG_PID) means no watchdog."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    for usec in ("0", "-5", "30s", ""):
        monkeypatch.setenv("WATCHDOG_USEC", usec)
        assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", "init")
    assert watchdog_interval() is None
