"""Hostile file systems and stale recipes: directories others may write, planted symlinks.

Each test runs the installed ``credproxy`` as a user would and looks at what the
user sees: the exit status, the one line on stderr, the log, the files on disk.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from conftest import Dirs, cli

REPO = Path(__file__).resolve().parents[1]
AS_ROOT = pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")


def _serve_briefly(dirs: Dirs) -> tuple[int, str]:
    """Run `credproxy serve` until it is idle for a moment; its exit status and stderr."""
    proc = cli(dirs, "serve", "--idle-exit", "0.2", timeout=60)
    return proc.returncode, proc.stderr


def _events(stderr: str, name: str) -> list[dict[str, object]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == name:
                out.append(event)
    return out


def test_world_writable_state_dir_is_repaired_and_reported(dirs: Dirs) -> None:
    """A pre-existing 0777 state directory is made 0700 at daemon start, and a warning names it."""
    dirs.state.mkdir()
    os.chmod(dirs.state, 0o777)
    code, stderr = _serve_briefly(dirs)
    assert code == 0, stderr
    assert stat.S_IMODE(os.stat(dirs.state).st_mode) == 0o700
    [event] = _events(stderr, "directory_repaired")
    assert event["path"] == str(dirs.state) and event["mode"] == "0777"
    assert event["level"] == "warning"


def test_group_writable_runtime_dir_is_repaired_and_reported(dirs: Dirs) -> None:
    """A pre-existing 0770 runtime directory is made 0700 at daemon start, and a warning names it."""
    dirs.runtime.mkdir()
    os.chmod(dirs.runtime, 0o770)
    code, stderr = _serve_briefly(dirs)
    assert code == 0, stderr
    assert stat.S_IMODE(os.stat(dirs.runtime).st_mode) == 0o700
    [event] = _events(stderr, "directory_repaired")
    assert event["path"] == str(dirs.runtime) and event["mode"] == "0770"


@AS_ROOT
def test_state_dir_of_another_uid_is_refused(dirs: Dirs) -> None:
    """The daemon refuses to start on a state directory that belongs to another uid, saying whose it is."""
    dirs.state.mkdir(mode=0o700)
    os.chown(dirs.state, 65534, 65534)
    code, stderr = _serve_briefly(dirs)
    assert code == 1
    [line] = stderr.splitlines()
    assert line.startswith(
        f"credproxy serve: the state directory {dirs.state} belongs to uid 65534"
    )
    assert not (dirs.runtime / "credproxy.sock").exists()


def test_planted_daemon_lock_symlink_is_not_followed(dirs: Dirs) -> None:
    """A symlink planted as daemon.lock makes the daemon refuse to start; the file it points at is never created."""
    victim = dirs.root / "victim"
    dirs.runtime.mkdir(mode=0o700)
    (dirs.runtime / "daemon.lock").symlink_to(victim)
    code, stderr = _serve_briefly(dirs)
    assert code == 1
    [line] = stderr.splitlines()
    assert "daemon.lock is a symbolic link" in line
    assert not victim.exists()
    assert not (dirs.runtime / "credproxy.sock").exists()


def test_planted_daemon_log_symlink_is_not_followed(dirs: Dirs) -> None:
    """`credproxy run` refuses to start a daemon whose log path is a planted symlink, and writes nothing through it."""
    victim = dirs.root / "victim"
    dirs.runtime.mkdir(mode=0o700)
    (dirs.runtime / "daemon.log").symlink_to(victim)
    proc = cli(dirs, "run", "--allow", "demo", "--", "true", timeout=60)
    assert proc.returncode == 1
    # (`demo` is configured nowhere: run warns about that grant first, then fails)
    [line] = [ln for ln in proc.stderr.splitlines() if "warning: grant 'demo'" not in ln]
    assert "daemon.log is a symbolic link" in line
    assert not victim.exists()


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md"])
def test_recipes_point_both_socket_variables_inside_the_sandbox(doc: str) -> None:
    """Every documented recipe that mounts {socket} in a sandbox sets CREDPROXY_SOCKET and LLXPRT_CREDENTIAL_SOCKET to the path inside."""
    text = (REPO / doc).read_text()
    # A recipe is one shell command: lines joined at their trailing backslashes.
    commands = re.sub(r"\\\n\s*", " ", text).splitlines()
    recipes = [c for c in commands if "{socket}" in c and c.startswith("credproxy run ")]
    assert recipes, "expected at least the bwrap recipe"
    for recipe in recipes:
        m = re.search(r"--bind \{socket\} (\S+)|-v \{socket\}:(\S+)", recipe)
        assert m, recipe
        inside = m.group(1) or m.group(2)
        for var in ("CREDPROXY_SOCKET", "LLXPRT_CREDENTIAL_SOCKET"):
            assert re.search(rf"(--setenv {var} |-e {var}=){re.escape(inside)}(\s|$)", recipe), (
                f"{var} not set to {inside} in: {recipe}"
            )


def test_no_test_ends_processes_by_name() -> None:
    """No test ends processes by name or pattern (pkill, killall), which would hit processes it did not start."""
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(Path(__file__).parent.rglob("*.py"))
        if path.name != Path(__file__).name
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"\b(pkill|killall)\b", line)
    ]
    assert offenders == []
