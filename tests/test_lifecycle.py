"""Daemon lifecycle with real processes and signals: socket activation, sd_notify,
SIGTERM, idle exit, the watchdog, and one daemon per runtime directory (and, in
this process under trio's autojump clock, the idle time and the instance lock's
wait, where the instants matter)."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conftest import CREDPROXY, Dirs, Peer, UnixServer, WallClock, cli, make_config
from credproxy.errors import CredproxyError
from credproxy.inner.client import Client
from credproxy.shell.daemon import LOCK_WAIT, Daemon
from credproxy.shell.daemon import serve as serve_in_trio
from credproxy.shell.http import HttpTokenEndpoint
from credproxy.shell.store import TokenStore

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate not installed (Debian/Ubuntu package: systemd)",
)
OWN_READY = b"READY=1\nSTATUS=0 sessions, 0 renewal timers"  # the daemon's own datagram


# --- helpers -----------------------------------------------------------------------


Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a process with stderr in a file; every process is killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []
    files: list[Any] = []

    def start(cmd: list[str], env: dict[str, str], stderr: Path) -> subprocess.Popen[bytes]:
        err = stderr.open("wb")
        files.append(err)
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    for f in files:
        f.close()


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll *check* until it returns something truthy; fail after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines in a daemon's stderr file (other lines are skipped)."""
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def wait_event(
    path: Path, event: str, proc: subprocess.Popen[bytes], timeout: float = 15
) -> dict[str, Any]:
    """Wait for the first log line with ``"event": event`` (fail early if *proc* died)."""

    def check() -> dict[str, Any] | None:
        for e in log_events(path):
            if e.get("event") == event:
                return e
        assert proc.poll() is None, f"exited {proc.returncode}: {path.read_text()}"
        return None

    found: dict[str, Any] = wait_for(check, timeout, f"{event} in {path.name}")
    return found


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pid {proc.pid} still running after {timeout} s") from None


def serve(spawn: Spawn, dirs: Dirs, *args: str, name: str = "daemon", **env: str) -> Any:
    """Start ``credproxy serve ARGS`` on *dirs*; returns (process, stderr path)."""
    stderr = dirs.root / f"{name}.err"
    proc = spawn([CREDPROXY, "serve", *args], dirs.env(**env), stderr)
    return proc, stderr


def receive_until(
    sock: socket.socket, done: Callable[[list[bytes]], bool], timeout: float
) -> list[bytes]:
    """Collect datagrams until *done* says so or *timeout* seconds pass."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096))
        except TimeoutError:
            break
    return got


@pytest.fixture
def notify_socket(dirs: Dirs) -> Iterator[socket.socket]:
    """A datagram socket at ``<root>/notify`` playing the service manager."""
    dirs.root.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(dirs.root / "notify"))
        yield sock


def control(dirs: Dirs, op: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    with Client(dirs.runtime / "credproxy.sock", timeout=10) as c:
        return c.call(op, payload)


# --- 1. socket activation ------------------------------------------------------------


@needs_socket_activate
def test_socket_activation_ready_status_and_stop(
    dirs: Dirs, spawn: Spawn, notify_socket: socket.socket
) -> None:
    """Under systemd-socket-activate the first connect starts the daemon, which serves on the inherited socket, announces READY with its STATUS, and on SIGTERM sends STOPPING=1, exits 0 and leaves systemd's socket file in place."""
    # Like credproxy.socket (%t/credproxy/credproxy.sock, DirectoryMode=0700): the
    # systemd-owned socket sits in the runtime directory, where the daemon also
    # takes daemon.lock and puts session sockets under s/, and where the CLI looks.
    dirs.runtime.mkdir(mode=0o700, parents=True)
    path = dirs.runtime / "credproxy.sock"
    stderr = dirs.root / "activate.err"
    proc = spawn(
        [
            SOCKET_ACTIVATE or "",
            "-l",
            str(path),
            "--fdname=credproxy",
            "-E",
            f"NOTIFY_SOCKET={notify_socket.getsockname()}",
            "-E",
            f"CREDPROXY_STATE_DIR={dirs.state}",
            "-E",
            f"CREDPROXY_RUNTIME_DIR={dirs.runtime}",
            "-E",
            f"CREDPROXY_CONFIG={dirs.config}",
            "--",
            CREDPROXY,
            "serve",
        ],
        dirs.env(),
        stderr,
    )
    wait_for(lambda: path.exists() or proc.poll() is not None, 10, "the listening socket")
    assert proc.poll() is None, stderr.read_text()
    inode = os.stat(path).st_ino

    # Not running yet: still systemd-socket-activate, no lock taken, nothing announced.
    time.sleep(0.3)
    assert os.readlink(f"/proc/{proc.pid}/exe") == os.path.realpath(SOCKET_ACTIVATE or "")
    assert not (dirs.runtime / "daemon.lock").exists()
    assert receive_until(notify_socket, lambda got: bool(got), 0.1) == []

    # The first connect starts it (systemd-socket-activate execs in place, same pid).
    with Client(path, timeout=15) as client:
        reply = client.call("ping")
    assert reply["pid"] == proc.pid
    assert os.readlink(f"/proc/{proc.pid}/exe") != os.path.realpath(SOCKET_ACTIVATE or "")
    ready = wait_event(stderr, "daemon_ready", proc)
    assert ready["control"] == "systemd"  # it used the inherited socket, it bound none
    assert os.stat(path).st_ino == inode

    # systemd-socket-activate 252 sends no READY=1 of its own; newer ones do
    # (systemd PR #38148). The daemon's own datagram carries STATUS= with READY.
    got = receive_until(notify_socket, lambda got: OWN_READY in got, 10)
    assert OWN_READY in got, got

    # The CLI finds the daemon through the same (systemd-owned) path.
    status = cli(dirs, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["daemon"]["pid"] == proc.pid
    assert "daemon: pid" in cli(dirs, "status").stdout

    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc, 10) == 0, stderr.read_text()
    got = receive_until(notify_socket, lambda got: b"STOPPING=1" in got, 5)
    assert b"STOPPING=1" in got, got
    assert path.exists() and os.stat(path).st_ino == inode  # systemd's to remove
    assert (dirs.runtime / "s").is_dir()


