"""A full or read-only state disk never costs a login, and never stops the daemon.

The state directory is a real 64 KiB tmpfs (mounted by the test, so these tests
need root and skip otherwise). It is filled to the last block, remounted
read-only, then given back. The upstream is the development IdP, which revokes
the whole token family when a spent refresh token comes back: a single
presentation of an older refresh token than the daemon has received shows up
as ``reuse_count`` > 0. The daemon runs in the test's trio loop under
``autojump_clock``, so hours pass in moments.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import Dirs, Harness, Peer, StartDaemon

HOUR = 3600.0
LONG_IDLE = {"idle_timeout": 1e9}


class SmallDisk:
    """A tmpfs of a few pages mounted on a directory: fill it, free it, flip it read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Take every free block (the last ones byte by byte)."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (b"\0" * 4096, b"\0"):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, chunk)
            assert os.statvfs(self.path).f_bavail == 0
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink()

    def read_only(self, on: bool) -> None:
        _mount("-o", "remount," + ("ro" if on else "rw"), str(self.path))


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def small_disk(dirs: Dirs) -> Iterator[SmallDisk]:
    """The test's state directory on its own 64 KiB tmpfs; unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the state directory needs root")
    dirs.state.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        _mount("-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(dirs.state))
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield SmallDisk(dirs.state)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _mount("-o", "remount,rw", str(dirs.state))
        result = subprocess.run(["umount", str(dirs.state)], capture_output=True, timeout=10)
        if result.returncode != 0:  # something still has a file open there: detach it
            subprocess.run(["umount", "-l", str(dirs.state)], check=True, timeout=10)


@pytest.fixture
def small_token_disk(dirs: Dirs) -> Iterator[SmallDisk]:
    """A tmpfs on tokens/dev only (the lock files, held open, stay on the real disk)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path = dirs.state / "tokens" / "dev"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        _mount("-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield SmallDisk(path)
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _mount("-o", "remount,rw", str(path))
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=10)


def _stored(h: Harness, bucket: str = "default") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(h.store.token_path("dev", bucket).read_bytes())
    return data


async def _status(h: Harness, bucket: str = "default") -> dict[str, Any]:
    (row,) = [t for t in (await h.daemon.status())["tokens"] if t["bucket"] == bucket]
    return dict(row)


def _is_live(h: Harness, refresh_token: str) -> bool:
    """Present *refresh_token* to the IdP (spending it): True if it was the family's live one."""
    status, _ = h.idp.handle_token_request(
        {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": "credproxy-dev",
        }
    )
    return status == 200


