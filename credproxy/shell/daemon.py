"""The daemon: control socket, sandbox sessions, dispatch (trio shell).

Task tree::

    serve()
     ├─ refresh nursery      upstream refreshes (outlive the session that asked;
     │                        drained with a grace period on shutdown)
     └─ main nursery
         ├─ control accept loop ─ one task per control connection
         ├─ idle-exit watch, watchdog pings, signal watch
         └─ one supervisor task per session, holding the session's CancelScope
             └─ session nursery
                 ├─ accept loop ─ one task per sandbox connection
                 ├─ launcher watch (pidfd)
                 └─ renewal timers (one per key served)

Closing a session is one ``scope.cancel()``: its listener, connections and
every timer it started go with it, and its socket file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import resource
import secrets
import signal
import socket as stdsocket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from credproxy.core import config as config_mod
from credproxy.core import policy
from credproxy.core.config import Config
from credproxy.core.grants import Grants
from credproxy.core.oauth import TokenEndpoint
from credproxy.core.protocol import Request, ServerConnection, capability_digest, name_field
from credproxy.core.store import DEFAULT_BUCKET, TokenStore
from credproxy.errors import (
    CredproxyError,
    Forbidden,
    NotFound,
    RateLimited,
    ReauthRequired,
    RefreshFailed,
    StoreError,
    UsageError,
)
from credproxy.shell import logs, paths, systemd
from credproxy.shell.renewal import (
    Entry,
    Key,
    Refresher,
    Timer,
    TokenCache,
    renewal_timer,
    retry_after,
)
from credproxy.shell.server import (
    bind_unix,
    make_private_dir,
    peer_credentials,
    refuse,
    serve_connection,
)

log = logs.get("credproxy.shell.daemon")

SHUTDOWN_GRACE = 8.0  # seconds for in-flight refreshes to land; < TimeoutStopSec (10 s)
UPSTREAM_TIMEOUT = 6.0  # per phase of a refresh request; a sent request fits the grace
FORBIDDEN_OPS = frozenset({"save_token", "remove_token"})
_GENERIC = "internal error; see the daemon log"


def version() -> str:
    from credproxy._version import __version__

    return __version__


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(eq=False)
class Session:
    id: str
    name: str
    grants: Grants
    allow_uids: frozenset[int]
    capability: bytes | None
    socket_path: Path
    launcher_pid: int | None
    created: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    nursery: trio.Nursery | None = None
    connections: int = 0
    timers: dict[Key, Timer] = field(default_factory=dict)
    served: dict[Key, list[float]] = field(default_factory=dict)  # key -> [count, last ms]
    closed: trio.Event = field(default_factory=trio.Event)


class Daemon:
    """Everything the daemon knows; the trio tasks are started by :func:`serve`."""

    def __init__(
        self,
        cfg: Config,
        store: TokenStore,
        runtime: Path,
        endpoint: TokenEndpoint,
        *,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        idle_exit: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.runtime = runtime
        self.sessions_dir = runtime / "s"
        self.endpoint = endpoint
        self.wall = wall_clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not crypto
        self.idle_exit = idle_exit
        self.uid = os.getuid()
        self.cache = TokenCache(store, wall_clock)
        self.refresher = Refresher(cfg, store, self.cache, endpoint, wall_clock)
        self.sessions: dict[str, Session] = {}
        self.connections = 0
        self.started = wall_clock()
        self.stop_event = trio.Event()
        self.main: trio.Nursery | None = None

    def stop(self) -> None:
        self.stop_event.set()

    # -- control socket ------------------------------------------------------

    async def accept_control(self, listener: trio.socket.SocketType) -> None:
        async for sock in _accept_forever(listener):
            pid, uid, _ = peer_credentials(sock)
            if uid != self.uid:
                log.warning("peer_refused", socket="control", uid=uid, pid=pid)
                await refuse(sock, "UNAUTHORIZED", f"uid {uid} may not use the control socket")
                continue
            assert self.main is not None
            self.main.start_soon(self._control_connection, sock, pid)

    async def _control_connection(self, sock: trio.socket.SocketType, pid: int) -> None:
        self.connections += 1
        try:
            await serve_connection(sock, ControlHandler(self, pid), self.cfg.limits, "control")
        except Exception:  # last resort: one connection must never take the daemon down
            log.exception("connection_crashed", conn="control")
        finally:
            self.connections -= 1

    # -- sessions ------------------------------------------------------------

    async def open_session(
        self,
        grants: Grants,
        allow_uids: frozenset[int],
        name: str,
        capability: bytes | None,
        launcher_pid: int | None,
    ) -> Session:
        sid = secrets.token_hex(8)
        session = Session(
            id=sid,
            name=name or sid,
            grants=grants,
            allow_uids=allow_uids,
            capability=capability,
            socket_path=self.sessions_dir / f"{sid}.sock",
            launcher_pid=launcher_pid,
            created=self.wall(),
        )
        assert self.main is not None
        await self.main.start(self._run_session, session)
        return session

    async def _run_session(
        self, session: Session, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        make_private_dir(self.sessions_dir)
        pidfd = listener = None
        try:
            if session.launcher_pid is not None:
                try:
                    pidfd = os.pidfd_open(session.launcher_pid)
                except ProcessLookupError:
                    raise UsageError("the launcher exited before its session opened") from None
            listener = await bind_unix(session.socket_path)
            with session.scope:
                async with trio.open_nursery() as nursery:
                    session.nursery = nursery
                    nursery.start_soon(self._accept_sandbox, session, listener)
                    if pidfd is not None:
                        nursery.start_soon(self._watch_launcher, session, pidfd)
                    self.sessions[session.id] = session
                    log.info(
                        "session_opened",
                        session=session.id,
                        name=session.name,
                        grants=session.grants.specs(),
                        allow_uids=sorted(session.allow_uids),
                        launcher_pid=session.launcher_pid,
                    )
                    self._status_changed()
                    task_status.started()
        finally:
            if listener is not None:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(session.socket_path)
            if pidfd is not None:
                os.close(pidfd)
            if self.sessions.pop(session.id, None) is not None:
                log.info(
                    "session_closed",
                    session=session.id,
                    timers_cancelled=sum(1 for t in session.timers.values() if not t.gave_up),
                )
            session.closed.set()
            self._status_changed()

    async def _watch_launcher(self, session: Session, pidfd: int) -> None:
        await trio.lowlevel.wait_readable(pidfd)
        log.info("launcher_exited", session=session.id, pid=session.launcher_pid)
        session.scope.cancel()

    async def close_session(self, sid: str) -> bool:
        session = self.sessions.get(sid)
        if session is None:
            return False
        session.scope.cancel()
        await session.closed.wait()
        return True

    async def _accept_sandbox(self, session: Session, listener: trio.socket.SocketType) -> None:
        assert session.nursery is not None
        async for sock in _accept_forever(listener):
            pid, uid, _ = peer_credentials(sock)
            if uid != self.uid and uid not in session.allow_uids:
                log.warning("peer_refused", session=session.id, uid=uid, pid=pid)
                session.nursery.start_soon(
                    refuse,
                    sock,
                    "UNAUTHORIZED",
                    f"uid {uid} is not allowed on this socket (credproxy run --allow-uid)",
                )
                continue
            if session.connections >= self.cfg.limits.max_connections:
                log.warning("connection_refused", session=session.id, why="connection cap")
                session.nursery.start_soon(
                    refuse,
                    sock,
                    "RESOURCE_EXHAUSTED",
                    f"this session already has {session.connections} connections",
                )
                continue
            session.connections += 1
            self.connections += 1
            session.nursery.start_soon(self._sandbox_connection, session, sock)

    async def _sandbox_connection(self, session: Session, sock: trio.socket.SocketType) -> None:
        try:
            await serve_connection(sock, SessionHandler(self, session), self.cfg.limits, session.id)
        except Exception:  # last resort: one connection must never take the daemon down
            log.exception("connection_crashed", conn=session.id)
        finally:
            session.connections -= 1
            self.connections -= 1

    # -- tokens --------------------------------------------------------------

    def lookup(self, session: Session, payload: dict[str, Any]) -> tuple[Key, Entry]:
        provider = name_field(payload, "provider")
        bucket = name_field(payload, "bucket", default=DEFAULT_BUCKET)
        key = (provider, bucket)
        # Missing and not granted answer alike, so a sandbox cannot probe.
        entry = self.cache.get(key) if session.grants.token_allowed(provider, bucket) else None
        if entry is None:
            raise NotFound(f"no token for {provider}:{bucket} in this session")
        return key, entry

    def serve_entry(
        self, session: Session, conn: ServerConnection, rid: str, key: Key, entry: Entry
    ) -> bytes:
        now = self.wall()
        if entry.refreshable and key not in session.timers and session.nursery is not None:
            assert entry.expiry is not None
            # The deadline is set now, so `status` shows it from the first moment.
            timer = session.timers[key] = Timer(
                deadline=policy.renewal_deadline(entry.expiry, now, self.cfg.renewal, self.rng)
            )
            session.nursery.start_soon(
                renewal_timer, self.refresher, key, entry.expiry, timer, session.id, self.rng
            )
            self._status_changed()
        stats = session.served.get(key)
        if stats is None:
            stats = session.served[key] = [0, 0.0]
        stats[0] += 1
        stats[1] = now * 1000
        log.info(
            "token_served",
            session=session.id,
            provider=key[0],
            bucket=key[1],
            fp=entry.fp,
            expires_in=None if entry.expiry is None else int(entry.expiry - now),
        )
        return conn.reply_ok_raw(rid, entry.served)

    def needs_refresh(self, entry: Entry) -> bool:
        if entry.expiry is None:
            return False
        if not entry.refreshable:
            return entry.expiry <= self.wall()  # expired, nothing to refresh with
        return policy.needs_refresh_on_serve(
            entry.expiry, self.wall(), entry.lifetime, self.cfg.renewal
        )

    async def refresh_for_serve(self, key: Key, entry: Entry) -> Entry:
        """On-demand refresh; falls back to the old token while it is still valid."""
        if not entry.refreshable:
            raise ReauthRequired(
                f"the token for {key[0]}:{key[1]} has expired and there is no refresh token; "
                f"log in again and `credproxy import {key[0]}`"
            )
        try:
            return await self.refresher.refresh(key, entry.expiry, reason="on-demand")
        except (RefreshFailed, ReauthRequired):
            if entry.expiry is not None and entry.expiry > self.wall():
                return entry
            raise

    def token_changed(self, key: Key) -> int:
        """The CLI changed *key* in the store; stop timers if it is gone."""
        self.cache.drop(key)
        if self.store.signature(*key) is not None:
            # A new login: forget the old failures, and let sessions whose
            # renewal had given up (re-auth required) schedule it again on
            # their next get_token.
            self.refresher.status.pop(key, None)
            for session in self.sessions.values():
                timer = session.timers.get(key)
                if timer is not None and timer.done:
                    del session.timers[key]
            log.info("token_replaced", provider=key[0], bucket=key[1])
            return 0
        cancelled = 0
        for session in self.sessions.values():
            timer = session.timers.pop(key, None)
            if timer is not None:
                timer.scope.cancel()
                cancelled += 1
        self.refresher.status.pop(key, None)
        log.info("token_removed", provider=key[0], bucket=key[1], timers_cancelled=cancelled)
        return cancelled

    # -- status --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.wall()
        sessions = []
        for s in self.sessions.values():
            renewals = [
                {
                    "provider": k[0],
                    "bucket": k[1],
                    "next_renewal": iso(t.deadline),
                    "next_renewal_in": None if t.deadline is None else round(t.deadline - now),
                    "failures": t.failures,
                    "last_error": t.last_error,
                    "reauth_required": t.reauth_required,
                    "gave_up": t.gave_up,
                }
                for k, t in sorted(s.timers.items())
            ]
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
                }
            )
        tokens = []
        for provider in self.store.providers():
            for bucket in self.store.buckets(provider):
                tokens.append(self._token_status((provider, bucket), now))
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": version(),
                "running_since": iso(self.started),
                "connections": self.connections,
            },
            "sessions": sessions,
            "tokens": tokens,
            "keys": self.store.key_names(),
        }

    def _token_status(self, key: Key, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {"provider": key[0], "bucket": key[1]}
        try:
            entry = self.cache.get(key)
        except StoreError as exc:
            out["error"] = str(exc)
            return out
        if entry is not None:
            out["expiry"] = iso(entry.expiry)
            out["expires_in"] = None if entry.expiry is None else round(entry.expiry - now)
            out["refreshable"] = entry.refreshable
        st = self.refresher.status.get(key)
        if st is not None:
            out.update(
                failures=st.failures,
                last_error=st.last_error,
                reauth_required=st.reauth_required,
                last_refresh=iso(st.last_refresh),
                refreshes=st.refreshes,
            )
        nexts = [
            s.timers[key].deadline
            for s in self.sessions.values()
            if key in s.timers and s.timers[key].deadline is not None
        ]
        out["next_renewal"] = iso(min(nexts)) if nexts else None  # type: ignore[type-var]
        return out

    def _status_changed(self) -> None:
        timers = sum(len(s.timers) for s in self.sessions.values())
        systemd.notify(f"STATUS={len(self.sessions)} sessions, {timers} renewal timers")

    # -- background tasks ----------------------------------------------------

    async def idle_watch(self) -> None:
        """Stop after ``idle_exit`` seconds with no session and no connection."""
        assert self.idle_exit is not None
        idle_since: float | None = None
        while True:
            now = trio.current_time()
            if self.sessions or self.connections:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= self.idle_exit:
                log.info("idle_exit", idle_seconds=self.idle_exit)
                self.stop()
                return
            await trio.sleep(min(0.25, self.idle_exit))


class ControlHandler:
    """Admin operations; only on the control socket, only for our own uid."""

    capability: bytes | None = None

    def __init__(self, daemon: Daemon, peer_pid: int) -> None:
        self.d = daemon
        self.peer_pid = peer_pid

    def fast(self, conn: ServerConnection, req: Request) -> bytes | None:
        d, p = self.d, req.payload
        try:
            if req.op == "ping":
                return conn.reply_ok(req.id, {"pid": os.getpid(), "version": version()})
            if req.op == "status":
                return conn.reply_ok(req.id, d.status())
            if req.op == "token_changed":
                key = (name_field(p, "provider"), name_field(p, "bucket", default=DEFAULT_BUCKET))
                return conn.reply_ok(req.id, {"timers_cancelled": d.token_changed(key)})
            if req.op in ("open_session", "close_session"):
                return None
            raise UsageError(f"Unknown operation: {req.op}")
        except CredproxyError as exc:
            return conn.reply_error(req.id, exc.code, str(exc))

    async def slow(self, conn: ServerConnection, req: Request) -> bytes:
        p = req.payload
        try:
            if req.op == "open_session":
                grants = Grants.parse(_str_list(p.get("grants", []), "grants"))
                uids = p.get("allow_uids", [])
                if not isinstance(uids, list) or not all(
                    isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 2**32 for u in uids
                ):
                    raise UsageError("'allow_uids' must be a list of uids")
                name = p.get("name") or ""
                if not isinstance(name, str) or len(name) > 128:
                    raise UsageError("'name' must be a string of at most 128 characters")
                cap = p.get("capability")
                if cap is not None and not (
                    isinstance(cap, str)
                    and len(cap) == 64
                    and all(c in "0123456789abcdef" for c in cap)
                ):
                    raise UsageError("'capability' must be 64 lowercase hex characters")
                watch = p.get("watch_launcher", True)
                session = await self.d.open_session(
                    grants,
                    frozenset(uids),
                    name,
                    capability_digest(cap) if cap else None,
                    self.peer_pid if watch else None,
                )
                return conn.reply_ok(
                    req.id, {"session": session.id, "socket": str(session.socket_path)}
                )
            sid = p.get("session")
            if not isinstance(sid, str):
                raise UsageError("missing 'session'")
            if not await self.d.close_session(sid):
                raise NotFound(f"no session {sid}")
            return conn.reply_ok(req.id, {})
        except CredproxyError as exc:
            return conn.reply_error(req.id, exc.code, str(exc))
        except OSError as exc:
            log.error("open_session_failed", error=exc.strerror)
            return conn.reply_error(req.id, "INTERNAL_ERROR", _GENERIC)


class SessionHandler:
    """Operations a sandbox may use, limited to its session's grants."""

    def __init__(self, daemon: Daemon, session: Session) -> None:
        self.d = daemon
        self.s = session
        self.capability = session.capability

    def fast(self, conn: ServerConnection, req: Request) -> bytes | None:
        try:
            return self._fast(conn, req)
        except CredproxyError as exc:
            return self._error(conn, req, exc)

    def _fast(self, conn: ServerConnection, req: Request) -> bytes | None:
        d, s, p, op = self.d, self.s, req.payload, req.op
        if op == "get_token":
            key, entry = d.lookup(s, p)
            if d.needs_refresh(entry):
                return None
            return d.serve_entry(s, conn, req.id, key, entry)
        if op == "refresh_token":
            d.lookup(s, p)  # NOT_FOUND before anything else
            return None
        if op == "list_providers":
            names = [n for n in d.store.providers() if _any_bucket_granted(d, s, n)]
            return conn.reply_ok(req.id, {"providers": names})
        if op == "list_buckets":
            provider = name_field(p, "provider")
            buckets = [b for b in d.store.buckets(provider) if s.grants.token_allowed(provider, b)]
            return conn.reply_ok(req.id, {"buckets": buckets})
        if op == "get_bucket_stats":
            key, _ = d.lookup(s, p)
            stats = s.served.get(key, [0, 0.0])
            total = sum(v[0] for k, v in s.served.items() if k[0] == key[0]) or 1
            out: dict[str, Any] = {
                "bucket": key[1],
                "requestCount": int(stats[0]),
                "percentage": round(100.0 * stats[0] / total, 1),
            }
            if stats[1]:
                out["lastUsed"] = int(stats[1])
            return conn.reply_ok(req.id, out)
        if op == "get_api_key":
            name = name_field(p, "name")
            value = d.store.read_key(name) if s.grants.key_allowed(name) else None
            if value is None:
                raise NotFound(f"no API key {name} in this session")
            log.info("key_served", session=s.id, name=name)
            return conn.reply_ok(req.id, {"key": value})
        if op == "list_api_keys":
            return conn.reply_ok(
                req.id, {"keys": [k for k in d.store.key_names() if s.grants.key_allowed(k)]}
            )
        if op == "has_api_key":
            name = name_field(p, "name")
            exists = s.grants.key_allowed(name) and d.store.read_key(name) is not None
            return conn.reply_ok(req.id, {"exists": exists})
        if op in FORBIDDEN_OPS or op.startswith("oauth_"):
            raise Forbidden(f"{op} is not available to a sandbox")
        raise UsageError(f"Unknown operation: {op}")

    async def slow(self, conn: ServerConnection, req: Request) -> bytes:
        d, s = self.d, self.s
        try:
            key, entry = d.lookup(s, req.payload)
            if req.op == "refresh_token":
                entry = await self._refresh_op(key, entry)
            else:
                entry = await d.refresh_for_serve(key, entry)
            return d.serve_entry(s, conn, req.id, key, entry)
        except CredproxyError as exc:
            return self._error(conn, req, exc)

    async def _refresh_op(self, key: Key, entry: Entry) -> Entry:
        d = self.d
        st = d.refresher.key_status(key)
        # The cooldown counts attempts, not successes: a failing IdP is not
        # hammered by a sandbox that keeps asking.
        left = policy.cooldown_left(st.last_attempt, d.wall(), d.cfg.renewal)
        if left > 0:
            if entry.expiry is None or entry.expiry > d.wall():
                return entry
            raise RateLimited(
                f"{key[0]}:{key[1]} was refreshed moments ago; retry later", retry_after(left)
            )
        if not entry.refreshable:
            raise ReauthRequired(
                f"{key[0]}:{key[1]} cannot be refreshed (no refresh token or no expiry "
                f"stored); log in again and `credproxy import {key[0]}`"
            )
        return await d.refresher.refresh(key, None, reason="requested")

    def _error(self, conn: ServerConnection, req: Request, exc: CredproxyError) -> bytes:
        if exc.code == "INTERNAL_ERROR":
            # Store and other host-side errors: the details (paths, causes) go
            # to the daemon log; the sandbox learns only that it failed.
            log.error("request_failed", session=self.s.id, op=req.op, error=str(exc))
            return conn.reply_error(req.id, "INTERNAL_ERROR", _GENERIC)
        retry = exc.retry_after if isinstance(exc, RateLimited) else None
        return conn.reply_error(req.id, exc.code, str(exc), retry)


