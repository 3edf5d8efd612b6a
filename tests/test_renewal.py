"""Proactive renewal and coordinated refresh, through the live daemon.

Every test runs the real daemon in the test's trio loop under
``autojump_clock``: virtual hours pass in milliseconds. The upstream is the
development IdP over real HTTP on loopback; it rotates refresh tokens and
revokes the whole family when a rotated one is reused, so any double spend
shows up as ``reuse_count`` > 0 and an ``invalid_grant``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_reload import edit, provider

from conftest import Dirs, Harness, Peer, StartDaemon, WallClock, serve_config_file
from credproxy import devidp
from credproxy.core.grants import Grants
from credproxy.shell.http import HttpTokenEndpoint
from credproxy.shell.store import TokenStore

HOUR = 3600.0
LONG_IDLE = {"idle_timeout": 1e9}  # these tests hold one connection across virtual hours


async def _serve_once(
    h: Harness, provider: str = "dev", grants: tuple[str, ...] = ("dev",)
) -> tuple[object, Peer, dict]:
    s = await h.session(*grants)
    p = await h.peer(s)
    reply = await p.call("get_token", {"provider": provider})
    assert reply["ok"] is True, reply
    return s, p, reply["data"]


async def test_hour_token_renews_between_3240_and_3270_s(
    start_daemon: StartDaemon, autojump_clock: object, no_secrets_in_logs: list[dict]
) -> None:
    """A 3600 s token first served at t=0 is refreshed between 3240 s and 3270 s later."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    await trio.sleep(3240 - 0.5)
    assert h.idp.refresh_count == 0
    await trio.sleep(31)
    assert h.idp.refresh_count == 1
    assert h.idp.reuse_count == 0
    events = [e["event"] for e in no_secrets_in_logs]
    assert {"token_served", "renewal_scheduled", "token_refreshed"} <= set(events)
    p.close()


