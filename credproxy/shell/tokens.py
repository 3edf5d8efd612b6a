"""Tokens: lookup, serve decisions, refresh and renewal of every key (trio shell).

Theory of operation
-------------------

:class:`Tokens` is the one interface the rest of the daemon uses for tokens.
It owns four things, and decides nothing itself: every decision is a pure
function of :mod:`credproxy.core.serving` or a transition of
:class:`credproxy.core.renewal.RenewalTimer`.

The cache
    The daemon's copy of each stored token (:class:`Entry`), with the bytes
    we serve already encoded (``refresh_token`` removed). An entry is valid
    while the store file's (inode, mtime) signature is unchanged; every store
    write is a rename, so a token written by another process is noticed at the
    cost of one ``stat``.

Refresh, one at a time
    *Single flight in the daemon*: concurrent callers share one upstream call
    (the first starts a task in the daemon-wide refresh nursery, the rest wait
    on its result). *Single use across processes*: that task holds the key's
    exclusive ``flock`` around read -> double-check -> refresh -> durable
    write; if another process renewed the token past what the caller saw, that
    token is used and the (rotated) refresh token is not presented again.
    *Durable before served*: the merged token is on disk (fsync, rename, fsync
    dir) before anyone gets it. *Completion*: the task lives in the refresh
    nursery, not in the session that asked, so a session closing never
    abandons a response already requested; on shutdown the daemon gives that
    nursery a grace period.

Never losing a rotated refresh token
    The space for the new token is claimed before the request goes out
    (:meth:`TokenStore.reserve`), so a full disk is met while the old refresh
    token still works, and the answer goes into a file the moment it arrives.
    If the durable write fails anyway (read-only remount, I/O error, a disk
    that was full at reservation), the merged token becomes the key's cache
    entry *without* being on disk: it is "unsaved". The cache entry stays
    valid while the store file is unchanged, so every path (``get_token``,
    ``refresh_token``, other sessions, the next refresh) uses the newest
    token and its refresh token, never the spent one on disk. A task in the
    refresh nursery retries the write with backoff, and every refresh of the
    key tries it first; ``status`` shows ``unsaved_since`` and the log says
    ``token_not_durable`` (error level) until ``token_saved``. If the store
    file changes meanwhile (a new login by ``credproxy import``, a logout),
    the store wins and the unsaved token is dropped.

Key health
    One :class:`~credproxy.core.renewal.KeyHealth` per key: failures,
    last error, re-auth required, last attempt (the ``refresh_token`` op's
    cooldown counts from it).

Renewal timers
    :meth:`Tokens.keep_renewed` is the trio task of one
    :class:`~credproxy.core.renewal.RenewalTimer`: it sleeps until the
    deadline (in slices of at most 30 s against the wall clock and the boot
    clock, so a suspend or a clock step is noticed within 30 s), reads the
    store, refreshes, and reports back.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from credproxy.core import failover, policy, serving
from credproxy.core.config import Config
from credproxy.core.failover import BucketMarks
from credproxy.core.names import DEFAULT_BUCKET, Key
from credproxy.core.oauth import TokenEndpoint, merge_refreshed
from credproxy.core.renewal import End, Failure, KeyHealth, Refresh, RenewalTimer, Wait
from credproxy.errors import (
    CredproxyError,
    NotFound,
    RateLimited,
    ReauthRequired,
    RefreshFailed,
    StoreError,
)
from credproxy.shell import logs
from credproxy.shell.store import Reservation, TokenStore

log = logs.get("credproxy.tokens")
_encoder = msgspec.json.Encoder()

LOCK_POLL = 0.02  # seconds between flock attempts while another process refreshes
SAVE_RETRY_BASE = 1.0  # seconds before retrying the write of an unsaved token, doubling
SAVE_RETRY_CAP = 60.0
NOTIFY_TIMEOUT = 10.0  # seconds a [notify] command may run
RECHECK = 1.0  # seconds a served answer may be reused before the store is looked at again


def login_command(key: Key) -> str:
    """The command the person on the host runs to log *key* in again."""
    bucket = "" if key.bucket == DEFAULT_BUCKET else f" --bucket {key.bucket}"
    return f"credproxy login {key.provider}{bucket}"


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a secret, fit for logs."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def sanitize(token: dict[str, Any]) -> dict[str, Any]:
    """The token as served: everything but ``refresh_token``."""
    return {k: v for k, v in token.items() if k != "refresh_token"}


@dataclass(frozen=True, slots=True)
class Entry:
    """One generation of one stored token, as the daemon serves it."""

    token: dict[str, Any]
    signature: tuple[int, int]
    served: bytes  # JSON of sanitize(token)
    fp: str
    facts: serving.TokenFacts

    @property
    def expiry(self) -> float | None:
        return self.facts.expiry

    @property
    def refreshable(self) -> bool:
        return self.facts.refreshable


class _Flight:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Entry | None = None
        self.error: CredproxyError | None = None


class Tokens:
    """Every stored token as the daemon sees it (see the module docstring).

    Args:
        cfg: providers and renewal settings.
        store: the token store.
        endpoint: where refresh requests go.
        refresh_nursery: where refreshes run (outliving whoever asked).
        wall_clock: epoch seconds.
        boot_clock: seconds on a clock that wall-clock steps do not move and
            that counts suspend (``CLOCK_BOOTTIME``): what freshness is
            decided with, beside the stored wall-clock expiry.
        rng: the source of renewal jitter.
    """

    def __init__(
        self,
        cfg: Config,
        store: TokenStore,
        endpoint: TokenEndpoint,
        refresh_nursery: trio.Nursery,
        *,
        wall_clock: Callable[[], float],
        boot_clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.endpoint = endpoint
        self.wall = wall_clock
        self.boot = boot_clock
        self.rng = rng
        self._nursery: trio.Nursery | None = refresh_nursery
        self._entries: dict[Key, Entry] = {}
        self._health: dict[Key, KeyHealth] = {}
        self._flights: dict[Key, _Flight] = {}
        # Keys whose newest token is only in memory (its durable write failed),
        # and the keys with a task retrying that write.
        self._unsaved: dict[Key, Entry] = {}
        self._savers: set[Key] = set()
        self._closing = trio.Event()
        self._told: set[Key] = set()  # keys whose need of a new login the host was told
        self._marks: dict[Key, BucketMarks] = {}  # quota holds, per key (several accounts)

    def close(self) -> None:
        """No new refreshes from now on (shutdown); those under way finish.

        Unsaved tokens get one last write attempt at once.
        """
        self._nursery = None
        self._closing.set()

    # -- the cache -----------------------------------------------------------

    def entry(self, key: Key) -> Entry | None:
        """The current token of *key*, or None; reads the file only if it changed.

        Raises:
            StoreError: the store could not be read.
        """
        sig = self.store.signature(*key)
        entry = self._entries.get(key)
        if entry is not None and entry.signature == sig and sig is not None:
            return entry
        if key in self._unsaved:
            self._drop_unsaved(key, "the stored token was replaced or removed")
        if sig is None:
            self._entries.pop(key, None)
            return None
        token, sig = self.store.read_with_signature(*key)
        if token is None or sig is None:
            self._entries.pop(key, None)
            return None
        return self._remember(key, token, sig)

    def _remember(self, key: Key, token: dict[str, Any], sig: tuple[int, int]) -> Entry:
        old = self._entries.get(key)
        expiry = policy.token_expiry(token)
        if policy.expiry_is_invalid(token):
            log.warning(
                "token_expiry_invalid",
                provider=key.provider,
                bucket=key.bucket,
                why="the stored expiry is not a number; treated as expired",
            )
        lifetime = old.facts.lifetime if old is not None else None
        boot_deadline = old.facts.boot_deadline if old is not None else None
        if expiry is not None and (old is None or old.expiry != expiry):
            # A new generation: its remaining time is a lower bound of the
            # key's lifetime; keep the largest seen so a token imported late
            # in its life does not shrink the serve margin for good.
            remaining = expiry - self.wall()
            lifetime = max(lifetime or 0.0, remaining)
            # Where its life ends on the boot clock, which no wall-clock step
            # moves: exact for a token just received (its expiry is now +
            # expires_in), the wall clock's word for one first seen on disk.
            boot_deadline = self.boot() + remaining
        facts = serving.TokenFacts(
            expiry=expiry,
            refreshable=bool(token.get("refresh_token")) and expiry is not None,
            lifetime=lifetime,
            boot_deadline=boot_deadline,
        )
        entry = Entry(
            token=token,
            signature=sig,
            served=_encoder.encode(sanitize(token)),
            fp=fingerprint(str(token.get("access_token", ""))),
            facts=facts,
        )
        self._entries[key] = entry
        return entry

    def health(self, key: Key) -> KeyHealth:
        health = self._health.get(key)
        if health is None:
            health = self._health[key] = KeyHealth()
        return health

    def known_health(self, key: Key) -> KeyHealth | None:
        return self._health.get(key)

    def changed(self, key: Key) -> bool:
        """The command line replaced or removed *key*; True if it is still stored.

        A new login forgets the old failures (and an unsaved older token).
        """
        if key in self._unsaved:
            self._drop_unsaved(key, "a new login or a logout replaced it")
        self._entries.pop(key, None)
        self._health.pop(key, None)
        self._told.discard(key)  # a new login (or a logout) ends the need to tell
        return self.store.signature(*key) is not None

    # -- serving -------------------------------------------------------------

    def _get_entry(self, key: Key) -> Entry:
        entry = self.entry(key)
        if entry is None:
            raise NotFound(f"no token for {key} in this session")
        return entry

    async def get(self, key: Key) -> Entry:
        """The token ``get_token`` serves for *key*, refreshed first when due.

        Raises:
            NotFound: no token is stored.
            ReauthRequired: it has expired and cannot be refreshed.
            RefreshFailed: a refresh was due, failed, and the old token has expired.
        """
        entry = self._get_entry(key)
        facts = self.facts(entry)
        decision = serving.on_get(facts, self.wall(), self.cfg.renewal)
        if isinstance(decision, serving.Reauth):
            raise self.reauth(key, f"the token {decision.why}")
        if isinstance(decision, serving.Serve):
            return entry
        try:
            return await self.refresh_to_serve(key, entry, reason="on-demand")
        except (RefreshFailed, ReauthRequired) as exc:
            if serving.after_failed_refresh(self.facts(entry), self.wall()) is None:
                if isinstance(exc, ReauthRequired):
                    raise self.reauth(key, str(exc)) from None
                raise
            return entry

    async def refresh_requested(self, key: Key) -> Entry:
        """The sandbox's ``refresh_token`` op (with its cooldown).

        Raises:
            NotFound, ReauthRequired, RefreshFailed: as :meth:`get`.
            RateLimited: inside the cooldown with an expired token.
        """
        entry = self._get_entry(key)
        health = self._health.get(key)
        decision = serving.on_refresh_request(
            self.facts(entry),
            None if health is None else health.last_attempt,
            self.wall(),
            self.cfg.renewal,
        )
        if isinstance(decision, serving.Serve):
            return entry
        if isinstance(decision, serving.RateLimit):
            raise RateLimited(f"{key} was refreshed moments ago; retry later", decision.retry_after)
        if isinstance(decision, serving.Reauth):
            raise self.reauth(key, f"the token {decision.why}")
        try:
            return await self.refresh(key, None, reason="requested")
        except ReauthRequired as exc:
            raise self.reauth(key, str(exc)) from None

    async def refresh_to_serve(self, key: Key, entry: Entry, reason: str) -> Entry:
        """*entry* renewed before it is served (``get_token``, the API proxy, failover).

        If the key's last refresh failed less than ``refresh_cooldown`` ago, the
        IdP is not asked again, however many requests come: a still-valid
        *entry* is served as it is, an expired one gets that failure.

        Raises:
            ReauthRequired, RefreshFailed, NotFound: as :meth:`refresh`.
        """
        health = self._health.get(key)
        if (
            health is not None
            and health.failures
            and serving.cooldown_left(health.last_attempt, self.wall(), self.cfg.renewal) > 0
        ):
            if serving.after_failed_refresh(self.facts(entry), self.wall()) is not None:
                return entry
            raise RefreshFailed(
                f"{key}: its last refresh failed moments ago ({health.last_error}); "
                "retry in a few seconds"
            )
        return await self.refresh(key, entry.expiry, reason=reason)

    async def after_rejection(self, key: Key, rejected: Entry) -> Entry | None:
        """A token to retry with after an upstream refused *rejected*, or None.

        An upstream 401 goes through the ``refresh_token`` op's rules: a newer
        token already there (renewed by anyone) is used as is; else one
        refresh, shared with every caller, at most once per
        ``refresh_cooldown`` for the key, whoever asked (API proxy,
        ``refresh_token``, ``report_failure``, renewal). Inside the cooldown
        there is nothing newer to try: None, and the caller passes the 401 on.
        """
        try:
            current = self.entry(key)
        except StoreError:
            return None
        if current is None:
            return None
        if current.fp != rejected.fp:
            return current
        if key not in self._flights:
            health = self._health.get(key)
            last = None if health is None else health.last_attempt
            if not current.refreshable or serving.cooldown_left(
                last, self.wall(), self.cfg.renewal
            ):
                return None
        try:
            # Seen expiry: the rejected one's, so a token renewed meanwhile (by
            # another process too) is taken instead of refreshing again.
            entry = await self.refresh(key, rejected.expiry, reason="api-401")
        except ReauthRequired as exc:
            self.reauth(key, str(exc))  # the host hears it, once
            return None
        except CredproxyError:
            return None
        return entry if entry.fp != rejected.fp else None

    def facts(self, entry: Entry) -> serving.TokenFacts:
        """*entry*'s facts with the expiry no wall-clock step can stretch."""
        return entry.facts.at(self.wall(), self.boot())

    def expiry(self, entry: Entry) -> float | None:
        """*entry*'s true expiry in wall-clock terms (see :func:`serving.true_expiry`)."""
        return serving.true_expiry(entry.facts, self.wall(), self.boot())

    # -- several accounts: the daemon's own quota holds ---------------------------
    #
    # What the daemon saw itself (a 429 answered through the API proxy) holds a
    # bucket for every session. What a sandbox reports holds it for that
    # session only (Session.holds); see credproxy.core.failover.

    def marks(self, key: Key) -> BucketMarks | None:
        """The daemon's quota hold on *key*, if it ever had one."""
        return self._marks.get(key)

    def quota_held(self, key: Key) -> bool:
        """True while the daemon holds *key* as quota-exhausted."""
        marks = self._marks.get(key)
        return marks is not None and marks.held(self.wall())

    def hold_until(self, retry_after: float | None) -> float:
        """The wall-clock instant a hold that starts now ends (capped at ``max_quota_hold``)."""
        fo = self.cfg.failover
        return self.wall() + failover.quota_hold(retry_after, fo.quota_hold, fo.max_quota_hold)

    def mark_quota(self, key: Key, retry_after: float | None) -> float:
        """Hold *key* as quota-exhausted for every session; returns when the hold ends."""
        marks = self._marks.get(key)
        if marks is None:
            marks = self._marks[key] = BucketMarks()
        until = marks.hold(self.hold_until(retry_after))
        log.info(
            "bucket_quota_exhausted",
            provider=key.provider,
            bucket=key.bucket,
            source="daemon",
            held_for=round(until - self.wall()),
        )
        return until

    def daemon_holds(self) -> list[tuple[Key, float]]:
        """Every hold of the daemon's own still in force, with its end."""
        now = self.wall()
        return [
            (key, m.quota_until)
            for key, m in sorted(self._marks.items())
            if m.quota_until is not None and m.held(now)
        ]

    def forget_ended_hold(self, key: Key) -> None:
        """Drop the daemon's hold on *key* if it has ended."""
        marks = self._marks.get(key)
        if marks is not None and not marks.held(self.wall()):
            del self._marks[key]

    def release(self, provider: str, bucket: str | None) -> int:
        """End the daemon's holds on *provider* (one bucket, or all); returns how many."""
        now = self.wall()
        ended = 0
        for key in [k for k in self._marks if k.provider == provider]:
            if bucket is not None and key.bucket != bucket:
                continue
            if self._marks.pop(key).held(now):
                ended += 1
        return ended

    def reauth_many(self, provider: str, buckets: tuple[str, ...], why: str) -> str:
        """Ask the host for one new login of several buckets at once; returns the commands."""
        keys = [Key(provider, b) for b in buckets]
        logins = "; ".join(login_command(k) for k in keys)
        # Only told, not marked re-auth required: a bucket whose refresh failed
        # for a moment (the network) stays one the next walk tries to refresh.
        fresh = [k for k in keys if k not in self._told]
        if fresh:
            self._told.update(fresh)
            log.warning(
                "reauth_needed",
                provider=provider,
                buckets=[k.bucket for k in fresh],
                login=logins,
            )
            if self.cfg.notify.command and self._nursery is not None:
                self._nursery.start_soon(self._notify, fresh[0], why, logins)
        return logins

    def reauth(self, key: Key, why: str) -> ReauthRequired:
        """The error a sandbox gets when *key* needs a new login; the host is told once.

        The message names the command to run on the host. The person hears it
        once per key (a log event, ``status``, and ``[notify] command`` when
        configured) until a new login or a logout of the key.
        """
        login = login_command(key)
        health = self.health(key)
        health.reauth_required = True
        if key not in self._told:
            self._told.add(key)
            log.warning("reauth_needed", provider=key.provider, bucket=key.bucket, login=login)
            if self.cfg.notify.command and self._nursery is not None:
                self._nursery.start_soon(self._notify, key, why, login)
        return ReauthRequired(f"{key} needs a new login ({why}); on the host run: {login}")

    async def _notify(self, key: Key, why: str, login: str) -> None:
        """Run ``[notify] command`` (no shell), with a bounded wait and its outcome logged."""
        argv = [*self.cfg.notify.command, f"credproxy: {key} needs a new login ({why}): {login}"]
        env = dict(
            os.environ,
            CREDPROXY_PROVIDER=key.provider,
            CREDPROXY_BUCKET=key.bucket,
            CREDPROXY_LOGIN=login,
        )
        try:
            with trio.fail_after(NOTIFY_TIMEOUT):
                result = await trio.run_process(
                    argv, env=env, check=False, stdin=b"", capture_stdout=True, capture_stderr=True
                )
        except (OSError, trio.TooSlowError) as exc:
            log.warning("notify_failed", command=argv[0], error=type(exc).__name__)
            return
        if result.returncode != 0:
            log.warning("notify_failed", command=argv[0], status=result.returncode)

    def serve_until(self, entry: Entry) -> float:
        """Until which instant of the boot clock *entry* may be served without asking again.

        On the boot clock, not the wall clock: a wall clock put back must not
        stretch the reuse of an answer (the serving loop compares with it).
        """
        now, boot = self.wall(), self.boot()
        until = serving.serve_until(entry.facts.at(now, boot), now, self.cfg.renewal, RECHECK)
        return boot + (until - now)

    # -- refreshing ----------------------------------------------------------

    async def refresh(self, key: Key, seen_expiry: float | None, reason: str) -> Entry:
        """Renew *key* unless the stored token is already newer than *seen_expiry*.

        Returns the current entry (renewed here or elsewhere).

        Raises:
            ReauthRequired: the refresh token was rejected, or there is none.
            RefreshFailed: a transient failure; the old token is unchanged.
            NotFound: the token was removed.
        """
        flight = self._flights.get(key)
        if flight is None:
            if self._nursery is None:
                raise RefreshFailed("the daemon is shutting down")
            flight = self._flights[key] = _Flight()
            self._nursery.start_soon(self._fly, key, flight, seen_expiry, reason)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.result is not None
        return flight.result

    async def _fly(self, key: Key, flight: _Flight, seen_expiry: float | None, reason: str) -> None:
        try:
            flight.result = await self._locked_refresh(key, seen_expiry, reason)
        except NotFound as exc:
            flight.error = exc  # logged out: not a failure of the key
        except CredproxyError as exc:
            self._failed(key, exc, reason)
            flight.error = exc
        except Exception:
            log.exception("refresh_crashed", provider=key.provider, bucket=key.bucket)
            flight.error = RefreshFailed("internal error during refresh; see the daemon log")
            self._failed(key, flight.error, reason)
        finally:
            del self._flights[key]
            flight.done.set()

    async def _locked_refresh(self, key: Key, seen_expiry: float | None, reason: str) -> Entry:
        fd = await self._lock(key)
        try:
            return await self._refresh_holding_lock(key, seen_expiry, reason)
        finally:
            os.close(fd)

    async def _lock(self, key: Key) -> int:
        """Take the key's flock, polling so the loop never blocks; close the fd to release.

        Raises:
            StoreError: the lock file cannot be opened (e.g. a read-only state
                directory without one).
        """
        fd = self.store.open_lock(*key)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    await trio.sleep(LOCK_POLL)
        except BaseException:
            os.close(fd)
            raise

    async def _refresh_holding_lock(
        self, key: Key, seen_expiry: float | None, reason: str
    ) -> Entry:
        provider, bucket = key
        if key in self._unsaved:
            # Our newest token is only in memory: it, not the spent one on
            # disk, is what this refresh starts from, whether or not it can be
            # written now. No temp file can be newer than it.
            self._save_unsaved(key)
        elif self.store.recover_pending(provider, bucket):
            log.warning(
                "token_recovered",
                provider=provider,
                bucket=bucket,
                why="a refresh interrupted before its rename",
            )
        stored = self.entry(key)  # re-read under the lock: the double-check
        if stored is None:
            raise NotFound(f"no token for {key}")
        if stored.expiry is not None and seen_expiry is not None and stored.expiry > seen_expiry:
            log.info("refresh_skipped", provider=provider, bucket=bucket, why="renewed elsewhere")
            return stored
        health = self.health(key)
        rt = stored.token.get("refresh_token")
        if not isinstance(rt, str) or not rt:
            raise ReauthRequired(f"{key} has no refresh token")
        prov = self.cfg.providers.get(provider)
        if prov is None:
            raise RefreshFailed(
                f"provider {provider!r} is not configured; add [providers.{provider}] "
                "to the config file"
            )
        # Claim the disk space for the answer before asking: a full disk is
        # met now, while the refresh token in hand still works. If it cannot
        # be claimed, refresh anyway (the answer is then kept in memory):
        # refusing would only let the access token run out.
        reservation: Reservation | None = None
        try:
            reservation = self.store.reserve(provider, bucket, stored.token)
        except StoreError as exc:
            log.warning("store_reserve_failed", provider=provider, bucket=bucket, error=str(exc))
        try:
            self.store.fault("refresh-before-request")
            health.attempted(self.wall())
            new = await self.endpoint.refresh(prov, rt)
            # The old refresh token may be spent now: the new one must reach
            # the disk whatever happens to whoever asked. There is
            # deliberately no await between the response and the write, so
            # no cancellation (session close, shutdown) can land in between;
            # the bytes go into the reserved file first, which a SIGKILL
            # after that point cannot take back (recover_pending adopts it).
            merged = merge_refreshed(stored.token, new)
            self.store.fault("refresh-got-response")
            health.succeeded(self.wall())  # (a failed write below says so in the same record)
            entry = self._store_refreshed(key, merged, reservation, stored.signature)
            reservation = None
        finally:
            if reservation is not None:
                reservation.release()
        log.info(
            "token_refreshed",
            provider=provider,
            bucket=bucket,
            reason=reason,
            fp=entry.fp,
            expires_in=None if entry.expiry is None else int(entry.expiry - self.wall()),
            rotated=merged.get("refresh_token") != rt,
            durable=key not in self._unsaved,
        )
        return entry

    def _store_refreshed(
        self,
        key: Key,
        merged: dict[str, Any],
        reservation: Reservation | None,
        base: tuple[int, int],
    ) -> Entry:
        """Write a refreshed token; if that fails, make it the unsaved newest token in memory.

        *base* is the signature of the store file it was refreshed from.
        Synchronous on purpose (no await, so no cancellation, in between).
        """
        provider, bucket = key
        try:
            if reservation is not None:
                reservation.commit(_encoder.encode(merged))
            else:
                self.store.write(provider, bucket, merged)
            sig = self._written_signature(key)
        except StoreError as exc:
            entry = self._remember(key, merged, base)
            self._unsaved[key] = entry
            self.health(key).not_durable(str(exc), self.wall())
            log.error(
                "token_not_durable",
                provider=provider,
                bucket=bucket,
                fp=entry.fp,
                error=str(exc),
                why="the rotated refresh token is kept in memory and written when the disk allows",
            )
            self._start_saver(key)
            return entry
        if key in self._unsaved:
            del self._unsaved[key]
            self.health(key).saved()
        return self._remember(key, merged, sig)

    def _written_signature(self, key: Key) -> tuple[int, int]:
        """The signature of the file just written for *key*.

        Raises:
            StoreError: it is gone already.
        """
        sig = self.store.signature(*key)
        if sig is None:
            raise StoreError("token vanished right after it was written")
        return sig

    def _save_unsaved(self, key: Key) -> bool:
        """Write the key's unsaved token, holding its lock; True if nothing is left unsaved."""
        entry = self._unsaved.get(key)
        if entry is None:
            return True
        provider, bucket = key
        if self.entry(key) is not entry:
            return True  # the store changed: entry() dropped the unsaved token
        health = self.health(key)
        try:
            self.store.write(provider, bucket, entry.token)
            sig = self._written_signature(key)
        except StoreError as exc:
            health.not_durable(str(exc), self.wall())
            log.warning(
                "token_save_failed",
                provider=provider,
                bucket=bucket,
                fp=entry.fp,
                error=str(exc),
                attempts=health.save_failures,
            )
            return False
        del self._unsaved[key]
        since = health.unsaved_since
        health.saved()
        self._remember(key, entry.token, sig)
        with suppress(StoreError):
            self.store.recover_pending(provider, bucket)  # removes temp files of failed writes
        log.warning(
            "token_saved",
            provider=provider,
            bucket=bucket,
            fp=entry.fp,
            unsaved_for=None if since is None else round(self.wall() - since, 1),
        )
        return True

    def _drop_unsaved(self, key: Key, why: str) -> None:
        entry = self._unsaved.pop(key)
        health = self._health.get(key)
        if health is not None:
            health.saved()
        log.warning(
            "unsaved_token_dropped", provider=key.provider, bucket=key.bucket, fp=entry.fp, why=why
        )

    def _start_saver(self, key: Key) -> None:
        if key not in self._savers and self._nursery is not None:
            self._savers.add(key)
            self._nursery.start_soon(self._keep_saving, key)

    async def _keep_saving(self, key: Key) -> None:
        """Retry writing *key*'s unsaved token with backoff until it lands (refresh nursery).

        Never raises: a store that keeps failing is retried, up to every
        :data:`SAVE_RETRY_CAP` seconds, for as long as the daemon runs. On
        shutdown it tries once more at once; if that fails too, it says
        loudly that the login will be lost with the process.
        """
        delay = SAVE_RETRY_BASE
        try:
            while key in self._unsaved:
                with trio.move_on_after(delay):
                    await self._closing.wait()
                closing = self._closing.is_set()
                try:
                    fd = await self._lock(key)
                except StoreError as exc:
                    log.warning(
                        "token_save_failed",
                        provider=key.provider,
                        bucket=key.bucket,
                        error=str(exc),
                    )
                    saved = False
                else:
                    try:
                        saved = self._save_unsaved(key)
                    finally:
                        os.close(fd)
                if saved:
                    return
                if closing:
                    log.error(
                        "token_lost_at_exit",
                        provider=key.provider,
                        bucket=key.bucket,
                        why="the daemon is stopping and the renewed token could not be written;"
                        " the next refresh from the stored one will be refused",
                    )
                    return
                delay = min(SAVE_RETRY_CAP, delay * 2)
        finally:
            self._savers.discard(key)

    def _failed(self, key: Key, exc: CredproxyError, reason: str) -> None:
        """Count one failed refresh of *key* (every kind but a logout)."""
        health = self.health(key)
        health.failed(str(exc), reauth=isinstance(exc, ReauthRequired))
        log.warning(
            "refresh_failed",
            provider=key.provider,
            bucket=key.bucket,
            reason=reason,
            error=str(exc),
            reauth_required=health.reauth_required,
            failures=health.failures,
        )

    # -- renewal timers ------------------------------------------------------

    def new_timer(self, key: Key, entry: Entry) -> RenewalTimer:
        """A renewal timer for a refreshable *entry* that was just served."""
        expiry = self.expiry(entry)
        assert expiry is not None
        return RenewalTimer(expiry, self.wall(), self.cfg.renewal, self.rng, self.health(key))

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until the wall-clock instant *deadline*, or as long on the boot clock.

        Both clocks are looked at every 30 s at most: a suspend moves
        both, and is noticed; a wall clock put back would postpone the
        deadline, but the boot clock, which no step moves, fires it on time; a
        wall clock put forward fires it early, which is safe.
        """
        boot_deadline = self.boot() + (deadline - self.wall())
        while True:
            step = min(
                policy.sleep_slice(deadline, self.wall()),
                policy.sleep_slice(boot_deadline, self.boot()),
            )
            if step <= 0:
                return
            await trio.sleep(step)

    async def keep_renewed(self, timer: RenewalTimer, key: Key, session: str) -> None:
        """Run *timer* until it ends or is cancelled (with its session, or a logout)."""
        fields = {"session": session, "provider": key.provider, "bucket": key.bucket}
        assert timer.deadline is not None, "a new timer has its first deadline"
        log.info("renewal_scheduled", in_seconds=round(timer.deadline - self.wall(), 1), **fields)
        try:
            while timer.deadline is not None:
                await self.sleep_until(timer.deadline)
                try:
                    stored = self.entry(key)
                except StoreError as exc:
                    log.warning("renewal_store_unreadable", error=str(exc), **fields)
                    stored = None
                step = timer.on_fire(None if stored is None else stored.token, self.wall())
                if isinstance(step, Refresh):
                    try:
                        entry = await self.refresh(key, step.seen_expiry, reason="proactive")
                    except ReauthRequired as exc:
                        self.reauth(key, str(exc))  # tells the host, once
                        step = timer.on_failure(Failure.REAUTH, self.wall())
                    except NotFound:
                        step = timer.on_failure(Failure.GONE, self.wall())
                    except CredproxyError:
                        # RefreshFailed, StoreError (a full or read-only disk,
                        # a lock file that cannot be opened) and anything else
                        # named: counted in KeyHealth by _fly, retried with
                        # backoff. A timer never takes its session down.
                        step = timer.on_failure(Failure.TRANSIENT, self.wall())
                    else:
                        step = timer.on_success(self.expiry(entry), self.wall())
                _log_step(step, timer, self.wall(), fields)
        finally:
            if timer.ended is None:
                timer.cancel()
                log.info("renewal_cancelled", **fields)


def _log_step(step: Wait | End, timer: RenewalTimer, now: float, fields: dict[str, str]) -> None:
    if isinstance(step, End):
        if step.event == "renewal_gave_up":
            log.warning(step.event, why=step.why, failures=timer.health.failures, **fields)
        else:
            log.info(step.event, why=step.why, **fields)
    elif step.event == "renewal_retry":
        log.info(
            step.event,
            failures=timer.health.failures,
            retry_in=round(step.deadline - now, 1),
            **fields,
        )
    else:
        log.info(step.event, in_seconds=round(step.deadline - now, 1), **fields)
