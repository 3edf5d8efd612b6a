"""Reload and stop: a running daemon re-reads its config, and stops without losing a refresh.

The config file is edited under a running daemon, in this process (``serve``
with ``config_path``) and as the real ``credproxy serve``; ``credproxy reload``,
SIGHUP and the file watch make a running session see a new provider (a
``get_token`` that was "not configured" now refreshes) and a new ``api``
section (a proxied request that was 404 reaches a loopback upstream); a
reload that moves, changes or removes an ``api`` section closes the WebSockets
opened under it (``tests/test_websocket.py``'s echo server) and no others. A bad
edit keeps the old configuration and says where. ``credproxy stop`` with a
refresh on its way to the identity provider returns once the daemon is gone,
and the new token is on disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_proxy import HttpClient, Upstream, upstream  # noqa: F401
from test_refresh_coordination import _wait_stopped
from test_systemd_user import User, host_marker, machine, user  # noqa: F401
from test_websocket import (  # noqa: F401
    EchoServer,
    _audit,
    ca,
    echo,
    one_ends_other_stays,
    refused_while,
)
from websockets.sync.client import ClientConnection

from conftest import CREDPROXY, Dirs, Peer, cli, serve_config_file
from credproxy import devidp
from credproxy.core.grants import Grants
from credproxy.devidp.idp import DevIdP, Fault
from credproxy.errors import CredproxyError
from credproxy.inner.client import Client
from credproxy.shell import paths
from credproxy.shell.daemon import Daemon, config_signature
from credproxy.shell.http import HttpTokenEndpoint
from credproxy.shell.store import TokenStore
from systemd_boot import unavailable

SYSTEMD_UNAVAILABLE = unavailable()
WAIT = 10.0  # seconds any one step may take before a test gives up (never a timing claim)


class WatchedIdP(DevIdP):
    """The development IdP, saying when a "slow" token request has arrived."""

    def __init__(self) -> None:
        super().__init__(lifetime=3600)
        self.slow_started = trio.Event()

    def take_fault(self) -> Fault | None:
        fault = super().take_fault()
        if fault is not None and fault.kind == "slow":
            self.slow_started.set()
        return fault


@dataclass
class Live:
    """A daemon in this process that reads its config from ``dirs.config``."""

    daemon: Daemon
    store: TokenStore
    idp: WatchedIdP
    dirs: Dirs

    async def session(self, *grants: str) -> Any:
        return await self.daemon.open_session(
            Grants.parse(list(grants)), frozenset(), "test", None, None
        )

    async def reload_cli(self) -> subprocess.CompletedProcess[str]:
        """``credproxy reload``, run as a process while this trio loop keeps serving."""
        return await trio.to_thread.run_sync(functools.partial(cli, self.dirs, "reload"))


def provider(name: str, url: str, api: str | None = None) -> str:
    text = f'[providers.{name}]\ntoken_url = "{url}"\nclient_id = "credproxy-dev"\n'
    if api is not None:
        text += f'[providers.{name}.api]\nbase_url = "{api}"\n'
        text += 'headers = { Authorization = "Bearer {access_token}" }\n'
    return text


def store_tokens(store: TokenStore, idp: DevIdP) -> None:
    """A valid dev token, and an expired dev2 one (serving it needs a refresh)."""
    store.write("dev", "default", idp.mint())
    expired = idp.mint()
    expired["expiry"] = time.time() - 60
    store.write("dev2", "default", expired)


def edit(path: Path, text: str) -> None:
    """Rewrite the config file as an editor saving through a rename does (a new inode)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


StartLive = Callable[..., Awaitable[Live]]


@pytest.fixture
async def idp(nursery: trio.Nursery) -> tuple[WatchedIdP, str]:
    idp = WatchedIdP()
    url = await nursery.start(devidp.serve, idp)
    return idp, url


@pytest.fixture
async def start_live(
    nursery: trio.Nursery, dirs: Dirs, idp: tuple[WatchedIdP, str]
) -> AsyncIterator[StartLive]:
    """Start the daemon in this trio loop on ``dirs.config`` (real clocks; no file watch unless
    *config_poll* is given)."""
    started: list[tuple[Daemon, HttpTokenEndpoint]] = []

    async def start(text: str, *, config_poll: float | None = None) -> Live:
        dirs.config.write_text(text)
        store = TokenStore(dirs.state)
        endpoint = HttpTokenEndpoint(timeout=10)
        daemon = await serve_config_file(
            nursery, dirs, endpoint, store=store, config_poll=config_poll
        )
        started.append((daemon, endpoint))
        return Live(daemon, store, idp[0], dirs)

    yield start
    for daemon, endpoint in started:
        daemon.stop()
        await endpoint.aclose()


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e.get("event") == name]