# --- 2. SIGTERM with renewals pending --------------------------------------------------


def test_sigterm_cancels_pending_renewals(dirs: Dirs, spawn: Spawn) -> None:
    """SIGTERM with a renewal timer pending exits 0 within 2 s, and the token endpoint sees no refresh afterwards."""
    dirs.root.mkdir(parents=True, exist_ok=True)
    mint, url_file, idp_err = dirs.root / "mint.json", dirs.root / "url", dirs.root / "idp.err"
    idp = spawn(
        [
            sys.executable,
            "-m",
            "credproxy.devidp",
            "--port",
            "0",
            "--lifetime",
            "8",
            "--mint",
            str(mint),
            "--port-file",
            str(url_file),
        ],
        dirs.env(),
        idp_err,
    )

    def token_url() -> str | None:
        assert idp.poll() is None, idp_err.read_text()
        return url_file.read_text().strip() if url_file.exists() else None

    url = wait_for(token_url, 15, "the devidp port file")

    def refreshes() -> int:
        return sum("refresh family" in line for line in idp_err.read_text().splitlines())

    dirs.config.write_text(f'[providers.dev]\ntoken_url = "{url}"\nclient_id = "credproxy-dev"\n')
    imported = cli(dirs, "import", "dev", str(mint))
    assert imported.returncode == 0, imported.stderr

    proc, stderr = serve(spawn, dirs)
    wait_event(stderr, "daemon_ready", proc)
    opened = control(dirs, "open_session", {"grants": ["dev"], "watch_launcher": False})
    served_at = time.monotonic()
    with Client(opened["socket"], timeout=10) as c:
        assert c.get_token("dev")["access_token"].startswith("devat-")
    scheduled = wait_event(stderr, "renewal_scheduled", proc)
    fires_at = served_at + scheduled["in_seconds"]
    [session] = control(dirs, "status")["sessions"]
    assert session["renewals"][0]["next_renewal"] is not None
    assert refreshes() == 0  # served from the store, no refresh yet

    assert time.monotonic() < fires_at - 0.5, "too slow to SIGTERM before the renewal"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc, 10) == 0, stderr.read_text()
    assert time.monotonic() - sent < 2.0

    time.sleep(max(0.0, fires_at + 1.5 - time.monotonic()))
    assert refreshes() == 0, idp_err.read_text()
    assert idp.poll() is None  # the endpoint was up the whole time
    assert not (dirs.runtime / "credproxy.sock").exists()
    assert not Path(opened["socket"]).exists()


