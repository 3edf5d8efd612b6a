"""What requests mean: the operations of a sandbox socket and of the control socket.

Handlers are op tables (trio-websocket's ``handlers = {Event: method}``): each
operation returns data or raises a :class:`~credproxy.errors.CredproxyError`;
the connection encodes the reply, clears the in-flight id and hides internal
errors, once (:class:`credproxy.core.connection.Connection`).

Sandbox operations come in two kinds. *Fast* ones answer from what the daemon
already holds, without waiting, and run in the serving loop
(:mod:`credproxy.shell.fastpath`), possibly in its own thread: they only read
(the session's grants and ``ready`` table, the store's directory listings and
key files). An operation that may wait returns :class:`Defer` with the key it
has already looked up and checked; the trio side runs :meth:`SandboxOps.slow`
in the session's nursery and hands the :data:`Outcome` back to the loop.

A served token is published in the session's ``ready`` table
(:class:`Ready`: the reply bytes and the wall-clock instant after which they
must not be served), so that the next ``get_token`` of that key is fast. The
first serve of a refreshable token in a session always takes the slow path,
which is where the session's renewal timer is started (docs/design.md section 3.1).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from credproxy.core import failover, serving
from credproxy.core.failover import BucketMarks, Profile
from credproxy.core.grants import Grants
from credproxy.core.names import Key, key_field, name_field
from credproxy.core.protocol import capability_digest
from credproxy.errors import (
    AllBucketsExhausted,
    CredproxyError,
    Forbidden,
    NotFound,
    ReauthRequired,
    StoreError,
    UsageError,
)
from credproxy.shell import logs
from credproxy.shell.store import TokenStore

if TYPE_CHECKING:
    from credproxy.shell.sessions import Session, Sessions
    from credproxy.shell.tokens import Entry, Tokens

log = logs.get("credproxy.handlers")
_encoder = msgspec.json.Encoder()

FORBIDDEN_OPS = frozenset({"save_token", "remove_token"})
MAX_KEY_MEMO = 4096  # distinct valid (provider, bucket) pairs remembered


@dataclass(frozen=True, slots=True)
class Ready:
    """A token a session may be served as is until ``until`` on the boot clock."""

    key: Key
    served: bytes  # the JSON of the token without refresh_token
    fp: str
    expiry: float | None
    until: float


@dataclass(frozen=True, slots=True)
class Defer:
    """The request needs the trio side: ``op`` on ``key`` (granted, checked)."""

    op: str
    key: Key  # for get_token_profile: Key(provider, "") (no bucket is named "")
    detail: Any = None  # what the fast part already parsed (report_failure's report)


# A served token, encoded JSON data, or the error to answer.
Outcome = Ready | bytes | CredproxyError


class SlowConnection(Protocol):
    """What the slow side needs of a serving-loop connection (``fastpath.SandboxConnection``)."""

    session: Session
    slow_scopes: set[trio.CancelScope]  # touched by the trio side only


class Loop(Protocol):
    """What the slow side needs of the serving loop (``fastpath.FastPath``): to answer."""

    def deliver(self, conn: Any, op: str, key: Any, rid: str, outcome: Outcome) -> None: ...


REPORT_REASONS = {"quota-exhausted": "quota-exhausted", "unauthorized": "unauthorized"}


class SandboxOps:
    """The operations a sandbox may use, limited to its session's grants."""

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
        self._keys: dict[tuple[Any, Any], Key] = {}  # validated (provider, bucket) pairs
        self._fast: dict[str, Callable[[Session, dict[str, Any]], bytes | Ready | Defer]] = {
            "get_token": self.get_token,
            "refresh_token": self.refresh_token,
            "list_providers": self.list_providers,
            "list_buckets": self.list_buckets,
            "get_bucket_stats": self.get_bucket_stats,
            "get_api_key": self.get_api_key,
            "list_api_keys": self.list_api_keys,
            "has_api_key": self.has_api_key,
            "report_failure": self.report_failure,
        }

    # -- fast: run in the serving loop ----------------------------------------

    def fast(self, session: Session, req: Any) -> bytes | Ready | Defer:
        """Answer *req* now (encoded JSON data or a :class:`Ready` token), or :class:`Defer` it."""
        handler = self._fast.get(req.op)
        if handler is None:
            if req.op in FORBIDDEN_OPS or req.op.startswith("oauth_"):
                raise Forbidden(f"{req.op} is not available to a sandbox")
            raise UsageError(f"Unknown operation: {req.op}")
        return handler(session, req.payload)

    def _granted_key(self, session: Session, payload: dict[str, Any]) -> Key:
        # Names are checked once per distinct (provider, bucket) pair, not per
        # request: this is the hot path of every get_token.
        raw = (payload.get("provider"), payload.get("bucket"))
        try:
            key = self._keys[raw]
        except (KeyError, TypeError):  # TypeError: an unhashable value, not a name
            key = key_field(payload)
            if len(self._keys) < MAX_KEY_MEMO:
                self._keys[raw] = key
        if not session.grants.token_allowed(*key):
            # Missing and not granted answer alike, so a sandbox cannot probe.
            raise NotFound(f"no token for {key} in this session")
        return key

    def get_token(self, session: Session, payload: dict[str, Any]) -> Ready | Defer:
        if payload.get("bucket") is None:
            provider = payload.get("provider")
            # The profile is looked up once per session and provider; after
            # that the hot path pays one dict lookup, not a name check.
            if isinstance(provider, str) and provider in session.profiles:
                profile = session.profiles[provider]
            else:
                profile = self.profile(session, name_field(payload, "provider"))
            if profile is not None:
                return self._profile_get_token(session, profile)
        key = self._granted_key(session, payload)
        ready = session.ready.get(key)
        if ready is not None and self.boot() < ready.until:
            return ready
        return Defer("get_token", key)

    # -- several accounts ----------------------------------------------------------

    def profile(self, session: Session, provider: str) -> Profile | None:
        """*provider*'s profile in *session* when it has two or more buckets, else None.

        From a ``PROVIDER:B1,B2`` grant, else from the provider's configured
        ``buckets`` that the session is granted. One bucket is no profile: such
        a session is served exactly as without one (its bucket, or ``default``).
        """
        if provider in session.profiles:
            return session.profiles[provider]
        prov = self.tokens.cfg.providers.get(provider)
        order = session.grants.profile(provider)
        if order is None and prov is not None:
            order = tuple(b for b in prov.buckets if session.grants.token_allowed(provider, b))
        strategy = prov.strategy if prov is not None else "fill-first"
        profile = Profile(provider, order, strategy) if order and len(order) > 1 else None
        session.profiles[provider] = profile
        return profile

    def _profile_get_token(self, session: Session, profile: Profile) -> Ready | Defer:
        """The current bucket's token if it can be served now, else the failover walk (trio)."""
        n = len(profile.buckets)
        index = session.current.get(profile.provider, 0) % n
        key = Key(profile.provider, profile.buckets[index])
        ready = session.ready.get(key)
        if ready is not None and self.boot() < ready.until and not self.held(session, key):
            if profile.strategy == "round-robin":
                session.current[profile.provider] = (index + 1) % n
            elif (
                index
                and profile.strategy == "fill-first"
                and self._earlier_may_serve(session, profile, index)
            ):
                return Defer("get_token_profile", Key(profile.provider, ""))
            return ready
        return Defer("get_token_profile", Key(profile.provider, ""))

    def _earlier_may_serve(self, session: Session, profile: Profile, index: int) -> bool:
        """Fill-first: whether a bucket before *index* may serve again because its hold ended.

        Only an ended hold brings the walk back to an earlier bucket (the walk
        forgets the hold when it passes it, so this is true once per hold);
        a bucket that failed for any other reason is tried again by the next
        walk that happens anyway, when the current answer must be renewed.
        """
        now = self.wall()
        for bucket in profile.buckets[:index]:
            hold = self.hold(session, Key(profile.provider, bucket))
            if hold is not None and hold.quota_until is not None and not hold.held(now):
                return True
        return False

    def _forget_ended_hold(self, session: Session, key: Key) -> None:
        """The walk passed *key*: an ended hold has said what it had to say."""
        now = self.wall()
        own = session.holds.get(key)
        if own is not None and not own.held(now):
            del session.holds[key]
        self.tokens.forget_ended_hold(key)

    # -- quota holds -----------------------------------------------------------------

    def hold(self, session: Session, key: Key) -> BucketMarks | None:
        """The quota hold on *key* that applies to *session*: the daemon's or its own."""
        return failover.later(self.tokens.marks(key), session.holds.get(key))

    def held(self, session: Session, key: Key) -> bool:
        """True while *key* is held as quota-exhausted for *session* (read by the serving loop)."""
        own = session.holds.get(key)
        return self.tokens.quota_held(key) or (own is not None and own.held(self.wall()))

    async def pick(self, session: Session, provider: str) -> Key:
        """The bucket ``get_token`` without a bucket would serve now (the API proxy's choice).

        Raises:
            AllBucketsExhausted, and the errors of :meth:`walk`.
        """
        profile = self.profile(session, provider)
        assert profile is not None
        answer = self._profile_get_token(session, profile)
        if isinstance(answer, Ready):
            return answer.key
        return (await self.walk(session, provider)).key

    async def walk(self, session: Session, provider: str) -> Ready:
        """Failover's three passes (credproxy.core.failover) for one get_token without a bucket.

        Raises:
            AllBucketsExhausted: no bucket could serve (the host is asked for
                the logins that would cure it, at once).
        """
        profile = self.profile(session, provider)
        assert profile is not None
        walk = failover.Walk(
            profile, failover.walk_start(profile, session.current.get(provider, 0))
        )
        cfg = self.tokens.cfg.renewal
        while (bucket := walk.next()) is not None:
            key = Key(provider, bucket)
            self._forget_ended_hold(session, key)
            try:
                entry = self.tokens.entry(key)
            except StoreError:
                walk.failed(bucket, "no-token")
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
                except ReauthRequired:
                    walk.failed(bucket, "reauth-failed")
                    continue
                except NotFound:
                    walk.failed(bucket, "no-token")
                    continue
                except CredproxyError:
                    if serving.after_failed_refresh(self.tokens.facts(entry), self.wall()) is None:
                        walk.failed(bucket, "expired-refresh-failed")
                        continue
            walk.served(bucket)
            session.current[provider] = failover.next_current(profile, bucket)
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
            return self.publish(session, key, entry)
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

    def report_failure(self, session: Session, payload: dict[str, Any]) -> bytes | Defer:
        """A sandbox that called the API itself reports what happened (429, 401, 403, 5xx).

        Only a granted bucket; nothing a sandbox reports can mark a bucket
        healthy, and a 5xx is not a quota failure.
        """
        key = self._granted_key(session, payload)
        status, reason = payload.get("status"), payload.get("reason")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
            raise UsageError("'status' must be an HTTP status code")
        if reason is not None and reason not in REPORT_REASONS:
            raise UsageError(
                "'reason' must be quota-exhausted or unauthorized (a report cannot mark a "
                "bucket healthy)"
            )
        retry = payload.get("retryAfter")
        if retry is not None and (
            isinstance(retry, bool) or not isinstance(retry, int | float) or not retry >= 0
        ):
            raise UsageError("'retryAfter' must be a number of seconds")
        if reason == "quota-exhausted" or status == 429:
            return Defer("report_failure", key, ("quota-exhausted", retry))
        if reason == "unauthorized" or status in (401, 403):
            return Defer("report_failure", key, ("unauthorized", None))
        if status is not None and 500 <= status < 600:
            return _encoder.encode(
                {"recorded": None, "why": "a server error is not a quota failure"}
            )
        raise UsageError("report a 429, 401 or 403 'status', or a 'reason'")

    async def _report(self, session: Session, key: Key, kind: str, retry: float | None) -> bytes:
        if self.store.signature(*key) is None:
            # Only stored buckets are held: made-up names cannot grow the table.
            raise NotFound(f"no token for {key} in this session")
        if kind == "quota-exhausted":
            # The hold is this session's alone: what one sandbox says never
            # changes another's answer. No ready answer needs dropping:
            # get_token without a bucket checks holds before it serves one.
            marks = session.holds.get(key)
            if marks is None:
                marks = session.holds[key] = failover.BucketMarks()
            until = marks.hold(self.tokens.hold_until(retry))
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

    def profiles_status(self, session: Session) -> list[dict[str, Any]]:
        """Each profile *session* has, with its buckets' state (for ``status``)."""
        names = {p for p, _ in session.grants.profiles} | {
            name for name, prov in self.tokens.cfg.providers.items() if len(prov.buckets) > 1
        }
        out = []
        for provider in sorted(names):
            profile = self.profile(session, provider)
            if profile is None:
                continue
            current = profile.buckets[session.current.get(provider, 0) % len(profile.buckets)]
            out.append(
                {
                    "provider": provider,
                    "strategy": profile.strategy,
                    "current": current,
                    "buckets": [
                        {"bucket": b, **self.bucket_state(session, Key(provider, b))}
                        for b in profile.buckets
                    ],
                }
            )
        return out

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

    def refresh_token(self, session: Session, payload: dict[str, Any]) -> Defer:
        return Defer("refresh_token", self._granted_key(session, payload))

    def list_providers(self, session: Session, payload: dict[str, Any]) -> bytes:
        grants = session.grants
        names = [
            p
            for p in self.store.providers()
            if grants.provider_visible(p)
            and any(grants.token_allowed(p, b) for b in self.store.buckets(p))
        ]
        return _encoder.encode({"providers": names})

    def list_buckets(self, session: Session, payload: dict[str, Any]) -> bytes:
        provider = name_field(payload, "provider")
        buckets = [
            b for b in self.store.buckets(provider) if session.grants.token_allowed(provider, b)
        ]
        return _encoder.encode({"buckets": buckets})

    def get_bucket_stats(self, session: Session, payload: dict[str, Any]) -> bytes:
        key = self._granted_key(session, payload)
        if self.store.signature(*key) is None:
            raise NotFound(f"no token for {key} in this session")
        count, last_ms = session.served.get(key, (0, 0.0))
        total = sum(v[0] for k, v in session.served.items() if k.provider == key.provider) or 1
        out: dict[str, Any] = {
            "bucket": key.bucket,
            "requestCount": int(count),
            "percentage": round(100.0 * count / total, 1),
        }
        if last_ms:
            out["lastUsed"] = int(last_ms)
        out.update(self.bucket_state(session, key))
        return _encoder.encode(out)

    def get_api_key(self, session: Session, payload: dict[str, Any]) -> bytes:
        name = name_field(payload, "name")
        value = self.store.read_key(name) if session.grants.key_allowed(name) else None
        if value is None:
            raise NotFound(f"no API key {name} in this session")
        log.info("key_served", session=session.id, name=name)
        return _encoder.encode({"key": value})

    def list_api_keys(self, session: Session, payload: dict[str, Any]) -> bytes:
        names = [k for k in self.store.key_names() if session.grants.key_allowed(k)]
        return _encoder.encode({"keys": names})

    def has_api_key(self, session: Session, payload: dict[str, Any]) -> bytes:
        name = name_field(payload, "name")
        exists = session.grants.key_allowed(name) and self.store.read_key(name) is not None
        return _encoder.encode({"exists": exists})

    def count_serve(self, session: Session, ready: Ready, wall: float) -> None:
        """Account one serve of *ready* at wall time *wall* (called by the serving loop only)."""
        stats = session.served.get(ready.key)
        if stats is None:
            stats = session.served[ready.key] = [0, 0.0]
        stats[0] += 1
        stats[1] = wall * 1000

    # -- slow: run in trio ---------------------------------------------------

    def defer(self, fast: Loop, conn: SlowConnection, rid: str, deferred: Defer) -> None:
        """Start the slow part of a request (in the trio thread)."""
        session = conn.session
        if not session.open or session.nursery is None:
            fast.deliver(conn, deferred.op, deferred.key, rid, NotFound("session closed"))
            return
        session.nursery.start_soon(self._run_slow, fast, conn, rid, deferred)

    async def _run_slow(self, fast: Loop, conn: SlowConnection, rid: str, deferred: Defer) -> None:
        with trio.CancelScope() as scope:
            conn.slow_scopes.add(scope)
            try:
                outcome = await self.slow(conn.session, deferred)
            finally:
                conn.slow_scopes.discard(scope)
            fast.deliver(conn, deferred.op, deferred.key, rid, outcome)

    async def slow(self, session: Session, deferred: Defer) -> Outcome:
        """The token ``get_token`` or ``refresh_token`` serves, or the error to answer."""
        try:
            if deferred.op == "get_token_profile":
                return await self.walk(session, deferred.key.provider)
            if deferred.op == "report_failure":
                kind, retry = deferred.detail
                return await self._report(session, deferred.key, kind, retry)
            if deferred.op == "get_token":
                entry = await self.tokens.get(deferred.key)
            else:
                entry = await self.tokens.refresh_requested(deferred.key)
        except CredproxyError as exc:
            return exc
        except Exception:
            log.exception("request_failed", session=session.id, op=deferred.op)
            return CredproxyError("internal error")
        return self.publish(session, deferred.key, entry)

    def publish(self, session: Session, key: Key, entry: Entry) -> Ready:
        """Make *entry* what *session* serves for *key*; start its renewal on first serve."""
        ready = Ready(
            key, entry.served, entry.fp, self.tokens.expiry(entry), self.tokens.serve_until(entry)
        )
        if session.open:
            session.ready[key] = ready
            session.ensure_timer(self.tokens, key, entry)
        return ready

    def connection_closed(self, session: Session, conn: SlowConnection | None) -> None:
        """The serving loop closed a connection (in the trio thread)."""
        session.connection_closed()
        if conn is not None:
            for scope in conn.slow_scopes:
                scope.cancel()


