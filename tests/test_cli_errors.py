"""What the command line says when the user's input or the machine gets in the way.

Each is a command a user can type, run as the installed ``credproxy``: one
line that says why (and what to do), the documented exit code, never a
traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CREDPROXY, Dirs, cli, stop_daemon
from credproxy.cli import _render_status


def _run_bytes(
    dirs: Dirs, *args: bytes | str, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [CREDPROXY, *args],
        input=input,
        capture_output=True,
        timeout=60,
        env=dirs.env(),
        check=False,
    )


def test_status_into_a_pipe_that_closes_early_says_nothing_more(dirs: Dirs) -> None:
    """`credproxy status | head -1`: no BrokenPipeError traceback."""
    proc = subprocess.run(
        ["sh", "-c", f"'{CREDPROXY}' status | true; '{CREDPROXY}' status --json | true"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dirs.env(),
        check=False,
    )
    assert proc.stderr == ""


def test_input_that_is_not_utf8_is_refused_in_one_line(dirs: Dirs) -> None:
    """`key set` and `import` (a file, or stdin) of bytes that are not UTF-8: exit 2, one line, nothing stored."""
    refused = _run_bytes(dirs, "key", "set", "k", input=b"ab\xffcd")
    assert refused.returncode == 2
    assert refused.stderr == b"credproxy key: the key value (read from stdin) is not UTF-8 text\n"
    bad = dirs.root / "bad.json"
    bad.write_bytes(b'{"access_token":"\xff"}')
    for args, stdin in (((str(bad),), None), ((), bad.read_bytes())):
        proc = _run_bytes(dirs, "import", "p", *args, input=stdin)
        assert proc.returncode == 2 and b"is not UTF-8 text" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    assert not (dirs.state / "keys" / "k").exists()
    assert not (dirs.state / "tokens" / "p").exists()


def test_run_of_a_command_whose_file_name_is_not_utf8(dirs: Dirs) -> None:
    """The session's name comes from the command's file name (here caf\\xe9 in Latin-1): it runs."""
    script = dirs.root / os.fsdecode(b"caf\xe9")
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    try:
        proc = _run_bytes(dirs, "run", "--allow", "*", "--", os.fsencode(script))
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        named = _run_bytes(dirs, "run", "--name", b"\xff", "--allow", "*", "--", "true")
        assert (named.returncode, named.stderr) == (
            2,
            b"credproxy run: --name is not UTF-8 text\n",
        )
    finally:
        stop_daemon(dirs)


def test_a_name_that_cannot_be_sent_is_a_usage_error_inside_the_sandbox(dirs: Dirs) -> None:
    """`credproxy token` and `key get` with a name that is not UTF-8 or longer than any name: exit 2 with the name rule, not 'connection lost'."""
    inner = (
        f"'{CREDPROXY}' token \"$(printf '\\377')\"; echo rc=$?; "
        f"'{CREDPROXY}' token $(head -c 70000 /dev/zero | tr '\\0' a); echo rc=$?; "
        f"'{CREDPROXY}' key get \"$(printf '\\377')\"; echo rc=$?"
    )
    try:
        proc = cli(dirs, "run", "--allow", "*", "--", "sh", "-c", inner)
    finally:
        stop_daemon(dirs)
    assert proc.stdout.split() == ["rc=2", "rc=2", "rc=2"], proc.stderr
    assert "lost" not in proc.stderr and proc.stderr.count("is not a name (1-64 of") == 3
    assert max(len(line) for line in proc.stderr.splitlines()) < 300


def test_a_runtime_directory_too_deep_for_its_sockets_is_said_at_once(dirs: Dirs) -> None:
    """A CREDPROXY_RUNTIME_DIR whose session sockets would pass the 107-byte limit: one line that says so and what to do, before any daemon starts."""
    runtime = dirs.root / ("q" * 100)
    proc = cli(dirs, "run", "--allow", "*", "--", "true", CREDPROXY_RUNTIME_DIR=str(runtime))
    assert proc.returncode == 2
    assert "a Unix socket's may have 107 at most; set CREDPROXY_RUNTIME_DIR" in proc.stderr
    assert not (runtime / "daemon.log").exists()


def test_install_units_that_cannot_be_written_says_so_in_one_line(dirs: Dirs) -> None:
    config_home = dirs.root / "xdg"
    config_home.mkdir()
    (config_home / "systemd").write_text("")  # a file where the directory goes
    proc = cli(dirs, "install-units", XDG_CONFIG_HOME=str(config_home))
    assert proc.returncode == 1
    assert proc.stderr.startswith("credproxy install-units: cannot write the units in ")
    assert len(proc.stderr.splitlines()) == 1


def test_key_rm_that_cannot_remove_says_so_in_one_line(dirs: Dirs) -> None:
    """(Root ignores file modes: a directory where the file goes makes the removal fail.)"""
    assert cli(dirs, "key", "set", "k", input="v").returncode == 0
    (dirs.state / "keys" / "k").unlink()
    (dirs.state / "keys" / "k").mkdir()
    (dirs.state / "signing").mkdir(mode=0o700, exist_ok=True)
    (dirs.state / "signing" / "s").mkdir()
    for args in (("key", "rm", "k"), ("signing-key", "rm", "s")):
        proc = cli(dirs, *args)
        assert proc.returncode == 1 and "cannot remove" in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1


def test_status_says_a_renewed_token_is_only_in_memory() -> None:
    """A token whose write was refused (kept in memory, its rotated refresh token too) stands out in the text status, as in --json."""
    text = _render_status(
        {
            "daemon": {"pid": 1, "version": "0.1.0", "running_since": "x"},
            "sessions": [],
            "tokens": [
                {
                    "provider": "s",
                    "bucket": "default",
                    "expires_in": 3596,
                    "failures": 0,
                    "last_error": "the renewed token is not on disk yet (kept in memory): "
                    "cannot write /x/tokens/s/default.json: Permission denied",
                    "refreshable": True,
                    "reauth_required": False,
                    "save_failures": 1,
                    "unsaved_since": "2026-12-06T16:59:26+00:00",
                    "next_renewal": None,
                }
            ],
            "holds": [],
            "keys": [],
        }
    )
    assert "NOT ON DISK since 2026-12-06T16:59:26+00:00 (kept in memory; 1 failed writes" in text


def test_a_daemon_that_does_not_answer_is_not_called_not_running(dirs: Dirs) -> None:
    """A daemon stopped with SIGSTOP (hung): status and stop say it does not answer, with its pid and the way out (exit 1); import warns it was not told; run does not wait to start another."""
    assert cli(dirs, "run", "--allow", "*", "--", "true").returncode == 0
    pid = int(json.loads(cli(dirs, "status", "--json").stdout)["daemon"]["pid"])
    os.kill(pid, signal.SIGSTOP)
    try:
        status = cli(dirs, "status")
        stop = cli(dirs, "stop", "--timeout", "1")
        token = '{"access_token":"a","refresh_token":"r","expires_in":3600}'
        imported = cli(dirs, "import", "p", input=token)
        started = time.monotonic()
        ran = cli(dirs, "run", "--allow", "*", "--", "true")
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.2)
        stop_daemon(dirs)
    said = f"the credproxy daemon (pid {pid}) holds"
    for proc in (status, stop, ran):
        assert proc.returncode == 1 and said in proc.stderr, proc.stderr
        assert f"end it with kill -TERM {pid}" in proc.stderr
    assert "not running" not in status.stdout + stop.stdout
    assert imported.returncode == 0 and "warning: the running daemon was not told" in (
        imported.stderr
    )
    assert took < 14, "run waited to start a daemon beside the one that holds the socket"


def test_a_daemon_of_another_version_is_named_as_such(dirs: Dirs) -> None:
    """An upgrade while the old daemon runs (a copy of the package saying 0.0.9, without the stop operation): status warns, and stop says how to end it instead of 'Unknown operation'."""
    old = dirs.root / "old"
    shutil.copytree(
        Path(__file__).resolve().parent.parent / "credproxy",
        old / "credproxy",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (old / "credproxy" / "_version.py").write_text('__version__ = "0.0.9"\n')
    handlers = old / "credproxy" / "shell" / "handlers.py"
    handlers.write_text(handlers.read_text().replace('            "stop": self.stop,\n', ""))
    dirs.runtime.mkdir(mode=0o700)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "credproxy", "serve"],
        env=dirs.env(PYTHONPATH=str(old)),
        cwd=old,  # (`-m` puts the cwd first: the copy, not the installed package)
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if cli(dirs, "status", "--json").stdout.find('"0.0.9"') >= 0:
                break
            time.sleep(0.05)
        status = cli(dirs, "status")
        stop = cli(dirs, "stop")
    finally:
        daemon.terminate()
        daemon.wait(20)
    assert "warning: the running daemon is version 0.0.9" in status.stderr
    assert stop.returncode == 2
    assert f"is version 0.0.9 and has no stop; end it with kill -TERM {daemon.pid}" in stop.stderr


def test_status_json_has_the_same_keys_without_a_daemon(dirs: Dirs) -> None:
    """A script reading `status --json` finds holds (empty) whether or not a daemon runs."""
    offline = json.loads(cli(dirs, "status", "--json").stdout)
    assert offline["daemon"] is None and offline["holds"] == []


def test_release_of_a_bucket_that_is_not_held_says_so(background_daemon: Dirs) -> None:
    """`credproxy release P` without a daemon: exit 3, holds live in its memory; with one and nothing held: exit 0, saying so and that P's profiles start again from their first bucket."""
    dirs = background_daemon
    offline = cli(dirs, "release", "nosuch")
    assert (offline.returncode, offline.stdout) == (3, "")
    assert offline.stderr == (
        "credproxy release: no quota hold on nosuch: the daemon is not running, and holds "
        "live in its memory only\n"
    )
    online = cli(dirs, "run", "--allow", "*", "--", CREDPROXY, "release", "nosuch:work")
    assert (online.returncode, online.stderr) == (0, "")
    assert online.stdout == (
        "no quota hold on nosuch:work (`credproxy status` lists the holds); "
        "profiles of nosuch start again from their first bucket\n"
    )


