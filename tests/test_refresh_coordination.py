"""Refresh coordination across processes, and crash safety of the refresh path.

These tests run real ``credproxy serve`` processes sharing one token store,
against the development IdP over HTTP. The IdP rotates refresh tokens and
revokes the whole family when a rotated one is presented again, so a single
double spend anywhere shows up as a reuse and an ``invalid_grant``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import CREDPROXY, Dirs, cli
from credproxy import devidp
from credproxy.errors import CredproxyError
from credproxy.inner.client import Client
from credproxy.shell.store import TokenStore


class ThreadIdP:
    """The development IdP served over HTTP from a background thread (its own trio loop)."""

    def __init__(self, lifetime: float) -> None:
        self.idp = devidp.DevIdP(lifetime=lifetime)
        self.url = ""
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        ready = threading.Event()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as n:
                self.url = await n.start(devidp.serve, self.idp)
                ready.set()
                await self._stop.wait()
                n.cancel_scope.cancel()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self._thread.start()
        assert ready.wait(10)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run *fn* in the IdP's loop (its state is not shared across threads)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def close(self) -> None:
        assert self._stop is not None
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)


@contextmanager
def thread_idp(lifetime: float) -> Iterator[ThreadIdP]:
    idp = ThreadIdP(lifetime)
    try:
        yield idp
    finally:
        idp.close()


@dataclass
class DaemonProc:
    proc: subprocess.Popen[bytes]
    runtime: Path
    log: Path

    @property
    def control(self) -> Path:
        return self.runtime / "credproxy.sock"

    def open_session(self, *grants: str) -> str:
        with Client(self.control, timeout=10) as c:
            reply = c.call(
                "open_session", {"grants": list(grants), "name": "t", "watch_launcher": False}
            )
        return str(reply["socket"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_daemon_proc(dirs: Dirs, runtime: Path, **env: str) -> DaemonProc:
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = runtime.parent / f"{runtime.name}.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [CREDPROXY, "serve"],
            env=dirs.env(CREDPROXY_RUNTIME_DIR=str(runtime), **env),
            stdout=f,
            stderr=f,
        )
    d = DaemonProc(proc, runtime, log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with Client(d.control, timeout=2) as c:
                c.call("ping")
            return d
        except CredproxyError:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.01)
    proc.kill()
    raise AssertionError("daemon did not start:\n" + log.read_text())


def write_config(dirs: Dirs, url: str) -> None:
    dirs.config.write_text(
        f'[providers.dev]\ntoken_url = "{url}"\nclient_id = "credproxy-dev"\n'
        "[limits]\nrequests_per_second = 0\n"
    )


def test_two_daemons_sharing_a_store_never_reuse_a_refresh_token(dirs: Dirs) -> None:
    """Two daemon processes, each with sessions hammering one key through several renewals, cause zero reuse and zero invalid_grant."""
    with thread_idp(lifetime=4.0) as idp:
        write_config(dirs, idp.url)
        store = TokenStore(dirs.state)
        store.write("dev", "default", idp.call(idp.idp.mint))
        daemons = [start_daemon_proc(dirs, dirs.root / f"run{i}") for i in range(2)]
        try:
            sockets = [d.open_session("dev") for d in daemons for _ in range(2)]
            served: list[tuple[float, dict[str, Any]]] = []
            errors: list[str] = []
            stop_at = time.monotonic() + 14

            def hammer(path: str) -> None:
                with Client(path, timeout=15) as c:
                    while time.monotonic() < stop_at:
                        try:
                            served.append((time.time(), c.get_token("dev")))
                        except CredproxyError as exc:
                            errors.append(f"{exc.code}: {exc}")
                        time.sleep(0.01)

            threads = [threading.Thread(target=hammer, args=(s,)) for s in sockets]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        finally:
            for d in daemons:
                d.stop()
        refreshes = idp.call(lambda: idp.idp.refresh_count)
        reuses = idp.call(lambda: idp.idp.reuse_count)
        logs = "".join(d.log.read_text() for d in daemons)
    assert errors == []
    assert reuses == 0
    assert "invalid_grant" not in logs and '"refresh_failed"' not in logs
    assert refreshes >= 4, f"only {refreshes} renewals in 14 s of 4 s tokens"
    per_daemon = [d.log.read_text().count('"token_refreshed"') for d in daemons]
    print(
        f"renewals: {refreshes} at the IdP, by daemon: {per_daemon}, tokens served: {len(served)}"
    )
    assert sum(per_daemon) == refreshes  # every upstream refresh was one daemon's, none twice
    assert len(served) > 100
    assert all(tok["expiry"] > at for at, tok in served), "an expired token was served"
    assert all("refresh_token" not in tok for _, tok in served)


# --- crash safety -----------------------------------------------------------------

CHECKPOINTS = [
    "refresh-before-request",  # request not sent yet
    "refresh-got-response",  # IdP rotated; nothing written
    "store-written",  # temp file written, not fsynced
    "store-fsynced",  # temp file durable, not renamed
    "store-renamed",  # new token in place, directory not yet fsynced
]


def _wait_stopped(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state == "T":
            return True
        time.sleep(0.002)
    return False


def _request_token(path: str) -> Any:
    """Send handshake + get_token without waiting for the answer; the caller closes it."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    for obj in (
        {"v": 1, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}},
        {"v": 2, "id": "1", "op": "get_token", "payload": {"provider": "dev"}},
    ):
        body = json.dumps(obj).encode()
        sock.sendall(len(body).to_bytes(4, "big") + body)
    return sock


