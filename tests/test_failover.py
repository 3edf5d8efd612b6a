"""Several accounts of one provider, with failover that says why (issue 11), on the live daemon.

Each bucket is its own login at the development identity provider (its own
token family). Profiles come from a grant ``dev:a,b,c`` or from the
provider's configured ``buckets``.
"""

from __future__ import annotations

import functools
from typing import Any

import trio
import trio.testing

from conftest import Harness, StartDaemon, cli

HOUR = 3600.0
LONG = {"idle_timeout": 1e9}


def _login(h: Harness, *buckets: str) -> dict[str, str]:
    """One login per bucket; returns bucket -> its first access token."""
    return {b: h.login(bucket=b)["access_token"] for b in buckets}


def _bucket_of(tokens: dict[str, str], h: Harness, served: str) -> str:
    """Which bucket's token family *served* belongs to (by the store, after refreshes)."""
    for b in tokens:
        stored = h.store.read("dev", b)
        if stored is not None and stored["access_token"] == served:
            return b
    raise AssertionError("the served token is no bucket's")


async def test_single_bucket_profile_behaves_as_before(start_daemon: StartDaemon) -> None:
    """A grant of one bucket, asked without a bucket, is served exactly as today: the default bucket."""
    h = await start_daemon()
    _login(h, "default", "a")
    s = await h.session("dev:a", "dev:default")
    p = await h.peer(s)
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is True
    assert reply["data"]["access_token"] == h.store.read("dev", "default")["access_token"]


async def test_quota_report_moves_to_the_next_bucket_without_refreshing_the_first(
    start_daemon: StartDaemon, autojump_clock: trio.testing.MockClock
) -> None:
    """Bucket a reported quota-exhausted: the next get_token serves b with no refresh of a; after retryAfter, a again (fill-first)."""
    h = await start_daemon(limits=LONG)
    first = _login(h, "a", "b")
    s = await h.session("dev:a,b")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["a"]
    refreshes = h.idp.refresh_count
    report = await p.call(
        "report_failure", {"provider": "dev", "bucket": "a", "status": 429, "retryAfter": 120}
    )
    assert report["ok"] and report["data"]["recorded"] == "quota-exhausted"
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["data"]["access_token"] == first["b"]
    assert h.idp.refresh_count == refreshes, "a healthy or held bucket was refreshed"
    stats = await p.call("get_bucket_stats", {"provider": "dev", "bucket": "a"})
    assert stats["data"]["state"] == "quota-exhausted"
    await trio.sleep(121)
    # fill-first: a's hold has ended and a is listed first, so a serves again
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["a"]
    stats = await p.call("get_bucket_stats", {"provider": "dev", "bucket": "a"})
    assert stats["data"]["state"] == "ok"
    assert h.idp.refresh_count == refreshes


async def test_sticky_stays_on_the_bucket_that_served_after_the_hold_ends(
    start_daemon: StartDaemon, autojump_clock: trio.testing.MockClock
) -> None:
    """strategy = "sticky" keeps the old fill-first: after a's hold ends, b goes on serving until it fails."""
    h = await start_daemon(limits=LONG, providers={"dev": {"strategy": "sticky"}})
    first = _login(h, "a", "b")
    s = await h.session("dev:a,b")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["a"]
    await p.call(
        "report_failure", {"provider": "dev", "bucket": "a", "status": 429, "retryAfter": 120}
    )
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["b"]
    await trio.sleep(121)
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["b"]
    await p.call("report_failure", {"provider": "dev", "bucket": "b", "reason": "quota-exhausted"})
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["a"]


async def test_release_with_no_hold_left_still_sends_a_sticky_profile_back(
    start_daemon: StartDaemon,
) -> None:
    """After a's hold has ended, sticky stays on b; `credproxy release dev` then makes a serve again, and says there was no hold to end, exit 0 (not "not found": it did something)."""
    h = await start_daemon(limits=LONG, providers={"dev": {"strategy": "sticky"}})
    first = _login(h, "a", "b")
    s = await h.session("dev:a,b")
    p = await h.peer(s)
    await p.call("get_token", {"provider": "dev"})
    await p.call(
        "report_failure", {"provider": "dev", "bucket": "a", "status": 429, "retryAfter": 1}
    )
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["b"]
    await trio.sleep(1.5)  # (the real clock: the CLI below is another process)
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["b"]
    done = await trio.to_thread.run_sync(functools.partial(cli, h.dirs, "release", "dev"))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("no quota hold on dev ")
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["a"]


async def test_fill_first_stays_on_the_bucket_that_serves(start_daemon: StartDaemon) -> None:
    """Without a strategy, consecutive get_token without a bucket keep serving the first bucket while it serves."""
    h = await start_daemon(limits=LONG)
    first = _login(h, "a", "b", "c")
    s = await h.session("dev:a,b,c")
    p = await h.peer(s)
    served = [
        (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] for _ in range(3)
    ]
    assert served == [first["a"]] * 3