# --- in this process -------------------------------------------------------------------


async def test_reload_brings_a_new_provider_and_api_section_to_a_running_session(
    start_live: StartLive,
    idp: tuple[WatchedIdP, str],
    upstream: Upstream,  # noqa: F811
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """`credproxy reload` after adding [providers.dev2] and [providers.dev.api]: the open
    connection's get_token of dev2 refreshes instead of "not configured", and a proxied
    request that was 404 reaches the upstream with dev's token."""
    _, url = idp
    live = await start_live(provider("dev", url))
    store_tokens(live.store, live.idp)
    s = await live.session("dev", "dev2")
    peer = await Peer.connect(s.socket_path)
    assert (await peer.handshake())["ok"] is True

    before = await peer.call("get_token", {"provider": "dev2"})
    assert before["ok"] is False
    assert "provider 'dev2' is not configured" in before["error"]
    http = await HttpClient.connect(s.socket_path)
    status, _, _ = await http.call("GET", "/dev/models")
    assert status == 404
    await http.aclose()
    assert upstream.received == []

    edit(live.dirs.config, provider("dev", url, api=upstream.url) + provider("dev2", url))
    done = await live.reload_cli()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"reloaded {live.dirs.config}: providers added: dev2; providers changed: dev"
    )

    after = await peer.call("get_token", {"provider": "dev2"})
    assert after["ok"] is True, after
    assert after["data"]["access_token"] == live.store.read("dev2", "default")["access_token"]
    assert live.idp.refresh_count == 1

    http = await HttpClient.connect(s.socket_path)
    status, _, _ = await http.call("GET", "/dev/models")
    assert status == 200
    await http.aclose()
    token = live.store.read("dev", "default")["access_token"]
    assert upstream.headers()["authorization"] == f"Bearer {token}"
    assert upstream.received[0]["target"] == "/v1/models"

    [reloaded] = events(no_secrets_in_logs, "config_reloaded")
    assert reloaded["source"] == "command"
    assert reloaded["providers_added"] == ["dev2"]
    assert reloaded["providers_changed"] == ["dev"]
    assert reloaded["providers_removed"] == []
    peer.close()


