"""The serving core: what each sandbox request gets, decided by the one thread that owns it.

Theory of operation
-------------------

A cached ``get_token`` needs no waiting: the answer is bytes the daemon
already has. :class:`ServingCore` holds everything that answer depends on,
per session (:class:`SessionState`): the grants, the tokens published for it
(:class:`Ready`), each profile's current bucket, its own quota holds and its
serve counts; and, for the daemon, the quota holds every session sees. Like
h11's ``Connection``, it does no I/O and reads no clock: the serving loop
(``shell/servingloop.py``) owns the one instance, asks it about each request with
the time of the turn, and is the only thread that mutates it.

The trio side, where refreshes, the failover walk, the store and the API
proxy live, changes the core only through typed commands (:data:`Command`:
:class:`OpenSession`, :class:`Publish`, :class:`Hold`, :class:`Release`,
:class:`Forget`, :class:`CloseSession`, :class:`Reconfigure`), which the loop applies between
batches, in the order they were sent, before it reads more requests. It learns
what the core decided through the answers the loop hands over (:class:`Defer`
carries the bucket a failover walk starts from and the serve counts of a
bucket's stats) and through queries the loop runs for it (the API proxy's
bucket pick, ``status``).

A request is answered by :meth:`ServingCore.request` with one of:

* :class:`Ready`: a token the session may be served as is, now;
* :class:`Defer`: the trio side must finish it (a refresh, the failover walk,
  a report), with what the core already checked;
* :class:`Read`: the answer is in the store (the lists, the API keys): the
  loop reads it, filtered by the session's grants;
* ``bytes``: encoded JSON data to answer at once;

or raises :class:`~credproxy.errors.CredproxyError` (answered as an error).
:data:`Outcome` is what the trio side hands back for a deferred request.

``get_token`` without a bucket, in a session with a profile (two or more
buckets of one provider), serves the profile's current bucket when its token
is ready and no hold applies; round-robin moves on after each serve;
fill-first goes back to an earlier bucket (through the walk) once that
bucket's hold has ended. :meth:`ServingCore.pick` is that one decision, used
by ``get_token``, the API proxy and ``status``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from credproxy.core import failover
from credproxy.core.config import Provider
from credproxy.core.failover import Profile
from credproxy.core.grants import Grants
from credproxy.core.names import Key, key_field, name_field
from credproxy.core.throttle import ServeAudit
from credproxy.errors import CredproxyError, Forbidden, NotFound, UsageError

__all__ = [
    "CloseSession",
    "Command",
    "Defer",
    "DeferOp",
    "Forget",
    "Hold",
    "OpenSession",
    "Outcome",
    "Publish",
    "Read",
    "ReadOp",
    "Ready",
    "Reconfigure",
    "Release",
    "ServingCore",
    "SessionState",
    "profile_of",
]

_encoder = msgspec.json.Encoder()

FORBIDDEN_OPS = frozenset({"save_token", "remove_token"})
MAX_KEY_MEMO = 4096  # distinct valid (provider, bucket) pairs remembered
NO_KEY = Key("", "")  # the key of a deferred request that names none (no name is "")


@dataclass(frozen=True, slots=True)
class Ready:
    """A token a session may be served as is until ``until`` on the boot clock."""

    key: Key
    served: bytes  # the JSON of the token without refresh_token
    fp: str
    expiry: float | None
    until: float


DeferOp = Literal[
    "get_token", "get_token_profile", "refresh_token", "report_failure", "get_bucket_stats"
]
ReadOp = Literal["list_providers", "list_buckets", "get_api_key", "list_api_keys", "has_api_key"]


@dataclass(frozen=True, slots=True)
class Defer:
    """The request needs the trio side: ``op`` on ``key``, granted and checked.

    ``key`` is what the request names: ``Key(provider, "")`` for ``get_token``
    without a bucket in a session with a profile (no bucket is named ""),
    :data:`NO_KEY` for operations that name no token.
    """

    op: DeferOp
    key: Key = NO_KEY
    start: int = 0  # get_token_profile: the profile index the failover walk starts from
    report: tuple[str, float | None] | None = None  # report_failure: (kind, retry after)
    stats: tuple[int, float, int] = (0, 0.0, 0)  # get_bucket_stats: count, last ms, total


@dataclass(frozen=True, slots=True)
class Read:
    """The answer is in the store, as the session's grants let it see it: read it now.

    Reads change nothing the core or the trio side keeps, so the serving loop
    answers them itself, in order, without a hand-over.
    """

    op: ReadOp
    name: str = ""  # list_buckets: the provider; the API key operations: the key's name


# What a deferred request is answered with: a served token, encoded JSON data, or the error.
Outcome = Ready | bytes | CredproxyError


@dataclass(eq=False, slots=True)
class SessionState:
    """One session as the serving loop knows it (only the loop mutates it)."""

    id: str
    grants: Grants
    capability: bytes | None
    open: bool = True
    ready: dict[Key, Ready] = field(default_factory=dict)  # what may be answered at once
    profiles: dict[str, Profile | None] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)  # profile index get_token starts from
    holds: dict[Key, float] = field(default_factory=dict)  # its own quota holds: end, wall clock
    serves: dict[Key, ServeAudit] = field(default_factory=dict)  # counted, for stats and the audit
    # (provider, bucket) as a request names them -> the key, for pairs its grants allow
    granted: dict[tuple[object, object], Key] = field(default_factory=dict)


# -- commands: how the trio side changes the core ------------------------------------


@dataclass(frozen=True, slots=True)
class OpenSession:
    """Serve *session* from now on (the trio side never touches it again)."""

    session: SessionState


@dataclass(frozen=True, slots=True)
class Publish:
    """*ready* is what the session serves for its key; ``current`` moves the profile's bucket."""

    session: str
    ready: Ready
    current: tuple[str, int] | None = None  # (provider, profile index) after a failover walk


