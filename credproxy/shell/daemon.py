"""The daemon: process lifecycle, the control socket, status (trio shell).

Task tree::

    serve()
     ├─ refresh nursery      upstream refreshes (outlive the session that asked;
     │                        drained with a grace period on shutdown)
     └─ main nursery
         ├─ serving loop      every sandbox connection (its own thread in
         │                     `credproxy serve`, a trio task in tests)
         ├─ control accept loop ─ one task per control connection
         ├─ idle-exit watch, watchdog pings, signal watch, config file watch
         └─ one supervisor task per session (see credproxy.shell.sessions)

Tokens (lookup, serving, refresh, renewal) are :class:`~credproxy.shell.tokens.Tokens`;
sessions are :class:`~credproxy.shell.sessions.Sessions`; what requests mean is
:mod:`credproxy.shell.handlers`. This module starts them, reports on them,
reloads the configuration into them (:meth:`Daemon.reload`), and stops them.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import functools
import gc
import os
import random
import resource
import signal
import socket as stdsocket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import trio

from credproxy.core.config import SIGNING_GRANTS, Config, Provider
from credproxy.core.failover import BucketMarks
from credproxy.core.names import Key
from credproxy.core.oauth import TokenEndpoint
from credproxy.core.servecore import Hold, Release, ServingCore
from credproxy.errors import ConfigError, CredproxyError, StoreError, UsageError
from credproxy.shell import faults, logs, paths, systemd
from credproxy.shell.handlers import ControlOps, SandboxOps
from credproxy.shell.http import ApiClient
from credproxy.shell.loopproxy import LoopProxy
from credproxy.shell.proxy import ApiProxy, Handed, keep_big_blocks_off_the_heap
from credproxy.shell.server import (
    accept_forever,
    bind_unix,
    make_private_dir,
    peer_credentials,
    refuse,
)
from credproxy.shell.servingloop import LoopStopped, ServingLoop
from credproxy.shell.sessions import Session, Sessions
from credproxy.shell.store import TokenStore
from credproxy.shell.streams import serve_stream
from credproxy.shell.tokens import Tokens

log = logs.get("credproxy.daemon")

SHUTDOWN_GRACE = 8.0  # seconds for in-flight refreshes to land; < TimeoutStopSec (10 s)
UPSTREAM_TIMEOUT = 6.0  # per phase of a refresh request; a sent request fits the grace
CONFIG_POLL = 2.0  # seconds between looks at the config file's signature
# Seconds a new daemon waits for one that is stopping (it no longer listens but
# holds daemon.lock while its refreshes land): the grace, and its way out after.
LOCK_WAIT = SHUTDOWN_GRACE + 2.0


_BOOT_CLOCK = functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)

Signature = tuple[int, int, int]  # a config file's (mtime in ns, size, inode): config_signature


class Unseen(enum.Enum):
    """:func:`serve`'s default *config_seen*: the file's signature is taken at start."""

    TAKE_AT_START = enum.auto()


def version() -> str:
    from credproxy._version import __version__

    return __version__


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


class Daemon:
    """The running daemon: what :func:`serve` started, and what ``status`` reports."""

    def __init__(
        self,
        cfg: Config,
        store: TokenStore,
        tokens: Tokens,
        sessions: Sessions,
        loop: ServingLoop[Session],
        ops: SandboxOps,
        proxy: ApiProxy,
        *,
        wall_clock: Callable[[], float],
        idle_exit: float | None,
        config_path: Path | None = None,
        config_seen: Signature | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.tokens = tokens
        self.sessions = sessions
        self.loop = loop
        self.ops = ops
        self.proxy = proxy
        self.config_path = config_path  # None: given in memory, nothing to reload
        # The signature of the file as it was when self.cfg was read from it
        # (taken before the read: an edit saved after it is new to the watch).
        self.config_seen = config_seen
        self._reloading = trio.Lock()
        self.wall = wall_clock
        self.idle_exit = idle_exit
        self.uid = os.getuid()
        self.control_connections = 0
        # When a connection (control or sandbox) or a session last came or
        # went, on trio's clock: the idle time counts from here (idle_watch).
        self.last_activity = trio.current_time()
        self.started = wall_clock()
        self.stop_event = trio.Event()
        self.failure: str | None = None  # why the daemon stops on its own, if it does

    def stop(self) -> None:
        self.stop_event.set()

    def touch(self) -> None:
        """A connection or a session came or went: the idle time starts again from now."""
        self.last_activity = trio.current_time()

    def fail(self, why: str) -> None:
        """Stop, and exit non-zero: something the daemon cannot serve without broke."""
        if self.failure is None:
            self.failure = why
            log.error("daemon_failed", why=why, next="exiting with status 1")
        self.stop_event.set()

    # -- reload ----------------------------------------------------------------

    async def reload(self, source: str = "command") -> dict[str, Any]:
        """Re-read the config file and serve with it; returns the file and what changed.

        New requests of running sessions follow the new providers (and their
        ``api`` sections), limits (for connections accepted from now on),
        renewal, failover, proxy and notify settings, where their grants
        allow. *source* (command, signal, file) is logged. Returns once the
        serving loop serves with the new providers.

        Raises:
            ConfigError: the file is invalid (file, line and field); the
                running configuration is kept.
            UsageError: the daemon was given its configuration in memory.
        """
        if self.config_path is None:
            raise UsageError("this daemon was started without a config file; nothing to reload")
        async with self._reloading:
            seen = config_signature(self.config_path)
            try:
                cfg = paths.load_config(self.config_path)
            except ConfigError as exc:
                self.config_seen = seen  # the watch does not retry the same bad file
                log.warning(
                    "config_reload_failed",
                    source=source,
                    error=str(exc),
                    next="the running configuration is kept; fix the file, then credproxy reload",
                )
                raise
            self.config_seen = seen
            systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                changes = config_changes(self.cfg, cfg)
                await self._apply(cfg)
            finally:
                systemd.notify("READY=1")
            log.info("config_reloaded", source=source, file=str(self.config_path), **changes)
            return {"file": str(self.config_path), **changes}

    async def _apply(self, cfg: Config) -> None:
        """Hand *cfg* to every part that reads the configuration (design.md §6.5)."""
        self.cfg = cfg  # control connections' limits
        self.tokens.cfg = cfg  # serving decisions, renewal, notify
        self.tokens.refresher.cfg = cfg  # where each refresh goes
        self.tokens.holds.cfg = cfg.failover  # quota holds set from now on
        # api sections, proxy limits; a WebSocket whose api section changed ends
        self.proxy.reconfigure(cfg)
        self.loop.limits = cfg.limits  # sandbox connections accepted from now on
        await self.sessions.reconfigure(cfg.providers, cfg.limits.max_connections)
        for key in self.tokens.stale_mints():
            # Minted under the old configuration (a narrowing taken back): not
            # served from now on; the next get_token mints under the new one.
            await self.sessions.token_changed(key, True)

    async def reload_logged(self, source: str) -> None:
        """:meth:`reload` for a signal or the file watch: a failure is logged, not raised."""
        with contextlib.suppress(ConfigError):
            await self.reload(source)

    async def watch_config(self, interval: float) -> None:
        """Reload when the config file's signature (mtime, size, inode) changes.

        Looked at every *interval* seconds; a new signature is acted on once
        two looks in a row see it, so a file still being written is not read
        half way. A file that is missing for a moment (an editor saving
        through a rename) is waited out: the running configuration stays
        until the file is back (``credproxy reload`` applies a deleted file's
        defaults).
        """
        assert self.config_path is not None
        last = self.config_seen
        while True:
            await trio.sleep(interval)
            now = config_signature(self.config_path)
            if now is not None and now != self.config_seen and now == last:
                await self.reload_logged("file")
            last = now

    # -- conveniences for callers in the same process (tests, docs) ------------

    async def open_session(self, *args: Any) -> Any:
        return await self.sessions.open(*args)

    async def close_session(self, sid: str) -> bool:
        return await self.sessions.close(sid)

    async def token_changed(self, key: tuple[str, str]) -> int:
        """The command line changed *key* in the store; returns the timers stopped.

        The control op ``token_changed`` (import, login, logout) calls this;
        once it returns, no sandbox is served the old token, and after a
        logout no WebSocket its token opened is open.
        """
        k = Key(*key)
        still_stored = self.tokens.changed(k)
        stopped = await self.sessions.token_changed(k, still_stored)
        if not still_stored:
            # A logout: an open WebSocket was let in with the removed login's
            # token, and ends with it.
            self.proxy.end_tunnels(k)
        return stopped

    async def release(self, provider: str, bucket: str | None) -> int:
        """End every quota hold on *provider* (or one bucket of it): the daemon's and the sessions'.

        The control op ``release`` (``credproxy release P[:B]``) calls this.
        """
        now = self.wall()
        ended = self.tokens.release(provider, bucket)
        for session in self.sessions:
            for key in [k for k in tuple(session.holds) if k.provider == provider]:
                if bucket is None or key.bucket == bucket:
                    ended += session.holds.pop(key).held(now)
        # The serving loop drops them too, and every profile of *provider*
        # starts again from its first bucket (fill-first comes back); in
        # effect by the time this returns.
        self.loop.command(Release(provider, bucket))
        await self.loop.ask(lambda core: None)
        log.info("holds_released", provider=provider, bucket=bucket, released=ended)
        return ended

    def known(self) -> tuple[Mapping[str, Provider], set[Key], list[str]]:
        """What a grant may name: configured providers, stored logins, API keys.

        Raises:
            StoreError: the store could not be listed.
        """
        store = self.store
        stored = {Key(p, b) for p in store.providers() for b in store.buckets(p)}
        return self.cfg.providers, stored, store.key_names()

    def holds(self) -> list[dict[str, Any]]:
        """Every quota hold in force: bucket, who set it (daemon or a session), and its end."""
        now = self.wall()
        found = [(k, "daemon", until) for k, until in self.tokens.daemon_holds()]
        for s in self.sessions:
            found += [
                (k, f"session {s.id}", marks.quota_until)
                for k, marks in sorted(s.holds.items())
                if marks.quota_until is not None and marks.held(now)
            ]
        return [
            {
                "provider": k.provider,
                "bucket": k.bucket,
                "source": source,
                "until": iso(until),
                "ends_in": round(until - now),
            }
            for k, source, until in found
        ]

    # -- control socket ------------------------------------------------------

    async def accept_control(
        self, listener: trio.socket.SocketType, ops: ControlOps, nursery: trio.Nursery
    ) -> None:
        async for sock in accept_forever(listener):
            self.touch()  # (a refused peer too: it is a connection)
            pid, uid, _ = peer_credentials(sock)
            if uid != self.uid:
                log.warning("peer_refused", socket="control", uid=uid, pid=pid)
                nursery.start_soon(
                    refuse, sock, "UNAUTHORIZED", f"uid {uid} may not use the control socket"
                )
                continue
            nursery.start_soon(self._control_connection, sock, ops.table(pid))

    async def _control_connection(self, sock: trio.socket.SocketType, table: Any) -> None:
        self.control_connections += 1
        try:
            await serve_stream(trio.SocketStream(sock), table, self.cfg.limits, "control")
        except Exception:  # last resort: one connection must never take the daemon down
            log.exception("connection_crashed", conn="control")
        finally:
            self.control_connections -= 1
            self.touch()

    # -- status --------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        now = self.wall()
        sessions = []
        for s in self.sessions:
            renewals = []
            for k, (timer, _scope) in sorted(s.timers.items()):
                health = timer.health
                renewals.append(
                    {
                        "provider": k.provider,
                        "bucket": k.bucket,
                        "next_renewal": iso(timer.deadline),
                        "next_renewal_in": None
                        if timer.deadline is None
                        else round(timer.deadline - now),
                        "failures": health.failures,
                        "last_error": health.last_error,
                        "reauth_required": health.reauth_required,
                        "gave_up": timer.gave_up,
                    }
                )
            sessions.append(
                {
                    "id": s.id,
                    "name": s.name,
                    "socket": str(s.socket_path),
                    "grants": s.grants.specs(),
                    "allow_uids": sorted(s.allow_uids),
                    "launcher_pid": s.launcher_pid,
                    "connections": s.connections,
                    "created": iso(s.created),
                    "renewals": renewals,
                    "profiles": await self.ops.profiles_status(s),
                }
            )
        keys = {Key(p, b) for p in self.store.providers() for b in self.store.buckets(p)}
        for name, prov in self.cfg.providers.items():
            # Minted on first use: listed before then too.
            keys.update(Key(name, b) for b in prov.minted_buckets())
        tokens = [self._token_status(key, now) for key in sorted(keys)]
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": version(),
                "running_since": iso(self.started),
                "connections": self.sessions.connections + self.control_connections,
            },
            "sessions": sessions,
            "tokens": tokens,
            "holds": self.holds(),
            "keys": self.store.key_names(),
        }

    def _token_status(self, key: Key, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"provider": key.provider, "bucket": key.bucket}
        prov = self.cfg.providers.get(key.provider)
        if prov is not None and prov.grant in SIGNING_GRANTS:
            out["grant"] = prov.grant
            narrow = prov.narrow.get(key.bucket)
            if narrow is not None:
                out["narrow"] = msgspec.to_builtins(narrow)
        try:
            entry = self.tokens.entry(key)
        except StoreError as exc:
            out["error"] = str(exc)
            return out
        if entry is not None:
            expiry = self.tokens.expiry(entry)  # what is true, whatever the wall clock did
            out["expiry"] = iso(expiry)
            out["expires_in"] = None if expiry is None else round(expiry - now)
            out["refreshable"] = entry.refreshable
        health = self.tokens.known_health(key)
        if health is not None:
            out.update(
                failures=health.failures,
                last_error=health.last_error,
                reauth_required=health.reauth_required,
                last_refresh=iso(health.last_refresh),
                refreshes=health.refreshes,
                unsaved_since=iso(health.unsaved_since),
                save_failures=health.save_failures,
            )
        nexts = [
            deadline
            for s in self.sessions
            if key in s.timers and (deadline := s.timers[key][0].deadline) is not None
        ]
        out["next_renewal"] = iso(min(nexts)) if nexts else None
        return out

    # -- background tasks ----------------------------------------------------

    async def idle_watch(self) -> None:
        """Stop after ``idle_exit`` seconds with no session and no connection.

        Idleness counts from :attr:`last_activity`, which every accepted
        connection, every connection's close and every session's opening and
        closing set (:meth:`touch`), not from what happens to be open when
        this watch looks: a ping that lasts a millisecond keeps the daemon up
        for ``idle_exit`` seconds more. ``credproxy run`` relies on that: it
        pings, then opens its session on a second connection.
        """
        assert self.idle_exit is not None
        while True:
            if len(self.sessions) or self.control_connections:
                self.touch()  # busy: idle at the earliest idle_exit after the last one leaves
            deadline = self.last_activity + self.idle_exit
            if trio.current_time() >= deadline:
                log.info("idle_exit", idle_seconds=self.idle_exit)
                self.stop()
                return
            await trio.sleep_until(deadline)  # (a touch meanwhile moves it: looked at again)


def config_signature(path: Path) -> Signature | None:
    """What tells an edited config file apart: (mtime in ns, size, inode); None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def config_changes(old: Config, new: Config) -> dict[str, list[str]]:
    """The provider names added, removed and changed, and the other sections that changed."""
    was, now = old.providers, new.providers
    return {
        "providers_added": sorted(now.keys() - was.keys()),
        "providers_removed": sorted(was.keys() - now.keys()),
        "providers_changed": sorted(p for p in was.keys() & now.keys() if was[p] != now[p]),
        "sections_changed": sorted(
            name
            for name in Config.__struct_fields__
            if name != "providers" and getattr(old, name) != getattr(new, name)
        ),
    }