async def test_a_bad_edit_keeps_the_old_config_and_reload_says_where(
    start_live: StartLive, idp: tuple[WatchedIdP, str], no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """An invalid field: `credproxy reload` exits 2 naming file:line and the field; the
    daemon logs config_reload_failed and dev still serves; the fixed file then reloads."""
    _, url = idp
    good = provider("dev", url)
    live = await start_live(good)
    store_tokens(live.store, live.idp)
    s = await live.session("dev", "dev2")
    peer = await Peer.connect(s.socket_path)
    await peer.handshake()
    first = await peer.call("get_token", {"provider": "dev"})
    assert first["ok"] is True

    bad = good + provider("dev2", url) + "[limits]\nmax_connections = 0\n"
    line = bad.splitlines().index("max_connections = 0") + 1
    edit(live.dirs.config, bad)
    done = await live.reload_cli()
    assert done.returncode == 2
    assert done.stdout == ""
    [said] = done.stderr.splitlines()
    assert said.startswith(f"credproxy reload: {live.dirs.config}:{line}: field ")
    assert "limits.max_connections" in said
    assert said.endswith("; the daemon keeps the configuration it runs with")
    [failed] = events(no_secrets_in_logs, "config_reload_failed")
    assert f"{live.dirs.config}:{line}" in failed["error"]

    # The old configuration serves: dev as before, dev2 still not configured.
    again = await peer.call("get_token", {"provider": "dev"})
    assert again["ok"] is True and again["data"] == first["data"]
    dev2 = await peer.call("get_token", {"provider": "dev2"})
    assert "not configured" in dev2["error"]
    assert live.daemon.cfg.limits.max_connections == 128
    assert events(no_secrets_in_logs, "config_reloaded") == []

    edit(live.dirs.config, good + provider("dev2", url))
    fixed = await live.reload_cli()
    assert fixed.returncode == 0, fixed.stderr
    assert "providers added: dev2" in fixed.stdout
    peer.close()


async def test_the_file_watch_reloads_an_edit_without_a_command(
    start_live: StartLive, idp: tuple[WatchedIdP, str], no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """With the watch on, an edit is picked up by itself; a bad edit is logged once, not at
    every look, and the old configuration keeps serving until a good one comes."""
    _, url = idp
    live = await start_live(provider("dev", url), config_poll=0.05)
    store_tokens(live.store, live.idp)
    s = await live.session("dev", "dev2")
    peer = await Peer.connect(s.socket_path)
    await peer.handshake()

    edit(live.dirs.config, provider("dev", url) + "[renewal]\nmin_lead = nan\n")
    with trio.fail_after(10):
        while not events(no_secrets_in_logs, "config_reload_failed"):
            await trio.sleep(0.05)
    await trio.sleep(0.5)  # ten more looks at the same bad file
    [failed] = events(no_secrets_in_logs, "config_reload_failed")
    assert failed["source"] == "file"
    assert "renewal.min_lead" in failed["error"]
    assert "not configured" in (await peer.call("get_token", {"provider": "dev2"}))["error"]

    edit(live.dirs.config, provider("dev", url) + provider("dev2", url))
    with trio.fail_after(10):
        while not events(no_secrets_in_logs, "config_reloaded"):
            await trio.sleep(0.05)
    [reloaded] = events(no_secrets_in_logs, "config_reloaded")
    assert reloaded["source"] == "file"
    assert reloaded["providers_added"] == ["dev2"]
    got = await peer.call("get_token", {"provider": "dev2"})
    assert got["ok"] is True, got
    peer.close()


async def test_reload_reorders_a_running_sessions_profile(
    start_live: StartLive, idp: tuple[WatchedIdP, str]
) -> None:
    """dev's buckets ["a", "b"] become ["b", "a"]: the same connection's get_token without a
    bucket is served from b, on both sides of the serving loop (its core and the walk)."""
    the_idp, url = idp

    def config(buckets: str) -> str:
        return provider("dev", url).replace("[providers.dev]\n", f"[providers.dev]\n{buckets}\n")

    live = await start_live(config('buckets = ["a", "b"]'))
    for bucket in ("a", "b"):
        live.store.write("dev", bucket, the_idp.mint())
    s = await live.session("dev")
    peer = await Peer.connect(s.socket_path)
    await peer.handshake()
    served = await peer.call("get_token", {"provider": "dev"})
    assert served["data"]["access_token"] == live.store.read("dev", "a")["access_token"]

    edit(live.dirs.config, config('buckets = ["b", "a"]'))
    done = await live.reload_cli()
    assert done.returncode == 0, done.stderr
    served = await peer.call("get_token", {"provider": "dev"})
    assert served["data"]["access_token"] == live.store.read("dev", "b")["access_token"]
    [profile] = (await live.daemon.status())["sessions"][0]["profiles"]
    assert [b["bucket"] for b in profile["buckets"]] == ["b", "a"]
    assert profile["current"] == "b"
    peer.close()


async def test_reload_applies_limits_to_new_connections(
    start_live: StartLive, idp: tuple[WatchedIdP, str]
) -> None:
    """max_connections lowered by a reload: the connection already open stays, a new one
    beyond the new cap is refused with RESOURCE_EXHAUSTED."""
    _, url = idp
    live = await start_live(provider("dev", url))
    store_tokens(live.store, live.idp)
    s = await live.session("dev")
    kept = await Peer.connect(s.socket_path)
    assert (await kept.handshake())["ok"] is True

    edit(live.dirs.config, provider("dev", url) + "[limits]\nmax_connections = 1\n")
    done = await live.reload_cli()
    assert done.returncode == 0, done.stderr
    assert "sections changed: limits" in done.stdout

    refused = await Peer.connect(s.socket_path)
    assert (await refused.recv() or {}).get("code") == "RESOURCE_EXHAUSTED"
    assert (await kept.call("get_token", {"provider": "dev"}))["ok"] is True
    kept.close()
    refused.close()


#: What a reload may do to dev's [providers.dev.api] section (the config's text, from
#: provider()'s): move base_url to another host, change the headers sent, take it away.
API_CHANGES: dict[str, Callable[[str], str]] = {
    "moved": lambda text: text.replace(
        'base_url = "http://127.0.0.1:', 'base_url = "http://localhost:'
    ),
    "headers": lambda text: text.replace(
        '{ Authorization = "Bearer {access_token}" }',
        '{ Authorization = "Bearer {access_token}", X-Host = "changed" }',
        1,
    ),
    "removed": lambda text: text.split("[providers.dev.api]")[0],
}


def websocket_config(url: str, echo_url: str) -> tuple[str, str]:
    """dev's and dev2's sections, each with an api section at the echo server."""
    return provider("dev", url, api=echo_url), provider("dev2", url, api=echo_url)


@pytest.mark.parametrize("echo", ["plain"], indirect=True)
@pytest.mark.parametrize("change", sorted(API_CHANGES))
async def test_a_reload_that_changes_an_api_section_ends_its_open_websockets(
    start_live: StartLive,
    idp: tuple[WatchedIdP, str],
    echo: EchoServer,  # noqa: F811
    change: str,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """An open WebSocket of dev stays open through a reload that leaves [providers.dev.api]
    as it was (dev's scopes, [limits]), and is closed by one that moves, changes or removes
    it (audit ended=reload); dev2's, whose section is unchanged, stays open throughout."""
    the_idp, url = idp
    dev, dev2 = websocket_config(url, echo.url)
    live = await start_live(dev + dev2)
    live.store.write("dev", "default", the_idp.mint())
    live.store.write("dev2", "default", the_idp.mint())
    s = await live.session("dev", "dev2")

    async def reload(text: str) -> str:
        edit(live.dirs.config, text)
        done = await live.reload_cli()
        assert done.returncode == 0, done.stderr
        return done.stdout

    def reloads(ws: ClientConnection) -> None:
        unrelated = dev.replace(
            'client_id = "credproxy-dev"\n', 'client_id = "credproxy-dev"\nscopes = ["more"]\n'
        )
        said = trio.from_thread.run(reload, unrelated + dev2 + "[limits]\nmax_connections = 64\n")
        assert "providers changed: dev" in said
        ws.send("after an unrelated reload")
        assert ws.recv(WAIT) == "after an unrelated reload"
        said = trio.from_thread.run(reload, API_CHANGES[change](dev) + dev2)
        assert "providers changed: dev" in said and "dev2" not in said

    ended = functools.partial(one_ends_other_stays, s.socket_path, "/dev2/echo", reloads)
    await trio.to_thread.run_sync(ended)
    lines = await _audit(no_secrets_in_logs, 2)
    assert sorted((line["provider"], line["status"], line["ended"]) for line in lines) == [
        ("dev", 101, "reload"),
        ("dev2", 101, "upstream"),  # (closed in the end by its client's close frame)
    ]
    assert sorted(await echo.wait_ended(2)) == ["broken", "closed"]


@pytest.mark.parametrize("echo", ["plain"], indirect=True)
@pytest.mark.parametrize(
    ("change", "status", "said"),
    [
        ("moved", 503, b"moved (a reload)"),
        ("headers", 503, b"changed (a reload)"),
        ("removed", 404, b"no such API"),
    ],
    ids=["moved", "headers", "removed"],
)
async def test_a_reload_while_a_websocket_handshake_is_on_its_way_refuses_it(
    start_live: StartLive,
    idp: tuple[WatchedIdP, str],
    echo: EchoServer,  # noqa: F811
    change: str,
    status: int,
    said: bytes,
) -> None:
    """A reload that moves or changes dev's api section while a WebSocket handshake sent under
    the old one waits for the upstream's 101: the client gets 503 (send it again) or, with the
    section gone, 404; no tunnel is opened with the old section's credentials."""
    the_idp, url = idp
    dev, dev2 = websocket_config(url, echo.url)
    live = await start_live(dev + dev2)
    live.store.write("dev", "default", the_idp.mint())
    s = await live.session("dev")

    async def reload() -> None:
        edit(live.dirs.config, API_CHANGES[change](dev) + dev2)
        await live.daemon.reload("signal")

    assert await refused_while(echo, s.socket_path, said, reload) == status
    assert len(echo.handshakes) == 1


# --- the real `credproxy serve` --------------------------------------------------------


class Process:
    """``credproxy serve`` on *dirs* (*env* added to its environment), its stderr (the JSON
    log) in a file."""

    def __init__(self, dirs: Dirs, **env: str) -> None:
        self.log = dirs.root / "daemon.err"
        self._err = self.log.open("wb")
        self.proc = subprocess.Popen(
            [CREDPROXY, "serve"],
            env=dirs.env(**env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        import json

        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    async def wait_event(self, name: str, count: int = 1, timeout: float = 15) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while len(self.events(name)) < count:
                assert self.proc.poll() is None, self.log.read_text()
                await trio.sleep(0.02)
        return self.events(name)[count - 1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._err.close()


@pytest.fixture
def daemon_process(dirs: Dirs) -> Any:
    started: list[Process] = []

    def start(**env: str) -> Process:
        started.append(Process(dirs, **env))
        return started[-1]

    yield start
    for p in started:
        p.close()


def control(dirs: Dirs, op: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
    with Client(dirs.runtime / "credproxy.sock", timeout=10) as c:
        return c.call(op, payload)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


async def test_credproxy_serve_reloads_on_the_command_and_on_sighup_and_stops(
    dirs: Dirs,
    idp: tuple[WatchedIdP, str],
    upstream: Upstream,  # noqa: F811
    daemon_process: Callable[[], Process],
) -> None:
    """The real daemon: `credproxy reload` brings dev2 to a running session, SIGHUP brings
    dev's api section (404, then 200 at the upstream), `credproxy stop` ends it with 0."""
    the_idp, url = idp
    dirs.config.write_text(provider("dev", url))
    store_tokens(TokenStore(dirs.state), the_idp)
    daemon = daemon_process()
    await daemon.wait_event("daemon_ready")
    opened = await in_thread(
        control, dirs, "open_session", {"grants": ["dev", "dev2"], "watch_launcher": False}
    )
    sandbox = Client(opened["socket"], timeout=10)
    with pytest.raises(Exception, match="provider 'dev2' is not configured"):
        await in_thread(sandbox.get_token, "dev2")

    edit(dirs.config, provider("dev", url) + provider("dev2", url))
    done = await in_thread(cli, dirs, "reload")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"reloaded {dirs.config}: ")
    assert (await daemon.wait_event("config_reloaded"))["source"] in ("command", "file")
    token = await in_thread(sandbox.get_token, "dev2")
    assert token["access_token"] == TokenStore(dirs.state).read("dev2", "default")["access_token"]

    http = await HttpClient.connect(Path(opened["socket"]))
    assert (await http.call("GET", "/dev/models"))[0] == 404
    await http.aclose()
    edit(dirs.config, provider("dev", url, api=upstream.url) + provider("dev2", url))
    daemon.proc.send_signal(signal.SIGHUP)
    hup = await daemon.wait_event("config_reloaded", count=2)
    assert hup["source"] == "signal"
    assert hup["providers_changed"] == ["dev"]
    http = await HttpClient.connect(Path(opened["socket"]))
    assert (await http.call("GET", "/dev/models"))[0] == 200
    await http.aclose()
    assert upstream.received[-1]["target"] == "/v1/models"
    sandbox.close()

    stopped = await in_thread(cli, dirs, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"stopped the credproxy daemon (pid {daemon.proc.pid})"
    assert daemon.proc.poll() == 0  # gone by the time `stop` returned
    assert daemon.events("daemon_stopped")
    assert not (dirs.runtime / "credproxy.sock").exists()
    assert not Path(opened["socket"]).exists()


async def test_stop_with_a_refresh_in_flight_loses_nothing(
    dirs: Dirs, idp: tuple[WatchedIdP, str], daemon_process: Callable[[], Process]
) -> None:
    """`credproxy stop` while the IdP is still answering a refresh (3 s): the daemon waits
    for it within its grace, writes the rotated token, exits 0; the stored refresh token
    is the IdP's current one (no reuse, nothing lost)."""
    the_idp, url = idp
    dirs.config.write_text(provider("dev", url))
    store = TokenStore(dirs.state)
    store.write("dev", "default", the_idp.mint())
    old = store.read("dev", "default")
    daemon = daemon_process()
    await daemon.wait_event("daemon_ready")
    opened = await in_thread(
        control, dirs, "open_session", {"grants": ["dev"], "watch_launcher": False}
    )

    the_idp.fail_next("slow", delay=3)
    sandbox = Client(opened["socket"], timeout=15)

    def ask_refresh() -> None:
        # The session closes under it: the new token or a closed connection are both fine.
        with contextlib.suppress(CredproxyError):
            sandbox.refresh_token("dev")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, ask_refresh)
        with trio.fail_after(10):
            await the_idp.slow_started.wait()  # the refresh request is at the IdP
        started = time.monotonic()
        stopped = await in_thread(cli, dirs, "stop")
    took = time.monotonic() - started
    sandbox.close()

    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"stopped the credproxy daemon (pid {daemon.proc.pid})"
    assert daemon.proc.poll() == 0
    assert 2.0 < took < 8.0 + 3.0  # it waited for the refresh, within the grace
    assert daemon.events("daemon_stopped")
    assert daemon.events("token_refreshed")

    new = store.read("dev", "default")
    assert new["refresh_token"] != old["refresh_token"]
    assert the_idp.refresh_count == 1 and the_idp.reuse_count == 0
    assert the_idp.is_access_token_valid(new["access_token"])
    status, _ = the_idp.handle_token_request(
        {
            "grant_type": "refresh_token",
            "refresh_token": new["refresh_token"],
            "client_id": "credproxy-dev",
        }
    )
    assert status == 200  # the stored refresh token is the live one


async def test_run_while_the_daemon_stops_gets_a_new_daemon(
    background_daemon: Dirs, idp: tuple[WatchedIdP, str], daemon_process: Callable[[], Process]
) -> None:
    """`credproxy run` while the daemon stops with a refresh in flight (it no longer listens,
    but holds daemon.lock for up to its grace): the daemon `run` starts waits for the old one
    to go, takes over, and the command runs (exit 0)."""
    dirs = background_daemon
    the_idp, url = idp
    dirs.config.write_text(provider("dev", url))
    TokenStore(dirs.state).write("dev", "default", the_idp.mint())
    old = daemon_process()
    await old.wait_event("daemon_ready")
    opened = await in_thread(
        control, dirs, "open_session", {"grants": ["dev"], "watch_launcher": False}
    )
    the_idp.fail_next("slow", delay=3)
    sandbox = Client(opened["socket"], timeout=15)

    def ask_refresh() -> None:
        with contextlib.suppress(CredproxyError):  # the session closes under it
            sandbox.refresh_token("dev")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(in_thread, ask_refresh)
        with trio.fail_after(10):
            await the_idp.slow_started.wait()
        old.proc.send_signal(signal.SIGTERM)  # it stops; the refresh gets its grace
        await old.wait_event("daemon_stopping")
        ran = await in_thread(
            cli, dirs, "run", "--allow", "dev", "--", CREDPROXY, "status", "--json"
        )
    sandbox.close()
    assert ran.returncode == 0, ran.stderr
    assert old.proc.wait(timeout=15) == 0
    assert old.events("token_refreshed")  # the old daemon's refresh landed first
    new_pid = json.loads(ran.stdout)["daemon"]["pid"]
    assert new_pid != old.proc.pid
    assert control(dirs, "ping")["pid"] == new_pid


def test_an_edit_saved_while_credproxy_serve_starts_is_loaded(
    dirs: Dirs, daemon_process: Callable[..., Process]
) -> None:
    """The config file is edited after `credproxy serve` has read it, before the daemon is
    up (stopped there by a checkpoint): the file watch loads the edit once the daemon runs."""
    dirs.config.write_text(provider("dev", "https://idp.example/token"))
    daemon = daemon_process(CREDPROXY_FAULT="daemon-config-read")
    assert _wait_stopped(daemon.proc.pid, timeout=15), daemon.log.read_text()
    edit(
        dirs.config,
        provider("dev", "https://idp.example/token") + provider("dev2", "https://idp.example/t"),
    )
    daemon.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 15  # the watch acts on two looks, 2 s apart
    while not daemon.events("config_reloaded"):
        assert time.monotonic() < deadline, daemon.log.read_text()
        assert daemon.proc.poll() is None, daemon.log.read_text()
        time.sleep(0.05)
    (reloaded,) = daemon.events("config_reloaded")
    assert (reloaded["source"], reloaded["providers_added"]) == ("file", ["dev2"])


async def test_serve_loads_an_edit_made_after_its_config_was_read(
    nursery: trio.Nursery, dirs: Dirs, autojump_clock: trio.testing.MockClock
) -> None:
    """``serve(config_seen=...)``: the signature taken before the config was read tells the
    file watch that an edit saved since is new, and it loads it."""
    dirs.config.write_text(provider("dev", "https://idp.example/token"))
    seen = config_signature(dirs.config)
    cfg = paths.load_config(dirs.config)
    edit(
        dirs.config,
        provider("dev", "https://idp.example/token") + provider("dev2", "https://idp.example/t"),
    )
    endpoint = HttpTokenEndpoint(timeout=10)
    daemon = await serve_config_file(
        nursery, dirs, endpoint, cfg=cfg, config_seen=seen, config_poll=0.05
    )
    try:
        await trio.sleep(1.0)  # twenty looks at the file
        assert "dev2" in daemon.cfg.providers
    finally:
        daemon.stop()
        await endpoint.aclose()


def test_reload_and_stop_without_a_daemon(dirs: Dirs) -> None:
    """No daemon: `stop` says so and exits 0; `reload` checks the file the next daemon reads
    (exit 0 if good, 2 with file:line and field if not)."""
    stopped = cli(dirs, "stop")
    assert (stopped.returncode, stopped.stdout.strip()) == (
        0,
        "credproxy stop: the daemon is not running",
    )
    dirs.config.write_text(provider("dev", "https://idp.example/token"))
    good = cli(dirs, "reload")
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == (
        f"credproxy reload: the daemon is not running; it reads {dirs.config} when it starts"
    )
    dirs.config.write_text("[renewal]\n\nmax_jitter = -1\n")
    bad = cli(dirs, "reload")
    assert bad.returncode == 2
    assert re.match(
        rf"credproxy reload: {re.escape(str(dirs.config))}:3: field renewal", bad.stderr
    )


def test_help_lists_reload_and_stop(dirs: Dirs) -> None:
    """`credproxy --help` names both commands; each has its own --help."""
    out = cli(dirs, "--help").stdout
    assert re.search(r"^\s+reload\s+make the running daemon re-read its config file", out, re.M)
    assert re.search(r"^\s+stop\s+stop the running daemon cleanly", out, re.M)
    for command in ("reload", "stop"):
        assert cli(dirs, command, "--help").returncode == 0


# --- under a real systemd user manager -------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    SYSTEMD_UNAVAILABLE is not None, reason=f"cannot boot systemd: {SYSTEMD_UNAVAILABLE}"
)
def test_reload_and_stop_under_systemd(user: User) -> None:  # noqa: F811
    """The installed units: `systemctl --user reload` (ExecReload=, SIGHUP) brings a new
    provider, a bad edit makes `credproxy reload` exit 2 with the line and field, and
    `credproxy stop` ends the service with exit 0 and no restart; the socket stays."""
    user("credproxy", "status")  # the first connection starts the service
    first = user.show("credproxy.service", "ActiveState", "MainPID")
    assert first["ActiveState"] == "active"

    user(
        "sh",
        "-c",
        "cat >> .config/credproxy/config.toml",
        input='[providers.demo2]\ntoken_url = "http://127.0.0.1:9/token"\nclient_id = "demo-client"\n',
    )
    user("systemctl", "--user", "reload", "credproxy.service")

    def reloaded() -> list[dict[str, object]]:
        return [e for e in user.journal_events() if e.get("event") == "config_reloaded"]

    user.wait_for("config_reloaded in the journal", lambda: bool(reloaded()))
    assert reloaded()[0]["providers_added"] == ["demo2"]
    assert any(
        e.get("event") == "signal_received" and e.get("signal") == "SIGHUP"
        for e in user.journal_events()
    )

    user("sh", "-c", "printf '[limits]\\nmax_connections = 0\\n' >> .config/credproxy/config.toml")
    bad = user("credproxy", "reload", check=False)
    assert bad.returncode == 2
    assert re.search(r"config\.toml:\d+: field limits\.max_connections", bad.stderr)
    assert user.show("credproxy.service", "MainPID") == {"MainPID": first["MainPID"]}

    stopped = user("credproxy", "stop")
    assert stopped.stdout.strip() == f"stopped the credproxy daemon (pid {first['MainPID']})"
    after = user.show("credproxy.service", "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert after == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainStatus": "0",
        "NRestarts": "0",
    }
    assert user("systemctl", "--user", "is-active", "credproxy.socket").stdout.strip() == "active"
    user.wait_for("daemon_stopped in the journal", lambda: "daemon_stopped" in user.events())
