"""Refresher: "refresh key K now", once, under the key's lock, durably (trio shell).

Theory of operation
-------------------

:class:`Refresher` is what renewing one key means, whoever asks (a serve, the
sandbox's ``refresh_token``, an upstream 401, a renewal timer): it knows
nothing of sessions, serving, quota holds or timers. It keeps two things of
its own, the refreshes under way and the tokens not yet on disk, and reads
and fills its owner's cache through :class:`Cache` (the token as the daemon
holds it, and each key's :class:`~credproxy.core.renewal.KeyHealth`).

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
    the store wins: the cache calls :meth:`Refresher.drop_unsaved`.

Health
    Each attempt, success, failure and failed write is recorded in the key's
    :class:`~credproxy.core.renewal.KeyHealth` (the cache's), which is what
    the cooldowns, ``status`` and the renewal timers read.

A clock step while the answer is on its way
    An ``expires_in`` counts from when the request was sent, and the answer's
    ``expiry`` is that instant on the wall clock of then. If the wall clock is
    stepped before the answer arrives, that expiry is off by the step in
    today's wall-clock terms, and so would be the boot-clock deadline the
    cache derives from it: an hour late (served after it died) or an hour
    early (renewed at once). The wall and boot clocks are read together
    when the endpoint reads the wall clock for the request, just before it
    is sent (:class:`SendClock`: after any secret or key was read), and an
    answer that arrives after a step has its expiry moved by the step
    (:func:`expiry_after_step`): its life still counts from before the
    request, on the boot clock, which no step moves. Not for the grants
    whose answer says when the token ends on the issuer's clock
    (``EXPIRES_AT_GRANTS``): a step does not move that instant.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import msgspec
import trio

from credproxy.core import policy
from credproxy.core.config import EXPIRES_AT_GRANTS, MINTED_WITH, Config, Provider
from credproxy.core.names import Key
from credproxy.core.oauth import TokenEndpoint, merge_refreshed
from credproxy.core.renewal import KeyHealth
from credproxy.errors import (
    CredproxyError,
    NotFound,
    ReauthRequired,
    RefreshFailed,
    RotatedUnusable,
    StoreError,
)
from credproxy.shell import logs
from credproxy.shell.store import Reservation, TokenStore

log = logs.get("credproxy.refresher")
_encoder = msgspec.json.Encoder()

LOCK_POLL = 0.02  # seconds between flock attempts while another process refreshes
SAVE_RETRY_BASE = 1.0  # seconds before retrying the write of an unsaved token, doubling
SAVE_RETRY_CAP = 60.0
MINT_TRIES = 3  # mints in a row while reloads keep changing what a bucket is minted from


class Sent(NamedTuple):
    """The wall clock and the boot clock when a refresh or mint request was sent."""

    wall: float
    boot: float


class SendClock:
    """The wall clock an endpoint reads as its request goes out; notes the boot clock with it.

    :attr:`sent` is that reading (until the endpoint reads the clock, the
    time this was made): a step is reckoned from when the request left, not
    from before a secret or a key was read for it.
    """

    def __init__(self, wall: Callable[[], float], boot: Callable[[], float]) -> None:
        self._wall, self._boot = wall, boot
        self.sent = Sent(wall(), boot())

    def __call__(self) -> float:
        self.sent = Sent(self._wall(), self._boot())
        return self.sent.wall


def expiry_after_step(expiry: float, sent: Sent, wall_now: float, boot_now: float) -> float:
    """*expiry*, reckoned on the wall clock at *sent*, on the wall clock of now.

    The step is what the wall clock moved since *sent* beyond what the boot
    clock did; a difference under :data:`~credproxy.core.policy.CLOCK_STEP` is none, and *expiry*
    is kept as it is. The result is ``wall_now + (sent.boot + (expiry -
    sent.wall) - boot_now)``: the lifetime counted from the boot clock at
    *sent*, whatever the wall clock did.
    """
    step = (wall_now - sent.wall) - (boot_now - sent.boot)
    return expiry if abs(step) < policy.CLOCK_STEP else expiry + step


class Generation(Protocol):
    """What the refresher needs of one generation of a stored token (the cache's entry)."""

    @property
    def token(self) -> dict[str, Any]: ...
    @property
    def signature(self) -> tuple[int, int]: ...
    @property
    def fp(self) -> str: ...
    @property
    def expiry(self) -> float | None: ...

    def lives_until(self, now: float, boot_now: float) -> float | None:
        """Its true expiry: earlier than :attr:`expiry` after a wall clock put back."""
        ...


G = TypeVar("G", bound=Generation)
G_co = TypeVar("G_co", bound=Generation, covariant=True)


class Cache(Protocol[G_co]):
    """The daemon's copy of the stored tokens and their health, as the refresher uses it."""

    def entry(self, key: Key) -> G_co | None:
        """The current token of *key*, re-read if the store file changed (StoreError)."""
        ...

    def remember(self, key: Key, token: dict[str, Any], sig: tuple[int, int]) -> G_co:
        """Make *token* the entry of *key*; *sig* is the signature of the file it came from."""
        ...

    def health(self, key: Key) -> KeyHealth: ...

    def known_health(self, key: Key) -> KeyHealth | None: ...

    def mints(self, key: Key) -> bool:
        """True if *key*'s provider mints its tokens (a signing grant) instead of refreshing."""
        ...

    def mint_failed(self, key: Key, exc: CredproxyError) -> None:
        """A mint of *key* failed (already counted in its health)."""
        ...

    def minted(self, key: Key) -> None:
        """A mint of *key* succeeded."""
        ...


class _Flight(Generic[G]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: G | None = None
        self.error: CredproxyError | None = None


class Refresher(Generic[G]):
    """Single-flight, locked, durable refreshes of every key (see the module docstring).

    Args:
        cfg: the providers (where each key's refresh goes).
        store: the token store.
        endpoint: where refresh requests go.
        nursery: where refreshes and the writers of unsaved tokens run.
        cache: the entries and health records this reads and fills.
        wall_clock: epoch seconds.
        boot_clock: the boot clock (``CLOCK_BOOTTIME``), which no wall-clock step moves.
    """

    def __init__(
        self,
        cfg: Config,
        store: TokenStore,
        endpoint: TokenEndpoint,
        nursery: trio.Nursery,
        cache: Cache[G],
        *,
        wall_clock: Callable[[], float],
        boot_clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.endpoint = endpoint
        self.cache = cache
        self.wall = wall_clock
        self.boot = boot_clock
        self._nursery: trio.Nursery | None = nursery
        self._flights: dict[Key, _Flight[G]] = {}
        # Keys whose newest token is only in memory (its durable write failed),
        # and the keys with a task retrying that write.
        self._unsaved: dict[Key, G] = {}
        self._savers: set[Key] = set()
        self._closing = trio.Event()

    def close(self) -> None:
        """No new refreshes from now on (shutdown); those under way finish.

        Unsaved tokens get one last write attempt at once.
        """
        self._nursery = None
        self._closing.set()

    def in_flight(self, key: Key) -> bool:
        """True while a refresh of *key* is under way (a new caller would share it)."""
        return key in self._flights

    # -- single flight -------------------------------------------------------

    async def refresh(self, key: Key, seen_expiry: float | None, reason: str) -> G:
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

    async def _fly(
        self, key: Key, flight: _Flight[G], seen_expiry: float | None, reason: str
    ) -> None:
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

    def _failed(self, key: Key, exc: CredproxyError, reason: str) -> None:
        """Count one failed refresh of *key* (every kind but a logout)."""
        health = self.cache.health(key)
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
        if self.cache.mints(key):
            self.cache.mint_failed(key, exc)

    # -- under the key's lock ------------------------------------------------

    async def _locked_refresh(self, key: Key, seen_expiry: float | None, reason: str) -> G:
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

    async def _refresh_holding_lock(self, key: Key, seen_expiry: float | None, reason: str) -> G:
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
        stored = self.cache.entry(key)  # re-read under the lock: the double-check
        prov = self.cfg.providers.get(provider)
        # A signing grant mints with a key on the host: no stored token (the
        # first mint) and no refresh token needed, nothing of the old one kept.
        mints = self.cache.mints(key)
        if stored is None and not mints:
            raise NotFound(f"no token for {key}")
        if stored is not None and policy.renewed_since(
            stored.expiry, seen_expiry, stored.lives_until(self.wall(), self.boot()), self.wall()
        ):
            log.info("refresh_skipped", provider=provider, bucket=bucket, why="renewed elsewhere")
            return stored
        health = self.cache.health(key)
        rt = None if stored is None else stored.token.get("refresh_token")
        if not mints and (not isinstance(rt, str) or not rt):
            raise ReauthRequired(f"{key} has no refresh token")
        if prov is None:
            raise RefreshFailed(
                f"provider {provider!r} is not configured; add [providers.{provider}] "
                "to the config file"
            )
        if not mints and not prov.token_url:
            raise RefreshFailed(
                f"provider {provider!r} has no token_url: its login cannot be refreshed "
                f"(add token_url and client_id to [providers.{provider}], or a preset)"
            )
        # Claim the disk space for the answer before asking: a full disk is
        # met now, while the refresh token in hand still works. If it cannot
        # be claimed, refresh anyway (the answer is then kept in memory):
        # refusing would only let the access token run out.
        reservation: Reservation | None = None
        try:
            reservation = self.store.reserve(
                provider, bucket, None if stored is None else stored.token
            )
        except StoreError as exc:
            log.warning("store_reserve_failed", provider=provider, bucket=bucket, error=str(exc))
        try:
            self.store.fault("refresh-before-request")
            health.attempted(self.wall())
            if mints:
                merged = await self._mint(prov, provider, bucket)
            else:
                assert stored is not None
                assert isinstance(rt, str)
                clock = self._send_clock()
                try:
                    new = await self.endpoint.refresh(
                        prov, rt, stored.token.get("scope"), clock=clock
                    )
                except RotatedUnusable as exc:
                    # No usable token, but the old refresh token is spent: the
                    # new one is stored (with the old access token) before the
                    # failure is counted, so the next attempt presents it.
                    kept = {**stored.token, "refresh_token": exc.refresh_token}
                    self._store_refreshed(key, kept, reservation, stored.signature)
                    reservation = None
                    raise RefreshFailed(str(exc)) from None
                # The old refresh token may be spent now: the new one must reach
                # the disk whatever happens to whoever asked. There is
                # deliberately no await between the response and the write, so
                # no cancellation (session close, shutdown) can land in between;
                # the bytes go into the reserved file first, which a SIGKILL
                # after that point cannot take back (recover_pending adopts it).
                new = self._on_todays_clock(key, prov, new, clock.sent)
                merged = merge_refreshed(stored.token, new)
            self.store.fault("refresh-got-response")
            health.succeeded(self.wall())  # (a failed write below says so in the same record)
            if mints:
                self.cache.minted(key)
            base = (0, 0) if stored is None else stored.signature
            entry = self._store_refreshed(key, merged, reservation, base)
            reservation = None
        finally:
            if reservation is not None:
                reservation.release()
        expires_in = None if entry.expiry is None else int(entry.expiry - self.wall())
        if mints:
            log.info(
                "token_minted",
                provider=provider,
                bucket=bucket,
                grant=prov.grant,
                reason=reason,
                fp=entry.fp,
                expires_in=expires_in,
                durable=key not in self._unsaved,
            )
            return entry
        log.info(
            "token_refreshed",
            provider=provider,
            bucket=bucket,
            reason=reason,
            fp=entry.fp,
            expires_in=expires_in,
            rotated=merged.get("refresh_token") != rt,
            durable=key not in self._unsaved,
        )
        return entry

    async def _mint(self, prov: Provider, provider: str, bucket: str) -> dict[str, Any]:
        """A token minted under the configuration in force when it comes back.

        A reload while the issuer answers (a narrowing taken back) makes the
        token one of the old configuration: it is minted again under the new
        one (a few times at most; then the failure is said), never served.

        Raises:
            RefreshFailed: as the mint, or the configuration kept changing.
            NotFound: the reload took the bucket (or the provider) away.
        """
        for _ in range(MINT_TRIES):
            # The key file is read before the mint and after it: a key replaced
            # meanwhile (the mint may have signed with either) mints again.
            digest = self.minted_with(prov, bucket)
            clock = self._send_clock()
            merged = await self.endpoint.mint(prov, bucket, clock=clock)
            merged = self._on_todays_clock(Key(provider, bucket), prov, merged, clock.sent)
            now = self.cfg.providers.get(provider)
            if now is None or not now.mints(bucket):
                raise NotFound(f"{provider}:{bucket} is no longer minted (a reload)")
            if self.minted_with(now, bucket) == digest:
                merged[MINTED_WITH] = digest
                return merged
            prov = now
        raise RefreshFailed(f"{provider}:{bucket}: its configuration changed while minting")

    def minted_with(self, prov: Provider, bucket: str) -> str:
        """What *bucket*'s tokens are minted from now: its key's content too (``minted_with``).

        Reads *prov*'s key file (:func:`~credproxy.shell.signing_keys.key_digest`,
        a few kilobytes): the digest tells a key rotated in place from the one
        it replaced. Never served or logged.
        """
        # Here, not at the top: signing_keys loads cryptography, which a daemon
        # without a signing grant never needs.
        from credproxy.shell.signing_keys import key_digest

        return prov.minted_with(bucket, key=key_digest(prov, self.store.signing_dir))

    def _send_clock(self) -> SendClock:
        """The clock a request's endpoint reads as it sends (:class:`SendClock`)."""
        return SendClock(self.wall, self.boot)

    def _on_todays_clock(
        self, key: Key, prov: Provider, answer: dict[str, Any], sent: Sent
    ) -> dict[str, Any]:
        """*answer* with its expiry moved by a wall-clock step since *sent* (module docstring).

        Synchronous: nothing may come between the answer and its write.
        """
        expiry = policy.expiry_value(answer.get("expiry"))
        if prov.grant in EXPIRES_AT_GRANTS or expiry is None:
            return answer
        moved = expiry_after_step(expiry, sent, self.wall(), self.boot())
        if moved == expiry:
            return answer
        log.info(
            "clock_step_during_refresh",
            provider=key.provider,
            bucket=key.bucket,
            step=round(moved - expiry, 1),
            why="the wall clock was stepped while the answer was on its way; "
            "the token's life counts from when its request was sent",
        )
        return {**answer, "expiry": moved}

    def _store_refreshed(
        self,
        key: Key,
        merged: dict[str, Any],
        reservation: Reservation | None,
        base: tuple[int, int],
    ) -> G:
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
            entry = self.cache.remember(key, merged, base)
            self._unsaved[key] = entry
            self.cache.health(key).not_durable(str(exc), self.wall())
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
            self.cache.health(key).saved()
        return self.cache.remember(key, merged, sig)

    def _written_signature(self, key: Key) -> tuple[int, int]:
        """The signature of the file just written for *key*.

        Raises:
            StoreError: it is gone already.
        """
        sig = self.store.signature(*key)
        if sig is None:
            raise StoreError("token vanished right after it was written")
        return sig

    # -- unsaved tokens ------------------------------------------------------

    def drop_unsaved(self, key: Key, why: str) -> None:
        """Forget *key*'s unsaved token, if it has one: the store changed under it (*why*)."""
        entry = self._unsaved.pop(key, None)
        if entry is None:
            return
        health = self.cache.known_health(key)
        if health is not None:
            health.saved()
        log.warning(
            "unsaved_token_dropped", provider=key.provider, bucket=key.bucket, fp=entry.fp, why=why
        )

    def _save_unsaved(self, key: Key) -> bool:
        """Write the key's unsaved token, holding its lock; True if nothing is left unsaved."""
        entry = self._unsaved.get(key)
        if entry is None:
            return True
        provider, bucket = key
        if self.cache.entry(key) is not entry:
            return True  # the store changed: the cache dropped the unsaved token
        health = self.cache.health(key)
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
        self.cache.remember(key, entry.token, sig)
        with suppress(StoreError):
            # What its own failed writes left is older than this: removed, never adopted.
            self.store.discard_pending(provider, bucket)
        log.warning(
            "token_saved",
            provider=provider,
            bucket=bucket,
            fp=entry.fp,
            unsaved_for=None if since is None else round(self.wall() - since, 1),
        )
        return True

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