@dataclass(frozen=True, slots=True)
class Hold:
    """A quota hold on *key* until *until* (wall clock; None ends it): a session's, or all's."""

    key: Key
    until: float | None
    session: str | None = None  # None: the daemon's hold, for every session


@dataclass(frozen=True, slots=True)
class Release:
    """End every hold on *provider* (or one bucket); its profiles start from the first bucket."""

    provider: str
    bucket: str | None = None


@dataclass(frozen=True, slots=True)
class Forget:
    """*key*'s token changed in the store: no session may be answered from the old one."""

    key: Key


@dataclass(frozen=True, slots=True)
class CloseSession:
    """Nothing more is served to the session; it is forgotten."""

    session: str


@dataclass(frozen=True, slots=True, eq=False)
class Reconfigure:
    """The configuration was reloaded: serve with *providers* from now on.

    Every session's profiles are worked out again on their next request (a
    provider's ``buckets`` or ``strategy`` may have changed, or the provider
    may be new); a provider whose configuration changed starts its profile
    from the first bucket again. Tokens already published stay: what a
    session may be served does not depend on the provider's configuration.
    """

    providers: Mapping[str, Provider]


Command = OpenSession | Publish | Hold | Release | Forget | CloseSession | Reconfigure


def _shown(op: str) -> str:
    """*op* as an error message quotes it: at most 64 characters (a reply stays small)."""
    return op if len(op) <= 64 else op[:64] + "..."


def profile_of(grants: Grants, provider: str, providers: Mapping[str, Provider]) -> Profile | None:
    """*provider*'s profile under *grants* when it has two or more buckets, else None.

    From a ``PROVIDER:B1,B2`` grant, else from the provider's configured
    ``buckets`` that the session is granted. One bucket is no profile: such a
    session is served exactly as without one (its bucket, or ``default``).
    """
    prov = providers.get(provider)
    order = grants.profile(provider)
    if order is None and prov is not None:
        order = tuple(b for b in prov.buckets if grants.token_allowed(provider, b))
    strategy = prov.strategy if prov is not None else "fill-first"
    return Profile(provider, order, strategy) if order and len(order) > 1 else None


