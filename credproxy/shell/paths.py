"""Where credproxy keeps its files.

Defaults come from platformdirs; ``CREDPROXY_CONFIG``, ``CREDPROXY_STATE_DIR`` and
``CREDPROXY_RUNTIME_DIR`` override them (tests and packagers use these).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from credproxy.errors import ConfigError, CredproxyError

if TYPE_CHECKING:
    from credproxy.core.config import Config

APP = "credproxy"


def config_file() -> Path:
    """The TOML configuration file (it need not exist)."""
    override = os.environ.get("CREDPROXY_CONFIG")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def load_config(path: Path | None = None) -> Config:
    """Read and validate the configuration (*path*, else :func:`config_file`).

    A missing file gives the defaults; :func:`credproxy.core.config.parse` is
    the pure part.

    Raises:
        ConfigError: naming the file, the line and the field at fault.
    """
    from credproxy.core import config

    if path is None:
        path = config_file()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return config.Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from None
    return config.parse(text, path)


def state_dir() -> Path:
    """The token store: ``tokens/``, ``keys/`` and ``locks/`` live here."""
    override = os.environ.get("CREDPROXY_STATE_DIR")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_state_dir(APP))


def runtime_dir() -> Path:
    """Sockets: the control socket and one socket per sandbox session."""
    override = os.environ.get("CREDPROXY_RUNTIME_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / APP
    # Without XDG_RUNTIME_DIR (a container, CI, su) use the same per-uid
    # directory platformdirs falls back to, without its warning; the daemon
    # creates it 0700 and refuses one it does not own.
    return Path("/tmp") / f"runtime-{os.getuid()}" / APP  # noqa: S108


def control_socket() -> Path:
    """The host-only admin socket (sandboxes never see it)."""
    return runtime_dir() / "credproxy.sock"


def sessions_dir() -> Path:
    """Directory of the per-sandbox session sockets."""
    return runtime_dir() / "s"


UNIX_PATH_MAX = 108  # a Unix socket path's room on Linux (sun_path), its final NUL included


def socket_path_too_long(path: Path) -> str | None:
    """Why *path* cannot be a Unix socket's (too long, and what to do), or None if it can."""
    size = len(os.fsencode(path))
    if size < UNIX_PATH_MAX:
        return None
    return (
        f"the path is {size} bytes, and a Unix socket's may have {UNIX_PATH_MAX - 1} at "
        "most; set CREDPROXY_RUNTIME_DIR (or XDG_RUNTIME_DIR) to a shorter directory"
    )


PRIVATE = 0o700
SEARCHABLE = 0o711  # others may pass through (to a socket opened for them), never list


def secure_dir(
    path: Path,
    *,
    what: str,
    allowed: tuple[int, ...] = (PRIVATE,),
    follow_symlinks: bool = False,
) -> int | None:
    """Create *path* (mode 0700, parents too) and make sure only we control it.

    A directory that belongs to another uid, or is not a directory (a symlink
    included: whoever could plant it chose where our files go), is refused. A
    mode outside *allowed* (say a group- or world-writable 0777) is repaired to
    0700 through a descriptor, so the check and the repair act on the same
    directory. With *follow_symlinks* (the state directory, which users may
    keep on another disk) a symlink is followed and its target checked.
    Returns the old mode when it repaired one, so that the caller can say so;
    ``None`` when nothing needed repairing.

    Raises:
        CredproxyError: the directory cannot be used; the message names it.
    """
    try:
        path.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a dangling symlink or a file: reported below
    except OSError as exc:
        raise CredproxyError(f"cannot create the {what} {path}: {exc.strerror}") from None
    try:
        nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | nofollow | os.O_CLOEXEC)
    except OSError as exc:
        if not follow_symlinks and os.path.islink(path):
            raise CredproxyError(
                f"the {what} {path} is a symbolic link; refusing to use it "
                "(remove it, or point the CREDPROXY_* variable at the real directory)"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise CredproxyError(
                f"the {what} {path} is not a directory; remove it and retry"
            ) from None
        raise CredproxyError(f"cannot open the {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise CredproxyError(
                f"the {what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
                "refusing to use it"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode in allowed:
            return None
        os.fchmod(fd, PRIVATE)
        return mode
    finally:
        os.close(fd)


def set_dir_mode(path: Path, mode: int) -> None:
    """Set the mode of our directory *path* if it differs, never through a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def open_nofollow(path: Path, flags: int, what: str) -> int:
    """``os.open`` a file we create or append to, refusing a symlink or someone else's file.

    Raises:
        CredproxyError: *path* is a symlink, not a regular file, or not ours.
    """
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CredproxyError(
                f"{path} is a symbolic link; refusing to write the {what} through it (remove it)"
            ) from None
        raise CredproxyError(f"cannot open the {what} {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise CredproxyError(
            f"{path} is not a regular file of yours; refusing to use it as the {what} (remove it)"
        )
    return fd
