"""What requests mean: the slow part of a sandbox's operations, and the control socket's.

Handlers are op tables (trio-websocket's ``handlers = {Event: method}``): each
operation returns data or raises a :class:`~credproxy.errors.CredproxyError`;
the connection encodes the reply, clears the in-flight id and hides internal
errors, once (:class:`credproxy.core.connection.Connection`).

A sandbox request is first decided by the serving core
(:class:`~credproxy.core.servecore.ServingCore`), in the serving loop: a
ready token, an answer, an error, or :class:`~credproxy.core.servecore.Defer`
with what it already checked. :class:`SandboxOps` is the trio side of a
deferred request: it runs in the session's nursery (a refresh, the failover
walk, a report, anything that reads the store) and hands the
:data:`~credproxy.core.servecore.Outcome` back to the loop, which writes it.

A served token is published to the core (:class:`~credproxy.core.servecore.Publish`:
the reply bytes and the boot-clock instant after which they must not be
served), so that the next ``get_token`` of that key is answered in the loop.
The first serve of a refreshable token in a session always takes this slow
path, which is where the session's renewal timer is started
(docs/design.md section 3.1).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import trio

from credproxy.core import failover, serving
from credproxy.core.config import Provider
from credproxy.core.failover import BucketMarks, Profile
from credproxy.core.grantcheck import grant_problems
from credproxy.core.grants import Grants
from credproxy.core.names import Key, key_field, name_field
from credproxy.core.protocol import capability_digest
from credproxy.core.servecore import (
    Defer,
    Hold,
    Outcome,
    Publish,
    Read,
    Ready,
    SessionState,
    profile_of,
)
from credproxy.errors import (
    AllBucketsExhausted,
    ConfigError,
    CredproxyError,
    NotFound,
    StoreError,
    UsageError,
)
from credproxy.shell import logs, paths
from credproxy.shell.servingloop import Pending, SandboxConnection, ServingLoop
from credproxy.shell.sessions import Session, Sessions
from credproxy.shell.store import TokenStore
from credproxy.shell.tokens import Entry, Tokens

log = logs.get("credproxy.handlers")
REPUBLISH_BEFORE = 0.5  # seconds before a published answer's end that it is published again
#: The log event of each cause of :func:`credproxy.core.grantcheck.grant_problems`.
_GRANT_EVENTS = {
    "not_configured": "grant_unknown",
    "no_api_section": "grant_no_api",
    "key_missing": "grant_key_missing",
    "unknown_bucket": "grant_unknown_bucket",
    "no_login": "grant_no_login",
}
_encoder = msgspec.json.Encoder()


class SandboxOps:
    """The trio side of the operations a sandbox may use, limited to its session's grants.

    ``loop`` is the serving loop this answers to (set once both exist).
    """

    loop: ServingLoop[Session]

    def __init__(
        self,
        tokens: Tokens,
        store: TokenStore,
        wall: Callable[[], float],
        boot: Callable[[], float],
    ) -> None:
        self.tokens = tokens
        self.store = store
        self.wall = wall
        self.boot = boot

    # -- several accounts ----------------------------------------------------------

    def profile(self, session: Session, provider: str) -> Profile | None:
        """*provider*'s profile in *session* (:func:`credproxy.core.servecore.profile_of`)."""
        try:
            return session.profiles[provider]
        except KeyError:
            profile = profile_of(session.grants, provider, self.tokens.cfg.providers)
            session.profiles[provider] = profile
            return profile

    def _forget_ended_hold(self, session: Session, key: Key) -> None:
        """The walk passed *key*: an ended hold has said what it had to say."""
        now = self.wall()
        own = session.holds.get(key)
        if own is not None and not own.held(now):
            del session.holds[key]
        self.tokens.forget_ended_hold(key)

    def hold(self, session: Session, key: Key) -> BucketMarks | None:
        """The quota hold on *key* that applies to *session*: the daemon's or its own."""
        return failover.later(self.tokens.marks(key), session.holds.get(key))

    async def pick(self, session: Session, provider: str) -> Key:
        """The bucket ``get_token`` without a bucket would serve now (the API proxy's choice).

        The serving core decides, as for ``get_token``; when it cannot serve
        at once, the failover walk does, from where the core says.

        Raises:
            AllBucketsExhausted, and the errors of :meth:`walk`.
        """
        wall, boot = self.wall(), self.boot()
        answer = await self.loop.ask(lambda core: core.pick(session.id, provider, wall, boot))
        if isinstance(answer, Ready):
            return answer.key
        return (await self.walk(session, provider, answer.start)).key

    async def walk(self, session: Session, provider: str, start: int) -> Ready:
        """Failover's three passes (credproxy.core.failover) for one get_token without a bucket.

        *start* is the profile index the serving core's pick stood on.

        Raises:
            AllBucketsExhausted: no bucket could serve (the host is asked for
                the logins that would cure it, at once).
        """
        profile = self.profile(session, provider)
        if profile is None:
            raise NotFound(f"no token for {provider} in this session")
        walk = failover.Walk(profile, failover.walk_start(profile, start))
        cfg = self.tokens.cfg.renewal
        while (bucket := walk.next()) is not None:
            key = Key(provider, bucket)
            self._forget_ended_hold(session, key)
            try:
                entry = self.tokens.entry(key)
                if entry is None and self.tokens.mints(key):
                    entry = await self.tokens.get(key)  # its first token: minted now
            except StoreError:
                walk.failed(bucket, "no-token")
                continue
            except CredproxyError as exc:  # its first mint failed: nothing to serve
                reason = failover.refresh_failure_reason(exc, servable=False)
                assert reason is not None  # (with nothing to serve there is always one)
                walk.failed(bucket, reason)
                continue
            health = self.tokens.known_health(key)
            verdict = failover.classify(
                None if entry is None else self.tokens.facts(entry),
                health is not None and health.reauth_required,
                self.hold(session, key),
                self.wall(),
                cfg,
            )
            if isinstance(verdict, str):
                walk.failed(bucket, verdict)
                continue
            assert entry is not None
            if isinstance(verdict, serving.Refresh):
                try:
                    entry = await self.tokens.refresh_to_serve(key, entry, reason="failover")
                except CredproxyError as exc:
                    servable = serving.after_failed_refresh(self.tokens.facts(entry), self.wall())
                    reason = failover.refresh_failure_reason(exc, servable=servable is not None)
                    if reason is not None:
                        walk.failed(bucket, reason)
                        continue
            walk.served(bucket)
            reasons: dict[str, str] = {b: r for b, r in walk.reasons.items() if r != "skipped"}
            if reasons and session.failover_said.get(provider) != (bucket, reasons):
                # Said once per change, not once per walk.
                session.failover_said[provider] = (bucket, reasons)
                log.info(
                    "bucket_failover",
                    session=session.id,
                    provider=provider,
                    served=bucket,
                    reasons=reasons,
                )
            elif not reasons:
                session.failover_said.pop(provider, None)
            return self.publish(
                session, key, entry, current=(provider, failover.next_current(profile, bucket))
            )
        holds = {
            b: self.hold(session, Key(provider, b)) or failover.BucketMarks()
            for b in profile.buckets
        }
        out = walk.exhausted(holds, self.wall())
        listed = ", ".join(f"{b}: {r}" for b, r in out.reasons.items())
        message = f"every bucket of {provider} failed ({listed})"
        if out.login:
            message += "; on the host run: " + self.tokens.reauth_many(
                provider, out.login, "every bucket failed"
            )
        log.warning(
            "all_buckets_exhausted", session=session.id, provider=provider, reasons=out.reasons
        )
        raise AllBucketsExhausted(message, dict(out.reasons), out.retry_after)

    async def _report(self, session: Session, key: Key, kind: str, retry: float | None) -> bytes:
        if self.store.signature(*key) is None:
            # Only stored buckets are held: made-up names cannot grow the table.
            raise NotFound(f"no token for {key} in this session")
        if kind == "quota-exhausted":
            # The hold is this session's alone: what one sandbox says never
            # changes another's answer.
            marks = session.holds.get(key)
            if marks is None:
                marks = session.holds[key] = failover.BucketMarks()
            until = marks.hold(self.tokens.hold_until(retry))
            self.loop.command(Hold(key, until, session.id))
            log.info(
                "bucket_quota_exhausted",
                provider=key.provider,
                bucket=key.bucket,
                source="session",
                session=session.id,
                held_for=round(until - self.wall()),
            )
            return _encoder.encode({"recorded": kind, "until": int(until * 1000)})
        # 401/403: the token may have been revoked early. A refresh through the
        # refresh_token op's rules: coalesced, and at most once per cooldown, so
        # a thousand reports cost at most one refresh.
        health = self.tokens.health(key)
        before = health.refreshes
        try:
            entry = await self.tokens.refresh_requested(key)
        except CredproxyError as exc:
            return _encoder.encode({"recorded": kind, "refreshed": False, "why": exc.code})
        self.publish(session, key, entry)
        # Inside the cooldown the current token is kept: say whether it changed.
        return _encoder.encode({"recorded": kind, "refreshed": health.refreshes > before})

    async def profiles_status(self, session: Session) -> list[dict[str, Any]]:
        """Each profile *session* has, with its buckets' state (for ``status``).

        The current bucket is the serving core's, asked of the loop.
        """
        names = {p for p, _ in session.grants.profiles} | {
            name for name, prov in self.tokens.cfg.providers.items() if len(prov.buckets) > 1
        }
        profiles = [p for p in (self.profile(session, n) for n in sorted(names)) if p is not None]
        currents = await self.loop.ask(
            lambda core: [core.current(session.id, p.provider) for p in profiles]
        )
        return [
            {
                "provider": profile.provider,
                "strategy": profile.strategy,
                "current": current or profile.buckets[0],
                "buckets": [
                    {"bucket": b, **self.bucket_state(session, Key(profile.provider, b))}
                    for b in profile.buckets
                ],
            }
            for profile, current in zip(profiles, currents, strict=True)
        ]

    def bucket_state(self, session: Session, key: Key) -> dict[str, Any]:
        """What ``get_bucket_stats`` and ``status`` say of a bucket's health for *session* now."""
        now = self.wall()
        marks = self.hold(session, key)
        health = self.tokens.known_health(key)
        if marks is not None and marks.held(now):
            assert marks.quota_until is not None
            return {"state": "quota-exhausted", "until": int(marks.quota_until * 1000)}
        if health is not None and health.reauth_required:
            return {"state": "reauth-failed"}
        if health is not None and health.failures:
            return {"state": "expired-refresh-failed", "failures": health.failures}
        return {"state": "ok"}

    # -- what reads the store ------------------------------------------------------

    def get_bucket_stats(self, session: Session, key: Key, stats: tuple[int, float, int]) -> bytes:
        if self.store.signature(*key) is None:
            raise NotFound(f"no token for {key} in this session")
        count, last_ms, total = stats
        out: dict[str, Any] = {
            "bucket": key.bucket,
            "requestCount": count,
            "percentage": round(100.0 * count / (total or 1), 1),
        }
        if last_ms:
            out["lastUsed"] = int(last_ms)
        out.update(self.bucket_state(session, key))
        return _encoder.encode(out)

    def read(self, state: SessionState, read: Read) -> bytes:
        """The answer to a :class:`~credproxy.core.servecore.Read` (called by the serving loop).

        Only reads files (directory listings, key files), never what the trio
        side keeps in memory.

        Raises:
            NotFound: an API key that is not there, or not granted (alike).
        """
        grants, store = state.grants, self.store
        if read.op == "list_providers":
            names = [
                p
                for p in store.providers()
                if grants.provider_visible(p)
                and any(grants.token_allowed(p, b) for b in store.buckets(p))
            ]
            return _encoder.encode({"providers": names})
        if read.op == "list_buckets":
            provider = read.name
            buckets = [b for b in store.buckets(provider) if grants.token_allowed(provider, b)]
            return _encoder.encode({"buckets": buckets})
        if read.op == "list_api_keys":
            return _encoder.encode(
                {"keys": [k for k in store.key_names() if grants.key_allowed(k)]}
            )
        value = store.read_key(read.name) if grants.key_allowed(read.name) else None
        if read.op == "has_api_key":
            return _encoder.encode({"exists": value is not None})
        if value is None:
            raise NotFound(f"no API key {read.name} in this session")
        log.info("key_served", session=state.id, name=read.name)
        return _encoder.encode({"key": value})

    # -- the hand-over from the loop -------------------------------------------------

    def defer(
        self,
        loop: ServingLoop[Session],
        conn: SandboxConnection[Session],
        pending: Pending,
        deferred: Defer,
    ) -> None:
        """Start the trio part of a request (in the trio thread)."""
        session = conn.session
        if not session.open or session.nursery is None:
            loop.deliver(conn, pending, NotFound("session closed"))
            return
        session.nursery.start_soon(self._finish, loop, conn, pending, deferred)

    async def _finish(
        self,
        loop: ServingLoop[Session],
        conn: SandboxConnection[Session],
        pending: Pending,
        deferred: Defer,
    ) -> None:
        with trio.CancelScope() as scope:
            conn.finishing.add(scope)
            try:
                outcome = await self.finish(conn.session, deferred)
            finally:
                conn.finishing.discard(scope)
            loop.deliver(conn, pending, outcome)

    async def finish(self, session: Session, deferred: Defer) -> Outcome:
        """The answer to a deferred request: a token to serve, data, or the error."""
        op, key = deferred.op, deferred.key
        try:
            if op == "get_token_profile":
                return await self.walk(session, key.provider, deferred.start)
            if op == "get_token":
                return self.publish(session, key, await self.tokens.get(key))
            if op == "refresh_token":
                return self.publish(session, key, await self.tokens.refresh_requested(key))
            if op == "report_failure":
                assert deferred.report is not None
                kind, retry = deferred.report
                return await self._report(session, key, kind, retry)
            return self.get_bucket_stats(session, key, deferred.stats)
        except CredproxyError as exc:
            return exc
        except Exception:
            log.exception("request_failed", session=session.id, op=op)
            return CredproxyError("internal error")

    def publish(
        self, session: Session, key: Key, entry: Entry, current: tuple[str, int] | None = None
    ) -> Ready:
        """Make *entry* what *session* serves for *key*; start its renewal on first serve.

        *current*: (provider, profile index) the profile starts from after a
        failover walk.
        """
        ready = Ready(
            key, entry.served, entry.fp, self.tokens.expiry(entry), self.tokens.serve_until(entry)
        )
        if session.open:
            # The API proxy publishes on every request; the loop hears of the
            # same token again only when what it holds is about to run out
            # (each command wakes the loop's thread).
            last = session.published.get(key)
            if (
                current is not None
                or last is None
                or last[0] != ready.fp
                or last[1] - self.boot() < REPUBLISH_BEFORE
            ):
                session.published[key] = (ready.fp, ready.until)
                self.loop.command(Publish(session.id, ready, current))
            session.ensure_timer(self.tokens, key, entry)
        return ready

    def connection_closed(self, session: Session, conn: SandboxConnection[Session] | None) -> None:
        """The serving loop closed a connection (in the trio thread)."""
        session.connection_closed()
        if conn is not None:
            for scope in conn.finishing:
                scope.cancel()


