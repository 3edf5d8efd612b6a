"""The on-disk token and API-key store.

Layout under the state directory (directories 0700, files 0600)::

    tokens/<provider>/<bucket>.json   one token per file
    keys/<name>                       one API key per file (the raw value)
    locks/<provider>/<bucket>.lock    per-key flock targets (never renamed)

Writes are atomic and durable: a temp file in the same directory is written,
fsynced, renamed over the target, and the directory is fsynced. A reader
therefore sees the old token or the new one, never a truncated file, and a
crash at any point leaves one of the two on disk.

Locks are separate files because the token file is replaced by rename on
every write: an flock on it would lock an inode that is about to be unlinked.

A refresh writes through a :class:`Reservation`: the temp file is created and
its blocks allocated (``posix_fallocate``) *before* the refresh request goes
out, so a full disk is found while the old refresh token is still good, and
the answer, once it arrives, goes into space that is already ours (one
``pwrite``, no directory operation) before anything else happens.

This module is synchronous (plain ``os`` calls). The daemon calls it from
its event loop: a token write (one small file, two fsyncs) happens once per
refresh, and keeping it on the loop means no await separates an upstream
answer from its durable write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import msgspec

from credproxy.core.names import DEFAULT_BUCKET, check_name, is_name
from credproxy.errors import StoreError
from credproxy.shell.faults import NO_FAULTS, Faults

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()

RESERVE_MIN = 8192  # bytes claimed for a token write: a token with an id_token is a few KiB


class Reservation:
    """A temp file with its space allocated, waiting for one write (see :meth:`TokenStore.reserve`).

    Until :meth:`commit` the file holds zeros, which never decode as a token,
    so :meth:`TokenStore.recover_pending` ignores (and removes) it.
    """

    __slots__ = ("fault", "fd", "path", "size", "tmp")

    def __init__(self, path: Path, tmp: Path, fd: int, size: int, fault: Faults) -> None:
        self.fault = fault
        self.path = path
        self.tmp = tmp
        self.fd: int | None = fd
        self.size = size

    def commit(self, data: bytes) -> None:
        """Write *data* into the reserved file and rename it into place, durably.

        The bytes reach the file first (one ``pwrite`` into allocated blocks,
        padded with spaces, which JSON ignores, so the file decodes whole at
        every instant), then fsync, rename and fsync of the directory. After
        the ``pwrite`` a SIGKILL loses nothing: the next holder of the key's
        lock adopts the temp file.

        Raises:
            StoreError: a step failed; the reservation is released.
        """
        fd = self.fd
        if fd is None:
            raise StoreError(f"cannot write {self.path}: reservation already used")
        self.fd = None
        try:
            try:
                padded = data + b" " * (self.size - len(data))
                view = memoryview(padded)
                offset = 0
                while offset < len(padded):
                    offset += os.pwrite(fd, view[offset:], offset)
                self.fault("store-written")
                with suppress(OSError):  # the padding is harmless if this fails
                    os.ftruncate(fd, len(data))
                os.fsync(fd)
            finally:
                os.close(fd)
            self.fault("store-fsynced")
            os.rename(self.tmp, self.path)
            self.fault("store-renamed")
            _fsync_dir(self.path.parent)
        except OSError as exc:
            with suppress(OSError):
                os.unlink(self.tmp)
            raise StoreError(f"cannot write {self.path}: {exc.strerror}") from None

    def release(self) -> None:
        """Give the space back without writing (the refresh produced nothing to store)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
            with suppress(OSError):
                os.unlink(self.tmp)


