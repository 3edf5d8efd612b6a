"""Wall-clock steps never lead to serving a token past its real lifetime (issue 9, item 3).

The host's wall clock is stepped (``WallClock.step``) while the identity
provider keeps the true time and the daemon's boot clock (``CLOCK_BOOTTIME``
in production) is not moved by steps. Every token served is checked against
the identity provider itself.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from conftest import Harness, Peer, StartDaemon

HOUR = 3600.0


async def _serve_for(h: Harness, p: Peer, seconds: float, every: float = 60.0) -> list[str]:
    """Ask for the token every *every* seconds of true time; return those the IdP refused."""
    dead: list[str] = []
    waited = 0.0
    while waited < seconds:
        reply = await p.call("get_token", {"provider": "dev"})
        assert reply["ok"] is True, reply
        token = reply["data"]["access_token"]
        if not h.idp.is_access_token_valid(token):
            dead.append(f"at +{waited:.0f} s: {token[:12]}")
        await trio.sleep(every)
        waited += every
    return dead


async def test_clock_put_back_after_a_refresh_never_stretches_a_tokens_life(
    start_daemon: StartDaemon, autojump_clock: trio.testing.MockClock
) -> None:
    """A token received while the wall clock was an hour ahead is renewed on time after the clock is put back, not an hour late."""
    h = await start_daemon(lifetime=HOUR, limits={"idle_timeout": 1e9})
    h.login()
    s = await h.session("dev")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["ok"]
    h.wall.step(HOUR)  # the host's clock runs an hour ahead: the token looks expired
    await trio.sleep(2)  # past the second for which a served answer may be reused
    before = h.idp.refresh_count
    assert (await p.call("get_token", {"provider": "dev"}))["ok"]
    assert h.idp.refresh_count == before + 1, "refreshed while the clock was ahead"
    h.wall.step(-HOUR)  # the clock is put right: the stored expiry is an hour too late
    dead = await _serve_for(h, p, 3 * HOUR)
    assert dead == [], f"served tokens the identity provider had already expired: {dead[:3]}"


async def test_clock_put_forward_refreshes_early_and_serves_nothing_dead(
    start_daemon: StartDaemon, autojump_clock: trio.testing.MockClock
) -> None:
    """A wall clock stepped forward an hour makes tokens look older: they are refreshed early, and none served is dead."""
    h = await start_daemon(lifetime=HOUR, limits={"idle_timeout": 1e9})
    h.login()
    s = await h.session("dev")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["ok"]
    await trio.sleep(600)
    h.wall.step(HOUR)
    dead = await _serve_for(h, p, 3 * HOUR)
    assert dead == []


async def test_status_reports_the_true_time_left_after_a_step_back(
    start_daemon: StartDaemon, autojump_clock: trio.testing.MockClock
) -> None:
    """After the clock is put back an hour, status shows the token's real time left, not an hour more."""
    h = await start_daemon(lifetime=HOUR, limits={"idle_timeout": 1e9})
    h.login()
    s = await h.session("dev")
    p = await h.peer(s)
    h.wall.step(HOUR)
    await trio.sleep(2)
    assert (await p.call("get_token", {"provider": "dev"}))["ok"]  # refreshed while ahead
    h.wall.step(-HOUR)
    token: dict[str, Any] = (await h.daemon.status())["tokens"][0]
    assert token["expires_in"] <= HOUR + 1, token


async def _received_ahead_then_put_back(h: Harness) -> float:
    """A token refreshed while the host's clock ran an hour ahead (its stored expiry an hour
    late), by a session that then closes; the clock put right. When it was received (true time)."""
    h.login()
    h.wall.step(HOUR)  # the host's clock runs an hour ahead
    await trio.sleep(2)
    ahead = await h.session("dev")
    p = await h.peer(ahead)
    assert (await p.call("get_token", {"provider": "dev"}))["ok"]  # refreshed: stored an hour late
    received = h.wall.true()
    p.close()
    assert await h.daemon.close_session(ahead.id)  # (its timer goes with it)
    h.wall.step(-HOUR)  # the clock is put right
    return received


async def test_a_token_received_while_ahead_and_first_served_after_the_step_back_is_renewed_on_time(
    start_daemon: StartDaemon, autojump_clock: trio.testing.MockClock
) -> None:
    """A session that first serves, after the clock is put back, a token received while it was an hour ahead renews it before it expires, not an hour late."""
    h = await start_daemon(lifetime=HOUR, limits={"idle_timeout": 1e9})
    received = await _received_ahead_then_put_back(h)
    s = await h.session("dev")
    q = await h.peer(s)
    token = (await q.call("get_token", {"provider": "dev"}))["data"]["access_token"]
    assert h.idp.is_access_token_valid(token)
    before = h.idp.refresh_count
    await trio.sleep(received + HOUR - 60 - h.wall.true())  # a minute before it expires
    assert h.idp.refresh_count == before + 1, "the session's timer did not renew it in time"


async def test_sessions_that_serve_a_token_stored_an_hour_late_renew_it_once(
    start_daemon: StartDaemon, autojump_clock: trio.testing.MockClock
) -> None:
    """Three sessions serve, after the clock is put back, a token received while it was an hour ahead: one renewal, not three (the new token's stored expiry is earlier than the old one's, and it counts as renewed elsewhere)."""
    h = await start_daemon(lifetime=HOUR, limits={"idle_timeout": 1e9})
    received = await _received_ahead_then_put_back(h)
    for _ in range(3):
        q = await h.peer(await h.session("dev"))
        assert (await q.call("get_token", {"provider": "dev"}))["ok"]
    before = h.idp.refresh_count
    await trio.sleep(received + HOUR - 60 - h.wall.true())  # every timer has fired by then
    assert h.idp.refresh_count == before + 1, f"{h.idp.refresh_count - before} refreshes"
