"""Serving and renewing tokens (trio shell over :mod:`credproxy.core.policy`).

Theory of operation
-------------------

Three pieces, each with one job:

:class:`TokenCache`
    The daemon's in-memory copy of each stored token, with the bytes we serve
    already encoded (``refresh_token`` removed). An entry stays valid while the
    store file's (inode, mtime) signature is unchanged; every store write is a
    rename, so a token written by another process is noticed on the next
    request at the cost of one ``stat``.

:class:`Refresher`
    The only code that spends a refresh token. Per key it guarantees:

    * *single flight in the daemon*: concurrent callers share one upstream
      call (the first caller starts a task in the daemon-wide refresh nursery,
      the rest wait on its result);
    * *single use across processes*: the task holds the key's exclusive
      ``flock`` around read -> double-check -> refresh -> durable write. The
      double-check re-reads the store under the lock; if another process
      already renewed the token past what the caller saw, that token is used
      and the (rotated) refresh token is not presented again;
    * *durable before served*: the merged token is on disk (fsync, rename,
      fsync dir) before any waiter gets it;
    * *completion*: the task lives in the daemon's refresh nursery, not in the
      session that asked, so closing a session (or a waiter being cancelled)
      never abandons a response already requested. On shutdown the daemon
      gives that nursery a grace period before cancelling it.

:func:`renewal_timer`
    One per (session, key), started the first time the session serves a
    refreshable token (R16.1). Deadlines are wall-clock instants; the timer
    sleeps in slices of at most 30 s and re-reads the wall clock, so a suspend
    or a clock jump is noticed within 30 s (R16.3). When it fires it re-reads
    the store and stops (logout), reschedules (renewed elsewhere) or refreshes,
    backing off on failure (R16.6, R16.7). It runs in the session's nursery,
    so closing the session cancels it (R16.4).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from credproxy.core import policy
from credproxy.core.config import Config
from credproxy.core.oauth import TokenEndpoint, merge_refreshed
from credproxy.core.store import TokenStore, checkpoint
from credproxy.errors import (
    CredproxyError,
    NotFound,
    ReauthRequired,
    RefreshFailed,
    StoreError,
)
from credproxy.shell import logs

log = logs.get("credproxy.shell.renewal")
_encoder = msgspec.json.Encoder()
Key = tuple[str, str]

LOCK_POLL = 0.02  # seconds between flock attempts while another process refreshes


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a secret, fit for logs."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def sanitize(token: dict[str, Any]) -> dict[str, Any]:
    """The token as served: everything but ``refresh_token``."""
    return {k: v for k, v in token.items() if k != "refresh_token"}


@dataclass(slots=True)
class Entry:
    token: dict[str, Any]
    signature: tuple[int, int]
    served: bytes  # JSON of sanitize(token)
    fp: str
    expiry: float | None
    refreshable: bool
    lifetime: float | None  # expiry minus the wall time this generation was first seen


class TokenCache:
    def __init__(self, store: TokenStore, wall_clock: Callable[[], float]) -> None:
        self.store = store
        self.wall = wall_clock
        self._entries: dict[Key, Entry] = {}

    def get(self, key: Key) -> Entry | None:
        """The current token of *key*, or None; reads the file only if it changed."""
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
        return self._put(key, token, sig, entry)

    def put(self, key: Key, token: dict[str, Any]) -> Entry:
        """Record a token we just wrote (saves the re-read)."""
        sig = self.store.signature(*key)
        if sig is None:
            raise StoreError("token vanished right after it was written")
        return self._put(key, token, sig, self._entries.get(key))

    def _put(
        self, key: Key, token: dict[str, Any], sig: tuple[int, int], old: Entry | None
    ) -> Entry:
        expiry = policy.token_expiry(token)
        lifetime = old.lifetime if old is not None else None
        if expiry is not None and (old is None or old.expiry != expiry):
            # A new generation: its remaining time is a lower bound of the
            # key's lifetime; keep the largest seen so a token imported late
            # in its life does not shrink the serve margin for good.
            lifetime = max(lifetime or 0.0, expiry - self.wall())
        entry = Entry(
            token=token,
            signature=sig,
            served=_encoder.encode(sanitize(token)),
            fp=fingerprint(str(token.get("access_token", ""))),
            expiry=expiry,
            refreshable=bool(token.get("refresh_token")) and expiry is not None,
            lifetime=lifetime,
        )
        self._entries[key] = entry
        return entry

    def drop(self, key: Key) -> None:
        self._entries.pop(key, None)


@dataclass(slots=True)
class KeyStatus:
    """What ``status`` shows of a key, shared by every session."""

    failures: int = 0
    last_error: str | None = None
    reauth_required: bool = False
    last_refresh: float | None = None  # wall time of the last successful refresh
    last_attempt: float | None = None  # wall time of the last request upstream
    refreshes: int = 0


class _Flight:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: Entry | None = None
        self.error: CredproxyError | None = None


class Refresher:
    """Single-flight, cross-process-safe refresh of one key at a time (see module doc)."""

    def __init__(
        self,
        cfg: Config,
        store: TokenStore,
        cache: TokenCache,
        endpoint: TokenEndpoint,
        wall_clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.cache = cache
        self.endpoint = endpoint
        self.wall = wall_clock
        self.status: dict[Key, KeyStatus] = {}
        self._flights: dict[Key, _Flight] = {}
        self.nursery: trio.Nursery | None = None  # set by the daemon

    def key_status(self, key: Key) -> KeyStatus:
        st = self.status.get(key)
        if st is None:
            st = self.status[key] = KeyStatus()
        return st

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
            if self.nursery is None:
                raise RefreshFailed("the daemon is shutting down")
            flight = self._flights[key] = _Flight()
            self.nursery.start_soon(self._run, key, flight, seen_expiry, reason)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.result is not None
        return flight.result

    async def _run(self, key: Key, flight: _Flight, seen_expiry: float | None, reason: str) -> None:
        try:
            flight.result = await self._locked_refresh(key, seen_expiry, reason)
        except CredproxyError as exc:
            flight.error = exc
        except Exception:
            log.exception("refresh_crashed", provider=key[0], bucket=key[1])
            flight.error = RefreshFailed("internal error during refresh; see the daemon log")
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
        stored = self.cache.get(key)  # re-read under the lock: the double-check
        if stored is None:
            raise NotFound(f"no token for {provider}:{bucket}")
        if stored.expiry is not None and seen_expiry is not None and stored.expiry > seen_expiry:
            log.info("refresh_skipped", provider=provider, bucket=bucket, why="renewed elsewhere")
            return stored
        st = self.key_status(key)
        rt = stored.token.get("refresh_token")
        if not isinstance(rt, str) or not rt:
            st.reauth_required = True
            st.last_error = "no refresh token stored"
            raise ReauthRequired(
                f"{provider}:{bucket} has no refresh token; log in again and "
                f"`credproxy import {provider}`"
            )
        prov = self.cfg.providers.get(provider)
        if prov is None:
            err = RefreshFailed(
                f"provider {provider!r} is not configured; add [providers.{provider}] "
                "to the config file"
            )
            self._failed(key, st, err, reason)
            raise err
        checkpoint("refresh-before-request")
        st.last_attempt = self.wall()
        try:
            new = await self.endpoint.refresh(prov, rt)
        except (RefreshFailed, ReauthRequired) as exc:
            self._failed(key, st, exc, reason)
            raise
        # The old refresh token may be spent now: the new one must reach the
        # disk whatever happens to whoever asked. There is deliberately no
        # await between the response and the durable write, so no
        # cancellation (session close, shutdown) can land in between. The
        # write (one small file, fsync, rename, fsync) blocks the loop for a
        # few milliseconds, once per refresh.
        merged = merge_refreshed(stored.token, new)
        checkpoint("refresh-got-response")
        self.store.write(provider, bucket, merged)
        entry = self.cache.put(key, merged)
        st.failures = 0
        st.last_error = None
        st.reauth_required = False
        st.last_refresh = self.wall()
        st.refreshes += 1
        left = None if entry.expiry is None else int(entry.expiry - self.wall())
        log.info(
            "token_refreshed",
            provider=provider,
            bucket=bucket,
            reason=reason,
            fp=entry.fp,
            expires_in=left,
            rotated=merged.get("refresh_token") != rt,
        )
        return entry

    def _failed(self, key: Key, st: KeyStatus, exc: CredproxyError, reason: str) -> None:
        st.failures += 1
        st.last_error = str(exc)
        if isinstance(exc, ReauthRequired):
            st.reauth_required = True
        log.warning(
            "refresh_failed",
            provider=key[0],
            bucket=key[1],
            reason=reason,
            error=str(exc),
            reauth_required=st.reauth_required,
            failures=st.failures,
        )


@dataclass(slots=True)
class Timer:
    """One renewal timer of one session (what ``status`` shows)."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    deadline: float | None = None  # wall-clock instant of the next attempt
    failures: int = 0
    last_error: str | None = None
    reauth_required: bool = False
    gave_up: bool = False
    done: bool = False  # the task has ended (gave up, stopped, or cancelled)


