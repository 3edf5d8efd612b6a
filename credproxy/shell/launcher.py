"""``credproxy run``: open a session, run the sandbox command, close the session.

Standard library only, plus the config and the grants: this process stays
alive for as long as the sandbox runs, and stays small. The config file is
read first: a bad one is said here (file, line, field) rather than by a
daemon that would not start on it, and a grant that names a provider the
config does not have (and no login is stored for), or ``api:P`` for a
provider without an ``api`` section, is warned about at once on stderr (the
sandbox itself is told only "not found"; see ``credproxy/core/grantcheck.py``).

If no daemon answers on the control socket, one is started in the background
(``credproxy serve --idle-exit``), so ``credproxy run`` works the same with or
without systemd. Two launchers racing to start one are fine: the daemon holds
an instance lock, the loser exits, and both launchers find the winner. A
daemon started while the last one is stopping waits for it (the stopping one
no longer listens but holds the lock until its refreshes land) and takes
over; one that answered the ping but is gone by the time the session is
asked for (it idled out, or was stopped) is replaced once (:func:`open_session`).

With ``--capability`` the session's capability token reaches CMD on file
descriptor 3 (``$CREDPROXY_CAPABILITY_FD`` and llxprt's ``$LLXPRT_CAPABILITY_FD``
say so), never in the environment, where every process of the sandbox could read
it in ``/proc/PID/environ`` and every child would carry it along. See
:func:`_capability_memfd` for why fd 3 is a sealed memfd and not a pipe.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from credproxy._version import __version__
from credproxy.core.config import Config
from credproxy.core.grants import Grants
from credproxy.errors import (
    EXIT_CANNOT_EXECUTE,
    EXIT_COMMAND_NOT_FOUND,
    EXIT_USAGE,
    ConfigError,
    CredproxyError,
    DaemonUnavailable,
    UsageError,
)
from credproxy.inner.client import (
    CAPABILITY_ENV,
    CAPABILITY_FD_ENV,
    Client,
    silent_daemon,
)
from credproxy.inner.forward import wait_forwarding_signals
from credproxy.shell import paths

AUTOSTART_IDLE_EXIT = 30.0  # seconds an auto-started daemon lingers after the last session
# Seconds to wait for a started daemon to answer. One started while the last
# daemon stops waits for it first (up to daemon.LOCK_WAIT, 10 s: its refreshes
# land), then takes over.
STARTUP_TIMEOUT = 15.0
CAPABILITY_FD = 3  # the descriptor llxprt's CLI reads (LLXPRT_CAPABILITY_FD must be "3")


def run(
    cmd: list[str],
    *,
    allow: list[str],
    allow_uids: list[int],
    name: str,
    capability: bool,
) -> int:
    control = paths.control_socket()
    _check_socket_room(paths.sessions_dir() / ("0" * 16 + ".sock"))
    cfg = _config(control)
    grants = allow or ([] if cfg is None else list(cfg.sandbox.default_allow))
    if not grants:
        print(
            "credproxy run: no grants: pass --allow PROVIDER[:BUCKET] (or key:NAME, or '*'), "
            "or set [sandbox] default_allow in the config file",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if name is not None:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise UsageError("--name is not UTF-8 text") from None
    parsed = Grants.parse(grants)  # a malformed grant is refused before any daemon starts
    if cfg is not None:
        _warn_grants(parsed, cfg)
    cap = secrets.token_hex(32) if capability else None
    payload: dict[str, Any] = {
        "grants": grants,
        "allow_uids": allow_uids,
        # (A name given is checked, not cut; the command's own file name is
        # made sendable: bytes that are not UTF-8 become U+FFFD.)
        "name": name or os.fsencode(Path(cmd[0]).name).decode("utf-8", "replace")[:128],
    }
    if cap:
        payload["capability"] = cap
    opened = open_session(control, payload)
    sid, sock = str(opened["session"]), str(opened["socket"])
    if allow_uids:
        _note_closed_path(Path(sock))
    env = dict(os.environ, CREDPROXY_SOCKET=sock, LLXPRT_CREDENTIAL_SOCKET=sock)
    # A token or descriptor named by an enclosing session means nothing here
    # (CMD gets no descriptor above 2 but ours), and the client would prefer it.
    for var in (CAPABILITY_ENV, *CAPABILITY_FD_ENV):
        env.pop(var, None)
    if cap:
        env.update(dict.fromkeys(CAPABILITY_FD_ENV, str(CAPABILITY_FD)))
    argv = [a.replace("{socket}", sock) for a in cmd]
    try:
        return _run_child(argv, env, capability=cap)
    finally:
        try:
            with Client(control, timeout=15) as c:
                c.call("close_session", {"session": sid})
        except CredproxyError:
            # (This launcher still runs, so its own exit did not close it.)
            print(
                "credproxy run: warning: the session ended before the command did (the daemon "
                "stopped or restarted meanwhile): the sandbox lost its socket, and what it "
                "asked for after that failed",
                file=sys.stderr,
            )


def _note_closed_path(sock: Path) -> None:
    """Say so when another uid cannot reach *sock* by its path (a 0700 parent).

    The daemon opens the socket and the directories it owns to other uids;
    the ones above (``/run/user/UID`` is 0700) are the user's. Bind-mounting
    the socket into the sandbox (``{socket}``) needs no path on the host.
    """
    for parent in sock.parents:
        try:
            searchable = os.stat(parent).st_mode & stat.S_IXOTH
        except OSError:
            continue
        if not searchable:
            print(
                f"credproxy run: note: other uids cannot reach {sock} by its path, "
                f"because {parent} is not searchable by them; bind-mount the socket into "
                "the sandbox ({socket}) or use a CREDPROXY_RUNTIME_DIR they can search",
                file=sys.stderr,
            )
            return


def _config(control: Path) -> Config | None:
    """The config file's settings; None if it is bad but a running daemon keeps a good one.

    Raises:
        ConfigError: the file is bad and no daemon runs (one would not start on it):
            the file, line and field, and what to do.
    """
    path = paths.config_file()
    try:
        return paths.load_config(path)
    except ConfigError as exc:
        if _ping(control) is not None:
            print(
                f"credproxy run: warning: {exc}; the running daemon keeps the configuration "
                f"it runs with until {path} is fixed",
                file=sys.stderr,
            )
            return None
        raise ConfigError(f"{exc}; fix {path}, then run this again") from None


def _warn_grants(grants: Grants, cfg: Config) -> None:
    """Say at once which grants give the sandbox nothing, and the fix (the sandbox is not told)."""
    from credproxy.core.grantcheck import grant_problems
    from credproxy.shell.store import TokenStore

    try:
        store = TokenStore(paths.state_dir())
        stored = {(p, b) for p in store.providers() for b in store.buckets(p)}
        keys = store.key_names()
    except (CredproxyError, OSError):
        return  # the store cannot be listed: the daemon says why when it starts
    for problem in grant_problems(grants, cfg.providers, stored, keys, str(paths.config_file())):
        says = problem.cause == "no_api_section" or (
            problem.cause == "no_login" and problem.grant.startswith("api:")
        )
        told = (
            "its API requests get a 404 that says so"
            if says
            else 'the sandbox is told only "not found"'
        )
        print(f"credproxy run: warning: {problem.line()} ({told}; running anyway)", file=sys.stderr)


def _run_child(argv: list[str], env: dict[str, str], *, capability: str | None) -> int:
    try:
        child = _spawn(argv, env, capability)
    except OSError as exc:
        print(f"credproxy run: cannot start {argv[0]}: {exc.strerror}", file=sys.stderr)
        return EXIT_COMMAND_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
    return wait_forwarding_signals(child)


def _spawn(argv: list[str], env: dict[str, str], capability: str | None) -> subprocess.Popen[bytes]:
    """Start CMD; with *capability*, CMD's fd 3 is a sealed memfd holding it.

    CMD inherits no descriptor above 2 but that one (``close_fds``, as
    without ``--capability``). The memfd is close-on-exec in this process and
    is closed here once CMD has its copy, so nothing else this launcher starts
    (the daemon, started earlier) can inherit it.

    ``pass_fds`` keeps a descriptor at the number it has here, so the memfd is
    placed at fd 3 of this process for the instant of the spawn. Whatever this
    process had on fd 3 is moved aside and put back afterwards, untouched. If
    that was a descriptor inherited from the caller (``credproxy run ... 3<file``),
    CMD would not have received it anyway (fds above 2 are never passed on);
    a note on stderr says that CMD's fd 3 is the capability instead.
    """
    if capability is None:
        return subprocess.Popen(argv, env=env)
    saved = _move_aside(CAPABILITY_FD)
    try:
        if saved is not None and saved[1]:
            print(
                f"credproxy run: note: CMD gets the capability token on fd {CAPABILITY_FD}; "
                f"the fd {CAPABILITY_FD} that credproxy run inherited is not passed on "
                "(no descriptor above 2 is)",
                file=sys.stderr,
            )
        memfd = _capability_memfd(capability)
        if memfd != CAPABILITY_FD:
            os.dup2(memfd, CAPABILITY_FD, inheritable=False)
            os.close(memfd)
        # Popen makes fd 3 inheritable in the child only, after the fork.
        return subprocess.Popen(argv, env=env, pass_fds=(CAPABILITY_FD,))
    finally:
        _put_back(CAPABILITY_FD, saved)


def _capability_memfd(token: str) -> int:
    """A sealed, close-on-exec memfd holding *token* and a newline.

    Why a memfd and not a pipe: a pipe's content goes to its first reader, but
    fd 3 is inherited by every process of the sandbox, and `credproxy token`
    runs many times there, each a new process. A memfd read with ``pread`` at
    offset 0 (what :mod:`credproxy.inner.client` does) gives the whole token to
    every reader, every time, and moves nothing. llxprt's CLI reads fd 3 once
    at start-up with plain ``read`` until end of file (at most 128 bytes,
    ``^[0-9a-f]{64}\\n$``) and closes it: from a fresh memfd at offset 0 that
    is the same as reading a pipe; it does move the offset that all inheritors
    share, which ``pread`` readers do not mind. The seals (no write, grow,
    shrink, or further seals) mean no process in the sandbox can change what
    the others read. Like an environment variable, the descriptor is readable
    by every process that holds it (and through ``/proc/PID/fd`` by those that
    may ptrace a holder); unlike one, it is not copied into every descendant's
    environment, not printed by ``env``, and a reader that wants it confined
    (llxprt) closes it, so its children never see it.
    """
    try:
        fd = os.memfd_create("credproxy-capability", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:  # e.g. a seccomp filter of an enclosing sandbox
        raise CredproxyError(
            f"cannot create the capability descriptor (memfd_create: {exc.strerror}); "
            "run without --capability"
        ) from None
    try:
        os.write(fd, f"{token}\n".encode())  # 65 bytes into fresh memory: never short
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.lseek(fd, 0, os.SEEK_SET)  # for readers that use plain read (llxprt)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _move_aside(fd: int) -> tuple[int, bool] | None:
    """Duplicate what is open on *fd* elsewhere: (the copy, was it inheritable), or None."""
    try:
        inheritable = os.get_inheritable(fd)
    except OSError:
        return None  # not open
    return os.dup(fd), inheritable


def _put_back(fd: int, saved: tuple[int, bool] | None) -> None:
    """Restore *fd* as :func:`_move_aside` found it (closed, if it was not open)."""
    if saved is None:
        with contextlib.suppress(OSError):
            os.close(fd)
        return
    copy, inheritable = saved
    os.dup2(copy, fd, inheritable=inheritable)
    os.close(copy)


def _check_socket_room(longest: Path) -> None:
    """Refuse a runtime directory too deep for the sockets under it (*longest*, a session's).

    Deeper, neither the daemon nor a session could listen, and the failure
    would come late and vague.

    Raises:
        UsageError: the path is too long (the message says what to do).
    """
    why = paths.socket_path_too_long(longest)
    if why is not None:
        raise UsageError(
            f"the runtime directory {longest.parent.parent} is too deep for its session "
            f"sockets: {why}"
        )


def open_session(control: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Open a session with *payload* on the daemon at *control*, starting one if none answers.

    The daemon that answered :func:`ensure_daemon` can be gone by the time the
    session is asked for (it was stopped in between): then a daemon is made sure
    of once more and, if that is another one, the session asked for again.

    Raises:
        DaemonUnavailable: no daemon came up; the one that answered did not
            answer the session (too slow: it is not asked twice); or the
            daemon went away twice.
        CredproxyError: the daemon refused the session (its error).
    """

    def ask() -> dict[str, Any]:
        with Client(control, timeout=15) as c:
            return c.call("open_session", payload)

    pid = ensure_daemon(control)
    try:
        return ask()
    except DaemonUnavailable:
        if ensure_daemon(control) == pid:
            raise  # the same daemon is there: it did not go away, it did not answer
        return ask()


def ensure_daemon(control: Path) -> int:
    """Make sure a daemon answers on *control*, starting one if needed; returns its pid.

    Raises:
        DaemonUnavailable: none came up in time (its log is named).
    """
    pong = _ping(control)
    if pong is not None:
        mismatch = version_mismatch(pong.get("version"))
        if mismatch is not None:
            print(f"credproxy run: warning: {mismatch}", file=sys.stderr)
        return int(pong["pid"])
    silent = silent_daemon(control)
    if silent is not None:  # (not one to replace: it holds the socket and the lock)
        raise DaemonUnavailable(silent)
    unit = _enabled_socket_unit()
    if unit is not None:
        # The socket unit should have answered: say so instead of covering up
        # a service that fails to start.
        print(
            f"credproxy run: nothing answers on {control} although credproxy.socket is "
            "enabled; "
            "starting a daemon in the background instead (see `systemctl --user status "
            "credproxy.socket credproxy.service`)",
            file=sys.stderr,
        )
    runtime = control.parent
    old = os.umask(0o077)
    try:
        # The daemon checks the runtime directory too, but the log is opened
        # here first: refuse a directory of someone else's and a planted
        # symlink before writing anything there.
        repaired = paths.secure_dir(
            runtime, what="runtime directory", allowed=(paths.PRIVATE, paths.SEARCHABLE)
        )
        if repaired is not None:
            print(
                f"credproxy run: warning: the runtime directory {runtime} was mode "
                f"{repaired:04o} (open to other users); it is 0700 now",
                file=sys.stderr,
            )
        log_path = runtime / "daemon.log"
        log_fd = paths.open_nofollow(log_path, os.O_WRONLY | os.O_APPEND, "daemon log")
        with open(log_fd, "ab") as log_file:
            try:
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
            except OSError as exc:  # (out of processes or memory)
                raise DaemonUnavailable(
                    f"cannot start the credproxy daemon ({exc.strerror})"
                ) from None
    finally:
        os.umask(old)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        pong = _ping(control)
        if pong is not None:  # (the daemon started here: this version)
            return int(pong["pid"])
        time.sleep(0.02)
    raise DaemonUnavailable(f"the credproxy daemon did not start; see {log_path}")


def _enabled_socket_unit() -> Path | None:
    """The link `systemctl --user enable credproxy.socket` made, if the user enabled it."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    link = Path(config_home) / "systemd" / "user" / "sockets.target.wants" / "credproxy.socket"
    return link if os.path.lexists(link) else None


def version_mismatch(running: object) -> str | None:
    """What to say when the running daemon (version *running*) is not this credproxy's."""
    if running == __version__:
        return None
    return (
        f"the running daemon is version {running}, this credproxy {__version__}: "
        "`credproxy stop` and the next command starts this one"
    )


def _ping(control: Path) -> dict[str, Any] | None:
    """The answer (pid, version) of the daemon on *control*; None if none answers."""
    try:
        with Client(control, timeout=5) as c:
            return c.call("ping")
    except (DaemonUnavailable, UsageError):
        return None