def _status_notifier(get_sessions: Callable[[], Sessions | None]) -> Callable[[], None]:
    last = [""]

    def changed() -> None:
        sessions = get_sessions()
        if sessions is None:
            return
        text = f"STATUS={len(sessions)} sessions, {sessions.timer_count()} renewal timers"
        if text != last[0]:
            last[0] = text
            systemd.notify(text)

    return changed


async def _take_instance_lock(runtime: Path, control_path: Path) -> int:
    """Take ``daemon.lock``, held for our lifetime: one daemon per runtime directory.

    Binding first and probing a stale socket is not enough on its own: a
    daemon that has bound but not yet listened refuses the probe, and a second
    daemon would unlink its socket. The lock closes that window. It is opened
    ``O_NOFOLLOW`` and must be a regular file of ours: a planted symlink is
    refused, not followed.

    A holder that listens on *control_path* is a running daemon: refused at
    once. One that does not is stopping (it closed its listeners and holds the
    lock until its refreshes land) or starting: waited for, ``LOCK_WAIT``
    seconds at most, so that the daemon ``credproxy run`` starts while the
    last one stops takes over from it instead of exiting.

    Raises:
        CredproxyError: another daemon runs, or still holds the lock after the wait.
    """
    fd = paths.open_nofollow(runtime / "daemon.lock", os.O_RDWR, "instance lock")
    deadline = trio.current_time() + LOCK_WAIT
    said = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                return fd
            if _listens(control_path) or trio.current_time() >= deadline:
                raise CredproxyError(
                    f"another credproxy daemon is running (it holds {runtime}/daemon.lock)"
                )
            if not said:
                said = True
                log.info("waiting_for_daemon", why="it holds daemon.lock and does not listen")
            await trio.sleep(0.05)
    except BaseException:
        os.close(fd)
        raise