class ServingCore:
    """Every session's serving state and the daemon's quota holds (module docstring).

    Args:
        providers: the configured providers (their buckets and strategy).
    """

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        self.providers = providers
        self.sessions: dict[str, SessionState] = {}
        self.holds: dict[Key, float] = {}  # the daemon's quota holds: end, wall clock
        self._keys: dict[tuple[object, object], Key] = {}  # validated (provider, bucket) pairs

    # -- commands --------------------------------------------------------------------

    def apply(self, command: Command) -> None:
        """Apply one command of the trio side (in the order they were sent)."""
        if isinstance(command, Publish):
            state = self.sessions.get(command.session)
            if state is not None:
                state.ready[command.ready.key] = command.ready
                if command.current is not None:
                    provider, index = command.current
                    state.current[provider] = index
        elif isinstance(command, Hold):
            table = self.holds
            if command.session is not None:
                owner = self.sessions.get(command.session)
                if owner is None:
                    return
                table = owner.holds
            if command.until is None:
                table.pop(command.key, None)
            else:
                table[command.key] = command.until
        elif isinstance(command, Release):
            for table in [self.holds] + [s.holds for s in self.sessions.values()]:
                for key in [k for k in table if k.provider == command.provider]:
                    if command.bucket is None or key.bucket == command.bucket:
                        del table[key]
            for state in self.sessions.values():
                state.current.pop(command.provider, None)
        elif isinstance(command, Forget):
            for state in self.sessions.values():
                state.ready.pop(command.key, None)
        elif isinstance(command, OpenSession):
            self.sessions[command.session.id] = command.session
        elif isinstance(command, Reconfigure):
            old, self.providers = self.providers, command.providers
            changed = [
                p
                for p in old.keys() | command.providers.keys()
                if old.get(p) != command.providers.get(p)
            ]
            for state in self.sessions.values():
                state.profiles.clear()
                for provider in changed:
                    state.current.pop(provider, None)
        else:
            state = self.sessions.pop(command.session, None)
            if state is not None:
                state.open = False
                state.ready.clear()

    # -- requests --------------------------------------------------------------------

    def request(
        self, state: SessionState, op: str, payload: dict[str, Any], wall: float, boot: float
    ) -> Ready | Defer | Read | bytes:
        """What *op* with *payload* gets now (*wall*: epoch seconds; *boot*: the boot clock).

        Raises:
            CredproxyError: the answer is this error (not granted, bad input, ...).
        """
        if op == "get_token":
            return self.get_token(state, payload, wall, boot)
        if op == "refresh_token":
            return Defer("refresh_token", self._granted_key(state, payload))
        if op == "report_failure":
            return self._report_failure(state, payload)
        if op == "get_bucket_stats":
            key = self._granted_key(state, payload)
            serves = state.serves.get(key)
            count, last = (0, 0.0) if serves is None else (serves.total, serves.last * 1000)
            total = sum(v.total for k, v in state.serves.items() if k.provider == key.provider)
            return Defer("get_bucket_stats", key, stats=(count, last, total))
        if op == "list_providers":
            return Read("list_providers")
        if op == "list_api_keys":
            return Read("list_api_keys")
        if op == "list_buckets":
            return Read("list_buckets", name_field(payload, "provider"))
        if op == "get_api_key":
            return Read("get_api_key", name_field(payload, "name"))
        if op == "has_api_key":
            return Read("has_api_key", name_field(payload, "name"))
        if op in FORBIDDEN_OPS or op.startswith("oauth_"):
            raise Forbidden(f"{op} is not available to a sandbox")
        raise UsageError(f"Unknown operation: {_shown(op)}")

    def get_token(
        self, state: SessionState, payload: dict[str, Any], wall: float, boot: float
    ) -> Ready | Defer:
        """The hot path: a ready token of the named (or the profile's current) bucket, or Defer."""
        bucket = payload.get("bucket")
        if bucket is None:
            provider = payload.get("provider")
            # The profile is looked up once per session and provider; after
            # that the hot path pays one dict lookup, not a name check.
            if isinstance(provider, str) and provider in state.profiles:
                profile = state.profiles[provider]
            else:
                profile = self.profile(state, name_field(payload, "provider"))
            if profile is not None:
                return self._pick(state, profile, wall, boot)
        try:  # (what _granted_key does first, inline: this is every get_token's path)
            key = state.granted[payload.get("provider"), bucket]
        except (KeyError, TypeError):
            key = self._granted_key(state, payload)
        ready = state.ready.get(key)
        if ready is not None and boot < ready.until:
            return ready
        return Defer("get_token", key)

    def profile(self, state: SessionState, provider: str) -> Profile | None:
        """*provider*'s profile in *state* (see :func:`profile_of`), remembered per session."""
        try:
            return state.profiles[provider]
        except KeyError:
            profile = profile_of(state.grants, provider, self.providers)
            if len(state.profiles) < MAX_KEY_MEMO:  # (names a sandbox makes up are not kept)
                state.profiles[provider] = profile
            return profile

    def pick(self, sid: str, provider: str, wall: float, boot: float) -> Ready | Defer:
        """What ``get_token`` without a bucket would get now (the API proxy's choice).

        Raises:
            NotFound: the session is gone, or has no profile for *provider*.
        """
        state = self.sessions.get(sid)
        profile = None if state is None else self.profile(state, provider)
        if state is None or profile is None:
            raise NotFound(f"no profile of {provider} in this session")
        return self._pick(state, profile, wall, boot)

    def current(self, sid: str, provider: str) -> str | None:
        """The bucket the profile of *provider* in session *sid* starts from (for status)."""
        state = self.sessions.get(sid)
        profile = None if state is None else self.profile(state, provider)
        if state is None or profile is None:
            return None
        return profile.buckets[state.current.get(provider, 0) % len(profile.buckets)]

    def held(self, state: SessionState, key: Key, wall: float) -> bool:
        """True while *key* is held as quota-exhausted for *state* (the daemon's or its own)."""
        until = self.holds.get(key)
        if until is not None and wall < until:
            return True
        own = state.holds.get(key)
        return own is not None and wall < own

    # -- inside ----------------------------------------------------------------------

    def _pick(
        self, state: SessionState, profile: Profile, wall: float, boot: float
    ) -> Ready | Defer:
        n = len(profile.buckets)
        index = state.current.get(profile.provider, 0) % n
        key = Key(profile.provider, profile.buckets[index])
        ready = state.ready.get(key)
        if ready is not None and boot < ready.until and not self.held(state, key, wall):
            if profile.strategy == "round-robin":
                state.current[profile.provider] = failover.next_current(profile, key.bucket)
            elif (
                index
                and profile.strategy == "fill-first"
                and self._earlier_hold_ended(state, profile, index, wall)
            ):
                return Defer("get_token_profile", Key(profile.provider, ""), start=index)
            return ready
        return Defer("get_token_profile", Key(profile.provider, ""), start=index)

    def _earlier_hold_ended(
        self, state: SessionState, profile: Profile, index: int, wall: float
    ) -> bool:
        """Fill-first: whether a bucket before *index* may serve again because its hold ended.

        An ended hold is forgotten here, so it brings the walk back once; a
        bucket that failed for any other reason is tried again by the next
        walk that happens anyway, when the current answer must be renewed.
        """
        ended = False
        for bucket in profile.buckets[:index]:
            key = Key(profile.provider, bucket)
            for table in (self.holds, state.holds):
                until = table.get(key)
                if until is not None and wall >= until:
                    del table[key]
                    ended = True
        return ended

    def _granted_key(self, state: SessionState, payload: dict[str, Any]) -> Key:
        # Names are checked once per distinct (provider, bucket) pair, not per
        # request, and a session's grants (which never change) once per pair
        # it names: this is the hot path of every get_token.
        raw = (payload.get("provider"), payload.get("bucket"))
        try:
            return state.granted[raw]
        except (KeyError, TypeError):  # TypeError: an unhashable value, not a name
            pass
        try:
            key = self._keys[raw]
        except (KeyError, TypeError):
            key = key_field(payload)
            if len(self._keys) < MAX_KEY_MEMO:
                self._keys[raw] = key
        if not state.grants.token_allowed(*key):
            # Missing and not granted answer alike, so a sandbox cannot probe.
            raise NotFound(f"no token for {key} in this session")
        if len(state.granted) < MAX_KEY_MEMO:
            state.granted[raw] = key
        return key

    def _report_failure(self, state: SessionState, payload: dict[str, Any]) -> Defer | bytes:
        """A sandbox that called the API itself reports what happened (429, 401, 403, 5xx).

        Only a granted bucket; nothing a sandbox reports can mark a bucket
        healthy, and a 5xx is not a quota failure.
        """
        key = self._granted_key(state, payload)
        status, reason = payload.get("status"), payload.get("reason")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int)):
            raise UsageError("'status' must be an HTTP status code")
        if reason is not None and reason not in ("quota-exhausted", "unauthorized"):
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
            return Defer("report_failure", key, report=("quota-exhausted", retry))
        if reason == "unauthorized" or status in (401, 403):
            return Defer("report_failure", key, report=("unauthorized", None))
        if status is not None and 500 <= status < 600:
            return _encoder.encode(
                {"recorded": None, "why": "a server error is not a quota failure"}
            )
        raise UsageError("report a 429, 401 or 403 'status', or a 'reason'")
