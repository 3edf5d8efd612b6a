"""Shared test fixtures: real sockets, a real token endpoint, an injectable wall clock.

Testing policy (after trio-websocket's): everything runs on this machine only.
In-process daemon tests run the real daemon (:func:`credproxy.shell.daemon.serve`)
in the test's own trio loop, over real Unix sockets in a short temporary
directory, against the development identity provider served over real HTTP on
127.0.0.1. Tests that involve time use ``autojump_clock``; the daemon's wall
clock is a :class:`WallClock` that follows trio's clock and can jump (a
simulated suspend). End-to-end tests run the installed ``credproxy``
executable in subprocesses.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec
import pytest
import trio

from credproxy import devidp
from credproxy.core.config import Config
from credproxy.core.grants import Grants
from credproxy.shell.daemon import Daemon, serve
from credproxy.shell.http import HttpTokenEndpoint
from credproxy.shell.store import TokenStore

BASE_EPOCH = 1_800_000_000.0
CREDPROXY = str(Path(sys.executable).with_name("credproxy"))


class WallClock:
    """Epoch seconds that follow trio's clock, plus suspends and clock steps.

    Three clocks in one: the host's wall clock (``wall()``, what the daemon
    reads), the true time (:meth:`true`, what the identity provider reads) and
    the boot clock (:meth:`boot`, ``CLOCK_BOOTTIME``). A suspend moves all
    three while trio's clock stands still; a step moves the wall clock only.
    """

    def __init__(self, base: float = BASE_EPOCH) -> None:
        self.base = base
        self.offset = 0.0  # suspends
        self.stepped = 0.0  # wall-clock steps
        self.t0 = trio.current_time()

    def __call__(self) -> float:
        return self.true() + self.stepped

    def true(self) -> float:
        return self.base + (trio.current_time() - self.t0) + self.offset

    def boot(self) -> float:
        return 1000.0 + (trio.current_time() - self.t0) + self.offset

    def jump(self, seconds: float) -> None:
        """The wall clock moves by *seconds* while trio's clock does not (a suspend)."""
        self.offset += seconds

    def step(self, seconds: float) -> None:
        """The host's wall clock is set *seconds* ahead (or back): nothing else moves."""
        self.stepped += seconds


class RealWallClock:
    """The real wall clock, for a daemon whose serving loop runs in its own thread.

    ``jump`` is not available: that thread reads ``time.time()`` itself.
    """

    def __call__(self) -> float:
        return time.time()


SECRET_MARKERS = ("devat-", "devrt-", "CANARY")  # dev IdP tokens and test canaries