def _listens(path: Path) -> bool:
    """Whether something listens on the Unix socket *path* (a connect that is not refused)."""
    with stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a full backlog says "listening" at once (EAGAIN)
        try:
            probe.connect(str(path))
        except BlockingIOError:
            return True
        except OSError:
            return False
    return True


def _check_state_dir(root: Path) -> None:
    """Refuse a state directory that is not ours; repair (and say so) one others may write."""
    old = paths.secure_dir(root, what="state directory", follow_symlinks=True)
    if old is not None:
        log.warning("directory_repaired", path=str(root), mode=f"{old:04o}", now="0700")


async def serve(
    cfg: Config,
    *,
    store: TokenStore,
    runtime: Path,
    endpoint: TokenEndpoint,
    idle_exit: float | None = None,
    wall_clock: Callable[[], float] = time.time,
    boot_clock: Callable[[], float] = _BOOT_CLOCK,
    rng: random.Random | None = None,
    handle_signals: bool = False,
    inherited: list[stdsocket.socket] | None = None,
    serving_thread: bool = False,
    config_path: Path | None = None,
    config_seen: Signature | Unseen | None = Unseen.TAKE_AT_START,
    config_poll: float | None = CONFIG_POLL,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT, idle exit, or :meth:`Daemon.stop`.

    *config_path* is the file *cfg* was read from: ``reload``, SIGHUP (with
    *handle_signals*) and a watch of the file every *config_poll* seconds
    (None: no watch) re-read it. Without it the configuration is *cfg* for the
    daemon's life. *config_seen* is the file's :func:`config_signature` taken
    just before *cfg* was read (None: there was no file), so that the watch
    loads an edit saved since; by default it is taken when the daemon starts,
    and such an edit waits for the next one (or ``credproxy reload``).

    *inherited* are listening sockets passed by systemd; without them the
    control socket is bound under *runtime* (and removed on exit). With
    *serving_thread* the serving loop of sandbox connections runs in its own
    thread (``credproxy serve``; the wall clock must then be ``time.time``),
    else as a trio task on trio's clock (tests under ``autojump_clock``).
    Startup errors (another daemon, an unusable directory) raise before
    ``task_status.started()``.

    Each step below is entered in order on one exit stack, and undone in the
    reverse order (design.md §6.1 and §6.5).
    """
    if serving_thread and (wall_clock is not time.time or boot_clock is not _BOOT_CLOCK):
        raise ValueError("the serving thread reads the real clocks; pass no others")
    _check_state_dir(store.root)
    make_private_dir(runtime, searchable_ok=False)  # no session yet: nothing is shared
    control_path = runtime / "credproxy.sock"
    daemon: Daemon | None = None

    def fail(why: str) -> None:  # the serving loop crashed
        if daemon is not None:
            daemon.fail(why)

    # Entered top to bottom; on the way out (stop, or an error) undone bottom to top.
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(  # out: release it, log daemon_stopped
            _instance_lock(runtime, control_path)
        )
        stack.enter_context(_own_control_path(control_path, own=not inherited))  # out: unlink
        _clear_sessions_dir(runtime / "s")
        listeners = await stack.enter_async_context(_listeners(control_path, inherited))
        api_client = await stack.enter_async_context(_api_client(cfg))
        sigs = stack.enter_context(_signals(handle_signals))
        tokens = await stack.enter_async_context(  # out: refreshes get SHUTDOWN_GRACE
            _refreshes(cfg, store, endpoint, wall_clock, boot_clock, rng)
        )
        main = await stack.enter_async_context(trio.open_nursery())
        loop, ops, proxy = _serving_parts(
            cfg, tokens, store, api_client, wall_clock, boot_clock, serving_thread, on_crash=fail
        )
        main.start_soon(proxy.hangups.run)
        if isinstance(config_seen, Unseen):
            config_seen = None if config_path is None else config_signature(config_path)
        daemon = _daemon(
            cfg,
            store,
            tokens,
            loop,
            ops,
            proxy,
            main,
            runtime,
            wall_clock,
            idle_exit,
            config_path,
            config_seen,
        )
        stack.enter_context(_serving_loop(loop, main, serving_thread))  # out: stop its thread
        _start_control(daemon, main, listeners, sigs, config_poll)
        await _until_stopped(daemon, main, listeners, control_path, not inherited, task_status)
    if daemon is not None and daemon.failure is not None:
        raise DaemonFailed(daemon.failure)


# -- the steps of serve(), in the order it takes them ----------------------------


@contextlib.asynccontextmanager
async def _instance_lock(runtime: Path, control_path: Path) -> AsyncIterator[None]:
    """Hold ``daemon.lock`` (see :func:`_take_instance_lock`); the last thing released."""
    lock_fd = await _take_instance_lock(runtime, control_path)
    try:
        yield
    finally:
        os.close(lock_fd)
        log.info("daemon_stopped")


@contextlib.contextmanager
def _own_control_path(control_path: Path, *, own: bool) -> Iterator[None]:
    """On the way out, remove the control socket if we bind it (never systemd's)."""
    try:
        yield
    finally:
        if own:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control_path)


def _clear_sessions_dir(sessions_dir: Path) -> None:
    """Create ``s/`` (0700) and remove the session sockets a daemon that crashed left there."""
    make_private_dir(sessions_dir, searchable_ok=False)
    for stale in os.listdir(sessions_dir):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sessions_dir / stale)


