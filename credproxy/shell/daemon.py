"""The daemon: process lifecycle, the control socket, status (trio shell).

Task tree::

    serve()
     ├─ refresh nursery      upstream refreshes (outlive the session that asked;
     │                        drained with a grace period on shutdown)
     └─ main nursery
         ├─ serving loop      every sandbox connection (its own thread in
         │                     `credproxy serve`, a trio task in tests)
         ├─ control accept loop ─ one task per control connection
         ├─ idle-exit watch, watchdog pings, signal watch
         └─ one supervisor task per session (see credproxy.shell.sessions)

Tokens (lookup, serving, refresh, renewal) are :class:`~credproxy.shell.tokens.Tokens`;
sessions are :class:`~credproxy.shell.sessions.Sessions`; what requests mean is
:mod:`credproxy.shell.handlers`. This module starts them, reports on them, and
stops them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import random
import resource
import signal
import socket as stdsocket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from credproxy.core.config import Config
from credproxy.core.names import Key
from credproxy.core.oauth import TokenEndpoint
from credproxy.errors import CredproxyError, StoreError
from credproxy.shell import faults, logs, paths, systemd
from credproxy.shell.fastpath import FastPath
from credproxy.shell.handlers import ControlOps, SandboxOps
from credproxy.shell.http import ApiClient
from credproxy.shell.proxy import ApiProxy
from credproxy.shell.server import (
    accept_forever,
    bind_unix,
    make_private_dir,
    peer_credentials,
    refuse,
)
from credproxy.shell.sessions import Sessions
from credproxy.shell.store import TokenStore
from credproxy.shell.streams import serve_stream
from credproxy.shell.tokens import Tokens

log = logs.get("credproxy.daemon")

SHUTDOWN_GRACE = 8.0  # seconds for in-flight refreshes to land; < TimeoutStopSec (10 s)
UPSTREAM_TIMEOUT = 6.0  # per phase of a refresh request; a sent request fits the grace


_BOOT_CLOCK = functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)


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
        fast: FastPath,
        *,
        wall_clock: Callable[[], float],
        idle_exit: float | None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.tokens = tokens
        self.sessions = sessions
        self.fast = fast
        self.wall = wall_clock
        self.idle_exit = idle_exit
        self.uid = os.getuid()
        self.control_connections = 0
        self.started = wall_clock()
        self.stop_event = trio.Event()
        self.failure: str | None = None  # why the daemon stops on its own, if it does

    def stop(self) -> None:
        self.stop_event.set()

    def fail(self, why: str) -> None:
        """Stop, and exit non-zero: something the daemon cannot serve without broke."""
        if self.failure is None:
            self.failure = why
            log.error("daemon_failed", why=why, next="exiting with status 1")
        self.stop_event.set()

    # -- conveniences for callers in the same process (tests, docs) ------------

    async def open_session(self, *args: Any) -> Any:
        return await self.sessions.open(*args)

    async def close_session(self, sid: str) -> bool:
        return await self.sessions.close(sid)

    def token_changed(self, key: tuple[str, str]) -> int:
        """The command line changed *key* in the store; returns the timers stopped.

        The control op ``token_changed`` (import, login, logout) calls this.
        """
        k = Key(*key)
        return self.sessions.token_changed(k, self.tokens.changed(k))

    def release(self, provider: str, bucket: str | None) -> int:
        """End every quota hold on *provider* (or one bucket of it): the daemon's and the sessions'.

        The control op ``release`` (``credproxy release P[:B]``) calls this.
        """
        now = self.wall()
        ended = self.tokens.release(provider, bucket)
        for session in self.sessions:
            for key in [k for k in tuple(session.holds) if k.provider == provider]:
                if bucket is None or key.bucket == bucket:
                    ended += session.holds.pop(key).held(now)
            # The profile starts again from its first bucket (fill-first comes back).
            session.current.pop(provider, None)
        log.info("holds_released", provider=provider, bucket=bucket, released=ended)
        return ended

    def holds(self) -> list[dict[str, Any]]:
        """Every quota hold in force: bucket, who set it (daemon or a session), and its end."""
        now = self.wall()
        found = [(k, "daemon", until) for k, until in self.tokens.daemon_holds()]
        for s in self.sessions:
            found += [
                (k, f"session {s.id}", marks.quota_until)
                for k, marks in sorted(s.holds.items())  # (one C-level copy: no race)
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

    # -- status --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
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
                    "profiles": self.fast.ops.profiles_status(s),
                }
            )
        tokens = [
            self._token_status(Key(provider, bucket), now)
            for provider in self.store.providers()
            for bucket in self.store.buckets(provider)
        ]
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
            s.timers[key][0].deadline
            for s in self.sessions
            if key in s.timers and s.timers[key][0].deadline is not None
        ]
        out["next_renewal"] = iso(min(nexts)) if nexts else None
        return out

    # -- background tasks ----------------------------------------------------

    async def idle_watch(self) -> None:
        """Stop after ``idle_exit`` seconds with no session and no connection."""
        assert self.idle_exit is not None
        idle_since: float | None = None
        while True:
            now = trio.current_time()
            if len(self.sessions) or self.control_connections:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= self.idle_exit:
                log.info("idle_exit", idle_seconds=self.idle_exit)
                self.stop()
                return
            await trio.sleep(min(0.25, self.idle_exit))


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


def _take_instance_lock(runtime: Path) -> int:
    """Hold ``daemon.lock`` for our lifetime: one daemon per runtime directory.

    Binding first and probing a stale socket is not enough on its own: a
    daemon that has bound but not yet listened refuses the probe, and a second
    daemon would unlink its socket. The lock closes that window. It is opened
    ``O_NOFOLLOW`` and must be a regular file of ours: a planted symlink is
    refused, not followed.
    """
    fd = paths.open_nofollow(runtime / "daemon.lock", os.O_RDWR, "instance lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CredproxyError(
            f"another credproxy daemon is running (it holds {runtime}/daemon.lock)"
        ) from None
    return fd


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
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT, idle exit, or :meth:`Daemon.stop`.

    *inherited* are listening sockets passed by systemd; without them the
    control socket is bound under *runtime* (and removed on exit). With
    *serving_thread* the serving loop of sandbox connections runs in its own
    thread (``credproxy serve``; the wall clock must then be ``time.time``),
    else as a trio task on trio's clock (tests under ``autojump_clock``).
    Startup errors (another daemon, an unusable directory) raise before
    ``task_status.started()``.
    """
    if serving_thread and (wall_clock is not time.time or boot_clock is not _BOOT_CLOCK):
        raise ValueError("the serving thread reads the real clocks; pass no others")
    _check_state_dir(store.root)
    make_private_dir(runtime, searchable_ok=False)  # no session yet: nothing is shared
    lock_fd = _take_instance_lock(runtime)
    sessions_dir = runtime / "s"
    control_path = runtime / "credproxy.sock"
    own_socket = not inherited
    listeners: list[trio.socket.SocketType] = []
    daemon: Daemon | None = None
    api_client = ApiClient(read=cfg.proxy.read_timeout)
    try:
        make_private_dir(sessions_dir, searchable_ok=False)
        for stale in os.listdir(sessions_dir):  # left by a daemon that crashed
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sessions_dir / stale)
        if inherited:
            listeners = [trio.socket.from_stdlib_socket(s) for s in inherited]
        else:
            listeners = [await bind_unix(control_path)]
        signals = (
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT)
            if handle_signals
            else contextlib.nullcontext()
        )
        with signals as sigs:
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
                    async with trio.open_nursery() as main:
                        sandbox_ops = SandboxOps(
                            tokens,
                            store,
                            wall_clock,
                            boot_clock,
                        )
                        proxy = ApiProxy(cfg, tokens, sandbox_ops, api_client)
                        main.start_soon(proxy.hangups.run)

                        def fail(why: str) -> None:
                            if daemon is not None:
                                daemon.fail(why)

                        def start_http(session: Any, sock: stdsocket.socket, data: bytes) -> None:
                            if not session.open or session.nursery is None:
                                sock.close()
                                session.connection_closed()
                                return
                            session.nursery.start_soon(proxy.serve, session, sock, data)

                        if serving_thread:
                            token = trio.lowlevel.current_trio_token()
                            fast = FastPath(
                                sandbox_ops,
                                cfg.limits,
                                to_trio=token.run_sync_soon,
                                clock=time.monotonic,
                                http=start_http,
                                on_crash=fail,
                                fault=store.fault,
                            )
                        else:
                            fast = FastPath(
                                sandbox_ops,
                                cfg.limits,
                                to_trio=_call_now,
                                clock=trio.current_time,
                                http=start_http,
                                on_crash=fail,
                                fault=store.fault,
                            )
                        changed = _status_notifier(lambda: daemon.sessions if daemon else None)
                        sessions = Sessions(
                            sessions_dir,
                            fast,
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
                            fast,
                            wall_clock=wall_clock,
                            idle_exit=idle_exit,
                        )
                        control_ops = ControlOps(
                            sessions, daemon.token_changed, daemon.status, version(), daemon.release
                        )
                        if serving_thread:
                            fast.start_thread()
                        else:
                            main.start_soon(fast.run_in_trio)
                        try:
                            for listener in listeners:
                                main.start_soon(daemon.accept_control, listener, control_ops, main)
                            if idle_exit is not None:
                                main.start_soon(daemon.idle_watch)
                            if sigs is not None:
                                main.start_soon(_signal_watch, sigs, daemon)
                            interval = systemd.watchdog_interval()
                            if interval:
                                main.start_soon(_watchdog, interval)
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
                            log.info("daemon_stopping", sessions=len(sessions))
                            for listener in listeners:  # stop accepting at once
                                listener.close()
                            main.cancel_scope.cancel()
                        finally:
                            if serving_thread:
                                fast.stop()
                finally:
                    # Sessions and timers are gone with the main nursery. Give
                    # refreshes whose request went out time to land on disk.
                    tokens.close()
                    refresh_nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
    finally:
        with trio.CancelScope(shield=True):
            await api_client.aclose()
        for listener in listeners:
            listener.close()
        if own_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control_path)
        os.close(lock_fd)
        log.info("daemon_stopped")
    if daemon is not None and daemon.failure is not None:
        raise DaemonFailed(daemon.failure)


class DaemonFailed(CredproxyError):
    """The daemon stopped on its own because a part it cannot serve without broke."""


def _call_now(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


async def _signal_watch(sigs: Any, daemon: Daemon) -> None:
    async for signum in sigs:
        log.info("signal_received", signal=signal.Signals(signum).name)
        daemon.stop()
        return


async def _watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await trio.sleep(interval / 2)


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
    cfg = paths.load_config()
    raise_fd_limit()
    inherited = [s for _, s in systemd.listen_fds()]
    from credproxy.shell.http import HttpTokenEndpoint  # httpx itself loads at the first refresh

    endpoint = HttpTokenEndpoint(timeout=UPSTREAM_TIMEOUT)

    async def run() -> None:
        try:
            await serve(
                cfg,
                store=TokenStore(paths.state_dir(), faults.from_env()),
                runtime=paths.runtime_dir(),
                endpoint=endpoint,
                idle_exit=idle_exit,
                handle_signals=True,
                inherited=inherited,
                serving_thread=True,
            )
        finally:
            with trio.CancelScope(shield=True):
                await endpoint.aclose()

    try:
        trio.run(run)
    except DaemonFailed:
        return 1  # logged as daemon_failed, with the reason
    return 0