# --- 3. --idle-exit ----------------------------------------------------------------------


def test_idle_exit_without_clients(dirs: Dirs, spawn: Spawn) -> None:
    """`credproxy serve --idle-exit 1` exits 0 about one second after it is ready when nothing connects."""
    proc, stderr = serve(spawn, dirs, "--idle-exit", "1")
    wait_event(stderr, "daemon_ready", proc)
    ready_at = time.monotonic()
    assert wait_exit(proc, 5) == 0, stderr.read_text()
    elapsed = time.monotonic() - ready_at
    assert 0.8 <= elapsed < 3.0, elapsed
    assert "idle_exit" in [e.get("event") for e in log_events(stderr)]
    assert not (dirs.runtime / "credproxy.sock").exists()


def test_idle_exit_waits_for_sessions_to_close(dirs: Dirs, spawn: Spawn) -> None:
    """An open session keeps an `--idle-exit 1` daemon running; after close_session it exits once the idle time has passed, not before."""
    proc, stderr = serve(spawn, dirs, "--idle-exit", "1")
    wait_event(stderr, "daemon_ready", proc)
    opened = control(dirs, "open_session", {"grants": [], "watch_launcher": False})
    time.sleep(2.5)  # well past the idle time, with no connection open
    assert proc.poll() is None, stderr.read_text()

    control(dirs, "close_session", {"session": opened["session"]})
    closed_at = time.monotonic()
    time.sleep(max(0.0, closed_at + 0.5 - time.monotonic()))
    assert proc.poll() is None, "exited before the idle time passed"
    assert wait_exit(proc, 3.0 - (time.monotonic() - closed_at)) == 0, stderr.read_text()
    assert time.monotonic() - closed_at >= 0.9


def test_idle_exit_counts_connections_that_come_and_go(dirs: Dirs, spawn: Spawn) -> None:
    """A ping every 0.2 s (each lasting a millisecond) keeps an `--idle-exit 1` daemon up for 3 s; once they stop, it exits after the idle time."""
    proc, stderr = serve(spawn, dirs, "--idle-exit", "1")
    wait_event(stderr, "daemon_ready", proc)
    end = time.monotonic() + 3
    while time.monotonic() < end:
        assert control(dirs, "ping")["pid"] == proc.pid
        last_ping = time.monotonic()
        time.sleep(0.2)
    assert proc.poll() is None, stderr.read_text()
    assert wait_exit(proc, 3) == 0, stderr.read_text()
    assert time.monotonic() - last_ping >= 0.9


@contextlib.asynccontextmanager
async def daemon_in_trio(nursery: trio.Nursery, dirs: Dirs, **kwargs: Any) -> Any:
    """``serve()`` in this trio loop on *dirs*, with a fake wall clock; stopped on the way out."""
    wall = WallClock()
    endpoint = HttpTokenEndpoint(timeout=10)
    try:
        daemon: Daemon = await nursery.start(
            functools.partial(
                serve_in_trio,
                make_config(),
                store=TokenStore(dirs.state),
                runtime=dirs.runtime,
                endpoint=endpoint,
                wall_clock=wall,
                boot_clock=wall.boot,
                **kwargs,
            )
        )
        try:
            yield daemon
        finally:
            daemon.stop()
    finally:
        await endpoint.aclose()


async def test_a_ping_just_before_the_idle_exit_keeps_the_daemon_up_for_the_next_request(
    nursery: trio.Nursery, dirs: Dirs, autojump_clock: trio.testing.MockClock
) -> None:
    """`credproxy run` pings, then opens its session on a second connection: a ping 1 ms before the idle time ends keeps the daemon up for a whole idle time more, and it exits exactly one idle time after the session closes."""
    async with daemon_in_trio(nursery, dirs, idle_exit=1.0) as daemon:
        control_path = dirs.runtime / "credproxy.sock"
        await trio.sleep(0.999)
        ping = await Peer.connect(control_path)
        assert (await ping.handshake())["ok"] is True
        assert (await ping.call("ping"))["ok"] is True
        ping.close()
        await trio.sleep(0.998)  # 2 ms before the idle time after the ping ends
        opener = await Peer.connect(control_path)
        assert (await opener.handshake())["ok"] is True
        opened = await opener.call("open_session", {"grants": ["*"], "watch_launcher": False})
        assert opened["ok"] is True, opened
        await trio.sleep(5)  # an open session: never idle
        closed = await opener.call("close_session", {"session": opened["data"]["session"]})
        assert closed["ok"] is True
        opener.close()
        closed_at = trio.current_time()
        with trio.fail_after(2):
            await daemon.stop_event.wait()
        assert trio.current_time() - closed_at == pytest.approx(1.0, abs=0.01)