@contextlib.asynccontextmanager
async def _listeners(
    control_path: Path, inherited: list[stdsocket.socket] | None
) -> AsyncIterator[list[trio.socket.SocketType]]:
    """The control listeners: systemd's sockets, else our own bound at *control_path*."""
    listeners: list[trio.socket.SocketType] = []
    try:
        if inherited:
            listeners = [trio.socket.from_stdlib_socket(s) for s in inherited]
        else:
            listeners = [await bind_unix(control_path)]
        yield listeners
    finally:
        for listener in listeners:
            listener.close()


@contextlib.asynccontextmanager
async def _api_client(cfg: Config) -> AsyncIterator[ApiClient]:
    """The API proxy's HTTP client (it connects on first use); closed, shielded, on the way out."""
    api_client = ApiClient(read=cfg.proxy.read_timeout)
    try:
        yield api_client
    finally:
        with trio.CancelScope(shield=True):
            await api_client.aclose()


@contextlib.contextmanager
def _signals(handle_signals: bool) -> Iterator[AsyncIterator[int] | None]:
    """SIGTERM, SIGINT and SIGHUP as an async iterator (for :func:`_signal_watch`), if asked."""
    if not handle_signals:
        yield None
        return
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        yield sigs


@contextlib.asynccontextmanager
async def _refreshes(
    cfg: Config,
    store: TokenStore,
    endpoint: TokenEndpoint,
    wall_clock: Callable[[], float],
    boot_clock: Callable[[], float],
    rng: random.Random | None,
) -> AsyncIterator[Tokens]:
    """The refresh nursery and :class:`Tokens`, which starts refreshes in it.

    On the way out (after the main nursery, so sessions and timers are gone)
    new refreshes are refused and those whose request went out get
    ``SHUTDOWN_GRACE`` to land on disk.
    """
    async with trio.open_nursery() as refresh_nursery:
        tokens = Tokens(
            cfg,
            store,
            endpoint,
            refresh_nursery,
            wall_clock=wall_clock,
            boot_clock=boot_clock,
            rng=rng or random.Random(),  # noqa: S311 - jitter, not crypto
        )
        try:
            yield tokens
        finally:
            tokens.close()
            refresh_nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE


def _serving_parts(
    cfg: Config,
    tokens: Tokens,
    store: TokenStore,
    api_client: ApiClient,
    wall_clock: Callable[[], float],
    boot_clock: Callable[[], float],
    serving_thread: bool,
    *,
    on_crash: Callable[[str], None],
) -> tuple[ServingLoop[Session], SandboxOps, ApiProxy]:
    """Build the serving loop (:class:`ServingLoop`), its :class:`SandboxOps`, and the API proxy.

    Nothing starts here: :func:`_serving_loop` starts the loop, and the caller
    the proxy's hang-up watch. In its own thread the loop reaches trio through
    ``run_sync_soon`` and keeps time with ``time.monotonic``; as a trio task it
    calls straight in and uses trio's clock. *on_crash* is told why, if the
    loop crashes.
    """
    sandbox_ops = SandboxOps(tokens, store, wall_clock, boot_clock)
    proxy = ApiProxy(cfg, tokens, sandbox_ops, api_client)

    def start_http(
        session: Session, sock: stdsocket.socket, data: bytes, handed: Handed | None = None
    ) -> None:
        if not session.open or session.nursery is None:
            sock.close()
            session.connection_closed()
            return
        session.nursery.start_soon(proxy.serve, session, sock, data, handed)

    to_trio: Callable[..., None]
    clock: Callable[[], float]
    if serving_thread:
        to_trio, clock = trio.lowlevel.current_trio_token().run_sync_soon, time.monotonic
    else:
        to_trio, clock = _call_now, trio.current_time
    loop = ServingLoop(
        ServingCore(cfg.providers),
        sandbox_ops,
        cfg.limits,
        to_trio=to_trio,
        clock=clock,
        wall=wall_clock,
        boot=boot_clock,
        on_crash=on_crash,
        fault=store.fault,
    )
    sandbox_ops.loop = loop
    # The API proxy's requests are relayed in the loop itself; what it does not
    # serve there goes to the trio side (start_http) at the start of a request.
    loop.relay = LoopProxy(loop, proxy, start_http)

    def hold_changed(key: Key, marks: BucketMarks | None) -> None:
        loop.command(Hold(key, None if marks is None else marks.quota_until))

    tokens.holds.on_change = hold_changed  # the loop sees the daemon's holds as they change
    return loop, sandbox_ops, proxy