class TokenStore:
    """Tokens and API keys under *root* (see the module docstring)."""

    def __init__(self, root: Path, fault: Faults = NO_FAULTS) -> None:
        self.root = root
        self.fault = fault  # the crash tests' checkpoints (credproxy.shell.faults)
        self.tokens_dir = root / "tokens"
        self.keys_dir = root / "keys"
        self.locks_dir = root / "locks"
        # Private keys of the signing grants (docs/signing.md): never served to a
        # sandbox (unlike keys/, which grants can name), only read by the daemon.
        self.signing_dir = root / "signing"
        # (provider, bucket) -> token file path, for tokens that exist (so a
        # sandbox asking for made-up buckets cannot grow it).
        self._token_paths: dict[tuple[str, str], str] = {}

    # -- paths --

    def token_path(self, provider: str, bucket: str = DEFAULT_BUCKET) -> Path:
        check_name("provider", provider)
        check_name("bucket", bucket)
        return self.tokens_dir / provider / f"{bucket}.json"

    def key_path(self, name: str) -> Path:
        return self.keys_dir / check_name("key", name)

    def lock_path(self, provider: str, bucket: str) -> Path:
        check_name("provider", provider)
        check_name("bucket", bucket)
        return self.locks_dir / provider / f"{bucket}.lock"

    # -- tokens --

    def read(self, provider: str, bucket: str = DEFAULT_BUCKET) -> dict[str, Any] | None:
        """The stored token, or ``None`` if there is none.

        Raises:
            StoreError: the file exists but cannot be read or is not a token.
        """
        return self._read_json(self.token_path(provider, bucket))

    def read_with_signature(
        self, provider: str, bucket: str = DEFAULT_BUCKET
    ) -> tuple[dict[str, Any] | None, tuple[int, int] | None]:
        """The token and the :meth:`signature` of the file it was read from."""
        path = self.token_path(provider, bucket)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        return self._decode(path, data), (st.st_ino, st.st_mtime_ns)

    def signature(self, provider: str, bucket: str = DEFAULT_BUCKET) -> tuple[int, int] | None:
        """(inode, mtime) of the token file, or ``None``: changes on every write.

        Every write renames a new file into place, so a different inode means
        a different token; the daemon uses this to keep its in-memory copy
        without re-reading the file on each request.
        """
        path = self._token_paths.get((provider, bucket))
        if path is None:
            path = str(self.token_path(provider, bucket))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._token_paths.pop((provider, bucket), None)
            return None
        except OSError as exc:  # (EIO, ESTALE, ELOOP...: an error of the store, not a crash)
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        self._token_paths[(provider, bucket)] = path
        return (st.st_ino, st.st_mtime_ns)

    def write(self, provider: str, bucket: str, token: dict[str, Any]) -> None:
        """Store *token* atomically and durably (see the module docstring).

        Raises:
            StoreError: it could not be written (full or read-only disk, ...);
                the stored token is unchanged.
        """
        path = self.token_path(provider, bucket)
        self._atomic_write(path, _encoder.encode(token))

    def reserve(
        self, provider: str, bucket: str, like: dict[str, Any] | None = None
    ) -> Reservation:
        """Claim the space for the next write of a token, before asking for it.

        The size is twice that of *like* (the token being refreshed), at least
        :data:`RESERVE_MIN`. Call it holding the key's lock; :meth:`Reservation.commit`
        or :meth:`Reservation.release` the result.

        Raises:
            StoreError: no space, a read-only disk, or another I/O error.
        """
        path = self.token_path(provider, bucket)
        size = RESERVE_MIN if like is None else max(RESERVE_MIN, 2 * len(_encoder.encode(like)))
        return _reserve(path, size, self.fault)

    def recover_pending(self, provider: str, bucket: str = DEFAULT_BUCKET) -> bool:
        """Adopt the token that a killed write left in a temp file; True if one was.

        A refresh writes the rotated token to a temp file before renaming it
        into place. If the process dies between the two, the old refresh
        token on disk is already spent at the IdP, while the temp file holds
        the live one. Call this only while holding the key's lock (no write
        of this key is in progress then). Every writer of a key calls it first
        under that lock, and a writer that holds a newer token than a temp
        file of its own failed write (the daemon saving a token it kept in
        memory) removes them instead (:meth:`discard_pending`): so a complete
        temp file is the answer of the last writer, newer than the stored
        token whatever their expiries say (an answer without ``expires_in``
        has none; one received after the wall clock was put back has an
        earlier one). It is renamed into place (the most recent, should there
        be more). Every temp file of the key is removed.

        Raises:
            StoreError: a complete temp token exists but could not be put in
                place (read-only disk, ...); do not refresh from the older one.
        """
        pending = self._pending(provider, bucket)
        if not pending:
            return False
        best: tuple[int, Path] | None = None
        for tmp in pending:
            try:
                self._decode(tmp, tmp.read_bytes())
                written = tmp.stat().st_mtime_ns
            except (OSError, StoreError):
                continue  # truncated, never written (zeros) or unreadable: never adopted
            if best is None or written > best[0]:
                best = (written, tmp)
        if best is not None:
            path = self.token_path(provider, bucket)
            try:
                fd = os.open(best[1], os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(best[1], path)
                _fsync_dir(path.parent)
            except OSError as exc:
                # The newer token stays in its temp file for the next try;
                # refreshing from the older one on disk would spend a spent token.
                raise StoreError(
                    f"cannot adopt the newer token left in {best[1].name}: {exc.strerror}"
                ) from None
        for tmp in pending:
            with suppress(OSError):
                tmp.unlink()
        return best is not None

    def discard_pending(self, provider: str, bucket: str = DEFAULT_BUCKET) -> None:
        """Remove the key's temp files, adopting none (the caller holds a newer token).

        For a writer that has just put the newest token in place: what a write
        of its own that failed halfway left behind is older, and adopting it
        would put a spent refresh token over a live one. Call it holding the
        key's lock.

        Raises:
            StoreError: a temp file could not be removed.
        """
        for tmp in self._pending(provider, bucket):
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StoreError(f"cannot remove {tmp}: {exc.strerror}") from None

    def _pending(self, provider: str, bucket: str) -> list[Path]:
        """The key's temp files (writes under way, or left by a killed writer)."""
        path = self.token_path(provider, bucket)
        pattern = re.compile(rf"\.{re.escape(path.name)}~\d+\.\d+\.tmp")
        return [path.parent / n for n in _listdir(path.parent) if pattern.fullmatch(n)]

    def remove(self, provider: str, bucket: str = DEFAULT_BUCKET) -> bool:
        """Delete a token, and what a killed write of it left; False if there was none.

        Call it holding the key's lock: a temp file left by a write that died
        before its rename may hold the login's live refresh token, which goes too.
        """
        path = self.token_path(provider, bucket)
        self.discard_pending(provider, bucket)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot remove {path}: {exc.strerror}") from None
        _fsync_dir(path.parent)
        return True

    def providers(self) -> list[str]:
        return sorted(p for p in _listdir(self.tokens_dir) if is_name(p) and self.buckets(p))

    def buckets(self, provider: str) -> list[str]:
        check_name("provider", provider)
        names = _listdir(self.tokens_dir / provider)
        return sorted(n[:-5] for n in names if n.endswith(".json") and is_name(n[:-5]))

    # -- API keys --

    def read_key(self, name: str) -> str | None:
        path = self.key_path(name)
        try:
            return path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"cannot read key file {path}: {type(exc).__name__}") from None

    def write_key(self, name: str, value: str) -> None:
        self._atomic_write(self.key_path(name), value.encode("utf-8"))

    def remove_key(self, name: str) -> bool:
        return _remove(self.key_path(name))

    def key_names(self) -> list[str]:
        return sorted(n for n in _listdir(self.keys_dir) if is_name(n))

    # -- signing keys --

    def signing_key_path(self, name: str) -> Path:
        return self.signing_dir / check_name("signing key", name)

    def write_signing_key(self, name: str, data: bytes) -> None:
        """Keep a signing grant's private key (the file's bytes, as given) under *name*."""
        self._atomic_write(self.signing_key_path(name), data)

    def remove_signing_key(self, name: str) -> bool:
        return _remove(self.signing_key_path(name))

    def signing_key_names(self) -> list[str]:
        return sorted(n for n in _listdir(self.signing_dir) if is_name(n))

    # -- locking --

    def open_lock(self, provider: str, bucket: str) -> int:
        """Open (creating) the lock file of a key; the caller flocks and closes it.

        On a read-only disk an existing lock file is opened read-only (flock
        does not need write access), so a refresh can still be coordinated.

        Raises:
            StoreError: the lock file does not exist and cannot be created.
        """
        path = self.lock_path(provider, bucket)
        try:
            _makedirs(path.parent)
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (OSError, StoreError) as exc:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                pass
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open lock file {path}: {exc.strerror}") from None

    @contextmanager
    def locked(self, provider: str, bucket: str) -> Iterator[None]:
        """Hold the key's exclusive flock (blocking) for the ``with`` body."""
        fd = self.open_lock(provider, bucket)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    # -- internals --

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        return self._decode(path, data)

    @staticmethod
    def _decode(path: Path, data: bytes) -> dict[str, Any]:
        try:
            obj = _decoder.decode(data)
        except msgspec.DecodeError:
            raise StoreError(f"{path} is not valid JSON; re-import the token") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("access_token"), str):
            raise StoreError(f"{path} does not hold a token; re-import it")
        return obj

    def _atomic_write(self, path: Path, data: bytes) -> None:
        _reserve(path, len(data), self.fault).commit(data)