@pytest.mark.parametrize("runs", [110])
def test_sigkill_anywhere_in_the_refresh_path_leaves_a_complete_token(
    dirs: Dirs, runs: int
) -> None:
    """SIGKILL at every checkpoint of the refresh path, and at random moments, always leaves a complete token; once the new token was written, the store holds the rotated refresh token and it works."""
    rng = random.Random(1234)
    lost_in_window = 0
    outcomes: dict[str, int] = {}
    with thread_idp(lifetime=3600.0) as idp:
        write_config(dirs, idp.url)
        store = TokenStore(dirs.state)
        path = store.token_path("dev", "default")
        for run in range(runs):
            point = CHECKPOINTS[run % len(CHECKPOINTS)] if run < 50 else None
            old = idp.call(idp.idp.mint)
            old["expiry"] = time.time() - 5  # expired: the first get_token refreshes
            store.write("dev", "default", old)
            before = idp.call(lambda: idp.idp.refresh_count)
            env = {"CREDPROXY_FAULT": point} if point else {}
            d = start_daemon_proc(dirs, dirs.root / "run", **env)
            sock = None
            try:
                sock = _request_token(d.open_session("dev"))
                if point:
                    assert _wait_stopped(d.proc.pid), f"run {run}: never reached {point}"
                else:
                    time.sleep(
                        rng.uniform(0, 0.25)
                    )  # spans startup of the HTTP client and the refresh
                d.proc.kill()
                d.proc.wait()
            finally:
                if sock is not None:
                    sock.close()
                if d.proc.poll() is None:
                    d.proc.kill()
                    d.proc.wait()
            # 1. Always a complete, valid token file.
            stored = json.loads(path.read_bytes())
            assert isinstance(stored.get("access_token"), str), f"run {run} ({point}): {stored}"
            # What the next holder of the key's lock does first (a daemon's refresh, an import).
            with store.locked("dev", "default"):
                recovered = store.recover_pending("dev", "default")
            stored = json.loads(path.read_bytes())
            assert not list(path.parent.glob(".*~*.tmp"))
            assert stored["refresh_token"] in (old["refresh_token"],) or stored[
                "refresh_token"
            ].startswith("devrt-")
            accepted = idp.call(lambda: idp.idp.refresh_count) - before
            rotated = stored["refresh_token"] != old["refresh_token"]
            # 2. Where the new token was written (even if not yet renamed), it is the rotated one.
            if point in ("store-written", "store-fsynced", "store-renamed"):
                assert rotated, f"run {run}: {point} but the old token is on disk"
            if point in ("store-written", "store-fsynced"):
                assert recovered
            if point == "refresh-before-request":
                assert accepted == 0 and not rotated
            if rotated:
                assert stored["access_token"] != old["access_token"]
                assert stored["expiry"] > time.time()
            # 3. The refresh token on disk is the live one at the IdP, except in
            #    the one window no client can close: the IdP answered and the
            #    daemon died before the new token reached a file.
            status, _ = idp.call(
                idp.idp.handle_token_request,
                {
                    "grant_type": "refresh_token",
                    "refresh_token": stored["refresh_token"],
                    "client_id": "credproxy-dev",
                },
            )
            if accepted and not rotated:
                assert point in (None, "refresh-got-response")
                assert status == 400  # spent: the key needs a new login
                lost_in_window += 1
            else:
                assert status == 200, f"run {run} ({point}): stored refresh token rejected"
            key = point or ("random: rotated" if rotated else "random: old")
            outcomes[key] = outcomes.get(key, 0) + 1
    print(
        f"crash runs: {runs}; outcomes: {outcomes}; lost in the response-to-write window: {lost_in_window}"
    )
    assert sum(outcomes.values()) == runs