def _daemon(
    cfg: Config,
    store: TokenStore,
    tokens: Tokens,
    loop: ServingLoop[Session],
    ops: SandboxOps,
    proxy: ApiProxy,
    main: trio.Nursery,
    runtime: Path,
    wall_clock: Callable[[], float],
    idle_exit: float | None,
    config_path: Path | None,
    config_seen: Signature | None,
) -> Daemon:
    """:class:`Sessions` (their supervisors run in *main*) and the :class:`Daemon` over it all."""
    daemon: Daemon | None = None
    notify_status = _status_notifier(lambda: daemon.sessions if daemon else None)

    def changed() -> None:  # (in the trio thread) a session, connection or timer came or went
        if daemon is not None:
            daemon.touch()
        notify_status()

    sessions = Sessions(
        runtime / "s",
        loop,
        cfg.limits.max_connections,
        main,
        wall_clock=wall_clock,
        on_change=changed,
    )
    daemon = Daemon(
        cfg,
        store,
        tokens,
        sessions,
        loop,
        ops,
        proxy,
        wall_clock=wall_clock,
        idle_exit=idle_exit,
        config_path=config_path,
        config_seen=config_seen,
    )
    return daemon


@contextlib.contextmanager
def _serving_loop(
    loop: ServingLoop[Session], main: trio.Nursery, serving_thread: bool
) -> Iterator[None]:
    """Start the serving loop: its own thread (stopped and joined on the way out), or a task.

    As a task of *main* it stops when the main nursery is cancelled.
    """
    if not serving_thread:
        main.start_soon(loop.run_in_trio)
        yield
        return
    loop.start_thread()
    try:
        yield
    finally:
        loop.stop()