def _reserve(path: Path, size: int, fault: Faults) -> Reservation:
    """Create a temp file beside *path* and allocate *size* bytes for it."""
    _makedirs(path.parent)
    # "~" is not allowed in names, so a temp file never lists as a token or key.
    tmp = path.with_name(f".{path.name}~{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from None
    try:
        if size:
            _allocate(fd, size)
    except OSError as exc:
        os.close(fd)
        with suppress(OSError):
            os.unlink(tmp)
        raise StoreError(f"cannot write {path}: {exc.strerror}") from None
    return Reservation(path, tmp, fd, size, fault)


def _allocate(fd: int, size: int) -> None:
    """Make sure *size* bytes of *fd* are backed by disk blocks (ENOSPC now, not later)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # A file system without fallocate: writing the bytes claims them as well.
        os.pwrite(fd, bytes(size), 0)


def _remove(path: Path) -> bool:
    """Remove *path* durably; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot remove {path}: {exc.strerror}") from None
    _fsync_dir(path.parent)
    return True


def _makedirs(path: Path) -> None:
    """Create *path* and parents 0700; refuse a directory someone else owns."""
    old = os.umask(0o077)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    try:
        st = path.stat()
        if st.st_uid != os.getuid():
            raise StoreError(f"{path} belongs to uid {st.st_uid}, not to you; refusing to use it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            # Tighten, once, a directory a user or older version made too open.
            os.chmod(path, 0o700)
    except OSError as exc:
        raise StoreError(f"cannot use {path}: {exc.strerror}") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
