"""Unix-socket listeners: private directories, binding, peer credentials (trio shell).

What happens on a connection once it is accepted lives in
:mod:`credproxy.shell.fastpath` (sandbox sockets) and
:mod:`credproxy.shell.streams` (the control socket).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket as stdsocket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from credproxy.core.protocol import handshake_error
from credproxy.errors import CredproxyError
from credproxy.shell import logs

log = logs.get("credproxy.server")
_PEERCRED = struct.Struct("3i")


class AlreadyRunning(CredproxyError):
    """Another daemon answers on the socket path."""


def make_private_dir(path: Path) -> None:
    """Create *path* 0700 (parents too) and refuse one that is not ours or is open.

    Raises:
        CredproxyError: the directory belongs to someone else or is a symlink.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CredproxyError(f"{path} is not a directory; remove it and retry")
    if st.st_uid != os.getuid():
        raise CredproxyError(f"{path} belongs to uid {st.st_uid}; refusing to put sockets there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


async def bind_unix(path: Path, backlog: int = 1024) -> trio.socket.SocketType:
    """Bind and listen on *path*, reclaiming a stale socket file safely.

    The socket is born 0600: it is bound under umask 177 (no chmod window),
    synchronously, so no other task runs while the process umask is changed.
    If the path is taken, it is reclaimed only when it is a socket and a
    probe-connect is refused (its daemon is gone); a live listener raises
    :class:`AlreadyRunning` and anything that is not a socket is left alone.
    """
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        try:
            _bind_private(sock, path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise CredproxyError(f"cannot bind {path}: {exc.strerror}") from None
            await _reclaim(path)
            _bind_private(sock, path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


def _bind_private(sock: stdsocket.socket, path: Path) -> None:
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)


async def _reclaim(path: Path) -> None:
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        raise CredproxyError(f"{path} exists and is not a socket; remove it and retry")
    probe = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    with probe:
        try:
            with trio.fail_after(2):
                await probe.connect(str(path))
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: the daemon that bound it is gone
            return
        except (OSError, trio.TooSlowError):
            pass
    raise AlreadyRunning(f"another credproxy daemon is listening on {path}")


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, as the kernel reports it (SO_PEERCRED)."""
    raw = sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


async def refuse(sock: trio.socket.SocketType, code: str, message: str) -> None:
    """Tell a refused peer why (one handshake-shaped error frame), then close."""
    with sock, trio.move_on_after(1), contextlib.suppress(OSError):
        await send_all(sock, handshake_error(code, message))


async def accept_forever(listener: trio.socket.SocketType) -> AsyncIterator[trio.socket.SocketType]:
    """Yield accepted sockets until the listener is closed; ride out fd exhaustion."""
    while True:
        try:
            sock, _ = await listener.accept()
        except trio.ClosedResourceError:
            return  # the listener was closed: shutdown has begun
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept_failed", error=exc.strerror)
                await trio.sleep(0.1)
                continue
            raise
        yield sock
