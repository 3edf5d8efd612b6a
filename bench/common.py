"""Plumbing for ``bench/run.py``: child processes, the shared client loop, statistics.

Everything the benchmark starts is a child process recorded in a :class:`Stack`
(the daemon, ``ssh-agent``, the development IdP), and everything it writes is
under one short temporary directory (Unix socket paths are limited to 108
bytes). ``Stack.close()`` stops the children and removes the directory.

The client loops are deliberately protocol-blind: they write a fixed request
(bytes prepared once) and read one 4-byte big-endian length-prefixed reply.
credproxy and ssh-agent frame their messages the same way, so the very same
loop measures both peers. :func:`lean_roundtrips` is the throughput loop (send,
read the reply into a buffer allocated once, nothing else: any work in the
client dilutes the ratio of the servers); :func:`roundtrips` also times every
round trip, for the latency figures.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

# -- wire -----------------------------------------------------------------------

#: credproxy's handshake, as credproxy.inner.client sends it.
CP_HANDSHAKE = b'{"v":1,"op":"handshake","payload":{"minVersion":1,"maxVersion":2}}'

#: SSH2_AGENTC_REQUEST_IDENTITIES (RFC draft-miller-ssh-agent, message 11).
AGENT_REQUEST_IDENTITIES = bytes([11])
AGENT_IDENTITIES_ANSWER = 12


def frame(body: bytes) -> bytes:
    """Prefix *body* with its 4-byte big-endian length (both peers' framing)."""
    return len(body).to_bytes(4, "big") + body


def cp_get_token(provider: str, bucket: str = "default", rid: str = "1") -> bytes:
    """A framed v2 ``get_token`` request.

    The same id may be reused on one connection once its reply has arrived (the
    daemon forgets an id when it answers), so the loop sends identical bytes.
    """
    payload = {"provider": provider, "bucket": bucket}
    body = json.dumps({"v": 2, "id": rid, "op": "get_token", "payload": payload})
    return frame(body.encode())


def read_reply(sock: socket.socket) -> bytes:
    """Read one length-prefixed reply and return its body."""
    buf = sock.recv(65536)
    while len(buf) < 4:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("peer closed the connection")
        buf += more
    need = 4 + int.from_bytes(buf[:4], "big")
    while len(buf) < need:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("peer closed the connection")
        buf += more
    return buf[4:need]


def connect(path: str | Path, handshake: bytes | None = None, timeout: float = 30) -> socket.socket:
    """A blocking connection to *path*; sends *handshake* (a body) first if given."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    if handshake is not None:
        sock.sendall(frame(handshake))
        reply = json.loads(read_reply(sock))
        if reply.get("ok") is not True:
            sock.close()
            raise RuntimeError(f"handshake refused: {reply}")
    return sock


def check_cp_reply(body: bytes) -> None:
    reply = json.loads(body)
    if reply.get("ok") is not True or "access_token" not in reply.get("data", {}):
        raise RuntimeError(f"credproxy did not serve a token: {reply}")


def check_agent_reply(body: bytes) -> None:
    if not body or body[0] != AGENT_IDENTITIES_ANSWER:
        raise RuntimeError(f"ssh-agent answered message {body[:1]!r}, not 12")
    if int.from_bytes(body[1:5], "big") < 1:
        raise RuntimeError("ssh-agent holds no identity")


def roundtrips(sock: socket.socket, request: bytes, end_ns: int) -> array[int]:
    """Send *request* and read one reply, back to back, until ``time.monotonic_ns() >= end_ns``.

    Returns the latency of every round trip in nanoseconds (at least one).
    ``monotonic_ns`` is CLOCK_MONOTONIC, shared by every process on the machine,
    so worker processes can be given one common deadline.
    """
    lat: array[int] = array("q")
    append, clock = lat.append, time.monotonic_ns
    send, recv = sock.sendall, sock.recv
    while True:
        t0 = clock()
        send(request)
        buf = recv(65536)
        while len(buf) < 4:
            buf += recv(65536)
        need = 4 + int.from_bytes(buf[:4], "big")
        while len(buf) < need:
            buf += recv(65536)
        t1 = clock()
        append(t1 - t0)
        if t1 >= end_ns:
            return lat


def lean_roundtrips(sock: socket.socket, request: bytes, reply: bytes, end_ns: int) -> int:
    """Send *request* and read its reply, back to back, until ``time.monotonic_ns() >= end_ns``.

    The leanest client loop there is: the request's bytes are built once, each
    reply is read with ``recv_into`` into one preallocated buffer until its
    length (that of *reply*, the framed reply the peer gave to the same
    request before) is complete, nothing is decoded, and the clock is read
    once per :data:`LEAN_BATCH` round trips. The last reply is checked against
    *reply* at the end. Returns the number of round trips (a multiple of
    :data:`LEAN_BATCH`).
    """
    size = len(reply)
    buf = bytearray(max(size, 65536))
    view = memoryview(buf)
    send, recv_into, clock = sock.sendall, sock.recv_into, time.monotonic_ns
    batch = range(LEAN_BATCH)
    count = 0
    # A Python socket with a timeout polls before every send and receive: two
    # system calls more per round trip. The loop's socket blocks instead, and
    # the kernel's own receive timeout keeps a silent peer from hanging it.
    timeout = sock.gettimeout()
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout or 0))
    try:
        while True:
            for _ in batch:
                send(request)
                got = recv_into(buf)
                while got < size:
                    more = recv_into(view[got:])
                    if not more:
                        raise ConnectionError("peer closed the connection")
                    got += more
            count += LEAN_BATCH
            if clock() >= end_ns:
                break
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
        sock.settimeout(timeout)
    if buf[:size] != reply:
        raise RuntimeError(f"the reply changed: {bytes(buf[:size])!r} != {reply!r}")
    return count


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


#: Round trips of :func:`lean_roundtrips` between two looks at the clock.
LEAN_BATCH = 32


def read_framed(sock: socket.socket) -> bytes:
    """Read one length-prefixed reply and return it whole, header included."""
    body = read_reply(sock)
    return frame(body)


# -- statistics -------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


# -- processes ------------------------------------------------------------------------


def credproxy_argv() -> list[str]:
    """The installed ``credproxy`` console script next to this interpreter."""
    exe = Path(sys.executable).with_name("credproxy")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "credproxy"]


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards *want*; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of *pid* in KiB, from /proc/PID/status."""
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def wakeups(pid: int) -> int:
    """The times *pid*'s threads have been put on a CPU so far (/proc/PID/task/*/schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[2])
    return total


def cpu_ns(pid: int) -> int:
    """CPU time *pid* has used so far (all its threads), in ns, from /proc/PID/task/*/schedstat.

    On a busy machine wall-clock latency mostly measures the scheduler; CPU
    time per request measures the server's own work.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        # a thread may exit between the listing and the read
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


_SCRUBBED_ENV = (
    "CREDPROXY_SOCKET",
    "LLXPRT_CREDENTIAL_SOCKET",
    "CREDPROXY_CAPABILITY",
    "CREDPROXY_FAULT",
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "SSH_AUTH_SOCK",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would steer credproxy or ssh.

    Bytecode caching is switched on for the children (``PYTHONDONTWRITEBYTECODE``
    removed) with a private ``PYTHONPYCACHEPREFIX`` (see :class:`Stack`): an
    installed credproxy has its ``.pyc`` files, and a process start that
    recompiles every module would measure the compiler, not credproxy.
    """
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if _pycache_prefix is not None:
        env["PYTHONPYCACHEPREFIX"] = _pycache_prefix
    env.update(extra)
    return env


_pycache_prefix: str | None = None


class Stack:
    """A temporary directory and the child processes living in it."""

    def __init__(self, keep: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cpb", dir="/tmp"))
        global _pycache_prefix
        _pycache_prefix = str(self.root / "pycache")
        self.keep = keep
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []

    def path(self, name: str) -> Path:
        return self.root / name

    def spawn(
        self, argv: list[str], *, env: dict[str, str], log: str, stdout: Any = subprocess.DEVNULL
    ) -> subprocess.Popen[bytes]:
        """Start *argv* with stderr appended to ``ROOT/log``."""
        err = open(self.root / log, "ab")  # noqa: SIM115 - closed in close()
        self._files.append(err)
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err, close_fds=True
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> int | None:
        """SIGTERM *proc* and wait (SIGKILL after *timeout*); returns its exit status."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def close(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc, timeout=10)
        for f in self._files:
            f.close()
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout} s")
        time.sleep(0.01)


# -- the three servers ---------------------------------------------------------------


def start_ssh_agent(stack: Stack) -> tuple[subprocess.Popen[bytes], Path]:
    """``ssh-agent -D -a SOCK`` holding one fresh ed25519 key."""
    sock = stack.path("agent.sock")
    key = stack.path("id_ed25519")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "credproxy-bench", "-f", str(key)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    proc = stack.spawn(["ssh-agent", "-D", "-a", str(sock)], env=clean_env(), log="ssh-agent.log")
    wait_for(sock.exists, 10, "ssh-agent", proc)
    subprocess.run(
        ["ssh-add", "-q", str(key)],
        env=clean_env(SSH_AUTH_SOCK=str(sock)),
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    return proc, sock


def start_devidp(
    stack: Stack, lifetime: float
) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """``python -m credproxy.devidp`` on a free port: (proc, token URL, minted token)."""
    port_file, mint = stack.path("devidp.url"), stack.path("devidp-mint.json")
    argv = [sys.executable, "-m", "credproxy.devidp", "--port", "0"]
    argv += ["--lifetime", str(lifetime)]
    argv += ["--mint", str(mint), "--port-file", str(port_file)]
    proc = stack.spawn(argv, env=clean_env(), log="devidp.log")
    wait_for(port_file.exists, 20, "devidp", proc)
    url = port_file.read_text().strip()
    token = json.loads(mint.read_text())
    return proc, url, token


def devidp_events(stack: Stack) -> tuple[int, int]:
    """(refreshes, refresh-token reuses) the development IdP has logged so far.

    It logs one ``devidp: refresh family N: ...`` line per successful refresh and
    one ``devidp: reuse of rotated refresh token ...`` line per reuse detected.
    """
    text = stack.path("devidp.log").read_text(errors="replace")
    lines = text.splitlines()
    refreshes = sum(1 for line in lines if line.startswith("devidp: refresh family "))
    reuses = sum(1 for line in lines if line.startswith("devidp: reuse of rotated"))
    return refreshes, reuses


def write_config(path: Path, token_url: str, *, max_connections: int) -> None:
    path.write_text(
        "# written by bench/run.py\n"
        "[providers.dev]\n"
        f'token_url = "{token_url}"\n'
        'client_id = "credproxy-dev"\n'
        "\n"
        "[limits]\n"
        "# The per-connection rate limit is a DoS guard; the benchmark measures the\n"
        "# serving path, so it is disabled here.\n"
        "requests_per_second = 0\n"
        f"max_connections = {max_connections}\n"
    )


class Daemon:
    """One ``credproxy serve`` child with its own state, runtime and config."""

    def __init__(self, stack: Stack, name: str, config: Path) -> None:
        self.stack = stack
        self.name = name
        self.state = stack.path(f"{name}-state")
        self.runtime = stack.path(f"{name}-run")
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_cpu = math.nan  # CPU seconds the daemon used up to READY=1

    @property
    def control(self) -> Path:
        return self.runtime / "credproxy.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            CREDPROXY_STATE_DIR=str(self.state),
            CREDPROXY_RUNTIME_DIR=str(self.runtime),
            CREDPROXY_CONFIG=str(self.config),
            **extra,
        )

    def start(self, timeout: float = 30) -> float:
        """Spawn ``credproxy serve``; returns the seconds from spawn to its READY=1 datagram."""
        notify_path = self.stack.path(f"{self.name}.notify")
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            notify.settimeout(0.05)
            t0 = time.perf_counter()
            self.proc = self.stack.spawn(
                [*credproxy_argv(), "serve"],
                env=self.env(NOTIFY_SOCKET=str(notify_path)),
                log=f"{self.name}.log",
            )
            deadline = t0 + timeout
            while True:
                try:
                    message = notify.recv(4096)
                except TimeoutError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(
                            f"credproxy serve exited with status {self.proc.returncode}; "
                            f"see {self.stack.path(self.name + '.log')}"
                        ) from None
                    if time.perf_counter() > deadline:
                        raise RuntimeError(
                            f"no READY=1 from credproxy serve in {timeout} s"
                        ) from None
                    continue
                if b"READY=1" in message.split(b"\n"):
                    elapsed = time.perf_counter() - t0
                    self.ready_cpu = cpu_ns(self.proc.pid) / 1e9
                    break
        notify_path.unlink(missing_ok=True)
        return elapsed

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        status = self.stack.stop(self.proc)
        self.proc = None
        return status