async def test_round_robin_from_the_providers_configured_buckets(
    start_daemon: StartDaemon,
) -> None:
    """[providers.dev] buckets and strategy = round-robin: serves rotate a, b, c, a, ... (once each token is warm)."""
    h = await start_daemon(
        limits=LONG,
        providers={"dev": {"buckets": ["a", "b", "c"], "strategy": "round-robin"}},
    )
    first = _login(h, "a", "b", "c")
    s = await h.session("dev")
    p = await h.peer(s)
    served = [
        (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] for _ in range(6)
    ]
    assert served == [first[b] for b in "abcabc"]


async def test_revoked_refresh_token_fails_over_and_asks_a_login_for_that_bucket_only(
    start_daemon: StartDaemon,
    no_secrets_in_logs: list[dict[str, Any]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """a's refresh token refused: a needs a login (told once), b is served, and no login is asked for b."""
    h = await start_daemon(lifetime=HOUR, limits=LONG)
    first = _login(h, "a", "b")
    s = await h.session("dev:a,b")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["data"]["access_token"] == first["a"]
    h.idp.fail_next("invalid_grant")  # a's renewal; b (never served yet) refreshes fine
    await trio.sleep(HOUR + 5)
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is True
    assert _bucket_of(first, h, reply["data"]["access_token"]) == "b"
    told = [e for e in no_secrets_in_logs if e["event"] == "reauth_needed"]
    assert [e.get("bucket", e.get("buckets")) for e in told] == ["a"]
    stats = await p.call("get_bucket_stats", {"provider": "dev", "bucket": "a"})
    assert stats["data"]["state"] == "reauth-failed"
    status = (await h.daemon.status())["sessions"][0]["profiles"]
    assert [(b["bucket"], b["state"]) for b in status[0]["buckets"]] == [
        ("a", "reauth-failed"),
        ("b", "ok"),
    ]


async def test_all_buckets_exhausted_lists_every_reason_and_the_soonest_retry(
    start_daemon: StartDaemon, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """No bucket can serve: ALL_BUCKETS_EXHAUSTED with each bucket's reason, the soonest retryAfter, one login prompt for those that need it."""
    h = await start_daemon(limits=LONG)
    _login(h, "a", "b")
    h.store.write("dev", "c", {"access_token": "devat-old", "expiry": h.wall() - 10})
    s = await h.session("dev:a,b,c,d")
    p = await h.peer(s)
    for bucket, after in (("a", 300), ("b", 90)):
        r = await p.call(
            "report_failure",
            {"provider": "dev", "bucket": bucket, "status": 429, "retryAfter": after},
        )
        assert r["ok"], r
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is False and reply["code"] == "ALL_BUCKETS_EXHAUSTED"
    assert reply["bucketFailureReasons"] == {
        "a": "quota-exhausted",
        "b": "quota-exhausted",
        "c": "expired-refresh-failed",
        "d": "no-token",
    }
    assert 89 <= reply["retryAfter"] <= 90
    assert "credproxy login dev --bucket c" in reply["error"]
    assert "credproxy login dev --bucket d" in reply["error"]
    told = [e for e in no_secrets_in_logs if e["event"] == "reauth_needed"]
    assert [e["buckets"] for e in told] == [["c", "d"]], "one prompt for every bucket that needs it"
    again = await p.call("get_token", {"provider": "dev"})
    assert again["code"] == "ALL_BUCKETS_EXHAUSTED"
    assert len([e for e in no_secrets_in_logs if e["event"] == "reauth_needed"]) == 1


async def test_reports_are_validated_and_cannot_amplify(
    start_daemon: StartDaemon, autojump_clock: trio.testing.MockClock
) -> None:
    """A report on a bucket not granted is NOT_FOUND, one cannot mark a bucket healthy, 5xx is not quota, and 1,000 401 reports cause one refresh."""
    h = await start_daemon(limits={**LONG, "requests_per_second": 0})
    _login(h, "a", "b", "secret")
    s = await h.session("dev:a,b")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["ok"]
    r = await p.call("report_failure", {"provider": "dev", "bucket": "secret", "status": 429})
    assert r["code"] == "NOT_FOUND"
    r = await p.call("report_failure", {"provider": "dev", "bucket": "a", "reason": "ok"})
    assert r["code"] == "INVALID_REQUEST" and "healthy" in r["error"]
    r = await p.call("report_failure", {"provider": "dev", "bucket": "a", "status": 503})
    assert r["ok"] and r["data"]["recorded"] is None
    stats = await p.call("get_bucket_stats", {"provider": "dev", "bucket": "a"})
    assert stats["data"]["state"] == "ok"
    before = h.idp.refresh_count
    for _ in range(1000):
        r = await p.call("report_failure", {"provider": "dev", "bucket": "a", "status": 401})
        assert r["ok"], r
    assert h.idp.refresh_count == before + 1