class ControlOps:
    """Admin operations; only on the control socket, only for the daemon's own uid."""

    def __init__(
        self,
        sessions: Sessions,
        token_changed: Callable[[Key], int],
        status: Callable[[], dict[str, Any]],
        version: str,
        release: Callable[[str, str | None], int],
    ) -> None:
        self.sessions = sessions
        self._token_changed = token_changed
        self.status = status
        self.version = version
        self._release = release

    def table(self, peer_pid: int) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """The operations of one control connection (whose peer is *peer_pid*)."""

        async def open_session(payload: dict[str, Any]) -> dict[str, Any]:
            return await self.open_session(payload, peer_pid)

        return {
            "ping": self.ping,
            "status": lambda _payload: self.status(),
            "token_changed": self.token_changed,
            "open_session": open_session,
            "close_session": self.close_session,
            "release": self.release,
        }

    def release(self, payload: dict[str, Any]) -> dict[str, Any]:
        """End the quota holds on a provider (one bucket, or every one), whoever set them."""
        provider = name_field(payload, "provider")
        bucket = payload.get("bucket")
        if bucket is not None:
            bucket = name_field(payload, "bucket")
        return {"released": self._release(provider, bucket)}

    def ping(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": self.version}

    def token_changed(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"timers_cancelled": self._token_changed(key_field(payload))}

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
        return {"session": session.id, "socket": str(session.socket_path)}

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