def test_a_usage_error_is_one_line_that_points_at_the_help(dirs: Dirs) -> None:
    """argparse's usage errors (a missing argument, an unknown option or command, a bad value): exit 2 and one line naming the command and its --help, no usage block."""
    cases = {
        ("login",): "credproxy login: the following arguments are required: provider "
        "(see credproxy login --help)",
        ("status", "--bogus"): "credproxy status: unrecognized arguments: --bogus "
        "(see credproxy status --help)",
        ("key", "set", "k", "extra"): "credproxy key set: unrecognized arguments: extra "
        "(see credproxy key set --help)",
        ("stop", "--timeout", "soon"): "credproxy stop: argument --timeout: 'soon' is not "
        "a number of seconds (see credproxy stop --help)",
        ("key",): "credproxy key: the following arguments are required: ACTION "
        "(see credproxy key --help)",
        ("--bogus",): "credproxy: unrecognized arguments: --bogus (see credproxy --help)",
        ("run", "--allow", "dev"): "credproxy run: a command is needed: credproxy run "
        "--allow GRANT -- CMD (see credproxy run --help)",
    }
    for args, said in cases.items():
        proc = cli(dirs, *args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", said + "\n"), args
    unknown = cli(dirs, "frobnicate")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("credproxy: argument COMMAND: invalid choice: 'frobnicate'")
    assert unknown.stderr.endswith(" (see credproxy --help)\n")
    assert len(unknown.stderr.splitlines()) == 1


def test_import_from_a_terminal_says_what_to_paste(dirs: Dirs) -> None:
    """`credproxy import P` with a terminal on stdin prompts on stderr (what to paste, Ctrl-D to end) and stores what was typed; from a pipe it says nothing."""
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [CREDPROXY, "import", "p", "--bucket", "work"],
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dirs.env(),
        )
        os.close(follower)
        os.write(leader, json.dumps({"access_token": "AT-CANARY"}).encode() + b"\n")
        os.write(leader, b"\x04")  # Ctrl-D on a line of its own: end of input
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(leader)
    assert proc.returncode == 0, err
    assert err.decode() == (
        "Paste the token JSON for p:work (access_token, with refresh_token and expires_in "
        "or expiry), then press Ctrl-D on a line of its own:\n"
    )
    assert out.decode().startswith("stored p:work (")
    piped = cli(dirs, "import", "q", input=json.dumps({"access_token": "AT-CANARY"}))
    assert (piped.returncode, piped.stderr) == (0, "")