class ControlOps:
    """Admin operations; only on the control socket, only for the daemon's own uid."""

    def __init__(
        self,
        sessions: Sessions,
        token_changed: Callable[[Key], Awaitable[int]],
        status: Callable[[], Awaitable[dict[str, Any]]],
        version: str,
        release: Callable[[str, str | None], Awaitable[int]],
        reload: Callable[[], Awaitable[dict[str, Any]]],
        stop: Callable[[], None],
        known: Callable[[], tuple[Mapping[str, Provider], set[Key], list[str]]],
    ) -> None:
        # What a grant may name: the configured providers, the stored logins,
        # the stored API keys (read when a session opens).
        self._known = known
        self.sessions = sessions
        self._token_changed = token_changed
        self.status = status
        self.version = version
        self._release = release
        self._reload = reload
        self._stop = stop

    def table(self, peer_pid: int) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """The operations of one control connection (whose peer is *peer_pid*)."""

        async def open_session(payload: dict[str, Any]) -> dict[str, Any]:
            return await self.open_session(payload, peer_pid)

        return {
            "ping": self.ping,
            "status": self._status,
            "token_changed": self.token_changed,
            "open_session": open_session,
            "close_session": self.close_session,
            "release": self.release,
            "reload": self.reload,
            "stop": self.stop,
        }

    async def _status(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.status()

    async def release(self, payload: dict[str, Any]) -> dict[str, Any]:
        """End the quota holds on a provider (one bucket, or every one), whoever set them."""
        provider = name_field(payload, "provider")
        bucket = payload.get("bucket")
        if bucket is not None:
            bucket = name_field(payload, "bucket")
        return {"released": await self._release(provider, bucket)}

    def ping(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": self.version}

    async def reload(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Re-read the configuration file; a bad one is refused and the running one kept.

        Raises:
            UsageError: the new file is invalid (file, line and field; the
                old configuration still serves).
        """
        try:
            return await self._reload()
        except ConfigError as exc:
            raise UsageError(str(exc)) from None

    def stop(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Stop the daemon as SIGTERM does; answered with its pid (the reply may be cut off)."""
        self._stop()
        return {"pid": os.getpid()}

    async def token_changed(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"timers_cancelled": await self._token_changed(key_field(payload))}

    async def open_session(self, payload: dict[str, Any], peer_pid: int) -> dict[str, Any]:
        grants = Grants.parse(_str_list(payload.get("grants", []), "grants"))
        uids = payload.get("allow_uids", [])
        if not isinstance(uids, list) or not all(
            isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 2**32 for u in uids
        ):
            raise UsageError("'allow_uids' must be a list of uids")
        name = payload.get("name") or ""
        if not isinstance(name, str) or len(name) > 128:
            raise UsageError("'name' must be a string of at most 128 characters")
        cap = payload.get("capability")
        if cap is not None and not (
            isinstance(cap, str) and len(cap) == 64 and all(c in "0123456789abcdef" for c in cap)
        ):
            raise UsageError("'capability' must be 64 lowercase hex characters")
        watch = payload.get("watch_launcher", True)
        session = await self.sessions.open(
            grants,
            frozenset(uids),
            name,
            capability_digest(cap) if cap else None,
            peer_pid if watch else None,
        )
        await self._log_grant_problems(session.id, grants)
        return {"session": session.id, "socket": str(session.socket_path)}

    async def _log_grant_problems(self, sid: str, grants: Grants) -> None:
        """Log each grant that gives the session nothing, with its cause and fix.

        The sandbox is never told (an unknown provider answers as one not
        granted); the host is, here and in ``credproxy status``.
        """
        try:
            providers, stored, keys = self._known()
        except StoreError as exc:
            log.warning("grant_check_failed", session=sid, error=str(exc))
            return
        for problem in grant_problems(grants, providers, stored, keys, str(paths.config_file())):
            log.warning(
                _GRANT_EVENTS[problem.cause],
                session=sid,
                grant=problem.grant,
                cause=problem.cause,
                error=problem.message,
                fix=problem.fix,
            )

    async def close_session(self, payload: dict[str, Any]) -> dict[str, Any]:
        sid = payload.get("session")
        if not isinstance(sid, str):
            raise UsageError("missing 'session'")
        if not await self.sessions.close(sid):
            raise NotFound(f"no session {sid}")
        return {}


def _str_list(value: object, field_name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"'{field_name}' must be a list of strings")
    return value
