"""The on-disk token store: private files, validated names, atomic writes that survive SIGKILL, flock."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CREDPROXY, Dirs
from credproxy.core.tokendata import normalize_token
from credproxy.errors import InvalidName, InvalidToken
from credproxy.shell.store import TokenStore

NOW = 1_800_000_000.0
OLD = {
    "access_token": "AT-old",
    "refresh_token": "RT-old",
    "expiry": 1_800_003_600,
    "token_type": "Bearer",
}
NEW = {
    "access_token": "AT-new",
    "refresh_token": "RT-new",
    "expiry": 1_800_007_200,
    "token_type": "Bearer",
}


# -- helpers ----------------------------------------------------------------------------


def proc_state(pid: int) -> str:
    """The one-letter state of *pid* from /proc (R, S, T, Z, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for(predicate: Any, what: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Poll *predicate* until true; fail (with the process's fate) if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"credproxy exited with {proc.returncode} before {what}")
        time.sleep(0.002)
    raise AssertionError(
        f"timed out waiting for {what}: state {proc_state(proc.pid)}, "
        f"wchan {Path(f'/proc/{proc.pid}/wchan').read_text()}"
    )


def reading_stdin(pid: int) -> bool:
    """True while *pid* sleeps in a pipe read (credproxy import waiting for its token)."""
    return proc_state(pid) == "S" and "pipe" in Path(f"/proc/{pid}/wchan").read_text()


def blocked_on_flock(pid: int) -> bool:
    """True while *pid* waits for an flock (a "->" line of /proc/locks)."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and str(pid) in fields:
            return True
    return False


def popen(dirs: Dirs, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [CREDPROXY, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dirs.env(**env),
    )


def hidden_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- permissions ------------------------------------------------------------------------


def test_files_are_0600_and_directories_0700_whatever_the_umask(dirs: Dirs) -> None:
    """Tokens, keys and lock files are 0600 in 0700 directories even under umask 000."""
    old_umask = os.umask(0)
    try:
        store = TokenStore(dirs.state)
        store.write("prov", "default", OLD)
        store.write_key("api", "KEY-CANARY-1")
        with store.locked("prov", "default"):
            pass
    finally:
        os.umask(old_umask)
    s = dirs.state
    for d in [s, s / "tokens", s / "tokens/prov", s / "keys", s / "locks", s / "locks/prov"]:
        assert mode(d) == 0o700, d
    for f in [s / "tokens/prov/default.json", s / "keys/api", s / "locks/prov/default.lock"]:
        assert mode(f) == 0o600, f


def test_a_too_open_token_directory_is_tightened(dirs: Dirs) -> None:
    """A provider directory someone made 0755 is 0700 after the next write."""
    loose = dirs.state / "tokens" / "prov"
    loose.mkdir(parents=True)
    loose.chmod(0o755)
    TokenStore(dirs.state).write("prov", "default", OLD)
    assert mode(loose) == 0o700


# -- names -------------------------------------------------------------------------------


BAD_NAMES = ["../x", "a/b", "/etc", "", "x" * 65, "a b", "a\x00b", "ü"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused_and_nothing_is_written(dirs: Dirs, name: str) -> None:
    """Provider, bucket and key names outside ^[A-Za-z0-9._@-]{1,64}$ raise InvalidName and touch no file."""
    store = TokenStore(dirs.state)
    with pytest.raises(InvalidName):
        store.write(name, "default", OLD)
    with pytest.raises(InvalidName):
        store.write("prov", name, OLD)
    with pytest.raises(InvalidName):
        store.write_key(name, "v")
    with pytest.raises(InvalidName):
        store.read(name)
    with pytest.raises(InvalidName):
        store.remove("prov", name)
    assert not dirs.state.exists()
    assert sorted(os.listdir(dirs.root)) == []


def test_longest_valid_name_is_accepted(dirs: Dirs) -> None:
    """A 64-character name made of every allowed kind of character works."""
    name = ("Az09._@-" * 8)[:64]
    store = TokenStore(dirs.state)
    store.write(name, name, OLD)
    assert store.read(name, name) == OLD
    assert store.buckets(name) == [name]


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_names_cannot_escape_the_store_layout(dirs: Dirs, name: str) -> None:
    """'.' and '..' (which the character class allows) are refused as provider, bucket and key names."""
    store = TokenStore(dirs.state)
    with pytest.raises(InvalidName):
        store.write(name, "escaped", OLD)
    with pytest.raises(InvalidName):
        store.write("prov", name, OLD)
    with pytest.raises(InvalidName):
        store.write_key(name, "v")
    assert not (dirs.state / "escaped.json").exists()
    assert not (dirs.state / "tokens" / "escaped.json").exists()


def test_name_with_trailing_newline_is_refused(dirs: Dirs) -> None:
    """A provider name ending in a newline is not a valid name (re's "$" would allow it)."""
    with pytest.raises(InvalidName):
        TokenStore(dirs.state).write("prov\n", "default", OLD)


# -- normalize_token -----------------------------------------------------------------------


def test_expires_in_becomes_an_epoch_expiry() -> None:
    """expires_in (seconds from now) is stored as expiry in epoch seconds and dropped."""
    token = normalize_token({"access_token": "AT", "expires_in": 3600}, NOW)
    assert token == {"access_token": "AT", "expiry": 1_800_003_600, "token_type": "Bearer"}


def test_expiry_wins_over_expires_in() -> None:
    """When both are given, expiry is kept and expires_in is dropped."""
    token = normalize_token({"access_token": "AT", "expiry": 1_800_000_500, "expires_in": 9}, NOW)
    assert token["expiry"] == 1_800_000_500
    assert "expires_in" not in token


def test_unknown_fields_are_kept() -> None:
    """Fields credproxy does not know (id_token, account_id, ...) pass through unchanged."""
    raw = {"access_token": "AT", "id_token": "jwt", "account_id": 7, "nested": {"a": [1]}}
    token = normalize_token(raw, NOW)
    assert token == {**raw, "token_type": "Bearer"}


def test_empty_refresh_token_is_dropped() -> None:
    """An empty refresh_token is treated as none at all."""
    assert "refresh_token" not in normalize_token({"access_token": "AT", "refresh_token": ""}, NOW)


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ({"access_token": "AT", "expiry": 1_800_000_000_000}, "milliseconds"),
        ({"refresh_token": "RT"}, "access_token"),
        ({"access_token": ""}, "access_token"),
        ({"access_token": 5}, "access_token"),
        ({"access_token": "AT", "refresh_token": 12}, "refresh_token"),
        ({"access_token": "AT", "expiry": "soon"}, "expiry"),
        ({"access_token": "AT", "expiry": -1}, "expiry"),
        ({"access_token": "AT", "expiry": True}, "expiry"),
        ({"access_token": "AT", "expires_in": "3600"}, "expires_in"),
        ({"access_token": "AT", "token_type": 1}, "token_type"),
        (["access_token"], "object"),
        ("AT", "object"),
    ],
    ids=[
        "ms-expiry",
        "missing-access-token",
        "empty-access-token",
        "numeric-access-token",
        "numeric-refresh-token",
        "string-expiry",
        "negative-expiry",
        "bool-expiry",
        "string-expires-in",
        "numeric-token-type",
        "list",
        "string",
    ],
)
def test_invalid_tokens_are_refused_naming_the_field(raw: Any, complaint: str) -> None:
    """Token JSON that cannot be served raises InvalidToken whose message names the problem."""
    with pytest.raises(InvalidToken, match=complaint):
        normalize_token(raw, NOW)


# -- remove and listing ----------------------------------------------------------------------


def test_remove_deletes_the_file_and_reports_whether_it_existed(dirs: Dirs) -> None:
    """remove() returns True and deletes the file, then False; listings forget it."""
    store = TokenStore(dirs.state)
    store.write("prov", "default", OLD)
    store.write("prov", "work", NEW)
    assert store.remove("prov") is True
    assert not (dirs.state / "tokens/prov/default.json").exists()
    assert store.read("prov") is None
    assert store.remove("prov") is False
    assert store.buckets("prov") == ["work"]
    assert store.remove("prov", "work") is True
    assert store.providers() == []
    store.write_key("k", "v")
    assert (store.remove_key("k"), store.remove_key("k")) == (True, False)


def test_listings_ignore_temp_files_lock_files_and_strays(dirs: Dirs) -> None:
    """providers()/buckets() list only real token files, not temp files, locks or odd names."""
    store = TokenStore(dirs.state)
    store.write("prov", "default", OLD)
    with store.locked("prov", "other"), store.locked("lockonly", "default"):
        pass
    tokens = dirs.state / "tokens"
    (tokens / "prov" / ".default.json.123.456.tmp").write_text("{")
    (tokens / "prov" / ".work.json.9.9.tmp").write_text("{")
    (tokens / "prov" / "notes.txt").write_text("x")
    (tokens / "ghost").mkdir()
    (tokens / "ghost" / ".default.json.1.2.tmp").write_text("{")
    (tokens / "bad name").mkdir()
    (tokens / "bad name" / "default.json").write_text(json.dumps(OLD))
    assert store.providers() == ["prov"]
    assert store.buckets("prov") == ["default"]
    assert store.buckets("ghost") == []
    assert store.buckets("lockonly") == []


def test_key_set_killed_mid_write_leaves_no_phantom_key(dirs: Dirs) -> None:
    """`credproxy key set` SIGKILLed after writing its temp file adds no key to the listing."""
    with popen(dirs, "key", "set", "mykey", CREDPROXY_FAULT="store-written") as proc:
        assert proc.stdin is not None
        proc.stdin.write(b"KEY-CANARY-1\n")
        proc.stdin.close()
        wait_for(lambda: proc_state(proc.pid) == "T", "the fault checkpoint", proc)
        proc.kill()
    assert TokenStore(dirs.state).key_names() == []


# -- crash safety ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "survivor"),
    [("store-written", OLD), ("store-fsynced", OLD), ("store-renamed", NEW)],
)
def test_import_killed_at_each_write_step_leaves_a_complete_token(
    dirs: Dirs, fault: str, survivor: dict[str, Any]
) -> None:
    """SIGKILL at each step of the atomic write leaves the whole old token before the rename, the whole new one after."""
    store = TokenStore(dirs.state)
    store.write("prov", "default", OLD)
    path = store.token_path("prov")
    with popen(dirs, "import", "prov", CREDPROXY_FAULT=fault) as proc:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(NEW).encode())
        proc.stdin.close()
        wait_for(lambda: proc_state(proc.pid) == "T", f"checkpoint {fault}", proc)
        proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(path.read_bytes()) == survivor
    assert store.read("prov") == survivor
    assert mode(path) == 0o600
    # Before the rename the new token sits complete in a temp file; after it, nothing is left over.
    leftovers = hidden_files(path.parent)
    if survivor is OLD:
        assert len(leftovers) == 1
        assert json.loads((path.parent / leftovers[0]).read_bytes()) == NEW
    else:
        assert leftovers == []
    assert store.buckets("prov") == ["default"]