def _hammer_refresh(path: str, stop: threading.Event) -> None:
    """Ask for a refresh again and again (cooldown 0) until *stop* or the daemon dies."""
    try:
        with Client(path, timeout=5) as c:
            while not stop.is_set():
                try:
                    c.call("refresh_token", {"provider": "dev"})
                except CredproxyError as exc:
                    if exc.code not in ("REFRESH_FAILED", "RATE_LIMITED"):
                        raise
    except (CredproxyError, OSError):
        pass  # the daemon was killed under us: expected


def kill_loop_under_constant_refresh(dirs: Dirs, kills: int, seed: int) -> dict[str, int]:
    """SIGKILL a daemon *kills* times while a client keeps it refreshing; count the lost logins.

    A login is lost when, after the next lock holder's recovery, the refresh
    token on disk is no longer the live one at the IdP.
    """
    rng = random.Random(seed)
    result = {"kills": kills, "lost": 0, "refreshes": 0, "incomplete": 0}
    with thread_idp(lifetime=3600.0) as idp:
        dirs.config.write_text(
            f'[providers.dev]\ntoken_url = "{idp.url}"\nclient_id = "credproxy-dev"\n'
            "[limits]\nrequests_per_second = 0\n[renewal]\nrefresh_cooldown = 0\n"
        )
        store = TokenStore(dirs.state)
        path = store.token_path("dev", "default")
        for _ in range(kills):
            store.write("dev", "default", idp.call(idp.idp.mint))
            before = idp.call(lambda: idp.idp.refresh_count)
            d = start_daemon_proc(dirs, dirs.root / "run")
            stop = threading.Event()
            hammer = threading.Thread(target=_hammer_refresh, args=(d.open_session("dev"), stop))
            try:
                hammer.start()
                # Let a few refreshes go by, then kill at a random instant of one.
                time.sleep(rng.uniform(0.05, 0.4))
                d.proc.kill()
                d.proc.wait()
            finally:
                stop.set()
                if d.proc.poll() is None:
                    d.proc.kill()
                    d.proc.wait()
                hammer.join(10)
            result["refreshes"] += idp.call(lambda: idp.idp.refresh_count) - before
            try:
                json.loads(path.read_bytes())["access_token"]
            except (ValueError, KeyError):
                result["incomplete"] += 1
            with store.locked("dev", "default"):
                store.recover_pending("dev", "default")
            stored = json.loads(path.read_bytes())
            status, _ = idp.call(
                idp.idp.handle_token_request,
                {
                    "grant_type": "refresh_token",
                    "refresh_token": stored["refresh_token"],
                    "client_id": "credproxy-dev",
                },
            )
            if status != 200:
                result["lost"] += 1
    return result


@pytest.mark.parametrize(
    "kills", [pytest.param(12, id="12"), pytest.param(120, id="120", marks=pytest.mark.slow)]
)
def test_sigkill_under_constant_refresh_leaves_a_complete_token(dirs: Dirs, kills: int) -> None:
    """Random SIGKILLs while a client keeps the daemon refreshing never leave an incomplete token file, and print how many cost the login (the measured figure is in docs/design.md section 5)."""
    result = kill_loop_under_constant_refresh(dirs, kills, seed=kills)
    print(f"kill loop under constant refresh: {result}")
    assert result["incomplete"] == 0
    assert result["refreshes"] >= kills, "the daemon was not kept refreshing"
    # The loss rate is a measurement, not an expectation: it is the share of
    # time a rotation is on its way between the IdP and the daemon, which
    # depends on the machine's load (see docs/design.md section 5).


