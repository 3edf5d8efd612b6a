"""``credproxy run``: open a session, run the sandbox command, close the session.

Standard library only (plus config for ``default_allow``): this process stays
alive for as long as the sandbox runs, and stays small.

If no daemon answers on the control socket, one is started in the background
(``credproxy serve --idle-exit``), so ``credproxy run`` works the same with or
without systemd. Two launchers racing to start one are fine: the daemon holds
an instance lock, the loser exits, and both launchers find the winner.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from credproxy.errors import EXIT_USAGE, CredproxyError, DaemonUnavailable, UsageError
from credproxy.inner.client import CAPABILITY_ENV, Client
from credproxy.shell import paths

AUTOSTART_IDLE_EXIT = 30.0  # seconds an auto-started daemon lingers after the last session
STARTUP_TIMEOUT = 10.0


def run(
    cmd: list[str],
    *,
    allow: list[str],
    allow_uids: list[int],
    name: str,
    capability: bool,
) -> int:
    grants = allow or _default_grants()
    if not grants:
        print(
            "credproxy run: no grants: pass --allow PROVIDER[:BUCKET] (or key:NAME, or '*'), "
            "or set [sandbox] default_allow in the config file",
            file=sys.stderr,
        )
        return EXIT_USAGE
    control = paths.control_socket()
    ensure_daemon(control)
    cap = secrets.token_hex(32) if capability else None
    payload: dict[str, Any] = {
        "grants": grants,
        "allow_uids": allow_uids,
        "name": name or Path(cmd[0]).name,
    }
    if cap:
        payload["capability"] = cap
    with Client(control, timeout=15) as c:
        opened = c.call("open_session", payload)
    sid, sock = str(opened["session"]), str(opened["socket"])
    env = dict(os.environ, CREDPROXY_SOCKET=sock, LLXPRT_CREDENTIAL_SOCKET=sock)
    if cap:
        env[CAPABILITY_ENV] = cap
    argv = [a.replace("{socket}", sock) for a in cmd]
    try:
        return _run_child(argv, env)
    finally:
        try:
            with Client(control, timeout=15) as c:
                c.call("close_session", {"session": sid})
        except CredproxyError:
            pass  # the daemon is gone or already closed it (pidfd watch)


def _default_grants() -> list[str]:
    from credproxy.core import config

    return list(config.load(paths.config_file()).sandbox.default_allow)


def _run_child(argv: list[str], env: dict[str, str]) -> int:
    try:
        child = subprocess.Popen(argv, env=env)
    except OSError as exc:
        print(f"credproxy run: cannot start {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    # The terminal already sends SIGINT to the whole foreground group (the child
    # included); forwarding it as well would deliver it twice.
    old = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
    }
    try:
        status = child.wait()
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status


def ensure_daemon(control: Path) -> None:
    """Make sure a daemon answers on *control*, starting one if needed.

    Raises:
        DaemonUnavailable: none came up in time (its log is named).
    """
    if _answers(control):
        return
    runtime = control.parent
    old = os.umask(0o077)
    try:
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_path = runtime / "daemon.log"
        with open(log_path, "ab") as log_file:
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "credproxy",
                    "serve",
                    "--idle-exit",
                    str(AUTOSTART_IDLE_EXIT),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                env=dict(os.environ, CREDPROXY_RUNTIME_DIR=str(runtime)),
            )
    finally:
        os.umask(old)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if _answers(control):
            return
        time.sleep(0.02)
    raise DaemonUnavailable(f"the credproxy daemon did not start; see {log_path}")


def _answers(control: Path) -> bool:
    try:
        with Client(control, timeout=5) as c:
            c.call("ping")
    except (DaemonUnavailable, UsageError):
        return False
    return True
