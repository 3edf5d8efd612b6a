"""Tokens: lookup, serve decisions and renewal of every key (trio shell).

Theory of operation
-------------------

:class:`Tokens` is the one interface the rest of the daemon uses for tokens.
It owns four things, hands two rooms their own job, and decides nothing
itself: every decision is a pure function of :mod:`credproxy.core.serving`
or a transition of :class:`credproxy.core.renewal.RenewalTimer`.

The cache
    The daemon's copy of each stored token (:class:`Entry`), with the bytes
    we serve already encoded (``refresh_token`` removed). An entry is valid
    while the store file's (inode, mtime) signature is unchanged; every store
    write is a rename, so a token written by another process is noticed at the
    cost of one ``stat``. A changed file also ends an unsaved token (the store
    wins; see :mod:`credproxy.shell.refresher`).

Serve decisions
    ``get_token`` refreshes first when :func:`serving.on_get` says so, the
    sandbox's ``refresh_token`` goes through its cooldown, an upstream 401
    gets one shared refresh at most once per ``refresh_cooldown``, and a key
    whose last refresh failed moments ago is not refreshed again before it is
    served (:meth:`Tokens.refresh_to_serve`).

Key health and re-auth notices
    One :class:`~credproxy.core.renewal.KeyHealth` per key: failures,
    last error, re-auth required, last attempt (the ``refresh_token`` op's
    cooldown counts from it). A key that needs a new login is told to the
    host once (a log event, ``status``, ``[notify] command``) until a new
    login or a logout.

Renewal timers
    :meth:`Tokens.keep_renewed` is the trio task of one
    :class:`~credproxy.core.renewal.RenewalTimer`: it sleeps until the
    deadline (in slices of at most 30 s against the wall clock and the boot
    clock, so a suspend or a clock step is noticed within 30 s), reads the
    store, refreshes, and reports back.

Refreshing a key is :class:`~credproxy.shell.refresher.Refresher`'s job
(single flight, the key's ``flock``, the write reserved before the request,
durable before served, unsaved tokens and their writer), which reads and
fills this cache; the daemon's quota holds are
:class:`~credproxy.shell.holds.Holds` (``Tokens.holds``), which the
methods of the same names here delegate to.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from credproxy.core import policy, serving
from credproxy.core.config import MINTED_WITH, SIGNING_GRANTS, UNSERVED_FIELDS, Config
from credproxy.core.failover import BucketMarks
from credproxy.core.names import DEFAULT_BUCKET, Key
from credproxy.core.oauth import TokenEndpoint
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
from credproxy.shell.holds import Holds
from credproxy.shell.refresher import Refresher
from credproxy.shell.store import TokenStore

log = logs.get("credproxy.tokens")
_encoder = msgspec.json.Encoder()

NOTIFY_TIMEOUT = 10.0  # seconds a [notify] command may run
MINT_FAILURES_TO_TELL = 3  # consecutive failed mints of a key before the host is told
RECHECK = 1.0  # seconds a served answer may be reused before the store is looked at again


def login_command(key: Key) -> str:
    """The command the person on the host runs to log *key* in again."""
    bucket = "" if key.bucket == DEFAULT_BUCKET else f" --bucket {key.bucket}"
    return f"credproxy login {key.provider}{bucket}"


def fingerprint(secret: str) -> str:
    """A short, non-reversible name for a secret, fit for logs."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def sanitize(token: dict[str, Any]) -> dict[str, Any]:
    """The token as served: everything but ``refresh_token`` (and a minted one's digest)."""
    return {k: v for k, v in token.items() if k not in UNSERVED_FIELDS}


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

    def lives_until(self, now: float, boot_now: float) -> float | None:
        """Its true expiry (:func:`serving.true_expiry`)."""
        return serving.true_expiry(self.facts, now, boot_now)


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
        self.wall = wall_clock
        self.boot = boot_clock
        self.rng = rng
        self._nursery: trio.Nursery | None = refresh_nursery  # [notify] commands, the clock watch
        # Renewal timers asleep (sleep_until), and the one watch of the clocks for them.
        self._sleepers = 0
        self._watching = False
        self._clocks_moved = trio.Event()  # set (and replaced) when the clocks moved apart
        self._no_sleepers = trio.Event()
        self._entries: dict[Key, Entry] = {}
        self._health: dict[Key, KeyHealth] = {}
        self._told: set[Key] = set()  # keys whose need of a new login the host was told
        self.refresher: Refresher[Entry] = Refresher(
            cfg,
            store,
            endpoint,
            refresh_nursery,
            self,
            wall_clock=wall_clock,
            boot_clock=boot_clock,
        )
        self.holds = Holds(cfg.failover, wall_clock)

    def close(self) -> None:
        """No new refreshes from now on (shutdown); those under way finish.

        Unsaved tokens get one last write attempt at once.
        """
        self._nursery = None
        self._no_sleepers.set()  # (the clock watch ends now, not after its 30 s)
        self.refresher.close()

    # -- the cache -----------------------------------------------------------

    def entry(self, key: Key) -> Entry | None:
        """The current token of *key*, or None; reads the file only if it changed.

        A bucket a signing provider does not mint has none, whatever is
        stored for it (an earlier version minted for any name a sandbox asked for).

        Raises:
            StoreError: the store could not be read.
        """
        prov = self.cfg.providers.get(key.provider)
        if prov is not None and prov.grant in SIGNING_GRANTS and not prov.mints(key.bucket):
            return None
        sig = self.store.signature(*key)
        entry = self._entries.get(key)
        if entry is not None and entry.signature == sig and sig is not None:
            return entry
        self.refresher.drop_unsaved(key, "the stored token was replaced or removed")
        if sig is None:
            self._entries.pop(key, None)
            return None
        token, sig = self.store.read_with_signature(*key)
        if token is None or sig is None:
            self._entries.pop(key, None)
            return None
        return self.remember(key, token, sig)

    def remember(self, key: Key, token: dict[str, Any], sig: tuple[int, int]) -> Entry:
        """Make *token* the entry of *key*; *sig* is the signature of the file it came from."""
        old = self._entries.get(key)
        expiry = policy.token_expiry(token)
        if policy.expiry_is_invalid(token):
            log.warning(
                "token_expiry_invalid",
                provider=key.provider,
                bucket=key.bucket,
                why="the stored expiry is not a number; treated as expired",
            )
        mints = self.mints(key)
        if self._minted_elsewise(key, token):
            # Minted under another configuration (a narrowing taken back, another
            # installation) or with another key (a key file replaced, even in
            # place): not served; minted again if the key still mints.
            expiry = 0.0
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
            # A key whose provider mints (a signing grant) renews without a refresh token.
            refreshable=bool(token.get("refresh_token") or mints) and expiry is not None,
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

    def mints(self, key: Key) -> bool:
        """True if *key* is minted with a key on the host (docs/signing.md; ``Provider.mints``)."""
        prov = self.cfg.providers.get(key.provider)
        return prov is not None and prov.mints(key.bucket)

    def health(self, key: Key) -> KeyHealth:
        """*key*'s health record, made if it has none yet."""
        health = self._health.get(key)
        if health is None:
            health = self._health[key] = KeyHealth()
        return health

    def known_health(self, key: Key) -> KeyHealth | None:
        """*key*'s health record, if it has one."""
        return self._health.get(key)

    def _minted_elsewise(self, key: Key, token: dict[str, Any]) -> bool:
        """True if *token* is a minted one, or *key* mints, and what they are minted from differs.

        What *key* is minted from now includes its key file's content, read
        here (:meth:`Refresher.minted_with`). A token stored before the
        digest covered the content differs, and is minted again.
        """
        minted = token.get(MINTED_WITH)
        prov = self.cfg.providers.get(key.provider)
        if prov is None or not prov.mints(key.bucket):
            return minted is not None
        return minted != self.refresher.minted_with(prov, key.bucket)

    def stale_mints(self) -> list[Key]:
        """The keys whose cached token was minted under another configuration (a reload).

        Or with another key: each minting provider's key file is read again
        here, so a reload after a key was replaced in place finds the tokens
        of the old key. Their entries are dropped: the next serve reads the
        store again, finds the token stale, and mints anew.
        """
        stale = [key for key, e in self._entries.items() if self._minted_elsewise(key, e.token)]
        for key in stale:
            del self._entries[key]
        return stale

    def changed(self, key: Key) -> bool:
        """The command line replaced or removed *key*; True if it is still stored.

        A new login forgets the old failures (and an unsaved older token).
        """
        self.refresher.drop_unsaved(key, "a new login or a logout replaced it")
        self._entries.pop(key, None)
        self._health.pop(key, None)
        self._told.discard(key)  # a new login (or a logout) ends the need to tell
        return self.store.signature(*key) is not None

    # -- serving -------------------------------------------------------------

    async def _first_mint(self, key: Key) -> Entry:
        """The first token of a key that mints (none is stored yet); else NotFound.

        A mint that failed less than ``refresh_cooldown`` ago is not tried
        again: the caller gets that failure, however many ask.

        Raises:
            NotFound: the key does not mint and no token is stored.
            RefreshFailed: the mint failed (the message says why and what to do).
        """
        if not self.mints(key):
            raise NotFound(f"no token for {key} in this session")
        health = self._health.get(key)
        if (
            health is not None
            and health.failures
            and serving.cooldown_left(health.last_attempt, self.wall(), self.cfg.renewal) > 0
        ):
            raise RefreshFailed(f"{key}: {health.last_error}; retry in a few seconds")
        return await self.refresher.refresh(key, None, reason="first-serve")

    def mint_failed(self, key: Key, exc: CredproxyError) -> None:
        """A mint of *key* failed (the refresher counted it); the host is told at the third.

        Told once, in the log and through ``[notify] command``, until a mint
        succeeds; ``status`` shows the failures and the last error all along.
        """
        health = self.health(key)
        if health.failures < MINT_FAILURES_TO_TELL or key in self._told:
            return
        self._told.add(key)
        log.warning(
            "mint_failing",
            provider=key.provider,
            bucket=key.bucket,
            failures=health.failures,
            cause=getattr(exc, "cause", None),
            error=str(exc),
        )
        if self.cfg.notify.command and self._nursery is not None:
            self._nursery.start_soon(
                self._notify, key, f"credproxy: {key} cannot mint a token: {exc}", ""
            )

    def minted(self, key: Key) -> None:
        """A mint of *key* succeeded: the next run of failures is told again."""
        self._told.discard(key)

    async def get(self, key: Key) -> Entry:
        """The token ``get_token`` serves for *key*, refreshed first when due.

        Raises:
            NotFound: no token is stored.
            ReauthRequired: it has expired and cannot be refreshed.
            RefreshFailed: a refresh was due, failed, and the old token has expired.
        """
        entry = self.entry(key)
        if entry is None:
            return await self._first_mint(key)
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
        entry = self.entry(key)
        if entry is None:
            return await self._first_mint(key)
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
            return await self.refresher.refresh(key, None, reason="requested")
        except ReauthRequired as exc:
            raise self.reauth(key, str(exc)) from None

    async def refresh_to_serve(self, key: Key, entry: Entry, reason: str) -> Entry:
        """*entry* renewed before it is served (``get_token``, the API proxy, failover).

        If the key's last refresh failed less than ``refresh_cooldown`` ago, the
        IdP is not asked again, however many requests come: a still-valid
        *entry* is served as it is, an expired one gets that failure.

        Raises:
            ReauthRequired, RefreshFailed, NotFound: as :meth:`Refresher.refresh`.
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
        return await self.refresher.refresh(key, entry.expiry, reason=reason)

    async def after_rejection(self, key: Key, rejected: str) -> Entry | None:
        """A token to retry with after an upstream refused the token whose fp is *rejected*.

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
        if current.fp != rejected:
            return current
        if not self.refresher.in_flight(key):
            health = self._health.get(key)
            last = None if health is None else health.last_attempt
            if not current.refreshable or serving.cooldown_left(
                last, self.wall(), self.cfg.renewal
            ):
                return None
        try:
            # Seen expiry: the rejected one's (it is the current one), so a token
            # renewed meanwhile (by another process too) is taken instead of
            # refreshing again.
            entry = await self.refresher.refresh(key, current.expiry, reason="api-401")
        except ReauthRequired as exc:
            self.reauth(key, str(exc))  # the host hears it, once
            return None
        except CredproxyError:
            return None
        return entry if entry.fp != rejected else None

    def facts(self, entry: Entry) -> serving.TokenFacts:
        """*entry*'s facts with the expiry no wall-clock step can stretch."""
        return entry.facts.at(self.wall(), self.boot())

    def expiry(self, entry: Entry) -> float | None:
        """*entry*'s true expiry in wall-clock terms (see :func:`serving.true_expiry`)."""
        return entry.lives_until(self.wall(), self.boot())

    def serve_until(self, entry: Entry) -> float:
        """Until which instant of the boot clock *entry* may be served without asking again.

        On the boot clock, not the wall clock: a wall clock put back must not
        stretch the reuse of an answer (the serving loop compares with it).
        """
        now, boot = self.wall(), self.boot()
        until = serving.serve_until(entry.facts.at(now, boot), now, self.cfg.renewal, RECHECK)
        return boot + (until - now)

    # -- several accounts: the daemon's own quota holds (Holds) -----------------

    def marks(self, key: Key) -> BucketMarks | None:
        """The daemon's quota hold on *key*, if it ever had one."""
        return self.holds.marks(key)

    def quota_held(self, key: Key) -> bool:
        """True while the daemon holds *key* as quota-exhausted."""
        return self.holds.quota_held(key)

    def hold_until(self, retry_after: float | None) -> float:
        """The wall-clock instant a hold that starts now ends (capped at ``max_quota_hold``)."""
        return self.holds.hold_until(retry_after)

    def mark_quota(self, key: Key, retry_after: float | None) -> float:
        """Hold *key* as quota-exhausted for every session; returns when the hold ends."""
        return self.holds.mark_quota(key, retry_after)

    def daemon_holds(self) -> list[tuple[Key, float]]:
        """Every hold of the daemon's own still in force, with its end."""
        return self.holds.daemon_holds()

    def forget_ended_hold(self, key: Key) -> None:
        """Drop the daemon's hold on *key* if it has ended."""
        self.holds.forget_ended_hold(key)

    def release(self, provider: str, bucket: str | None) -> int:
        """End the daemon's holds on *provider* (one bucket, or all); returns how many."""
        return self.holds.release(provider, bucket)

    # -- re-auth notices -----------------------------------------------------

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
                message = f"credproxy: {fresh[0]} needs a new login ({why}): {logins}"
                self._nursery.start_soon(self._notify, fresh[0], message, logins)
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
                message = f"credproxy: {key} needs a new login ({why}): {login}"
                self._nursery.start_soon(self._notify, key, message, login)
        return ReauthRequired(f"{key} needs a new login ({why}); on the host run: {login}")

    async def _notify(self, key: Key, message: str, login: str) -> None:
        """Run ``[notify] command`` (no shell) with *message*, a bounded wait, its outcome logged.

        *login* is the command that would cure it ("" when no login would).
        """
        argv = [*self.cfg.notify.command, message]
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

    # -- renewal timers ------------------------------------------------------

    def new_timer(self, key: Key, entry: Entry) -> RenewalTimer:
        """A renewal timer for a refreshable *entry* that was just served."""
        assert entry.expiry is not None
        return RenewalTimer(
            entry.expiry,
            self.wall(),
            self.cfg.renewal,
            self.rng,
            self.health(key),
            mints=self.mints(key),
            lives_until=self.expiry(entry),
        )

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until the wall-clock instant *deadline*, or as long on the boot clock.

        trio's clock stops while the machine is suspended, and a wall clock
        may be stepped: one watch for every sleeper (:meth:`_watch_clocks`)
        looks at the clocks every 30 s at most, and wakes them all when the
        clocks moved apart; each works out its wait again. A suspend moves
        both clocks, and is noticed; a wall clock put back would postpone the
        deadline, but the boot clock, which no step moves, fires it on time; a
        wall clock put forward fires it early, which is safe. (With each timer
        looking for itself every 30 s, an idle daemon with 10,000 timers was
        woken 154 times a second: figure 5 of ``bench/run.py``.)
        """
        boot_deadline = self.boot() + (deadline - self.wall())
        self._sleepers += 1
        if not self._watching and self._nursery is not None:
            self._watching = True
            self._nursery.start_soon(self._watch_clocks)
        try:
            while True:
                step = min(deadline - self.wall(), boot_deadline - self.boot())
                if step <= 0:
                    return
                with trio.move_on_after(step):
                    await self._clocks_moved.wait()
        finally:
            self._sleepers -= 1
            if not self._sleepers:
                self._no_sleepers.set()

    async def _watch_clocks(self) -> None:
        """While anything sleeps: every :data:`~credproxy.core.policy.SLICE` s, wake the
        sleepers if the wall or the boot clock moved apart from trio's (by
        :data:`~credproxy.core.policy.CLOCK_STEP` or more: a suspend, a step)."""
        try:
            seen = self._clock_offsets()
            while self._sleepers:
                self._no_sleepers = trio.Event()
                with trio.move_on_after(policy.SLICE):
                    await self._no_sleepers.wait()
                now = self._clock_offsets()
                if any(abs(a - b) >= policy.CLOCK_STEP for a, b in zip(now, seen, strict=True)):
                    moved, self._clocks_moved = self._clocks_moved, trio.Event()
                    moved.set()
                seen = now
        finally:
            self._watching = False

    def _clock_offsets(self) -> tuple[float, float]:
        """The wall and the boot clock, each less trio's clock."""
        now = trio.current_time()
        return self.wall() - now, self.boot() - now

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
                timer.cfg = self.cfg.renewal  # (as a reload left it)
                step = (
                    timer.on_fire(None, self.wall())
                    if stored is None
                    else timer.on_fire(stored.token, self.wall(), self.expiry(stored))
                )
                if isinstance(step, Refresh):
                    outcome: Entry | Failure
                    try:
                        outcome = await self.refresher.refresh(
                            key, step.seen_expiry, reason="proactive"
                        )
                    except ReauthRequired as exc:
                        self.reauth(key, str(exc))  # tells the host, once
                        outcome = Failure.REAUTH
                    except NotFound:
                        outcome = Failure.GONE
                    except CredproxyError:
                        # RefreshFailed, StoreError (a full or read-only disk,
                        # a lock file that cannot be opened) and anything else
                        # named: counted in KeyHealth by the refresher, retried with
                        # backoff. A timer never takes its session down.
                        outcome = Failure.TRANSIENT
                    timer.cfg = self.cfg.renewal  # (a reload while it refreshed)
                    if isinstance(outcome, Failure):
                        step = timer.on_failure(outcome, self.wall())
                    else:
                        step = timer.on_success(outcome.expiry, self.wall(), self.expiry(outcome))
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