async def test_no_timer_without_refresh_token_or_expiry(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """Tokens lacking a refresh token or an expiry are served but never renewed."""
    h = await start_daemon(limits=LONG_IDLE)
    h.store.write("dev", "default", {"access_token": "no-rt", "expiry": h.wall() + HOUR})
    h.store.write("dev", "noexp", {"access_token": "no-exp", "refresh_token": "RT-x"})
    s = await h.session("dev")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == "no-rt"
    assert (await p.call("get_token", {"provider": "dev", "bucket": "noexp"}))["data"][
        "access_token"
    ] == "no-exp"
    assert (await h.daemon.status())["sessions"][0]["renewals"] == []
    await trio.sleep(2 * HOUR - 61)
    assert len(h.idp.requests) == 0
    p.close()


async def test_second_serve_does_not_add_a_timer(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """Serving the same key again in one session schedules nothing new: one refresh per renewal."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    for _ in range(5):
        assert (await p.call("get_token", {"provider": "dev"}))["ok"] is True
    assert len((await h.daemon.status())["sessions"][0]["renewals"]) == 1
    await trio.sleep(3300)
    assert h.idp.refresh_count == 1
    p.close()


async def test_expired_token_is_refreshed_before_it_is_served(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """An already expired token is refreshed at once and the fresh one is served."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    token = h.idp.mint()
    token["expiry"] = h.wall() - 10
    h.store.write("dev", "default", token)
    _, p, served = await _serve_once(h)
    assert h.idp.refresh_count == 1
    assert served["access_token"] != token["access_token"]
    assert served["expiry"] > h.wall() + HOUR - 5
    assert h.idp.is_access_token_valid(served["access_token"])
    p.close()


async def test_timer_reschedules_when_renewed_elsewhere(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """When another process renewed the token before the timer fires, the timer reschedules instead of refreshing."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    first = h.login()
    _, p, _ = await _serve_once(h)
    await trio.sleep(1000)
    # Another process refreshes with the stored refresh token and writes the result.
    status, renewed = h.idp.handle_token_request(
        {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": h.idp.client_id,
        }
    )
    assert status == 200
    renewed["expiry"] = h.wall() + renewed.pop("expires_in")
    h.store.write("dev", "default", renewed)
    assert h.idp.refresh_count == 1
    await trio.sleep(3300 - 1000)  # t=3300: past the original deadline, no refresh by the daemon
    assert h.idp.refresh_count == 1
    # Rescheduled at ~3250 for the new expiry 4600: lead 300, so it fires at 4300-4330.
    await trio.sleep(4290 - 3300)
    assert h.idp.refresh_count == 1
    await trio.sleep(50)
    assert h.idp.refresh_count == 2
    assert h.idp.reuse_count == 0
    p.close()


async def test_reschedules_after_each_success(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """Each successful renewal schedules the next one for the new expiry."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    await trio.sleep(5 * 3270 + 1)
    assert h.idp.refresh_count == 5
    assert h.idp.reuse_count == 0
    served = (await p.call("get_token", {"provider": "dev"}))["data"]
    assert h.idp.is_access_token_valid(served["access_token"])
    p.close()


async def test_backoff_doubles_to_the_cap_then_gives_up(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """Failed renewals retry after 30, 60, 120 ... s capped at 1800 s, and stop after 10 consecutive failures."""
    h = await start_daemon(lifetime=20 * HOUR, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    h.idp.fail_next("server_error", count=100)
    # 20 h token: lead = max(300, 7200) -> first attempt at 64800 s + jitter in [0, 30).
    await trio.sleep(64800 - 1)
    assert len(h.idp.requests) == 0
    while len(h.idp.requests) == 0:
        await trio.sleep(0.25)
    last = trio.current_time()
    for n, delay in enumerate([30, 60, 120, 240, 480, 960, 1800, 1800, 1800], start=2):
        await trio.sleep(delay - 1)
        assert len(h.idp.requests) == n - 1, f"attempt {n} came early"
        while len(h.idp.requests) < n:
            await trio.sleep(0.25)
        gap, last = trio.current_time() - last, trio.current_time()
        assert delay - 0.5 <= gap <= delay + 1.5, (n, delay, gap)
    renewal = (await h.daemon.status())["sessions"][0]["renewals"][0]
    assert renewal["failures"] == 10
    assert renewal["gave_up"] is True and renewal["next_renewal"] is None
    assert "500" in renewal["last_error"]
    await trio.sleep(10 * HOUR)
    assert len(h.idp.requests) == 10
    p.close()


async def test_invalid_grant_is_not_retried(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """invalid_grant marks the key re-auth required, with no retry, and status says so."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    h.idp.fail_next("invalid_grant", count=5)
    await trio.sleep(3300)
    assert len(h.idp.requests) == 1
    await trio.sleep(5 * HOUR)
    assert len(h.idp.requests) == 1
    st = await h.daemon.status()
    assert st["sessions"][0]["renewals"][0]["reauth_required"] is True
    assert st["tokens"][0]["reauth_required"] is True
    p.close()


async def test_closing_a_session_cancels_all_its_timers(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """After its session closes, the endpoint sees no refresh for that session's keys; another session's renewals continue."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login("dev", "default")
    h.login("dev", "b2")
    h.login("dev", "mine")
    s1 = await h.session("dev:default", "dev:b2")
    p1 = await h.peer(s1)
    for bucket in ("default", "b2"):
        assert (await p1.call("get_token", {"provider": "dev", "bucket": bucket}))["ok"]
    s2 = await h.session("dev:mine")
    p2 = await h.peer(s2)
    assert (await p2.call("get_token", {"provider": "dev", "bucket": "mine"}))["ok"]
    p1.close()
    assert await h.daemon.close_session(s1.id)
    await trio.sleep(3 * 3270 + 1)
    assert h.idp.refresh_count == 3  # only "mine", three times
    p2.close()


async def test_logout_cancels_that_keys_timers_only(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """Removing one key (logout) cancels its timers everywhere; the session's other keys keep renewing."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login("dev", "default")
    h.login("dev", "keep")
    s = await h.session("dev")
    p = await h.peer(s)
    for bucket in ("default", "keep"):
        assert (await p.call("get_token", {"provider": "dev", "bucket": bucket}))["ok"]
    h.store.remove("dev", "default")
    assert await h.daemon.token_changed(("dev", "default")) == 1
    await trio.sleep(2 * 3270 + 1)
    assert h.idp.refresh_count == 2  # "keep" twice, "default" never
    assert [r["bucket"] for r in (await h.daemon.status())["sessions"][0]["renewals"]] == ["keep"]
    p.close()


async def test_timer_stops_when_token_removed_behind_its_back(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """A timer that fires and finds its token gone stops without calling the endpoint."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    h.store.remove("dev", "default")  # no notification to the daemon
    await trio.sleep(4 * HOUR)
    assert len(h.idp.requests) == 0
    p.close()


@pytest.mark.parametrize(
    ("lifetime", "window", "lo", "hi"), [(60.0, 600.0, 17, 21), (5.0, 60.0, 20, 25)]
)
async def test_short_lived_tokens_renew_at_half_life(
    start_daemon: StartDaemon,
    autojump_clock: object,
    lifetime: float,
    window: float,
    lo: int,
    hi: int,
) -> None:
    """60 s and 5 s tokens renew about every half-life, not in a loop, and are always valid when served."""
    h = await start_daemon(lifetime=lifetime, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    for _ in range(int(window / (lifetime / 4))):
        await trio.sleep(lifetime / 4)
        served = (await p.call("get_token", {"provider": "dev"}))["data"]
        assert served["expiry"] > h.wall(), "served an expired token"
    assert lo <= h.idp.refresh_count <= hi, h.idp.refresh_count
    assert h.idp.reuse_count == 0
    p.close()


async def test_suspend_is_noticed_within_30_s_and_nothing_expired_is_served(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """After an 8-hour suspend (wall clock jumps, trio's does not) the token is renewed within 30 s, and a request right after resume gets a fresh token."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    await trio.sleep(600)
    h.wall.jump(8 * HOUR)
    await trio.sleep(30.5)
    assert h.idp.refresh_count == 1
    served = (await p.call("get_token", {"provider": "dev"}))["data"]
    assert served["expiry"] > h.wall() + HOUR - 60
    p.close()


async def test_request_right_after_resume_is_never_served_expired(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """A get_token that arrives the instant the laptop resumes is refreshed first, not served expired."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    h.wall.jump(8 * HOUR)
    served = (await p.call("get_token", {"provider": "dev"}))["data"]
    assert served["expiry"] > h.wall()
    assert h.idp.refresh_count == 1
    await trio.sleep(60)
    assert h.idp.refresh_count == 1  # the timer found it renewed and rescheduled
    assert h.idp.reuse_count == 0
    p.close()


async def test_concurrent_get_token_on_expired_key_makes_one_refresh(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """200 concurrent get_token calls on an expired key cause exactly one upstream refresh, and all get the new token."""
    h = await start_daemon(lifetime=HOUR, limits={"max_connections": 300, **LONG_IDLE})
    token = h.idp.mint()
    token["expiry"] = h.wall() - 1
    h.store.write("dev", "default", token)
    s = await h.session("dev")
    h.idp.fail_next("slow", delay=2)  # keep the refresh in flight while the others arrive
    served: list[str] = []

    async def one() -> None:
        peer = await h.peer(s)
        reply = await peer.call("get_token", {"provider": "dev"})
        served.append(reply["data"]["access_token"])
        peer.close()

    async with trio.open_nursery() as n:
        for _ in range(200):
            n.start_soon(one)
    assert h.idp.refresh_count == 1
    assert len(served) == 200 and len(set(served)) == 1
    assert served[0] != token["access_token"]


async def test_refresh_token_op_cooldown(start_daemon: StartDaemon, autojump_clock: object) -> None:
    """refresh_token refreshes once; within 30 s it returns the current token while valid, else RATE_LIMITED with retryAfter."""
    h = await start_daemon(lifetime=20.0, limits=LONG_IDLE)
    h.login()
    s = await h.session("dev")
    p = await h.peer(s)
    first = await p.call("refresh_token", {"provider": "dev"})
    assert first["ok"] and "refresh_token" not in first["data"]
    assert h.idp.refresh_count == 1
    again = await p.call("refresh_token", {"provider": "dev"})
    assert again["data"]["access_token"] == first["data"]["access_token"]
    assert h.idp.refresh_count == 1
    # The cooldown (30 s) is longer than this token lives (20 s).
    await trio.sleep(21)
    s2 = await h.session("dev")  # a session that has no timer renewing the key
    p2 = await h.peer(s2)
    limited = await p2.call("refresh_token", {"provider": "dev"})
    if h.idp.refresh_count == 1:  # nothing renewed it meanwhile: expired and in cooldown
        assert limited["code"] == "RATE_LIMITED"
        assert isinstance(limited["retryAfter"], int) and 1 <= limited["retryAfter"] <= 9
    await trio.sleep(10)
    ok = await p2.call("refresh_token", {"provider": "dev"})
    assert ok["ok"] is True
    assert h.idp.reuse_count == 0
    p.close()
    p2.close()


async def _refresh_in_flight(
    start_daemon: StartDaemon, delay: float = 3
) -> tuple[Harness, dict, object, Peer]:
    """An expired token, an IdP that answers in *delay* s, and a get_token whose refresh
    request has been at the IdP for a second now."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    token = h.idp.mint()
    token["expiry"] = h.wall() - 1
    h.store.write("dev", "default", token)
    s = await h.session("dev")
    p = await h.peer(s)
    h.idp.fail_next("slow", delay=delay)
    await p.send({"v": 2, "id": "x", "op": "get_token", "payload": {"provider": "dev"}})
    await trio.sleep(1)
    return h, token, s, p


async def test_refresh_completes_its_write_when_the_session_closes(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """A refresh whose request went out lands on disk even though its session closed meanwhile."""
    h, token, s, p = await _refresh_in_flight(start_daemon)
    assert await h.daemon.close_session(s.id)
    await trio.sleep(5)
    stored = h.store.read("dev", "default")
    assert stored is not None and stored["refresh_token"] != token["refresh_token"]
    assert h.idp.refresh_count == 1
    # The rotated refresh token on disk is the live one: the next refresh works.
    s2 = await h.session("dev")
    p2 = await h.peer(s2)
    assert (await p2.call("refresh_token", {"provider": "dev"}))["ok"] is True
    assert h.idp.reuse_count == 0
    p.close()
    p2.close()


async def test_reimport_restarts_a_renewal_that_needed_reauth(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """After invalid_grant stops a session's renewal, importing a new login makes the next get_token schedule renewal again."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    _, p, _ = await _serve_once(h)
    h.idp.fail_next("invalid_grant")
    await trio.sleep(3300)
    assert (await h.daemon.status())["sessions"][0]["renewals"][0]["reauth_required"] is True
    h.login()  # the user logs in again: `credproxy import` writes and notifies the daemon
    assert await h.daemon.token_changed(("dev", "default")) == 0
    assert (await h.daemon.status())["tokens"][0].get("reauth_required") is None
    assert (await p.call("get_token", {"provider": "dev"}))["ok"] is True
    renewal = (await h.daemon.status())["sessions"][0]["renewals"][0]
    assert renewal["reauth_required"] is False and renewal["next_renewal"] is not None
    refreshed = h.idp.refresh_count
    await trio.sleep(3300)
    assert h.idp.refresh_count == refreshed + 1
    p.close()


async def test_refresh_op_cooldown_counts_failed_attempts(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """While the IdP fails, a sandbox calling refresh_token in a loop reaches it at most once per 30 s."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    s = await h.session("dev")
    p = await h.peer(s)
    h.idp.fail_next("server_error", count=1000)
    for _ in range(20):
        reply = await p.call("refresh_token", {"provider": "dev"})
        # The current token is still valid, so the sandbox keeps being served it.
        assert reply["ok"] is True or reply["code"] == "REFRESH_FAILED"
        await trio.sleep(1)
    assert len(h.idp.requests) == 1
    await trio.sleep(15)
    await p.call("refresh_token", {"provider": "dev"})
    assert len(h.idp.requests) == 2
    p.close()


async def test_refresh_in_flight_lands_on_disk_when_the_daemon_stops(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """A refresh whose request went out completes its durable write although the daemon is told to stop meanwhile."""
    h, token, _, p = await _refresh_in_flight(start_daemon)
    h.daemon.stop()
    await trio.sleep(10)  # past the IdP's answer, within the shutdown grace
    stored = h.store.read("dev", "default")
    assert stored is not None and stored["refresh_token"] != token["refresh_token"]
    assert h.idp.refresh_count == 1
    status, _ = h.idp.handle_token_request(
        {
            "grant_type": "refresh_token",
            "refresh_token": stored["refresh_token"],
            "client_id": h.idp.client_id,
        }
    )
    assert status == 200  # the refresh token on disk is the live one
    p.close()


async def test_a_store_that_cannot_be_read_when_the_timer_fires_does_not_stop_the_daemon(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """The token file becomes unreadable (a symbolic link to itself: ELOOP, as EIO or a stale NFS handle would) when its renewal is due: the daemon keeps serving other requests and answers ``status``; once the file is back, the token is renewed."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    first = h.login()
    s = await h.session("dev")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["ok"] is True
    path = h.store.token_path("dev")
    saved = path.read_bytes()
    path.unlink()
    path.symlink_to(path.name)  # (itself: every stat fails with ELOOP)
    await trio.sleep(HOUR * 0.8)  # (past the renewal, due at about half the life)
    assert (await p.call("list_buckets", {"provider": "dev"}))["ok"] is True
    assert (await h.daemon.status())["sessions"]
    path.unlink()
    path.write_bytes(saved)
    path.chmod(0o600)
    await trio.sleep(HOUR * 0.15)
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is True
    assert reply["data"]["access_token"] != first["access_token"]


async def _renewal_meets(start_daemon: StartDaemon, fault: str) -> tuple[Harness, Any, Peer]:
    """A session served an hour's token, whose renewal (due at about 3245 s) meets the
    identity provider's *fault*; returns at 3260 s, after it."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    h.login()
    s = await h.session("dev")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["ok"] is True
    h.idp.fail_next(fault)
    await trio.sleep(3260)
    return h, s, p


async def test_a_renewal_that_was_refused_is_not_started_again_by_the_next_serves(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """The identity provider refuses the renewal (``invalid_grant``): the timer gives up, and the sandbox's get_token every 2 s for the next 200 s (outside the serve margin) present the refused refresh token to nobody: one refresh request in all, and ``status`` still says it gave up."""
    h, s, p = await _renewal_meets(start_daemon, "invalid_grant")
    refused = len(h.idp.requests)
    assert refused == 1
    for i in range(100):
        reply = await p.call("get_token", {"provider": "dev"})
        assert reply["ok"] is True, (i, reply)
        await trio.sleep(2)
    assert len(h.idp.requests) == refused
    (entry,) = [x for x in (await h.daemon.status())["sessions"] if x["id"] == s.id]
    assert [r["gave_up"] for r in entry["renewals"]] == [True]


async def test_an_unusable_answer_that_rotated_the_refresh_token_keeps_the_new_one(
    start_daemon: StartDaemon, autojump_clock: object
) -> None:
    """The identity provider rotates the refresh token but answers with an ``expires_in`` that is no number: the refresh counts as failed, the new refresh token is stored all the same, and the retry presents it (no reuse of the spent one, no revoked family, no logout)."""
    h, _, p = await _renewal_meets(start_daemon, "bad_expiry")
    assert h.idp.refresh_count == 1
    await trio.sleep(120)  # (its retry, 30 s after)
    assert h.idp.refresh_count == 2
    assert h.idp.reuse_count == 0 and h.idp.families_revoked == 0
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is True and h.idp.is_access_token_valid(reply["data"]["access_token"])


async def test_reloaded_renewal_settings_reach_a_running_sessions_timer(
    nursery: trio.Nursery, dirs: Dirs, autojump_clock: trio.testing.MockClock
) -> None:
    """[renewal] changed by a reload: a session's timer running since before it schedules its next renewal with the new lead (lead_fraction 0.1 -> 0.5: 1800 s before expiry, not 360)."""
    wall = WallClock()
    the_idp = devidp.DevIdP(lifetime=3600, clock=wall.true)
    url = await nursery.start(devidp.serve, the_idp)

    def config(fraction: float) -> str:
        return provider("dev", url) + f"[renewal]\nlead_fraction = {fraction}\nmax_jitter = 0\n"

    dirs.config.write_text(config(0.1))
    store = TokenStore(dirs.state)
    store.write("dev", "default", the_idp.mint())
    endpoint = HttpTokenEndpoint(wall_clock=wall, timeout=10)
    daemon = await serve_config_file(
        nursery, dirs, endpoint, store=store, wall_clock=wall, boot_clock=wall.boot
    )
    try:
        s = await daemon.open_session(Grants.parse(["dev"]), frozenset(), "old", None, None)
        peer = await Peer.connect(s.socket_path)
        await peer.handshake()
        assert (await peer.call("get_token", {"provider": "dev"}))["ok"]

        async def next_renewal_in() -> float:
            (session,) = (await daemon.status())["sessions"]
            return float(session["renewals"][0]["next_renewal_in"])

        assert 3230 <= await next_renewal_in() <= 3245  # the lead of 0.1: 360 s of 3600
        edit(dirs.config, config(0.5))
        assert (await daemon.reload("command"))["sections_changed"] == ["renewal"]
        await trio.sleep(3300)  # its timer has fired (at 3240) and refreshed once
        assert the_idp.refresh_count == 1
        assert await next_renewal_in() <= 1800, "scheduled with the settings before the reload"
        peer.close()
    finally:
        daemon.stop()
        await endpoint.aclose()


@pytest.mark.parametrize("step", [-HOUR, HOUR], ids=["put-back", "put-forward"])
async def test_a_clock_step_while_the_idp_holds_its_answer_does_not_move_the_renewal(
    start_daemon: StartDaemon,
    autojump_clock: object,
    no_secrets_in_logs: list[dict],
    step: float,
) -> None:
    """The wall clock is stepped an hour (back or forward) between a refresh's request and its answer: the new hour token is renewed 3240-3270 s after it was asked for, as without a step, not an hour late or at once."""
    h, _, _, p = await _refresh_in_flight(start_daemon, delay=6)
    asked = h.wall.true() - 1
    await trio.sleep(2)  # the request is at the IdP, which answers at +6 s
    assert h.idp.refresh_count == 0
    h.wall.step(step)
    reply = await p.recv()
    assert reply is not None and reply["ok"] is True, reply
    assert h.idp.is_access_token_valid(reply["data"]["access_token"])
    assert h.idp.refresh_count == 1
    # The timer of the token just served: not early (a token that looked dead at once)...
    await trio.sleep(asked + 3240 - h.wall.true())
    assert h.idp.refresh_count == 1, "renewed early: the step counted against its life"
    # ...nor late (a token that looked an hour longer-lived), and nothing served dies.
    await trio.sleep(31)
    assert h.idp.refresh_count == 2, "not renewed in time: the step counted for its life"
    reply = await p.call("get_token", {"provider": "dev"})
    assert h.idp.is_access_token_valid(reply["data"]["access_token"])
    assert h.idp.reuse_count == 0
    (stepped,) = [e for e in no_secrets_in_logs if e["event"] == "clock_step_during_refresh"]
    assert stepped["step"] == step


async def _writer_of(fifo: Path) -> int:
    """A write end of *fifo*, once something has opened it to read (and waits in that open)."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # (ENXIO: no reader yet)
                raise
        await trio.sleep(0.01)


async def test_a_clock_step_while_the_client_secret_is_read_does_not_move_the_renewal(
    start_daemon: StartDaemon,
    no_secrets_in_logs: list[dict],
    tmp_path: Path,
) -> None:
    """The wall clock is stepped an hour forward while a refresh reads its client_secret_file (a FIFO the test writes once the step is made), before its request leaves: the new hour token's renewal is due 3240-3270 s after the refresh (status), not an hour late. (trio's real clock: an autojump clock leaps ahead while a thread reads the file.)"""
    fifo = tmp_path / "client-secret"
    os.mkfifo(fifo, 0o600)
    h = await start_daemon(
        lifetime=HOUR, limits=LONG_IDLE, providers={"dev": {"client_secret_file": str(fifo)}}
    )
    token = h.idp.mint()
    token["expiry"] = h.wall() - 1
    h.store.write("dev", "default", token)
    p = await h.peer(await h.session("dev"))
    await p.send({"v": 2, "id": "x", "op": "get_token", "payload": {"provider": "dev"}})
    fd = await _writer_of(fifo)  # the refresh is reading the secret now
    h.wall.step(HOUR)
    os.write(fd, b"not-checked-by-this-idp\n")
    os.close(fd)
    # The renewal reads a plain file (a FIFO with no writer would hold it for good).
    (tmp_path / "plain").write_text("not-checked-by-this-idp\n")
    os.replace(tmp_path / "plain", fifo)
    reply = await p.recv()
    assert reply is not None and reply["ok"] is True, reply
    assert h.idp.refresh_count == 1
    # Its renewal is due 3240-3270 s after the refresh (lead 0.1 of an hour,
    # jitter up to 30 s), as without a step: not an hour late.
    (renewal,) = (await h.daemon.status())["sessions"][0]["renewals"]
    assert 3230 <= renewal["next_renewal_in"] <= 3270, renewal
    # The request left after the step: its expiry needed no correction.
    assert not [e for e in no_secrets_in_logs if e["event"] == "clock_step_during_refresh"]
