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

Key health
    One :class:`~credproxy.core.renewal.KeyHealth` per key: failures,
    last error, re-auth required, last attempt (the ``refresh_token`` op's
    cooldown counts from it).

Renewal timers
    :meth:`Tokens.keep_renewed` is the trio task of one
    :class:`~credproxy.core.renewal.RenewalTimer`: it sleeps until the
    deadline (in slices of at most 30 s against the wall clock, so a suspend
    is noticed, R16.3), reads the store, refreshes, and reports back.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from credproxy.core import policy, serving
from credproxy.core.config import Config
from credproxy.core.names import Key
from credproxy.core.oauth import TokenEndpoint, merge_refreshed
from credproxy.core.renewal import End, Failure, KeyHealth, Refresh, RenewalTimer, Wait
from credproxy.core.store import TokenStore, fault_point
from credproxy.errors import (
    CredproxyError,
    NotFound,
    RateLimited,
    ReauthRequired,
    RefreshFailed,
    StoreError,
)
from credproxy.shell import logs

log = logs.get("credproxy.tokens")
_encoder = msgspec.json.Encoder()

LOCK_POLL = 0.02  # seconds between flock attempts while another process refreshes
RECHECK = 1.0  # seconds a served answer may be reused before the store is looked at again


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
        rng: random.Random,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.endpoint = endpoint
        self.wall = wall_clock
        self.rng = rng
        self._nursery: trio.Nursery | None = refresh_nursery
        self._entries: dict[Key, Entry] = {}
        self._health: dict[Key, KeyHealth] = {}
        self._flights: dict[Key, _Flight] = {}

    def close(self) -> None:
        """No new refreshes from now on (shutdown); those under way finish."""
        self._nursery = None

    # -- the cache -----------------------------------------------------------

    def entry(self, key: Key) -> Entry | None:
        """The current token of *key*, or None; reads the file only if it changed.

        Raises:
            StoreError: the store could not be read.
        """
        sig = self.store.signature(*key)
        entry = self._entries.get(key)
        if sig is None:
            if entry is not None:
                del self._entries[key]
            return None
        if entry is not None and entry.signature == sig:
            return entry
        token, sig = self.store.read_with_signature(*key)
        if token is None or sig is None:
            self._entries.pop(key, None)
            return None
        return self._remember(key, token, sig)

    def _remember(self, key: Key, token: dict[str, Any], sig: tuple[int, int]) -> Entry:
        old = self._entries.get(key)
        expiry = policy.token_expiry(token)
        lifetime = old.facts.lifetime if old is not None else None
        if expiry is not None and (old is None or old.expiry != expiry):
            # A new generation: its remaining time is a lower bound of the
            # key's lifetime; keep the largest seen so a token imported late
            # in its life does not shrink the serve margin for good.
            lifetime = max(lifetime or 0.0, expiry - self.wall())
        facts = serving.TokenFacts(
            expiry=expiry,
            refreshable=bool(token.get("refresh_token")) and expiry is not None,
            lifetime=lifetime,
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

        A new login forgets the old failures.
        """
        self._entries.pop(key, None)
        self._health.pop(key, None)
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
        decision = serving.on_get(entry.facts, self.wall(), self.cfg.renewal)
        if isinstance(decision, serving.Reauth):
            raise ReauthRequired(
                f"the token for {key} {decision.why}; log in again and "
                f"`credproxy import {key.provider}`"
            )
        if isinstance(decision, serving.Serve):
            return entry
        try:
            return await self.refresh(key, entry.expiry, reason="on-demand")
        except (RefreshFailed, ReauthRequired):
            if serving.after_failed_refresh(entry.facts, self.wall()) is None:
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
            entry.facts,
            None if health is None else health.last_attempt,
            self.wall(),
            self.cfg.renewal,
        )
        if isinstance(decision, serving.Serve):
            return entry
        if isinstance(decision, serving.RateLimit):
            raise RateLimited(f"{key} was refreshed moments ago; retry later", decision.retry_after)
        if isinstance(decision, serving.Reauth):
            raise ReauthRequired(
                f"{key} {decision.why}; log in again and `credproxy import {key.provider}`"
            )
        return await self.refresh(key, None, reason="requested")

    def serve_until(self, entry: Entry) -> float:
        """Until which wall-clock instant *entry* may be served without asking again."""
        return serving.serve_until(entry.facts, self.wall(), self.cfg.renewal, RECHECK)

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
        fd = self.store.open_lock(*key)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await trio.sleep(LOCK_POLL)
            return await self._refresh_holding_lock(key, seen_expiry, reason)
        finally:
            os.close(fd)

    async def _refresh_holding_lock(
        self, key: Key, seen_expiry: float | None, reason: str
    ) -> Entry:
        provider, bucket = key
        if self.store.recover_pending(provider, bucket):
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
            raise ReauthRequired(
                f"{key} has no refresh token; log in again and `credproxy import {provider}`"
            )
        prov = self.cfg.providers.get(provider)
        if prov is None:
            raise RefreshFailed(
                f"provider {provider!r} is not configured; add [providers.{provider}] "
                "to the config file"
            )
        fault_point("refresh-before-request")
        health.attempted(self.wall())
        new = await self.endpoint.refresh(prov, rt)
        # The old refresh token may be spent now: the new one must reach the
        # disk whatever happens to whoever asked. There is deliberately no
        # await between the response and the durable write, so no
        # cancellation (session close, shutdown) can land in between. The
        # write (one small file, fsync, rename, fsync) blocks the loop for a
        # few milliseconds, once per refresh.
        merged = merge_refreshed(stored.token, new)
        fault_point("refresh-got-response")
        self.store.write(provider, bucket, merged)
        sig = self.store.signature(provider, bucket)
        if sig is None:
            raise StoreError("token vanished right after it was written")
        entry = self._remember(key, merged, sig)
        health.succeeded(self.wall())
        log.info(
            "token_refreshed",
            provider=provider,
            bucket=bucket,
            reason=reason,
            fp=entry.fp,
            expires_in=None if entry.expiry is None else int(entry.expiry - self.wall()),
            rotated=merged.get("refresh_token") != rt,
        )
        return entry

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
        assert entry.expiry is not None
        return RenewalTimer(entry.expiry, self.wall(), self.cfg.renewal, self.rng, self.health(key))

    async def keep_renewed(self, timer: RenewalTimer, key: Key, session: str) -> None:
        """Run *timer* until it ends or is cancelled (with its session, or a logout)."""
        fields = {"session": session, "provider": key.provider, "bucket": key.bucket}
        assert timer.deadline is not None, "a new timer has its first deadline"
        log.info("renewal_scheduled", in_seconds=round(timer.deadline - self.wall(), 1), **fields)
        try:
            while timer.deadline is not None:
                await sleep_until_wall(timer.deadline, self.wall)
                try:
                    stored = self.entry(key)
                except StoreError as exc:
                    log.warning("renewal_store_unreadable", error=str(exc), **fields)
                    stored = None
                step = timer.on_fire(None if stored is None else stored.token, self.wall())
                if isinstance(step, Refresh):
                    try:
                        entry = await self.refresh(key, step.seen_expiry, reason="proactive")
                    except ReauthRequired:
                        step = timer.on_failure(Failure.REAUTH, self.wall())
                    except NotFound:
                        step = timer.on_failure(Failure.GONE, self.wall())
                    except (RefreshFailed, StoreError):
                        step = timer.on_failure(Failure.TRANSIENT, self.wall())
                    else:
                        step = timer.on_success(entry.expiry, self.wall())
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


async def sleep_until_wall(deadline: float, wall_clock: Callable[[], float]) -> None:
    """Sleep until the wall clock reaches *deadline*, re-checking at least every 30 s."""
    while True:
        step = policy.sleep_slice(deadline, wall_clock())
        if step <= 0:
            return
        await trio.sleep(step)
