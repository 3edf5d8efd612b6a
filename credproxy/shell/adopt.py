"""The file I/O of adopting another tool's login (the parsing is ``credproxy/core/adopt.py``).

:func:`read_source` reads a tool's credentials file; :func:`retire_source`
keeps a 0600 backup of it and then replaces it atomically (temp file in the
same directory, fsync, rename, fsync the directory) with the same JSON whose
refresh token is :data:`~credproxy.core.adopt.RETIRED_MARKER`. The tool
therefore sees its old file or the retired one, never a half-written file.

Nothing here prints or logs a token; errors name the file and the reason.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from credproxy.core.adopt import AdoptError, refresh_token_of, retire_text
from credproxy.errors import CredproxyError, NotFound

__all__ = ["BACKUP_SUFFIX", "read_source", "retire_source"]

#: The backup of a retired file is ``<file><BACKUP_SUFFIX>`` (``.1``, ``.2`` … if taken).
BACKUP_SUFFIX = ".credproxy-backup"


def read_source(path: Path) -> str:
    """The text of the credentials file at *path*.

    Raises:
        NotFound: there is no such file (exit 3, the "not found" code).
        AdoptError: the file cannot be read or is not UTF-8 (names the file).
    """
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist (give the file's path after the provider)") from None
    except OSError as exc:
        raise AdoptError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AdoptError(f"{path} is not UTF-8 text") from None


def retire_source(tool: str, path: Path, adopted_refresh_token: str) -> Path:
    """Back up *path* (0600) and replace its refresh token with the retired marker.

    *adopted_refresh_token* is the token credproxy stored; if the file now
    holds another one (the tool refreshed after we read it), nothing is
    changed and AdoptError says so: retiring would throw away the newer token
    while credproxy holds a spent one.

    Returns:
        The backup's path.

    Raises:
        AdoptError: the file changed, cannot be parsed, or cannot be written.
    """
    path = path.resolve()  # a symlinked file (dotfiles) is replaced at its target
    text = read_source(path)
    if refresh_token_of(tool, text, str(path)) != adopted_refresh_token:
        raise AdoptError(
            f"{path} changed since it was read (the tool refreshed its login); "
            "nothing was retired: run the import again"
        )
    retired = retire_text(tool, text, str(path))
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) & 0o600 or 0o600
        backup = _write_backup(path, text)
        _replace(path, retired, mode)
    except OSError as exc:
        raise AdoptError(f"cannot retire {path}: {exc.strerror}") from None
    return backup


def _write_backup(path: Path, text: str) -> Path:
    """Write *text* to a new 0600 file beside *path* (never overwriting an old backup)."""
    for n in range(1000):
        backup = path.with_name(path.name + BACKUP_SUFFIX + (f".{n}" if n else ""))
        try:
            fd = os.open(
                backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            _write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return backup
    raise CredproxyError(f"too many backups of {path}; remove old {BACKUP_SUFFIX} files")


def _replace(path: Path, text: str, mode: int) -> None:
    """Atomically replace *path* with *text* (mode *mode*), durably."""
    tmp = path.with_name(f".{path.name}.credproxy-{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
