"""Sandbox sessions: their sockets, their connections, their renewal timers (trio shell).

Task tree of one session (all inside the session's cancel scope)::

    Sessions.run_session
     └─ session nursery
         ├─ accept loop: peer checks, then the connection goes to the serving loop
         ├─ launcher watch (pidfd): the launcher exits -> the session closes
         ├─ slow requests handed over by the serving loop
         └─ renewal timers (one per key served, started by its first serve)

What the serving loop needs of a session (its grants, what it may be served
at once, its profiles' current buckets) is a
:class:`~credproxy.core.servecore.SessionState` that the loop owns: it is
handed over with :class:`~credproxy.core.servecore.OpenSession` and changed
only by commands from here on. Closing a session is ``session.open = False``
(no slow request starts), :class:`~credproxy.core.servecore.CloseSession`
sent to the loop (which serves nothing more to it and closes its
connections), and one ``scope.cancel()``: the listener, the slow requests and
every timer go with it, and its socket file is removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket as stdsocket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from credproxy.core.failover import BucketMarks, Profile
from credproxy.core.grants import Grants
from credproxy.core.names import Key
from credproxy.core.renewal import RenewalTimer
from credproxy.core.servecore import (
    CloseSession,
    Forget,
    OpenSession,
    Reconfigure,
    SessionState,
)
from credproxy.core.throttle import Throttle
from credproxy.errors import UsageError
from credproxy.shell import logs
from credproxy.shell.server import (
    accept_forever,
    bind_unix,
    make_private_dir,
    open_path_for_others,
    peer_credentials,
    refuse,
)
from credproxy.shell.servingloop import LoopStopped, ServingLoop

if TYPE_CHECKING:
    from credproxy.core.config import Provider
    from credproxy.shell.tokens import Entry, Tokens

log = logs.get("credproxy.sessions")

REFUSAL_LOG_INTERVAL = 10.0  # seconds between refused-connection log lines of one session
MAX_PEEKING = 8  # refused connections per session that may wait for their first byte


@dataclass(eq=False)
class Session:
    """One sandbox's view of the daemon: its socket, grants, allowed uids, launcher and timers."""

    id: str
    name: str
    grants: Grants
    allow_uids: frozenset[int]
    capability: bytes | None
    socket_path: Path
    launcher_pid: int | None
    created: float
    open: bool = True  # False from the moment closing starts: nothing more is served
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    nursery: trio.Nursery | None = None
    connections: int = 0
    timers: dict[Key, tuple[RenewalTimer, trio.CancelScope]] = field(default_factory=dict)
    # Several accounts: the profile of each provider (None: no profile).
    profiles: dict[str, Profile | None] = field(default_factory=dict)
    # What was last published to the serving loop per key: (fingerprint, until).
    published: dict[Key, tuple[str, float]] = field(default_factory=dict)
    # Quota holds this session's sandbox reported: they hold for it alone.
    holds: dict[Key, BucketMarks] = field(default_factory=dict)
    # The last failover each profile logged: (served bucket, reasons), said once per change.
    failover_said: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    # At most one refused-connection line per interval; the next says how many were not logged.
    refusals: Throttle = field(default_factory=lambda: Throttle(REFUSAL_LOG_INTERVAL))
    # Refused connections whose first byte is being waited for (server.refuse).
    peeking: int = 0
    closed: trio.Event = field(default_factory=trio.Event)
    on_change: Callable[[], None] = lambda: None

    def ensure_timer(self, tokens: Tokens, key: Key, entry: Entry) -> None:
        """Start this session's renewal timer for *key* on its first serve (docs/design.md 3.1)."""
        if not entry.refreshable or self.nursery is None:
            return
        running = self.timers.get(key)
        if running is not None and (running[0].ended is None or running[0].gave_up):
            # A second serve is a no-op for this session; a timer that gave up
            # stays until a new login clears it (docs/design.md 3.4): its
            # refresh token is not presented again on the next serve.
            return
        timer = tokens.new_timer(key, entry)
        scope = trio.CancelScope()
        self.timers[key] = (timer, scope)
        self.nursery.start_soon(self._keep_renewed, tokens, timer, scope, key)
        self.on_change()

    async def _keep_renewed(
        self, tokens: Tokens, timer: RenewalTimer, scope: trio.CancelScope, key: Key
    ) -> None:
        with scope:
            await tokens.keep_renewed(timer, key, self.id)
        self.on_change()

    def connection_closed(self) -> None:
        self.connections -= 1
        self.on_change()