def _any_bucket_granted(d: Daemon, s: Session, provider: str) -> bool:
    if not s.grants.provider_visible(provider):
        return False
    return any(s.grants.token_allowed(provider, b) for b in d.store.buckets(provider))


def _str_list(value: object, field_name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"'{field_name}' must be a list of strings")
    return value


async def _accept_forever(listener: trio.socket.SocketType) -> Any:
    """Yield accepted sockets; ride out fd exhaustion instead of dying."""
    while True:
        try:
            sock, _ = await listener.accept()
        except trio.ClosedResourceError:
            return  # the listener was closed: shutdown has begun
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept_failed", error=exc.strerror)
                await trio.sleep(0.1)
                continue
            raise
        yield sock


# --- the whole daemon ---------------------------------------------------------


def _take_instance_lock(runtime: Path) -> int:
    """Hold ``daemon.lock`` for our lifetime: one daemon per runtime directory.

    Binding first and probing a stale socket is not enough on its own: a
    daemon that has bound but not yet listened refuses the probe, and a second
    daemon would unlink its socket. The lock closes that window.
    """
    fd = os.open(runtime / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CredproxyError(
            f"another credproxy daemon is running (it holds {runtime}/daemon.lock)"
        ) from None
    return fd


async def serve(
    cfg: Config,
    *,
    store: TokenStore,
    runtime: Path,
    endpoint: TokenEndpoint,
    idle_exit: float | None = None,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    handle_signals: bool = False,
    inherited: list[stdsocket.socket] | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT, idle exit, or :meth:`Daemon.stop`.

    *inherited* are listening sockets passed by systemd; without them the
    control socket is bound under *runtime* (and removed on exit). Startup
    errors (another daemon, an unusable directory) raise before
    ``task_status.started()``.
    """
    make_private_dir(runtime)
    lock_fd = _take_instance_lock(runtime)
    daemon = Daemon(
        cfg, store, runtime, endpoint, wall_clock=wall_clock, rng=rng, idle_exit=idle_exit
    )
    control_path = runtime / "credproxy.sock"
    own_socket = not inherited
    listeners: list[trio.socket.SocketType] = []
    try:
        make_private_dir(daemon.sessions_dir)
        for stale in os.listdir(daemon.sessions_dir):  # left by a daemon that crashed
            with contextlib.suppress(FileNotFoundError):
                os.unlink(daemon.sessions_dir / stale)
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
                daemon.refresher.nursery = refresh_nursery
                try:
                    async with trio.open_nursery() as main:
                        daemon.main = main
                        for listener in listeners:
                            main.start_soon(daemon.accept_control, listener)
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
                        log.info("daemon_stopping", sessions=len(daemon.sessions))
                        for listener in listeners:  # stop accepting at once
                            listener.close()
                        main.cancel_scope.cancel()
                finally:
                    # Sessions and timers are gone with the main nursery. Give
                    # refreshes whose request went out time to land on disk.
                    daemon.refresher.nursery = None
                    refresh_nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
    finally:
        for listener in listeners:
            listener.close()
        if own_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control_path)
        os.close(lock_fd)
        log.info("daemon_stopped")


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
    cfg = config_mod.load(paths.config_file())
    raise_fd_limit()
    inherited = [s for _, s in systemd.listen_fds()]
    from credproxy.shell.http import HttpTokenEndpoint  # httpx itself loads at the first refresh

    endpoint = HttpTokenEndpoint(timeout=UPSTREAM_TIMEOUT)

    async def run() -> None:
        try:
            await serve(
                cfg,
                store=TokenStore(paths.state_dir()),
                runtime=paths.runtime_dir(),
                endpoint=endpoint,
                idle_exit=idle_exit,
                handle_signals=True,
                inherited=inherited,
            )
        finally:
            with trio.CancelScope(shield=True):
                await endpoint.aclose()

    trio.run(run)
    return 0