def _hold_lock(dirs: Dirs) -> int:
    """Take ``daemon.lock`` as a daemon does (the caller closes the descriptor to release it)."""
    dirs.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(dirs.runtime / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


async def test_a_daemon_started_while_the_last_one_stops_waits_and_takes_over(
    nursery: trio.Nursery, dirs: Dirs, autojump_clock: trio.testing.MockClock
) -> None:
    """The lock is held by a daemon that no longer listens (it is stopping, its refreshes landing): a new daemon waits instead of exiting, and starts as soon as the lock is released."""
    lock = _hold_lock(dirs)
    released_at: list[float] = []

    async def release_later() -> None:
        await trio.sleep(6)
        released_at.append(trio.current_time())
        os.close(lock)

    nursery.start_soon(release_later)
    async with daemon_in_trio(nursery, dirs):
        started = trio.current_time()
        assert released_at and started - released_at[0] < 0.1
        ping = await Peer.connect(dirs.runtime / "credproxy.sock")
        assert (await ping.handshake())["ok"] is True
        ping.close()


async def test_a_new_daemon_gives_up_on_a_lock_holder_that_neither_listens_nor_leaves(
    dirs: Dirs, autojump_clock: trio.testing.MockClock
) -> None:
    """The lock's holder never lets go and never listens: the new daemon refuses after LOCK_WAIT seconds, with the usual message."""
    lock = _hold_lock(dirs)
    try:
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            with pytest.raises(CredproxyError, match="another credproxy daemon is running"):
                async with daemon_in_trio(nursery, dirs):
                    pass
        assert trio.current_time() - began == pytest.approx(LOCK_WAIT, abs=0.1)
    finally:
        os.close(lock)


async def test_a_new_daemon_refuses_at_once_when_the_lock_holder_listens(
    dirs: Dirs, autojump_clock: trio.testing.MockClock
) -> None:
    """The lock's holder listens on the control socket (a running daemon): the new one refuses at once, without waiting."""
    lock = _hold_lock(dirs)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as running:
        running.bind(str(dirs.runtime / "credproxy.sock"))
        running.listen(1)
        try:
            began = trio.current_time()
            async with trio.open_nursery() as nursery:
                with pytest.raises(CredproxyError, match="another credproxy daemon is running"):
                    async with daemon_in_trio(nursery, dirs):
                        pass
            assert trio.current_time() == began
        finally:
            os.close(lock)


def _frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return len(body).to_bytes(4, "big") + body


def _read_frame(conn: socket.socket) -> dict[str, Any]:
    def exactly(n: int) -> bytes:
        got = b""
        while len(got) < n:
            chunk = conn.recv(n - len(got))
            assert chunk, "the launcher closed the connection"
            got += chunk
        return got

    obj: dict[str, Any] = json.loads(exactly(int.from_bytes(exactly(4), "big")))
    return obj


def test_run_replaces_a_daemon_that_went_away_after_answering_its_ping(
    background_daemon: Dirs,
) -> None:
    """A daemon answers `credproxy run`'s ping and is gone before the session is asked for (it idled out, or was stopped, in between): `run` starts a daemon and runs the command, instead of failing."""
    dirs = background_daemon
    dirs.runtime.mkdir(mode=0o700, parents=True)
    path = dirs.runtime / "credproxy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(30)

    def answer_the_ping_and_go() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            assert _read_frame(conn)["op"] == "handshake"
            conn.sendall(_frame({"v": 2, "op": "handshake", "ok": True, "data": {"version": 2}}))
            ping = _read_frame(conn)
            assert ping["op"] == "ping"
            os.unlink(path)  # gone, before the launcher has its answer
            listener.close()
            conn.sendall(_frame({"id": ping["id"], "ok": True, "data": {"pid": 1}}))

    fake = threading.Thread(target=answer_the_ping_and_go)
    fake.start()
    try:
        ran = cli(dirs, "run", "--allow", "*", "--", "sh", "-c", 'test -S "$CREDPROXY_SOCKET"')
    finally:
        fake.join(30)
        listener.close()
    assert ran.returncode == 0, ran.stderr
    pid = control(dirs, "ping")["pid"]
    assert pid != 1 and Path(f"/proc/{pid}").exists()  # the daemon `run` started


class DropsSessions(UnixServer):
    """A daemon that answers every ping (always the same pid) and drops every open_session."""

    conn_timeout = 10.0

    def __init__(self, path: Path) -> None:
        self.ops: list[str] = []
        super().__init__(path)

    def serve(self, conn: socket.socket) -> None:
        _read_frame(conn)
        conn.sendall(_frame({"v": 2, "op": "handshake", "ok": True, "data": {"version": 2}}))
        request = _read_frame(conn)
        self.ops.append(request["op"])
        if request["op"] == "ping":
            conn.sendall(_frame({"id": request["id"], "ok": True, "data": {"pid": 4242}}))


def test_run_does_not_ask_the_same_daemon_twice_for_its_session(dirs: Dirs) -> None:
    """The daemon that answered the ping drops the session request, and still answers a ping: `run` fails (exit 1) rather than ask it again, and starts no daemon."""
    dirs.runtime.mkdir(mode=0o700, parents=True)
    fake = DropsSessions(dirs.runtime / "credproxy.sock")
    try:
        ran = cli(dirs, "run", "--allow", "*", "--", "true")
    finally:
        fake.close()
    assert ran.returncode == 1, ran.stderr
    assert "connection to credproxy" in ran.stderr and "lost" in ran.stderr, ran.stderr
    assert fake.ops == ["ping", "open_session", "ping"]
    assert not (dirs.runtime / "daemon.log").exists()  # no daemon was started


# --- 4. watchdog -------------------------------------------------------------------------


@pytest.mark.parametrize("watchdog_pid", ["unset", "own", "other"])
def test_watchdog_pings(
    dirs: Dirs, spawn: Spawn, notify_socket: socket.socket, watchdog_pid: str
) -> None:
    """With WATCHDOG_USEC=400000 the daemon sends WATCHDOG=1 at least three times a second, unless WATCHDOG_PID names another process."""
    env = dirs.env(NOTIFY_SOCKET=notify_socket.getsockname(), WATCHDOG_USEC="400000")
    env.pop("WATCHDOG_PID", None)
    if watchdog_pid == "other":
        env["WATCHDOG_PID"] = "1"
    cmd = [CREDPROXY, "serve"]
    if watchdog_pid == "own":  # exec keeps the pid, so $$ is the daemon's pid
        cmd = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$0" serve', CREDPROXY]
    stderr = dirs.root / "daemon.err"
    proc = spawn(cmd, env, stderr)
    got = receive_until(notify_socket, lambda got: OWN_READY in got, 15)
    assert OWN_READY in got, (got, stderr.read_text())
    got = receive_until(notify_socket, lambda got: False, 1.0)
    pings = got.count(b"WATCHDOG=1")
    if watchdog_pid == "other":
        assert pings == 0, got
    else:
        assert pings >= 3, got
    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc, 10) == 0, stderr.read_text()