class Sessions:
    """Every open sandbox session of the daemon.

    Args:
        directory: where session sockets are bound.
        loop: the serving loop of every sandbox connection.
        max_connections: open connections per session.
        nursery: where session supervisors run.
        wall_clock: epoch seconds.
        on_change: called when sessions, connections or timers change (STATUS=).
    """

    def __init__(
        self,
        directory: Path,
        loop: ServingLoop[Session],
        max_connections: int,
        nursery: trio.Nursery,
        *,
        wall_clock: Callable[[], float],
        on_change: Callable[[], None],
    ) -> None:
        self.directory = directory
        self.loop = loop
        self.max_connections = max_connections
        self.nursery = nursery
        self.wall = wall_clock
        self.on_change = on_change
        self.uid = os.getuid()
        self.by_id: dict[str, Session] = {}

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self.by_id.values()))

    def __len__(self) -> int:
        return len(self.by_id)

    @property
    def connections(self) -> int:
        return sum(s.connections for s in self.by_id.values())

    def timer_count(self) -> int:
        return sum(len(s.timers) for s in self.by_id.values())

    async def open(
        self,
        grants: Grants,
        allow_uids: frozenset[int],
        name: str,
        capability: bytes | None,
        launcher_pid: int | None,
    ) -> Session:
        """Open a session: bind its socket and start serving it.

        Raises:
            UsageError: the launcher exited before its session opened.
            CredproxyError: the socket could not be bound.
        """
        sid = secrets.token_hex(8)
        session = Session(
            id=sid,
            name=name or sid,
            grants=grants,
            allow_uids=allow_uids,
            capability=capability,
            socket_path=self.directory / f"{sid}.sock",
            launcher_pid=launcher_pid,
            created=self.wall(),
            on_change=self.on_change,
        )
        self.loop.command(OpenSession(SessionState(sid, grants, capability)))
        await self.nursery.start(self._run, session)
        return session

    async def close(self, sid: str) -> bool:
        """Close session *sid* and wait until it is gone; False if there is none."""
        session = self.by_id.get(sid)
        if session is None:
            return False
        self._revoke(session)
        await session.closed.wait()
        with contextlib.suppress(LoopStopped):  # (a stopped loop serves nothing anyway)
            await self.loop.ask(lambda core: None)  # the loop has closed its connections
        return True

    def _revoke(self, session: Session) -> None:
        if session.open:
            session.open = False
            self.loop.command(CloseSession(session.id))
        session.scope.cancel()

    async def _run(
        self, session: Session, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        pidfd = listener = None
        try:
            # (inside the try: if it fails, the loop's state of the session goes too)
            make_private_dir(self.directory)
            if session.launcher_pid is not None:
                try:
                    pidfd = os.pidfd_open(session.launcher_pid)
                except ProcessLookupError:
                    raise UsageError("the launcher exited before its session opened") from None
            listener = await bind_unix(
                session.socket_path,
                for_others=bool(session.allow_uids),
                path_dirs=(self.directory.parent, self.directory),
            )
            with session.scope:
                async with trio.open_nursery() as nursery:
                    session.nursery = nursery
                    nursery.start_soon(self._accept, session, listener)
                    if pidfd is not None:
                        nursery.start_soon(self._watch_launcher, session, pidfd)
                    self.by_id[session.id] = session
                    log.info(
                        "session_opened",
                        session=session.id,
                        name=session.name,
                        grants=session.grants.specs(),
                        allow_uids=sorted(session.allow_uids),
                        launcher_pid=session.launcher_pid,
                    )
                    self.on_change()
                    task_status.started()
        finally:
            self._revoke(session)
            if listener is not None:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(session.socket_path)
                if session.allow_uids:
                    # The last session open to other uids closes the path again.
                    open_path_for_others(
                        (self.directory.parent, self.directory), self.directory, opening=False
                    )
            if pidfd is not None:
                os.close(pidfd)
            if self.by_id.pop(session.id, None) is not None:
                log.info(
                    "session_closed",
                    session=session.id,
                    timers_cancelled=sum(1 for t, _ in session.timers.values() if not t.gave_up),
                )
            session.closed.set()
            self.on_change()

    async def _watch_launcher(self, session: Session, pidfd: int) -> None:
        await trio.lowlevel.wait_readable(pidfd)
        log.info("launcher_exited", session=session.id, pid=session.launcher_pid)
        self._revoke(session)

    async def _accept(self, session: Session, listener: trio.socket.SocketType) -> None:
        assert session.nursery is not None
        async for sock in accept_forever(listener):
            pid, uid, _ = peer_credentials(sock)
            if uid != self.uid and uid not in session.allow_uids:
                suppressed = session.refusals.allow(trio.current_time())
                if suppressed is not None:
                    log.warning(
                        "peer_refused", session=session.id, uid=uid, pid=pid, suppressed=suppressed
                    )
                session.nursery.start_soon(
                    self._refuse,
                    session,
                    sock,
                    "UNAUTHORIZED",
                    f"uid {uid} is not allowed on this socket (credproxy run --allow-uid)",
                )
                continue
            if session.connections >= self.max_connections:
                suppressed = session.refusals.allow(trio.current_time())
                if suppressed is not None:
                    log.warning(
                        "connection_refused",
                        session=session.id,
                        why="connection cap",
                        suppressed=suppressed,
                    )
                session.nursery.start_soon(
                    self._refuse,
                    session,
                    sock,
                    "RESOURCE_EXHAUSTED",
                    f"this session already has {session.connections} connections",
                )
                continue
            session.connections += 1
            self.loop.add(stdsocket.socket(fileno=sock.detach()), session)

    @staticmethod
    async def _refuse(
        session: Session, sock: trio.socket.SocketType, code: str, message: str
    ) -> None:
        """Refuse *sock*; while :data:`MAX_PEEKING` refusals of the session wait for
        their peer's first byte, the others are refused without waiting: a flood of
        silent connections over the cap holds no more of the daemon's descriptors."""
        session.peeking += 1
        try:
            await refuse(sock, code, message, peek=session.peeking <= MAX_PEEKING)
        finally:
            session.peeking -= 1

    async def reconfigure(self, providers: Mapping[str, Provider], max_connections: int) -> None:
        """The configuration was reloaded: new requests of every session follow it.

        Each session's profiles are worked out again (here and in the serving
        loop, :class:`~credproxy.core.servecore.Reconfigure`); the connection
        cap applies to connections accepted from now on. Returns once the
        serving loop serves with *providers*.
        """
        self.max_connections = max_connections
        for session in self.by_id.values():
            session.profiles.clear()
        self.loop.command(Reconfigure(providers))
        with contextlib.suppress(LoopStopped):
            await self.loop.ask(lambda core: None)

    async def token_changed(self, key: Key, still_stored: bool) -> int:
        """The command line changed *key* in the store; returns the timers it stopped.

        Returns once the serving loop serves nothing from the old token.
        """
        self.loop.command(Forget(key))
        for session in self.by_id.values():
            session.published.pop(key, None)
        with contextlib.suppress(LoopStopped):
            await self.loop.ask(lambda core: None)
        if still_stored:
            # A new login: sessions whose renewal had ended (re-auth required,
            # gave up) schedule it again on their next get_token.
            for session in self.by_id.values():
                timer = session.timers.get(key)
                if timer is not None and timer[0].ended is not None:
                    del session.timers[key]
            log.info("token_replaced", provider=key.provider, bucket=key.bucket)
            return 0
        cancelled = 0
        for session in self.by_id.values():
            timer = session.timers.pop(key, None)
            if timer is not None:
                timer[1].cancel()
                cancelled += 1
        log.info(
            "token_removed", provider=key.provider, bucket=key.bucket, timers_cancelled=cancelled
        )
        self.on_change()
        return cancelled
