"""The three pieces of the systemd service protocol credproxy uses, by hand.

* ``notify()``: sd_notify(3), one datagram of ``KEY=value`` lines to
  ``$NOTIFY_SOCKET`` (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``).
* ``listen_fds()``: sd_listen_fds_with_names(3), the sockets systemd passed us when
  ``credproxy.socket`` activated the daemon.
* ``watchdog_interval()``: sd_watchdog_enabled(3), how often systemd expects
  ``WATCHDOG=1``.

Why not libsystemd or a wrapper package: the protocol is a handful of environment
variables and one datagram, systemd itself publishes a reimplementation in
sd_notify(3) and advises against linking libsystemd just for this, and the
Python bindings ship no wheels. This module is standard library only and never
imports trio, so it can be tested with plain sockets and used from any shell
module.

Every function here is a no-op (``False``, ``[]``, ``None``) outside systemd, so the
daemon calls them unconditionally instead of growing a ``--systemd`` flag.
"""

from __future__ import annotations

import os
import socket

__all__ = ["listen_fds", "notify", "watchdog_interval"]

# sd-daemon.h: passed file descriptors start right after stdin/stdout/stderr.
LISTEN_FDS_START = 3

# sd_listen_fds_with_names(3) names descriptors "unknown" when LISTEN_FDNAMES is
# missing or shorter than LISTEN_FDS.
UNKNOWN_FD_NAME = "unknown"


def _notify_address(value: str) -> str | None:
    """Map ``$NOTIFY_SOCKET`` to an AF_UNIX address, or None if it is not one.

    A leading ``@`` names an abstract socket, which Python spells with a NUL byte.
    Other forms (``vsock:...``, used to notify a VM host) are not for a user
    service and are treated as "not under systemd".
    """
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*fields: str) -> bool:
    """Send ``fields`` to the service manager as one sd_notify(3) message.

    ``notify("READY=1", "STATUS=serving")`` sends ``b"READY=1\\nSTATUS=serving"``.

    Returns True if the datagram was sent. Returns False, and sends nothing, when
    ``$NOTIFY_SOCKET`` is unset, empty or not a path or ``@abstract`` name (not
    running under systemd, or ``Type=`` is not ``notify``), or when ``fields`` is
    empty. Never raises for a failed send either: an ``OSError`` from the socket
    (the manager went away, the socket is gone, the datagram was refused) also
    returns False. The daemon's state does not depend on being heard; a missed
    ``WATCHDOG=1`` is systemd's to act on.

    ``$NOTIFY_SOCKET`` is left in the environment because the watchdog needs it for
    the daemon's whole life; processes the daemon spawns should not inherit it.
    """
    value = os.environ.get("NOTIFY_SOCKET", "")
    address = _notify_address(value)
    if address is None or not fields:
        return False
    message = "\n".join(fields).encode("utf-8")
    # A fresh socket per message: it is called once per watchdog period at most,
    # and a cached socket would need closing, locking and re-creation after errors.
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError:
        return False
    return True


def listen_fds() -> list[tuple[str, socket.socket]]:
    """Take the sockets systemd passed to this process, as ``(name, socket)`` pairs.

    Follows sd_listen_fds_with_names(3) with ``unset_environment`` true: reads
    ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``, then removes all three
    from ``os.environ`` whatever they contained, so that nothing this process spawns
    (a sandbox, a helper) mistakes our descriptors for its own. The descriptors are
    used only when ``LISTEN_PID`` is this process's pid; they are numbered from 3,
    marked close-on-exec, and wrapped with ``socket.socket(fileno=fd)``, which
    detects family and type from the descriptor itself (credproxy.socket passes one
    AF_UNIX stream socket that is already listening, named ``credproxy``). A
    descriptor without a name in ``LISTEN_FDNAMES`` is named ``unknown``.

    Returns an empty list when the variables are missing, malformed, or meant for
    another process (``LISTEN_PID`` differs: we were forked or exec'd by the process
    systemd started). Raises ``OSError`` if a promised descriptor is not open or is
    not a socket (a misconfigured unit, e.g. ``ListenFIFO=``); the sockets already
    wrapped are closed first, so nothing leaks.

    Call it once, early: a second call finds the environment empty and returns
    ``[]``, and the returned socket objects own the descriptors.
    """
    # Read all three before removing any: popping LISTEN_FDNAMES before reading it
    # is a bug seen in practice (every socket came back named "unknown").
    pid_text = os.environ.get("LISTEN_PID")
    count_text = os.environ.get("LISTEN_FDS")
    names_text = os.environ.get("LISTEN_FDNAMES")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)

    if pid_text is None or count_text is None:
        return []
    try:
        pid = int(pid_text)
        count = int(count_text)
    except ValueError:
        return []
    # The pid check is the part reimplementations forget (systemd#37359): without
    # it a child that inherited the environment would adopt its parent's sockets.
    if pid != os.getpid() or count <= 0:
        return []

    names = names_text.split(":") if names_text else []
    result: list[tuple[str, socket.socket]] = []
    try:
        for index in range(count):
            fd = LISTEN_FDS_START + index
            # systemd hands the descriptors over inheritable; sd_listen_fds sets
            # FD_CLOEXEC so they do not leak into every process we exec.
            os.set_inheritable(fd, False)
            name = names[index] if index < len(names) and names[index] else UNKNOWN_FD_NAME
            result.append((name, socket.socket(fileno=fd)))
    except OSError:
        for _, sock in result:
            sock.close()
        raise
    return result


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects ``WATCHDOG=1``, or None for no watchdog.

    Reads ``WATCHDOG_USEC`` (set by ``WatchdogSec=``). Returns None when it is unset,
    not a positive integer, or when ``WATCHDOG_PID`` is set to another process's pid
    (the variables were inherited, not meant for us). A missing ``WATCHDOG_PID`` means
    "this process", as in sd_watchdog_enabled(3). Never raises.

    The caller pings at half this interval, as systemd recommends, so that one
    late wake-up does not get the daemon killed. The variables are left in the
    environment.
    """
    usec_text = os.environ.get("WATCHDOG_USEC")
    pid_text = os.environ.get("WATCHDOG_PID")
    if usec_text is None:
        return None
    try:
        usec = int(usec_text)
        pid = int(pid_text) if pid_text is not None else os.getpid()
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 1_000_000