def test_watchdog_pings_stop_while_the_serving_loop_hangs(
    dirs: Dirs, spawn: Spawn, notify_socket: socket.socket
) -> None:
    """The serving loop's thread hangs on a sandbox's first request (an injected hang), the event loop running on: the WATCHDOG=1 pings stop, so systemd would restart the daemon."""
    env = dirs.env(
        NOTIFY_SOCKET=notify_socket.getsockname(),
        WATCHDOG_USEC="400000",
        CREDPROXY_FAULT="hang:serving-loop-turn",
    )
    env.pop("WATCHDOG_PID", None)
    stderr = dirs.root / "daemon.err"
    proc = spawn([CREDPROXY, "serve"], env, stderr)
    got = receive_until(notify_socket, lambda got: OWN_READY in got, 15)
    assert OWN_READY in got, (got, stderr.read_text())
    assert receive_until(notify_socket, lambda got: False, 0.6).count(b"WATCHDOG=1") >= 2
    with (dirs.root / "run.err").open("wb") as run_err:
        sandbox = subprocess.Popen(
            [CREDPROXY, "run", "--allow", "dev", "--", CREDPROXY, "token", "dev"],
            env=dirs.env(),
            stdout=subprocess.DEVNULL,
            stderr=run_err,
        )
    try:
        opened = receive_until(
            notify_socket, lambda got: any(d.startswith(b"STATUS=1 sessions") for d in got), 15
        )
        assert any(d.startswith(b"STATUS=1 sessions") for d in opened), opened
        # Once the sandbox's request reaches the loop (a process start away, which
        # a busy machine makes slow), the pings stop: a 1.2 s window (three ping
        # intervals) without one, waited for rather than assumed after a sleep.
        deadline = time.monotonic() + 15
        got = []
        while time.monotonic() < deadline:
            got = receive_until(notify_socket, lambda got: False, 1.2)
            if b"WATCHDOG=1" not in got:
                break
        assert got.count(b"WATCHDOG=1") == 0, got
        assert "serving_loop_unresponsive" in stderr.read_text()
    finally:
        sandbox.kill()
        sandbox.wait(timeout=10)
        proc.kill()
        proc.wait(timeout=10)