# -- what a crash between the temp file's write and its rename leaves ------------------


def _killed_mid_refresh(dirs: Dirs, idp: ThreadIdP, store: TokenStore) -> tuple[Path, str]:
    """A daemon SIGKILLed once the rotated token is in its temp file, before the rename."""
    old = idp.call(idp.idp.mint)
    old["expiry"] = time.time() - 5  # the first get_token refreshes
    store.write("dev", "default", old)
    d = start_daemon_proc(dirs, dirs.root / "run", CREDPROXY_FAULT="store-written")
    sock = _request_token(d.open_session("dev"))
    try:
        assert _wait_stopped(d.proc.pid), "never reached store-written"
        d.proc.kill()
        d.proc.wait()
    finally:
        sock.close()
    path = store.token_path("dev", "default")
    (left,) = path.parent.glob(".*~*.tmp")
    live = json.loads(left.read_bytes())["refresh_token"]
    assert live != old["refresh_token"]
    return path, live


def test_logout_after_a_crash_mid_refresh_leaves_no_refresh_token_on_disk(dirs: Dirs) -> None:
    """`credproxy logout` after a daemon died between writing the rotated token and its rename: the temp file with the live refresh token goes too, and a later import of another login is not refused by the logged-out one."""
    with thread_idp(lifetime=3600.0) as idp:
        write_config(dirs, idp.url)
        store = TokenStore(dirs.state)
        _, live = _killed_mid_refresh(dirs, idp, store)
        out = cli(dirs, "logout", "dev")
        assert out.returncode == 0, out.stderr
        holding = [
            str(Path(root, name))
            for root, _, names in os.walk(dirs.state)
            for name in names
            if live.encode() in Path(root, name).read_bytes()
        ]
        assert holding == [], f"the logged-out refresh token is still in {holding}"
        other = {"access_token": "other-at", "refresh_token": "other-rt", "expires_in": 1800}
        out = cli(dirs, "import", "dev", input=json.dumps(other))
        assert out.returncode == 0, out.stderr
        assert store.read("dev", "default")["access_token"] == "other-at"


_WRITER = """
import json, sys
from pathlib import Path
from credproxy.shell import faults
from credproxy.shell.store import TokenStore
store = TokenStore(Path(sys.argv[1]), faults.from_env())
old, new = json.loads(sys.argv[2]), json.loads(sys.argv[3])
with store.locked("dev", "default"):  # what a refresh does: reserve, ask, commit the answer
    store.reserve("dev", "default", old).commit(json.dumps(new).encode())
"""


@pytest.mark.parametrize("answer", ["without_expiry", "earlier_expiry"])
def test_the_rotated_token_left_by_a_crash_is_adopted_whatever_its_expiry(
    dirs: Dirs, answer: str
) -> None:
    """A writer killed between the answer's write and the rename: the next holder of the lock adopts the rotated token even when its answer had no expiry, or an earlier one than the stored token's (received after the clock was put back)."""
    store = TokenStore(dirs.state)
    now = time.time()
    old = {"access_token": "at-1", "refresh_token": "rt-1-spent", "expiry": now + 3 * 3600}
    store.write("dev", "default", old)
    new = {"access_token": "at-2", "refresh_token": "rt-2-live"}
    if answer == "earlier_expiry":
        new["expiry"] = now + 3600
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(dirs.state), json.dumps(old), json.dumps(new)],
        env=dirs.env(CREDPROXY_FAULT="store-written"),
    )
    try:
        assert _wait_stopped(proc.pid), "never reached store-written"
    finally:
        proc.kill()
        proc.wait()
    with store.locked("dev", "default"):
        assert store.recover_pending("dev", "default")
    assert store.read("dev", "default")["refresh_token"] == "rt-2-live"
    assert not list(store.token_path("dev", "default").parent.glob(".*~*.tmp"))
