"""A login that is needed reaches the person on the host, once per key (issue 10)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio
import trio.testing

from conftest import StartDaemon

HOUR = 3600.0

# Writes its arguments and the CREDPROXY_* environment to the file named first.
NOTIFY = (
    "import json, os, sys; "
    "open(sys.argv[1], 'a').write(json.dumps({'argv': sys.argv[2:], "
    "'env': {k: v for k, v in os.environ.items() if k.startswith('CREDPROXY_')}}) + '\\n')"
)


def _events(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


async def test_expired_token_without_refresh_token_names_the_login_command(
    start_daemon: StartDaemon, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """A sandbox asking for an expired token that cannot be refreshed gets REAUTH_REQUIRED naming the host command; the host is told once."""
    h = await start_daemon()
    h.store.write("dev", "work", {"access_token": "devat-old", "expiry": h.wall() - 10})
    s = await h.session("dev")
    p = await h.peer(s)
    for _ in range(3):
        reply = await p.call("get_token", {"provider": "dev", "bucket": "work"})
        assert reply["code"] == "REAUTH_REQUIRED"
        assert "on the host run: credproxy login dev --bucket work" in reply["error"]
    told = _events(no_secrets_in_logs, "reauth_needed")
    assert [(e["provider"], e["bucket"], e["login"]) for e in told] == [
        ("dev", "work", "credproxy login dev --bucket work")
    ]
    (token,) = [t for t in (await h.daemon.status())["tokens"] if t["bucket"] == "work"]
    assert token["reauth_required"] is True


async def test_rejected_refresh_token_asks_for_a_login_and_a_new_login_clears_it(
    start_daemon: StartDaemon,
    no_secrets_in_logs: list[dict[str, Any]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    """invalid_grant makes the key need a login (told once); after a new login the sandbox is served again and a later need is told again."""
    h = await start_daemon(lifetime=HOUR, limits={"idle_timeout": 1e9})
    h.login()
    s = await h.session("dev")
    p = await h.peer(s)
    assert (await p.call("get_token", {"provider": "dev"}))["ok"]
    h.idp.fail_next("invalid_grant", count=2)  # the renewal, then the on-demand refresh
    await trio.sleep(HOUR + 5)  # the token has expired; its renewal was refused
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["code"] == "REAUTH_REQUIRED"
    assert reply["error"].endswith("on the host run: credproxy login dev")
    assert len(_events(no_secrets_in_logs, "reauth_needed")) == 1

    h.login()  # what `credproxy login dev` does: a new token, then token_changed
    await h.daemon.token_changed(("dev", "default"))
    await trio.sleep(2)
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is True, reply
    assert (await h.daemon.status())["tokens"][0].get("reauth_required") in (None, False)

    h.idp.fail_next("invalid_grant", count=2)
    await trio.sleep(HOUR + 5)
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["code"] == "REAUTH_REQUIRED"
    assert len(_events(no_secrets_in_logs, "reauth_needed")) == 2


async def test_notify_command_runs_once_per_key_without_a_shell(
    start_daemon: StartDaemon, tmp_short: Path
) -> None:
    """[notify] command is run with the message as its last argument and the key in its environment, once per key however often it is asked."""
    out = tmp_short / "notified.jsonl"
    h = await start_daemon(notify={"command": [sys.executable, "-c", NOTIFY, str(out)]})
    h.store.write("dev", "default", {"access_token": "devat-old", "expiry": h.wall() - 10})
    s = await h.session("dev")
    p = await h.peer(s)
    for _ in range(3):
        assert (await p.call("get_token", {"provider": "dev"}))["code"] == "REAUTH_REQUIRED"
    with trio.fail_after(10):
        while not out.exists() or not out.read_text().strip():
            await trio.sleep(0.05)
    await trio.sleep(0.5)  # a second run, if there were one, would have written by now
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 1
    (message,) = lines[0]["argv"]
    assert "credproxy login dev" in message
    env = lines[0]["env"]
    assert (env["CREDPROXY_PROVIDER"], env["CREDPROXY_BUCKET"], env["CREDPROXY_LOGIN"]) == (
        "dev",
        "default",
        "credproxy login dev",
    )