def _start_control(
    daemon: Daemon,
    main: trio.Nursery,
    listeners: list[trio.socket.SocketType],
    sigs: AsyncIterator[int] | None,
    config_poll: float | None,
) -> None:
    """Start the control accept loop(s), and the idle-exit, signal, config and watchdog tasks."""
    control_ops = ControlOps(
        daemon.sessions,
        daemon.token_changed,
        daemon.status,
        version(),
        daemon.release,
        daemon.reload,
        daemon.stop,
        daemon.known,
    )
    for listener in listeners:
        main.start_soon(daemon.accept_control, listener, control_ops, main)
    if daemon.idle_exit is not None:
        main.start_soon(daemon.idle_watch)
    if daemon.config_path is not None and config_poll is not None:
        main.start_soon(daemon.watch_config, config_poll)
    if sigs is not None:
        main.start_soon(_signal_watch, sigs, daemon)
    interval = systemd.watchdog_interval()
    if interval:
        main.start_soon(_watchdog, interval, daemon.loop)


async def _until_stopped(
    daemon: Daemon,
    main: trio.Nursery,
    listeners: list[trio.socket.SocketType],
    control_path: Path,
    own_socket: bool,
    task_status: trio.TaskStatus[Daemon],
) -> None:
    """Say we are ready, wait for :meth:`Daemon.stop`, then stop accepting and cancel *main*."""
    log.info(
        "daemon_ready",
        pid=os.getpid(),
        version=version(),
        control=str(control_path) if own_socket else "systemd",
    )
    systemd.notify("READY=1", "STATUS=0 sessions, 0 renewal timers")
    task_status.started(daemon)
    await daemon.stop_event.wait()
    systemd.notify("STOPPING=1")
    log.info("daemon_stopping", sessions=len(daemon.sessions))
    for listener in listeners:  # stop accepting at once
        listener.close()
    main.cancel_scope.cancel()


