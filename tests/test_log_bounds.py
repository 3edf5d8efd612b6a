"""No sandbox can grow the daemon's log faster than a stated bound (issue 9, item 7)."""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing

from conftest import Peer, StartDaemon
from credproxy.core.protocol import frame


def _events(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


async def test_a_flood_of_serves_costs_two_audit_lines_per_minute(
    start_daemon: StartDaemon,
    no_secrets_in_logs: list[dict[str, Any]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Five thousand get_token on one key in one session write one audit line at once and one count line a minute later."""
    h = await start_daemon(limits={"requests_per_second": 0})
    h.login()
    s = await h.session("dev")
    p = await h.peer(s)
    body = b"".join(
        frame(
            json.dumps(
                {"v": 2, "id": f"r{i}", "op": "get_token", "payload": {"provider": "dev"}}
            ).encode()
        )
        for i in range(5000)
    )
    await p.send_raw(body)
    for _ in range(5000):
        reply = await p.recv()
        assert reply is not None and reply["ok"] is True
    assert len(_events(no_secrets_in_logs, "token_served")) == 1
    await trio.sleep(61)
    served = _events(no_secrets_in_logs, "token_served")
    assert [e["count"] for e in served] == [1, 4999]


async def test_refused_connections_are_logged_at_most_once_per_ten_seconds(
    start_daemon: StartDaemon,
    no_secrets_in_logs: list[dict[str, Any]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Fifty connections over the session's cap write one refusal line; the next one, ten seconds later, reports the 49 not logged."""
    h = await start_daemon(limits={"max_connections": 1})
    h.login()
    s = await h.session("dev")
    await h.peer(s)  # takes the one slot
    for _ in range(50):  # (each says its handshake at once, as clients do)
        extra = await Peer.connect(s.socket_path)
        reply = await extra.handshake()
        assert reply["code"] == "RESOURCE_EXHAUSTED"
        extra.close()
    assert [e["suppressed"] for e in _events(no_secrets_in_logs, "connection_refused")] == [0]
    await trio.sleep(10)
    extra = await Peer.connect(s.socket_path)
    assert (await extra.handshake()).get("code") == "RESOURCE_EXHAUSTED"
    extra.close()
    refused = _events(no_secrets_in_logs, "connection_refused")
    assert [e["suppressed"] for e in refused] == [0, 49]