async def sleep_until_wall(deadline: float, wall_clock: Callable[[], float]) -> None:
    """Sleep until the wall clock reaches *deadline*, re-checking at least every 30 s."""
    while True:
        step = policy.sleep_slice(deadline, wall_clock())
        if step <= 0:
            return
        await trio.sleep(step)


async def renewal_timer(
    refresher: Refresher,
    key: Key,
    expiry: float,
    timer: Timer,
    session: str,
    rng: random.Random,
) -> None:
    """Keep *key* renewed for one session until cancelled, logged out or given up."""
    cfg = refresher.cfg.renewal
    wall = refresher.wall
    provider, bucket = key
    assert timer.deadline is not None, "the caller schedules the first deadline"
    with timer.scope:
        log.info(
            "renewal_scheduled",
            session=session,
            provider=provider,
            bucket=bucket,
            in_seconds=round(timer.deadline - wall(), 1),
        )
        try:
            while True:
                await sleep_until_wall(timer.deadline, wall)
                try:
                    entry = refresher.cache.get(key)
                except StoreError as exc:
                    entry, timer.last_error = None, str(exc)
                decision = policy.decide_on_fire(
                    None if entry is None else entry.token, expiry, wall()
                )
                if isinstance(decision, policy.Stop):
                    log.info(
                        "renewal_stopped",
                        session=session,
                        provider=provider,
                        bucket=bucket,
                        why="token removed or not refreshable",
                    )
                    return
                if isinstance(decision, policy.Reschedule):
                    expiry = decision.expiry
                    timer.failures = 0
                    timer.deadline = policy.renewal_deadline(expiry, wall(), cfg, rng)
                    log.info(
                        "renewal_rescheduled",
                        session=session,
                        provider=provider,
                        bucket=bucket,
                        in_seconds=round(timer.deadline - wall(), 1),
                    )
                    continue
                try:
                    entry = await refresher.refresh(key, expiry, reason="proactive")
                except ReauthRequired as exc:
                    timer.reauth_required, timer.last_error = True, str(exc)
                    timer.deadline, timer.gave_up = None, True
                    log.warning(
                        "renewal_gave_up",
                        session=session,
                        provider=provider,
                        bucket=bucket,
                        why="re-authentication required",
                    )
                    return
                except NotFound:
                    log.info(
                        "renewal_stopped",
                        session=session,
                        provider=provider,
                        bucket=bucket,
                        why="token removed",
                    )
                    return
                except RefreshFailed as exc:
                    timer.failures += 1
                    timer.last_error = str(exc)
                    if policy.gives_up(timer.failures, cfg):
                        timer.deadline, timer.gave_up = None, True
                        log.warning(
                            "renewal_gave_up",
                            session=session,
                            provider=provider,
                            bucket=bucket,
                            failures=timer.failures,
                        )
                        return
                    delay = policy.retry_delay(timer.failures, cfg)
                    timer.deadline = wall() + delay
                    log.info(
                        "renewal_retry",
                        session=session,
                        provider=provider,
                        bucket=bucket,
                        failures=timer.failures,
                        retry_in=delay,
                    )
                    continue
                timer.failures, timer.last_error = 0, None
                if entry.expiry is None:
                    return
                expiry = entry.expiry
                timer.deadline = policy.renewal_deadline(expiry, wall(), cfg, rng)
                log.info(
                    "renewal_scheduled",
                    session=session,
                    provider=provider,
                    bucket=bucket,
                    in_seconds=round(timer.deadline - wall(), 1),
                )
        finally:
            if timer.scope.cancel_called:
                log.info("renewal_cancelled", session=session, provider=provider, bucket=bucket)
            timer.deadline = None
            timer.done = True


def retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))