class DaemonFailed(CredproxyError):
    """The daemon stopped on its own because a part it cannot serve without broke."""


def _call_now(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


async def _signal_watch(sigs: Any, daemon: Daemon) -> None:
    """SIGHUP reloads the configuration; SIGTERM and SIGINT stop the daemon."""
    async for signum in sigs:
        log.info("signal_received", signal=signal.Signals(signum).name)
        if signum == signal.SIGHUP:
            if daemon.config_path is not None:
                await daemon.reload_logged("signal")
            continue
        daemon.stop()
        return


async def _watchdog(interval: float, loop: ServingLoop[Session]) -> None:
    """``WATCHDOG=1`` every *interval* / 2, each once the serving loop has answered.

    The serving loop (its own thread) serves every sandbox: a ping from the trio
    thread alone would go on while it hangs. A question to the loop that is not
    answered within the half interval costs that ping, and systemd restarts the
    daemon once a whole interval passes without one.
    """
    half = interval / 2
    while True:
        start = trio.current_time()
        answered = False
        with trio.move_on_after(half):
            try:
                await loop.ask(lambda core: None)
            except LoopStopped:
                return  # (stopping: nothing to vouch for)
            answered = True
        if answered:
            systemd.notify("WATCHDOG=1")
        else:
            log.warning("serving_loop_unresponsive", waited_s=round(half, 3))
        await trio.sleep_until(start + half)


def raise_fd_limit() -> None:
    """Use the hard RLIMIT_NOFILE: every sandbox connection is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            log.warning("fd_limit_unchanged", soft=soft, hard=hard)


def main(idle_exit: float | None) -> int:
    """``credproxy serve``: configure, then run until told to stop. Returns the exit code."""
    logs.configure()
    os.umask(0o077)  # every file and socket we create is born private
    keep_big_blocks_off_the_heap()  # (big request bodies: see proxy.py)
    fault = faults.from_env()
    config_path = paths.config_file()
    # Signature first: an edit saved while the daemon starts is then new to
    # the file watch, which loads it (taken after the read, it would be missed).
    config_seen = config_signature(config_path)
    cfg = paths.load_config(config_path)
    fault("daemon-config-read")
    raise_fd_limit()
    inherited = [s for _, s in systemd.listen_fds()]
    from credproxy.shell.http import HttpTokenEndpoint  # httpx itself loads at the first refresh

    endpoint = HttpTokenEndpoint(
        timeout=UPSTREAM_TIMEOUT, signing_store=TokenStore(paths.state_dir()).signing_dir
    )

    async def run() -> None:
        try:
            await serve(
                cfg,
                store=TokenStore(paths.state_dir(), fault),
                runtime=paths.runtime_dir(),
                endpoint=endpoint,
                idle_exit=idle_exit,
                handle_signals=True,
                inherited=inherited,
                serving_thread=True,
                config_path=config_path,
                config_seen=config_seen,
            )
        finally:
            with trio.CancelScope(shield=True):
                await endpoint.aclose()

    # What is loaded by now lives as long as the daemon: frozen, the cycle
    # collector's full passes no longer walk it (one took about 20 ms, a stall
    # of every connection the serving loop holds).
    gc.collect()
    gc.freeze()
    try:
        trio.run(run)
    except DaemonFailed:
        return 1  # logged as daemon_failed, with the reason
    return 0