# `credproxy import`'s own code (cli.import_token: read, validate, lock, write, notify)
# in a loop, alternating two token files. Calling it directly rather than
# through argparse skips ~0.3 s of start-up per process (the parser imports the
# daemon for --version), and looping means a SIGKILL at a random moment lands
# inside some write rather than before the first one.
IMPORT_LOOP = """
import sys, types
from credproxy import cli
files = sys.argv[1:]
n = 0
while True:
    cli.import_token("prov", "default", files[n % 2])
    n += 1
    if n == 1:
        sys.stderr.write("looping\\n")
        sys.stderr.flush()
"""


def test_import_killed_at_random_moments_never_leaves_a_partial_token(dirs: Dirs) -> None:
    """Thirty import loops of 60 KB tokens SIGKILLed at random moments always leave one complete token."""
    store = TokenStore(dirs.state)
    tokens = {
        "old": dict(OLD, passthrough="o" * 60_000),
        "a": dict(NEW, access_token="AT-a", passthrough="a" * 60_000),
        "b": dict(NEW, access_token="AT-b", passthrough="b" * 60_000),
    }
    store.write("prov", "default", tokens["old"])
    files = []
    for name in ("a", "b"):
        files.append(dirs.root / f"{name}.json")
        files[-1].write_text(json.dumps(tokens[name]))
    path = store.token_path("prov")
    rng = random.Random()
    seen: list[str] = []
    mid_write = 0  # kills that left a temp file: they landed inside a write

    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        started.append(
            subprocess.Popen(
                [sys.executable, "-c", IMPORT_LOOP, *map(str, files)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=dirs.env(),
            )
        )
        return started[-1]

    try:
        ahead: subprocess.Popen[bytes] | None = start()
        for run in range(30):
            assert ahead is not None
            proc = ahead
            # The next loop starts up meanwhile; it is stopped while we kill and look,
            # so that its writes cannot hide what the killed one left behind.
            ahead = start() if run < 29 else None
            assert proc.stderr is not None
            assert proc.stderr.readline() == b"looping\n", proc.stderr.read()
            time.sleep(rng.uniform(0, 0.03))
            if ahead is not None:
                ahead.send_signal(signal.SIGSTOP)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == -signal.SIGKILL, proc.stderr.read()
            data = path.read_bytes()
            found = [name for name, tok in tokens.items() if json.loads(data) == tok]
            assert len(found) == 1, (run, len(data))
            seen += found
            mid_write += bool(hidden_files(path.parent))
            if ahead is not None:
                ahead.send_signal(signal.SIGCONT)
    finally:
        for p in started:
            p.kill()  # SIGKILL also ends a stopped process
            p.wait()
            assert p.stderr is not None
            p.stderr.close()
    assert store.read("prov") is not None
    assert store.buckets("prov") == ["default"]
    # About half the kills land between creating the temp file and the rename.
    assert mid_write > 0, f"no kill landed inside a write: {seen}"


def test_import_waits_for_the_key_lock(dirs: Dirs) -> None:
    """While another process holds the key's flock, `credproxy import` blocks and writes only after release."""
    store = TokenStore(dirs.state)
    store.write("prov", "default", OLD)
    with popen(dirs, "import", "prov") as proc:
        assert proc.stdin is not None
        with store.locked("prov", "default"):
            proc.stdin.write(json.dumps(NEW).encode())
            proc.stdin.close()
            wait_for(lambda: blocked_on_flock(proc.pid), "import to wait on the flock", proc)
            time.sleep(0.05)
            assert proc.poll() is None
            assert store.read("prov") == OLD
        assert proc.wait(timeout=20) == 0
    assert store.read("prov") == NEW
