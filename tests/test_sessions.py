"""Sandbox sessions: grants, isolation between sessions, what a sandbox may do."""

from __future__ import annotations

import os
import stat

from conftest import Harness, StartDaemon

TOKEN_A = {"access_token": "AT-a", "refresh_token": "RT-CANARY-a", "expiry": 1_800_003_600}
TOKEN_B = {"access_token": "AT-b", "refresh_token": "RT-CANARY-b", "expiry": 1_800_003_600}


async def _two_tokens(start_daemon: StartDaemon) -> Harness:
    h = await start_daemon()
    h.store.write("a", "default", dict(TOKEN_A, custom_field="kept"))
    h.store.write("b", "default", TOKEN_B)
    h.store.write("b", "work", TOKEN_B)
    h.store.write_key("granted-key", "KEY-CANARY-1")
    h.store.write_key("other-key", "KEY-CANARY-2")
    return h


async def test_get_token_serves_the_access_token_without_refresh_token(
    start_daemon: StartDaemon,
) -> None:
    """get_token returns the stored token, unknown fields included, minus refresh_token."""
    h = await _two_tokens(start_daemon)
    s = await h.session("a")
    p = await h.peer(s)
    reply = await p.call("get_token", {"provider": "a"})
    assert reply == {
        "id": reply["id"],
        "ok": True,
        "data": {"access_token": "AT-a", "expiry": 1_800_003_600, "custom_field": "kept"},
    }
    assert b"RT-CANARY" not in bytes(p.received)
    p.close()


async def test_ungranted_and_missing_tokens_answer_alike(start_daemon: StartDaemon) -> None:
    """A session granted `a` gets the same NOT_FOUND for existing `b` and for a provider that does not exist."""
    h = await _two_tokens(start_daemon)
    s = await h.session("a")
    p = await h.peer(s)
    existing = await p.call("get_token", {"provider": "b"})
    missing = await p.call("get_token", {"provider": "nosuch"})
    assert existing["ok"] is False
    assert existing["code"] == missing["code"] == "NOT_FOUND"
    assert existing["error"].replace("b:", "X:") == missing["error"].replace("nosuch:", "X:")
    assert (await p.call("list_providers"))["data"] == {"providers": ["a"]}
    assert (await p.call("list_buckets", {"provider": "b"}))["data"] == {"buckets": []}
    assert (await p.call("get_bucket_stats", {"provider": "b"}))["code"] == "NOT_FOUND"
    assert b"AT-b" not in bytes(p.received)
    p.close()


async def test_bucket_grant_allows_only_that_bucket(start_daemon: StartDaemon) -> None:
    """A PROVIDER:BUCKET grant reads that bucket only and lists only it."""
    h = await _two_tokens(start_daemon)
    s = await h.session("b:work")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "b", "bucket": "work"}))["ok"] is True
    assert (await p.call("get_token", {"provider": "b"}))["code"] == "NOT_FOUND"
    assert (await p.call("list_buckets", {"provider": "b"}))["data"] == {"buckets": ["work"]}
    assert (await p.call("list_providers"))["data"] == {"providers": ["b"]}
    p.close()


async def test_two_sessions_cannot_read_each_others_grants(start_daemon: StartDaemon) -> None:
    """Each session's socket serves only that session's grants."""
    h = await _two_tokens(start_daemon)
    sa, sb = await h.session("a"), await h.session("b")
    pa, pb = await h.peer(sa), await h.peer(sb)
    assert (await pa.call("get_token", {"provider": "a"}))["ok"] is True
    assert (await pa.call("get_token", {"provider": "b"}))["code"] == "NOT_FOUND"
    assert (await pb.call("get_token", {"provider": "b"}))["ok"] is True
    assert (await pb.call("get_token", {"provider": "a"}))["code"] == "NOT_FOUND"
    pa.close()
    pb.close()


async def test_api_keys_follow_grants(start_daemon: StartDaemon) -> None:
    """key:NAME grants one key; other keys are invisible, has_api_key included."""
    h = await _two_tokens(start_daemon)
    s = await h.session("key:granted-key")
    p = await h.peer(s)
    assert (await p.call("get_api_key", {"name": "granted-key"}))["data"] == {"key": "KEY-CANARY-1"}
    assert (await p.call("get_api_key", {"name": "other-key"}))["code"] == "NOT_FOUND"
    assert (await p.call("get_api_key", {"name": "nosuch"}))["code"] == "NOT_FOUND"
    assert (await p.call("list_api_keys"))["data"] == {"keys": ["granted-key"]}
    assert (await p.call("has_api_key", {"name": "other-key"}))["data"] == {"exists": False}
    assert (await p.call("has_api_key", {"name": "granted-key"}))["data"] == {"exists": True}
    assert b"KEY-CANARY-2" not in bytes(p.received)
    p.close()


async def test_mutations_and_oauth_are_forbidden_on_a_sandbox_socket(
    start_daemon: StartDaemon,
) -> None:
    """save_token, remove_token and oauth_* answer FORBIDDEN and change nothing."""
    h = await _two_tokens(start_daemon)
    s = await h.session("*")
    p = await h.peer(s)
    for op, payload in [
        ("save_token", {"provider": "a", "token": {"access_token": "evil"}}),
        ("remove_token", {"provider": "a"}),
        ("oauth_initiate", {"provider": "a"}),
        ("oauth_exchange", {"session_id": "x", "code": "y"}),
    ]:
        reply = await p.call(op, payload)
        assert (reply["ok"], reply["code"]) == (False, "FORBIDDEN"), op
    assert h.store.read("a")["access_token"] == "AT-a"
    unknown = await p.call("frobnicate")
    assert (unknown["code"], unknown["error"]) == (
        "INVALID_REQUEST",
        "Unknown operation: frobnicate",
    )
    p.close()


async def test_session_socket_is_private_and_removed_on_close(start_daemon: StartDaemon) -> None:
    """Session sockets are 0600 in a 0700 directory and disappear when the session closes."""
    h = await start_daemon()
    s = await h.session("a")
    path = s.socket_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(h.dirs.runtime / "credproxy.sock").st_mode) == 0o600
    assert await h.daemon.close_session(s.id) is True
    assert not path.exists()


async def test_capability_token_is_required_when_the_session_has_one(
    start_daemon: StartDaemon,
) -> None:
    """A session opened with a capability refuses handshakes without it (UNAUTHORIZED) and accepts the right one."""
    from credproxy.core.protocol import capability_digest

    cap = "ab" * 32
    h = await start_daemon()
    s = await h.session("a", capability=capability_digest(cap))
    p = await h.peer(s, handshake=False)
    reply = await p.handshake()
    assert (reply["ok"], reply["code"]) == (False, "UNAUTHORIZED")
    assert await p.closed_by_server()
    p.close()
    p = await h.peer(s, handshake=False)
    assert (await p.handshake(capability="cd" * 32))["code"] == "UNAUTHORIZED"
    p.close()
    p = await h.peer(s, handshake=False)
    assert (await p.handshake(capability=cap)) == {
        "v": 2,
        "op": "handshake",
        "ok": True,
        "data": {"version": 2},
    }
    p.close()
