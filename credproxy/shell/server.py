"""Unix-socket listeners: private directories, binding, peer credentials (trio shell).

What happens on a connection once it is accepted lives in
:mod:`credproxy.shell.servingloop` (sandbox sockets) and
:mod:`credproxy.shell.streams` (the control socket).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket as stdsocket
import stat
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio

from credproxy.core import httprules
from credproxy.core.protocol import handshake_error
from credproxy.errors import CredproxyError
from credproxy.shell import logs, paths

log = logs.get("credproxy.server")
_PEERCRED = struct.Struct("3i")


class AlreadyRunning(CredproxyError):
    """Another daemon answers on the socket path."""


def make_private_dir(path: Path, *, searchable_ok: bool = True) -> None:
    """Create *path* 0700 (parents too) and refuse one that is not ours.

    A directory with any other mode (group- or world-writable, say) is
    repaired to 0700 and a warning says so. 0711 is what
    :func:`open_path_for_others` sets while a session admits other uids; with
    *searchable_ok* it is left alone (other sessions may rely on it), without
    it (daemon start, when no session exists) it is quietly closed to 0700.

    Raises:
        CredproxyError: the directory belongs to someone else or is a symlink.
    """
    allowed = (paths.PRIVATE, paths.SEARCHABLE) if searchable_ok else (paths.PRIVATE,)
    old = paths.secure_dir(path, what="runtime directory", allowed=allowed)
    if old is not None and old != paths.SEARCHABLE:
        log.warning("directory_repaired", path=str(path), mode=f"{old:04o}", now="0700")


def open_path_for_others(dirs: Sequence[Path], socket_dir: Path, *, opening: bool) -> None:
    """Let other uids pass through *dirs* while a socket in *socket_dir* admits them.

    A socket is reachable by its path only when every directory above it is
    searchable. The directories credproxy owns are 0700; while at least one
    session socket in *socket_dir* is open to other uids (mode 0666), they
    become 0711: searchable, never listable, never writable. Everything else
    in them keeps its own mode (the control socket, ``daemon.lock`` and the
    sockets of other sessions are 0600), and the daemon's ``SO_PEERCRED`` check
    still refuses every uid the session did not name. Once no such socket is
    left, the next session opened closes them to 0700 again (*opening* says
    whether the socket just bound is one for others).
    """
    shared = opening or (
        # Only when the directories are open is it worth a look at every socket.
        any(stat.S_IMODE(os.lstat(d).st_mode) != paths.PRIVATE for d in dirs)
        and _any_socket_for_others(socket_dir)
    )
    mode = paths.SEARCHABLE if shared else paths.PRIVATE
    for d in dirs:
        paths.set_dir_mode(d, mode)
    if shared:
        closed = _first_closed_ancestor(dirs[0]) if dirs else None
        if closed is not None:
            log.warning(
                "socket_path_closed",
                directory=str(closed),
                why="other uids cannot search it: bind-mount the session socket instead",
            )


def _any_socket_for_others(directory: Path) -> bool:
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISSOCK(st.st_mode) and st.st_mode & stat.S_IWOTH:
                    return True
    return False


def _first_closed_ancestor(path: Path) -> Path | None:
    for parent in path.parents:
        with contextlib.suppress(OSError):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return parent
    return None


async def bind_unix(
    path: Path,
    backlog: int = 1024,
    *,
    for_others: bool = False,
    path_dirs: Sequence[Path] = (),
) -> trio.socket.SocketType:
    """Bind and listen on *path*, reclaiming a stale socket file safely.

    The socket is born 0600: it is bound under umask 177 (no chmod window),
    synchronously, so no other task runs while the process umask is changed.
    With *for_others* (a session with ``--allow-uid``) it is born 0666 instead,
    because the kernel checks write permission on the socket file before the
    daemon ever sees the peer; :func:`open_path_for_others` then makes
    *path_dirs* (the directories credproxy owns on the way to it) searchable,
    or closes them again when no socket for others is left.
    If the path is taken, it is reclaimed only when it is a socket and a
    probe-connect is refused (its daemon is gone); a live listener raises
    :class:`AlreadyRunning` and anything that is not a socket is left alone.
    """
    umask = 0o111 if for_others else 0o177
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        try:
            _bind_with_umask(sock, path, umask)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                # ("AF_UNIX path too long" has no errno)
                why = paths.socket_path_too_long(path) or exc.strerror or str(exc)
                raise CredproxyError(f"cannot bind {path}: {why}") from None
            await _reclaim(path)
            _bind_with_umask(sock, path, umask)
        sock.listen(backlog)
        if path_dirs:
            open_path_for_others(path_dirs, path.parent, opening=for_others)
    except BaseException:
        sock.close()
        raise
    return trio.socket.from_stdlib_socket(sock)


def _bind_with_umask(sock: stdsocket.socket, path: Path, umask: int) -> None:
    old = os.umask(umask)
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


#: The HTTP status a refusal has for a peer that speaks HTTP (the API proxy's clients).
_REFUSAL_STATUS = {"UNAUTHORIZED": 403, "RESOURCE_EXHAUSTED": 503}
REFUSE_PEEK = 0.5  # seconds to wait for the peer's first byte, which tells HTTP from frames


async def refuse(
    sock: trio.socket.SocketType, code: str, message: str, *, peek: bool = True
) -> None:
    """Tell a refused peer why, then close.

    The peer speaks first on a session socket: a frame header starts with
    0x00, an HTTP request with a letter. An HTTP client (the API proxy's,
    directly or through ``credproxy forward``) gets an HTTP answer it can show;
    anyone else, one handshake-shaped error frame. Without *peek*, the peer
    is not waited for: the frame goes at once.
    """
    with sock, trio.move_on_after(1), contextlib.suppress(OSError):
        first = b""
        if peek:
            with trio.move_on_after(REFUSE_PEEK):
                first = await sock.recv(1, stdsocket.MSG_PEEK)
        if first.isalpha():
            status = _REFUSAL_STATUS.get(code, 403)
            extra = [(b"retry-after", b"1")] if status == 503 else []
            await send_all(sock, httprules.refusal(status, message, extra))
        else:
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