async def _expired(start_daemon: StartDaemon) -> tuple[Harness, dict[str, Any], Peer]:
    """A daemon whose stored token of dev has just expired, the token, and a session's peer."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    old = h.idp.mint()
    h.store.write("dev", "default", {**old, "expiry": h.wall() - 5})
    return h, old, await h.peer(await h.session("dev"))


async def _token(p: Peer, op: str = "get_token", bucket: str = "default") -> dict[str, Any]:
    reply = await p.call(op, {"provider": "dev", "bucket": bucket})
    assert reply["ok"] is True, reply
    data: dict[str, Any] = reply["data"]
    return data


async def test_full_then_read_only_state_disk_loses_no_login(
    small_disk: SmallDisk,
    start_daemon: StartDaemon,
    autojump_clock: object,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """With the state disk full, then read-only, proactive and on-demand refreshes keep serving new tokens from the newest refresh token, the daemon stays up, and the token reaches the disk once space returns."""
    h = await start_daemon(lifetime=HOUR, limits=LONG_IDLE)
    first = h.login()
    expired = h.idp.mint()
    h.store.write("dev", "ondemand", {**expired, "expiry": h.wall() - 5})
    s = await h.session("dev")
    p = await h.peer(s)
    await _token(p)  # schedules the proactive renewal, ~3240 s from now

    small_disk.fill()

    # On-demand, disk full: the expired token is refreshed and the new one served.
    od = await _token(p, bucket="ondemand")
    assert od["access_token"] != expired["access_token"]
    assert h.idp.is_access_token_valid(od["access_token"])
    assert _stored(h, "ondemand")["refresh_token"] == expired["refresh_token"]  # not on disk yet
    assert "not on disk" in (await _status(h, "ondemand"))["last_error"]

    # Proactive renewals of both keys, disk full.
    await trio.sleep(3300)
    assert h.idp.refresh_count == 3
    served = await _token(p)
    assert served["access_token"] != first["access_token"]
    assert h.idp.is_access_token_valid(served["access_token"])
    assert _stored(h)["refresh_token"] == first["refresh_token"]
    events = [e["event"] for e in no_secrets_in_logs]
    assert events.count("token_not_durable") == 3

    # Read-only: the sandbox's refresh_token and the next renewal present the
    # in-memory refresh tokens, never the spent ones on disk.
    small_disk.read_only(True)
    await trio.sleep(31)  # past the refresh_token cooldown
    again = await _token(p, op="refresh_token")
    assert again["access_token"] != served["access_token"]
    await trio.sleep(HOUR)  # one more proactive renewal of each served key
    assert h.idp.is_access_token_valid((await _token(p))["access_token"])
    assert h.idp.is_access_token_valid((await _token(p, bucket="ondemand"))["access_token"])
    assert h.idp.reuse_count == 0 and h.idp.families_revoked == 0
    assert (await _status(h))["failures"] == 0

    # Writable again but still full: still only in memory.
    small_disk.read_only(False)
    await trio.sleep(120)
    assert _stored(h)["refresh_token"] == first["refresh_token"]

    # Space returns: both tokens are written within the retry cap (60 s).
    small_disk.free()
    await trio.sleep(61)
    for bucket in ("default", "ondemand"):
        assert (await _status(h, bucket))["last_error"] is None
        stored = _stored(h, bucket)
        current = await _token(p, bucket=bucket)
        assert stored["access_token"] == current["access_token"]
    assert "token_saved" in [e["event"] for e in no_secrets_in_logs]
    assert not list(small_disk.path.glob("tokens/dev/.*~*.tmp"))
    assert h.idp.reuse_count == 0 and h.idp.families_revoked == 0
    # The daemon served throughout; and what is on disk is the live login.
    assert (await p.call("list_buckets", {"provider": "dev"}))["ok"] is True
    assert _is_live(h, _stored(h)["refresh_token"])
    assert _is_live(h, _stored(h, "ondemand")["refresh_token"])


async def test_disk_filling_during_the_request_cannot_stop_the_write(
    small_disk: SmallDisk,
    start_daemon: StartDaemon,
    autojump_clock: object,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """A disk that fills up while the refresh request is in flight still takes the answer: its space was reserved before the request."""
    h, old, p = await _expired(start_daemon)
    h.idp.fail_next("slow", delay=5)
    async with trio.open_nursery() as n:
        got: list[dict[str, Any]] = []

        async def ask() -> None:
            got.append(await _token(p))

        n.start_soon(ask)
        await trio.sleep(1)  # the request is at the (slow) IdP
        small_disk.fill()
    stored = _stored(h)
    assert stored["access_token"] == got[0]["access_token"]
    assert stored["refresh_token"] != old["refresh_token"]
    assert "token_not_durable" not in [e["event"] for e in no_secrets_in_logs]
    assert (await _status(h))["last_error"] is None
    assert _is_live(h, stored["refresh_token"])


async def test_read_only_disk_without_a_lock_file_fails_the_refresh_cleanly(
    small_disk: SmallDisk,
    start_daemon: StartDaemon,
    autojump_clock: object,
) -> None:
    """On a read-only state disk where the key's lock file cannot be created, the refresh fails as a counted failure and the daemon keeps serving; once writable, it refreshes."""
    h, _, p = await _expired(start_daemon)
    small_disk.read_only(True)
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is False and "token_type" not in reply
    assert (await _status(h))["failures"] == 1
    assert "Read-only file system" in (await _status(h))["last_error"]
    assert h.idp.refresh_count == 0  # the refresh token was not spent without a lock
    assert (await p.call("list_buckets", {"provider": "dev"}))["ok"] is True
    small_disk.read_only(False)
    token = await _token(p)
    assert h.idp.is_access_token_valid(token["access_token"])
    assert (await _status(h))["failures"] == 0
    assert _is_live(h, _stored(h)["refresh_token"])


async def test_a_temp_file_of_a_failed_write_is_not_adopted_over_the_newer_token_saved_later(
    small_token_disk: SmallDisk,
    start_daemon: StartDaemon,
    autojump_clock: object,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """The disk turns read-only between a write's fsync and its rename (its temp file stays, whole); the daemon refreshes again meanwhile; when the disk is back, the saved token is the newest and its refresh token live, not the older one in the temp file."""
    h, _, p = await _expired(start_daemon)
    flipped: list[bool] = []

    def fault(name: str) -> None:
        if name == "store-fsynced" and not flipped:
            flipped.append(True)
            small_token_disk.read_only(True)

    h.store.fault = fault
    first = await _token(p)  # refresh 1: its temp file stays, whole
    assert flipped and list(small_token_disk.path.glob(".*~*.tmp"))
    await trio.sleep(31)  # past the cooldown, still read-only
    second = await _token(p, op="refresh_token")  # refresh 2: kept in memory
    assert second["access_token"] != first["access_token"]
    small_token_disk.read_only(False)
    await trio.sleep(120)  # the saver writes it
    assert "token_saved" in [e["event"] for e in no_secrets_in_logs]
    stored = _stored(h)
    assert stored["access_token"] == second["access_token"]
    assert _is_live(h, stored["refresh_token"])
    assert not list(small_token_disk.path.glob(".*~*.tmp"))