# --- 5. one daemon per runtime directory ---------------------------------------------------


def test_second_daemon_refuses_and_first_keeps_serving(dirs: Dirs, spawn: Spawn) -> None:
    """A second `credproxy serve` on the same runtime directory exits non-zero with one stderr line saying another daemon runs, and the first keeps serving."""
    first, first_err = serve(spawn, dirs, name="first")
    wait_event(first_err, "daemon_ready", first)
    second, second_err = serve(spawn, dirs, name="second")
    code = wait_exit(second, 15)
    lines = second_err.read_text().strip().splitlines()
    assert code != 0
    assert len(lines) == 1, lines
    assert "another credproxy daemon is running" in lines[0]
    assert control(dirs, "ping")["pid"] == first.pid
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)
    assert wait_exit(first, 10) == 0


def test_stale_control_socket_is_reclaimed(dirs: Dirs, spawn: Spawn) -> None:
    """The control socket file a SIGKILLed daemon leaves behind is reclaimed by the next `credproxy serve`, which then serves."""
    first, first_err = serve(spawn, dirs, name="first")
    wait_event(first_err, "daemon_ready", first)
    first.kill()
    wait_exit(first, 10)
    path = dirs.runtime / "credproxy.sock"
    assert path.is_socket()  # left behind: nobody removed it
    second, second_err = serve(spawn, dirs, name="second")
    wait_event(second_err, "daemon_ready", second)
    assert control(dirs, "ping")["pid"] == second.pid
    second.send_signal(signal.SIGTERM)
    assert wait_exit(second, 10) == 0, second_err.read_text()
    assert not path.exists()


# --- a crash of the serving loop is never silent -----------------------------------------


def test_a_crash_of_the_serving_loop_stops_the_daemon_non_zero(dirs: Dirs, spawn: Spawn) -> None:
    """A bug in the serving loop (injected at its turn): the daemon exits 1 within a second, the client's socket closes, and the log says why; nothing is left half-alive."""
    proc, stderr = serve(spawn, dirs, CREDPROXY_FAULT="crash:serving-loop-turn")
    wait_event(stderr, "daemon_ready", proc)
    session = control(dirs, "open_session", {"grants": ["dev"], "watch_launcher": False})
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(5)
    client.connect(session["socket"])
    client.sendall(b"\x00")  # the loop's next turn reads it, and crashes
    crashed_at = time.monotonic()
    assert wait_exit(proc, 5) == 1, stderr.read_text()
    assert time.monotonic() - crashed_at < 1.5
    with contextlib.suppress(ConnectionResetError):
        assert client.recv(4096) == b""  # closed, not left hanging
    client.close()
    events = [e.get("event") for e in log_events(stderr)]
    assert "serving_loop_crashed" in events
    (failed,) = [e for e in log_events(stderr) if e.get("event") == "daemon_failed"]
    assert "serving loop crashed" in failed["why"]
    assert events.index("daemon_failed") < events.index("daemon_stopped")
    assert not (dirs.runtime / "credproxy.sock").exists()
    assert not Path(session["socket"]).exists()
