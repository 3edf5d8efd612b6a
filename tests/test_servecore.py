"""The serving core as a state machine: commands from the trio side, requests from sandboxes.

Hypothesis runs sequences of the commands the trio side sends (open, publish,
hold, release, forget, close, reload), of requests, and of time passing,
against a small model of what each request must get: a token only while it
is published, unexpired and not forgotten; never one of a closed session;
under a profile, the current bucket unless it is held, and an earlier bucket
back (through the walk) once its hold has ended; after a reload that changes
the provider's strategy, the new strategy, from the first bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from credproxy.core.config import Provider
from credproxy.core.grants import Grants
from credproxy.core.names import Key
from credproxy.core.servecore import (
    CloseSession,
    Defer,
    Forget,
    Hold,
    OpenSession,
    Publish,
    Ready,
    Reconfigure,
    Release,
    ServingCore,
    SessionState,
)
from credproxy.core.throttle import ServeAudit
from credproxy.errors import Forbidden, InvalidName, NotFound, UsageError

BUCKETS = ("a", "b", "c")
SIDS = ("s1", "s2")


def _providers(strategy: str) -> dict[str, Provider]:
    return {"p": Provider(buckets=list(BUCKETS), strategy=strategy)}  # type: ignore[arg-type]


def _core(strategy: str) -> ServingCore:
    return ServingCore(_providers(strategy))


def _ready(bucket: str, until: float, n: int) -> Ready:
    return Ready(Key("p", bucket), b'{"access_token":"t%d"}' % n, f"fp{n}", None, until)


@dataclass
class ModelSession:
    ready: dict[str, Ready] = field(default_factory=dict)
    holds: dict[str, float] = field(default_factory=dict)
    current: int = 0


class CoreMachine(RuleBasedStateMachine):
    strategy = "fill-first"

    def __init__(self) -> None:
        super().__init__()
        self.core = _core(self.strategy)
        self.states: dict[str, SessionState] = {}
        self.model: dict[str, ModelSession] = {}
        self.daemon_holds: dict[str, float] = {}
        self.wall = 1_000.0
        self.boot = 50.0
        self.n = 0

    # -- the model ---------------------------------------------------------------

    def _held(self, sid: str, bucket: str) -> bool:
        until = [self.daemon_holds.get(bucket), self.model[sid].holds.get(bucket)]
        return any(u is not None and self.wall < u for u in until)

    def _valid(self, sid: str, bucket: str) -> Ready | None:
        ready = self.model[sid].ready.get(bucket)
        return ready if ready is not None and self.boot < ready.until else None

    def _expect_profile(self, sid: str) -> Ready | int:
        """The Ready the profile request must get, or the walk's start index."""
        m = self.model[sid]
        index = m.current % len(BUCKETS)
        ready = self._valid(sid, BUCKETS[index])
        if ready is None or self._held(sid, BUCKETS[index]):
            return index
        if self.strategy == "round-robin":
            m.current = (index + 1) % len(BUCKETS)
            return ready
        ended = False
        for bucket in BUCKETS[:index]:
            for table in (self.daemon_holds, m.holds):
                until = table.get(bucket)
                if until is not None and self.wall >= until:
                    del table[bucket]
                    ended = True
        return index if ended else ready

    # -- commands ----------------------------------------------------------------

    @rule(sid=st.sampled_from(SIDS))
    def open_session(self, sid: str) -> None:
        if sid in self.states:
            return
        state = SessionState(sid, Grants.parse(["p:a,b,c"]), None)
        self.core.apply(OpenSession(state))
        self.states[sid] = state
        self.model[sid] = ModelSession()

    @rule(
        sid=st.sampled_from(SIDS),
        bucket=st.sampled_from(BUCKETS),
        life=st.floats(1, 100),
        walked=st.booleans(),
    )
    def publish(self, sid: str, bucket: str, life: float, walked: bool) -> None:
        self.n += 1
        ready = _ready(bucket, self.boot + life, self.n)
        current = ("p", BUCKETS.index(bucket)) if walked else None
        self.core.apply(Publish(sid, ready, current))
        if sid in self.model:
            self.model[sid].ready[bucket] = ready
            if walked:
                self.model[sid].current = BUCKETS.index(bucket)

    @rule(
        bucket=st.sampled_from(BUCKETS),
        seconds=st.floats(1, 50),
        sid=st.one_of(st.none(), st.sampled_from(SIDS)),
    )
    def hold(self, bucket: str, seconds: float, sid: str | None) -> None:
        self.core.apply(Hold(Key("p", bucket), self.wall + seconds, sid))
        if sid is None:
            self.daemon_holds[bucket] = self.wall + seconds
        elif sid in self.model:
            self.model[sid].holds[bucket] = self.wall + seconds

    @rule(bucket=st.sampled_from(BUCKETS), sid=st.one_of(st.none(), st.sampled_from(SIDS)))
    def end_hold(self, bucket: str, sid: str | None) -> None:
        self.core.apply(Hold(Key("p", bucket), None, sid))
        table = self.daemon_holds if sid is None else self.model.get(sid, ModelSession()).holds
        table.pop(bucket, None)

    @rule(bucket=st.one_of(st.none(), st.sampled_from(BUCKETS)))
    def release(self, bucket: str | None) -> None:
        self.core.apply(Release("p", bucket))
        for table in [self.daemon_holds] + [m.holds for m in self.model.values()]:
            for b in list(table):
                if bucket is None or b == bucket:
                    del table[b]
        for m in self.model.values():
            m.current = 0

    @rule(bucket=st.sampled_from(BUCKETS))
    def forget(self, bucket: str) -> None:
        self.core.apply(Forget(Key("p", bucket)))
        for m in self.model.values():
            m.ready.pop(bucket, None)

    @rule(sid=st.sampled_from(SIDS))
    def close(self, sid: str) -> None:
        self.core.apply(CloseSession(sid))
        state = self.states.pop(sid, None)
        self.model.pop(sid, None)
        if state is not None:
            assert not state.open and not state.ready

    @rule(strategy=st.sampled_from(["fill-first", "round-robin"]))
    def reload(self, strategy: str) -> None:
        """The config is reloaded (the same, or with the other strategy)."""
        self.core.apply(Reconfigure(_providers(strategy)))
        if strategy != self.strategy:
            self.strategy = strategy
            for m in self.model.values():
                m.current = 0  # a changed provider's profile starts from its first bucket

    @rule(seconds=st.floats(0, 60))
    def time_passes(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds

    # -- requests ----------------------------------------------------------------

    @precondition(lambda self: bool(self.states))
    @rule(data=st.data(), bucket=st.sampled_from(BUCKETS))
    def get_bucket(self, data: st.DataObject, bucket: str) -> None:
        sid = data.draw(st.sampled_from(sorted(self.states)))
        got = self.core.request(
            self.states[sid], "get_token", {"provider": "p", "bucket": bucket}, self.wall, self.boot
        )
        want = self._valid(sid, bucket)
        if want is None:
            assert got == Defer("get_token", Key("p", bucket))
        else:
            assert got is want  # a named bucket is served whatever holds say

    @precondition(lambda self: bool(self.states))
    @rule(data=st.data(), through_proxy=st.booleans())
    def get_profile(self, data: st.DataObject, through_proxy: bool) -> None:
        sid = data.draw(st.sampled_from(sorted(self.states)))
        if through_proxy:
            got = self.core.pick(sid, "p", self.wall, self.boot)
        else:
            got = self.core.request(
                self.states[sid], "get_token", {"provider": "p"}, self.wall, self.boot
            )
        want = self._expect_profile(sid)
        if isinstance(want, Ready):
            assert got is want
            assert not self._held(sid, want.key.bucket)
        else:
            assert got == Defer("get_token_profile", Key("p", ""), start=want)

    @rule(sid=st.sampled_from(SIDS))
    def closed_sessions_have_no_pick(self, sid: str) -> None:
        if sid in self.states:
            return
        with pytest.raises(NotFound):
            self.core.pick(sid, "p", self.wall, self.boot)

    @invariant()
    def status_names_the_current_bucket(self) -> None:
        for sid, m in self.model.items():
            assert self.core.current(sid, "p") == BUCKETS[m.current % len(BUCKETS)]


class RoundRobinMachine(CoreMachine):
    strategy = "round-robin"


TestFillFirst = CoreMachine.TestCase
TestRoundRobin = RoundRobinMachine.TestCase
for _case in (TestFillFirst, TestRoundRobin):
    _case.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def _state(specs: list[str]) -> tuple[ServingCore, SessionState]:
    core = _core("fill-first")
    state = SessionState("s", Grants.parse(specs), None)
    core.apply(OpenSession(state))
    return core, state


def test_requests_beyond_the_grants_answer_alike_missing_or_not_granted() -> None:
    core, state = _state(["p:a"])
    for payload in ({"provider": "p", "bucket": "b"}, {"provider": "q"}):
        with pytest.raises(NotFound):
            core.request(state, "get_token", payload, 0.0, 0.0)
    with pytest.raises(Forbidden):
        core.request(state, "save_token", {}, 0.0, 0.0)
    with pytest.raises(UsageError):
        core.request(state, "frobnicate", {}, 0.0, 0.0)
    with pytest.raises(InvalidName):
        core.request(state, "get_token", {"provider": ["p"]}, 0.0, 0.0)


def test_bucket_stats_carry_the_serve_counts_the_core_keeps() -> None:
    core, state = _state(["p:a,b"])
    for bucket in ("a", "a", "b"):  # as the serving loop counts each serve
        serves = state.serves.get(Key("p", bucket))
        if serves is None:
            state.serves[Key("p", bucket)] = ServeAudit("fp", None, 2.0)
        else:
            serves.count(2.0)
    got = core.request(state, "get_bucket_stats", {"provider": "p", "bucket": "a"}, 0.0, 0.0)
    assert got == Defer("get_bucket_stats", Key("p", "a"), stats=(2, 2000.0, 3))


def test_a_report_of_a_server_error_is_answered_at_once_and_holds_nothing() -> None:
    core, state = _state(["p:a"])
    got = core.request(
        state, "report_failure", {"provider": "p", "bucket": "a", "status": 503}, 0.0, 0.0
    )
    assert isinstance(got, bytes) and b"not a quota failure" in got
    quota = core.request(
        state,
        "report_failure",
        {"provider": "p", "bucket": "a", "status": 429, "retryAfter": 5},
        0.0,
        0.0,
    )
    assert quota == Defer("report_failure", Key("p", "a"), report=("quota-exhausted", 5))


def test_fill_first_goes_back_to_an_earlier_bucket_once_when_its_hold_ends() -> None:
    core, state = _state(["p:a,b"])
    core.apply(Hold(Key("p", "a"), 100.0, "s"))
    core.apply(Publish("s", _ready("b", 1e9, 1), current=("p", 1)))  # the walk moved to b
    profile = {"provider": "p"}
    assert core.request(state, "get_token", profile, 50.0, 0.0).key == Key("p", "b")  # type: ignore[union-attr]
    # The hold on a ends: the next request goes through the walk (which starts at a) ...
    assert core.request(state, "get_token", profile, 100.0, 0.0) == Defer(
        "get_token_profile", Key("p", ""), start=1
    )
    # ... once: until the walk publishes, b is served again.
    assert core.request(state, "get_token", profile, 101.0, 0.0).key == Key("p", "b")  # type: ignore[union-attr]


def test_a_reload_brings_new_providers_and_profiles_to_running_sessions() -> None:
    """Reconfigure: a provider that had one bucket gets a profile, one that was not configured
    gets its buckets, a removed one loses its profile; published tokens stay."""
    core = ServingCore({"p": Provider(buckets=["a"])})
    state = SessionState("s", Grants.parse(["p", "q"]), None)
    core.apply(OpenSession(state))
    core.apply(Publish("s", _ready("a", 1e9, 1)))
    for provider in ("p", "q"):
        assert core.request(state, "get_token", {"provider": provider}, 0.0, 0.0) == Defer(
            "get_token", Key(provider, "default")
        )

    core.apply(Reconfigure({"p": Provider(buckets=["a", "b"]), "q": Provider(buckets=["x", "y"])}))
    got = core.request(state, "get_token", {"provider": "p"}, 0.0, 0.0)
    assert isinstance(got, Ready) and got.key == Key("p", "a")  # the profile, from its bucket a
    assert core.request(state, "get_token", {"provider": "q"}, 0.0, 0.0) == Defer(
        "get_token_profile", Key("q", ""), start=0
    )
    assert core.current("s", "q") == "x"

    core.apply(Reconfigure({}))
    assert core.request(state, "get_token", {"provider": "q"}, 0.0, 0.0) == Defer(
        "get_token", Key("q", "default")
    )
    assert core.current("s", "p") is None
    # What was published is still served: it does not depend on the configuration.
    assert core.request(state, "get_token", {"provider": "p", "bucket": "a"}, 0.0, 0.0) is got


def test_a_reload_that_keeps_a_provider_keeps_its_profile_position() -> None:
    """The same provider configuration again: the profile stays on its current bucket; a
    changed one starts again from its first."""
    core, _state_s = _state(["p:a,b"])
    core.apply(Publish("s", _ready("b", 1e9, 1), current=("p", 1)))
    core.apply(Reconfigure(_providers("fill-first")))
    assert core.current("s", "p") == "b"
    core.apply(Reconfigure(_providers("round-robin")))
    assert core.current("s", "p") == "a"


def test_an_api_grant_for_one_bucket_reads_back_and_malformed_ones_are_refused() -> None:
    """``api:P:B`` is one bucket's API (not the token, not another bucket's API); it reads back as written; ``api:a,b`` and ``api:P:B:C`` are refused, not read as something else."""
    g = Grants.parse(["dev:a", "api:dev:b"])
    assert g.specs() == ["dev:a", "api:dev:b"]
    assert g.api_allowed("dev", "b") and not g.api_allowed("dev", "a")
    assert not g.api_allowed("dev", "default") and g.api_allowed("dev")
    assert not g.token_allowed("dev", "b")
    for bad in ("api:a,b", "api:dev:b:c", "api:dev:", "api::b"):
        with pytest.raises(UsageError):
            Grants.parse([bad])