@pytest.fixture(autouse=True)
def no_secrets_in_logs() -> Iterator[list[Any]]:
    """Every test: no log event of the in-process daemon carries a token or canary value.

    Events are captured before any redaction, so this checks what the code
    passes to the logger, not what a filter later hides.
    """
    from credproxy.shell import logs

    with logs.capture() as events:
        yield events
    leaks = [e for e in events if any(m in repr(e) for m in SECRET_MARKERS)]
    assert leaks == [], f"secret-looking values in log events: {leaks[:3]}"


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    """A short temporary directory (Unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cp", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Dirs:
    root: Path
    state: Path
    runtime: Path
    config: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CREDPROXY_STATE_DIR=str(self.state),
            CREDPROXY_RUNTIME_DIR=str(self.runtime),
            CREDPROXY_CONFIG=str(self.config),
            PYTHONUNBUFFERED="1",
        )
        for name in (
            "CREDPROXY_SOCKET",
            "LLXPRT_CREDENTIAL_SOCKET",
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "CREDPROXY_FAULT",
        ):
            env.pop(name, None)
        env.update(extra)
        return env


@pytest.fixture
def dirs(tmp_short: Path) -> Dirs:
    """State, runtime and config paths for one test (the config file may not exist)."""
    return Dirs(tmp_short, tmp_short / "state", tmp_short / "run", tmp_short / "config.toml")


async def serve_config_file(
    nursery: trio.Nursery,
    dirs: Dirs,
    endpoint: HttpTokenEndpoint,
    *,
    cfg: Config | None = None,
    store: TokenStore | None = None,
    config_poll: float | None = None,
    **options: Any,
) -> Daemon:
    """The daemon on ``dirs.config`` (which `credproxy reload` re-reads), started in *nursery*.

    *cfg*: the configuration it starts with (default: the file's); *options* go to ``serve``.
    """
    from credproxy.shell import paths

    daemon: Daemon = await nursery.start(
        functools.partial(
            serve,
            paths.load_config(dirs.config) if cfg is None else cfg,
            store=TokenStore(dirs.state) if store is None else store,
            runtime=dirs.runtime,
            endpoint=endpoint,
            config_path=dirs.config,
            config_poll=config_poll,
            **options,
        )
    )
    return daemon


def cli(
    dirs: Dirs, *args: str, input: str | None = None, timeout: float = 30, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``credproxy`` executable with the test's directories."""
    return subprocess.run(
        [CREDPROXY, *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dirs.env(**env),
        check=False,
    )


def make_config(**sections: Any) -> Config:
    """A :class:`Config` from plain data, e.g. ``make_config(limits={"idle_timeout": 5})``."""
    return msgspec.convert(sections, Config)


def write_token(
    store: TokenStore, provider: str, token: dict[str, Any], bucket: str = "default"
) -> None:
    store.write(provider, bucket, token)


# --- a threaded Unix-socket server --------------------------------------------------


class UnixServer:
    """A Unix-socket server in threads: one thread per connection runs :meth:`serve`.

    An exception in a connection's thread is kept in ``errors`` (the
    :func:`unix_servers` fixture raises it again when the test ends). Subclasses
    set their own attributes before calling ``__init__``, which starts accepting.
    """

    #: The timeout of an accepted connection (None: blocking).
    conn_timeout: float | None = None
    join_timeout = 10.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(self.conn_timeout)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            with conn:
                self.serve(conn)
        except BaseException as exc:  # raised again at the end of the test
            self.errors.append(exc)

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(self.join_timeout)
        self.listener.close()
        for t in self._threads:
            t.join(self.join_timeout)


@pytest.fixture
def unix_servers(dirs: Dirs) -> Iterator[Callable[..., Any]]:
    """``start(cls, *args, **kwargs)``: a :class:`UnixServer` *cls* on a new socket in the test's directory.

    Every server is closed after the test, and the first error one of them kept is raised then.
    """
    dirs.root.mkdir(exist_ok=True)
    started: list[UnixServer] = []

    def start(cls: type[UnixServer], *args: Any, **kwargs: Any) -> UnixServer:
        server = cls(dirs.root / f"s{len(started)}.sock", *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()
    for server in started:
        if server.errors:
            raise server.errors[0]


# --- a raw protocol peer --------------------------------------------------------


class Peer:
    """A hand-driven client: sends exactly the bytes a test says, reads frames back."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.received = bytearray()  # every byte the server sent us
        self._ids = 0

    @classmethod
    async def connect(cls, path: Path | str) -> Peer:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(str(path))
        return cls(sock)

    async def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await self.sock.send(view) :]

    async def send(self, obj: Any) -> None:
        body = json.dumps(obj).encode()
        await self.send_raw(len(body).to_bytes(4, "big") + body)

    async def recv(self) -> dict[str, Any] | None:
        """The next frame, or None if the server closed the connection."""
        while True:
            if len(self.buf) >= 4:
                size = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) >= 4 + size:
                    body = bytes(self.buf[4 : 4 + size])
                    del self.buf[: 4 + size]
                    obj: dict[str, Any] = json.loads(body)
                    return obj
            try:
                data = await self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.buf += data
            self.received += data

    async def handshake(
        self, lo: int = 1, hi: int = 2, capability: str | None = None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"minVersion": lo, "maxVersion": hi}
        if capability is not None:
            payload["capabilityToken"] = capability
        await self.send({"v": 1, "op": "handshake", "payload": payload})
        reply = await self.recv()
        assert reply is not None, "server closed the connection during the handshake"
        return reply

    async def call(self, op: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        self._ids += 1
        rid = f"r{self._ids}"
        await self.send({"v": 2, "id": rid, "op": op, "payload": payload or {}})
        reply = await self.recv()
        assert reply is not None, f"server closed the connection instead of answering {op}"
        assert reply["id"] == rid
        return reply

    async def closed_by_server(self) -> bool:
        """True once the server closes the connection (reads and drops frames until then)."""
        while True:
            if await self.recv() is None:
                return True

    def close(self) -> None:
        self.sock.close()


class Peers:
    """Raw clients opened by one test, closed at its end whatever happened."""

    def __init__(self) -> None:
        self.opened: list[Peer] = []

    async def open(self, session: Any, handshake: bool = True) -> Peer:
        p = await Peer.connect(session.socket_path)
        self.opened.append(p)
        if handshake:
            reply = await p.handshake()
            assert reply["ok"] is True, reply
        return p


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    """Raw clients closed at teardown, whatever the test did (``filterwarnings = error``)."""
    tracker = Peers()
    yield tracker
    for p in tracker.opened:
        p.close()


# --- the in-process daemon --------------------------------------------------------


@dataclass
class Harness:
    daemon: Daemon
    store: TokenStore
    idp: devidp.DevIdP
    token_url: str
    wall: WallClock
    dirs: Dirs
    peers: list[Peer] = field(default_factory=list)
    issuers: devidp.DevIssuers | None = None  # the signing grants' issuers, when asked for

    async def session(
        self, *grants: str, allow_uids: tuple[int, ...] = (), capability: bytes | None = None
    ) -> Any:
        return await self.daemon.open_session(
            Grants.parse(list(grants)), frozenset(allow_uids), "test", capability, None
        )

    async def peer(self, session: Any, handshake: bool = True) -> Peer:
        p = await Peer.connect(session.socket_path)
        self.peers.append(p)  # closed at teardown even if the test fails first
        if handshake:
            reply = await p.handshake()
            assert reply["ok"] is True, reply
        return p

    def login(self, provider: str = "dev", bucket: str = "default") -> dict[str, Any]:
        """Mint a token family at the IdP and store its first token (like `credproxy import`)."""
        token = self.idp.mint()
        self.store.write(provider, bucket, token)
        return token


StartDaemon = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_daemon(nursery: trio.Nursery, dirs: Dirs) -> AsyncIterator[StartDaemon]:
    """Start the real daemon in this test's trio loop; returns a :class:`Harness`.

    Keyword arguments are config sections (``limits={...}``, ``renewal={...}``);
    ``lifetime=`` sets the IdP's access-token lifetime; ``issuers=True`` serves
    the signing grants' development issuers beside it (``h.issuers``, at the
    IdP's base URL). A provider named
    ``dev`` points at the in-loop development IdP. ``serving_thread=True``
    runs the serving loop in its own thread, as ``credproxy serve`` does; its
    clocks are then the real ones (not for ``autojump_clock`` tests).
    """
    endpoints: list[HttpTokenEndpoint] = []
    daemons: list[Daemon] = []
    harnesses: list[Harness] = []

    async def start(
        lifetime: float = 3600,
        *,
        serving_thread: bool = False,
        issuers: bool = False,
        **sections: Any,
    ) -> Harness:
        wall: Any = RealWallClock() if serving_thread else WallClock()
        true_time = wall.true if not serving_thread else wall
        idp = devidp.DevIdP(lifetime=lifetime, clock=true_time)
        signing = devidp.DevIssuers(clock=true_time, lifetime=lifetime) if issuers else None
        token_url = await nursery.start(functools.partial(devidp.serve, idp, issuers=signing))
        # "{idp}" in a provider's values is the IdP's base URL (the issuers' too).
        providers = _with_idp(dict(sections.pop("providers", {})), token_url.removesuffix("/token"))
        # `dev` points at the in-loop IdP; keys a test gives for it are added.
        providers["dev"] = {
            "token_url": token_url,
            "client_id": idp.client_id,
            **providers.get("dev", {}),
        }
        cfg = make_config(providers=providers, **sections)
        store = TokenStore(dirs.state)
        endpoint = HttpTokenEndpoint(wall_clock=wall, timeout=10, signing_store=store.signing_dir)
        extra: dict[str, Any] = (
            {"serving_thread": True}
            if serving_thread
            else {"wall_clock": wall, "boot_clock": wall.boot}
        )
        endpoints.append(endpoint)
        daemon = await nursery.start(
            functools.partial(
                serve,
                cfg,
                store=store,
                runtime=dirs.runtime,
                endpoint=endpoint,
                rng=random.Random(7),
                **extra,
            )
        )
        daemons.append(daemon)
        harness = Harness(daemon, store, idp, token_url, wall, dirs, issuers=signing)
        harnesses.append(harness)
        return harness

    yield start
    for h in harnesses:
        for p in h.peers:
            p.close()
    for d in daemons:
        d.stop()
    for e in endpoints:
        await e.aclose()


def _with_idp(value: Any, base: str) -> Any:
    """*value* with "{idp}" replaced by *base* in every string it holds."""
    if isinstance(value, str):
        return value.replace("{idp}", base)
    if isinstance(value, dict):
        return {k: _with_idp(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_idp(v, base) for v in value]
    return value


def stop_daemon(dirs: Dirs, timeout: float = 10) -> int | None:
    """SIGTERM the background daemon of *dirs* (if any) and wait; returns its pid."""
    import signal
    import time

    proc = cli(dirs, "status", "--json")
    daemon = json.loads(proc.stdout).get("daemon") if proc.returncode == 0 else None
    if not daemon:
        return None
    pid = int(daemon["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return pid
        time.sleep(0.02)
    raise AssertionError(f"daemon {pid} did not exit within {timeout} s of SIGTERM")


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def background_daemon(dirs: Dirs) -> Iterator[Dirs]:
    """Directories for tests whose `credproxy run` starts a daemon; it is stopped afterwards."""
    yield dirs
    stop_daemon(dirs)


# --- `credproxy login` as a process ------------------------------------------------


@dataclass
class Login:
    """A running ``credproxy login PROVIDER --no-browser``; a thread collects its stderr lines."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    reader: threading.Thread | None = None

    def line(self, pred: Callable[[str], bool], timeout: float = 20) -> str:
        """The next stderr line for which *pred* holds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"credproxy login never printed the line; stderr so far: {self.seen}"
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                reader_done = self.reader is None or not self.reader.is_alive()
                if self.proc.poll() is not None and reader_done and self.lines.empty():
                    raise AssertionError(
                        f"credproxy login exited {self.proc.returncode} without that line: "
                        f"{''.join(self.seen)}"
                    ) from None
                continue
            if pred(line):
                return line

    def auth_url(self) -> str:
        return self.line(lambda s: s.startswith("http")).strip()

    def callback_port(self, url: str) -> int:
        """The port of the loopback redirect URI in the authorization URL *url*."""
        redirect = dict(parse_qsl(urlsplit(url).query))["redirect_uri"]
        port = urlsplit(redirect).port
        assert port is not None
        return port

    def type_line(self, text: str) -> None:
        """The person types *text* and Enter at credproxy's prompt (its standard input)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 30) -> int:
        """Wait for the exit status; collect stdout and stderr, and close the pipes."""
        code = self.proc.wait(timeout=timeout)
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()
        if self.reader is not None:
            self.reader.join(timeout=5)
        self.stderr = "".join(self.seen)
        self.close()
        return code

    def close(self) -> None:
        """End the process if it still runs (by its own handle), and close the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.reader is not None:
            self.reader.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


StartLogin = Callable[..., Login]


@pytest.fixture
def start_login() -> Iterator[StartLogin]:
    """Start ``credproxy login PROVIDER --no-browser ARGS`` (``start(dirs, provider, *args)``).

    Whatever still runs is ended after the test.
    """
    started: list[Login] = []

    def start(dirs: Dirs, provider: str, *args: str) -> Login:
        proc = subprocess.Popen(
            [CREDPROXY, "login", provider, "--no-browser", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dirs.env(),
        )
        login = Login(proc)

        def read() -> None:
            assert proc.stderr is not None
            for text in proc.stderr:
                login.seen.append(text)
                login.lines.put(text)

        login.reader = threading.Thread(target=read, daemon=True)
        login.reader.start()
        started.append(login)
        return login

    yield start
    for login in started:
        login.close()
