"""Reading the signing grants' keys and secrets from files that must be private.

A key file (``private_key``: PEM; ``key_file``: Google's JSON service-account
key), a ``passphrase_file`` and a ``client_secret_file`` of a
``client_credentials`` client are read only if they are **regular files owned
by this user with no permission for group or others** (0600 or stricter).
Anything else is refused with what is wrong and the command that fixes it
(``chmod 600 PATH``), before a byte is read. The file is opened once and
checked with ``fstat`` on that open file, so it cannot be swapped between
the check and the read; a FIFO or a device is never read from (the open does
not block).

An encrypted PEM (``ENCRYPTED`` in its armour) is decrypted with the
passphrase from ``passphrase_file`` or from the standard output of
``passphrase_command``, run without a shell, with no input, under a timeout.
The file is read at every mint, and the key parsed (decrypted) only when its
content differs from the last read's: a command that asks a password manager
runs once per key, and a key replaced in place (the same path, a new key, as
a key rotation does) signs the next mint, whatever the file's times say.

:func:`key_digest` is what a minted token's ``minted_with`` knows of the key:
a SHA-256 of the file's content, so a reload or a restart after a rotation
mints anew rather than serving a token of the revoked key.

Errors are :class:`~credproxy.core.assertions.MintFailed` with cause
``"key"``: they name the file and say why, never a byte of its content, the
passphrase or the command's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from credproxy.core.assertions import MintFailed, SigningKey, algorithm_for, signable
from credproxy.core.config import Provider
from credproxy.core.names import NAME_RULE, is_name

__all__ = ["MAX_KEY_FILE_BYTES", "UNREADABLE_KEY", "SigningKeys", "key_digest", "read_private_file"]

#: A key file, a Google JSON key or a passphrase is a few kilobytes at most.
MAX_KEY_FILE_BYTES = 64 * 1024
#: Seconds a passphrase_command may take.
COMMAND_TIMEOUT = 10.0


def read_private_file(path: str, what: str, *, uid: int | None = None) -> bytes:
    """The bytes of *path* (``~`` expanded), if it is a private regular file of *uid*.

    *what* names the config key in messages (``private_key``). *uid* defaults
    to this process's.

    Raises:
        MintFailed: (cause ``"key"``) missing, unreadable, not a regular file,
            owned by another user, readable or writable by group or others, or
            larger than :data:`MAX_KEY_FILE_BYTES`.
    """
    full = os.path.expanduser(path)
    owner = os.getuid() if uid is None else uid
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MintFailed(f"cannot read {what} {path}: {reason}", "key") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MintFailed(f"{what} {path} is not a regular file", "key")
        if st.st_uid != owner:
            raise MintFailed(
                f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {owner}): "
                f"a key must be your own file (chown {owner} {path}, then chmod 600 {path})",
                "key",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise MintFailed(
                f"{what} {path} has mode {mode:04o}: group or others may read or change it; "
                f"make it private with: chmod 600 {path}",
                "key",
            )
        if st.st_size > MAX_KEY_FILE_BYTES:
            raise MintFailed(
                f"{what} {path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key", "key"
            )
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 16384)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_KEY_FILE_BYTES:
                raise MintFailed(
                    f"{what} {path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key", "key"
                )
            chunks.append(chunk)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MintFailed(f"cannot read {what} {path}: {reason}", "key") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


def _strip_line_end(raw: bytes) -> bytes:
    """*raw* without one trailing newline (a passphrase may end in spaces, a file in a newline)."""
    if raw.endswith(b"\r\n"):
        return raw[:-2]
    if raw.endswith(b"\n"):
        return raw[:-1]
    return raw


@dataclass(frozen=True)
class _Source:
    """Where a provider's key comes from (what the cache is keyed on)."""

    path: str
    what: str  # "private_key" or "key_file"
    passphrase_file: str | None
    passphrase_command: tuple[str, ...] | None


STORE_PREFIX = "store:"  # private_key = "store:NAME": a key kept by `credproxy signing-key import`


def _source(provider: Provider, store_dir: Path | None) -> _Source | None:
    if provider.key_file:
        return _Source(_where(provider.key_file, store_dir), "key_file", None, None)
    if provider.private_key:
        command = tuple(provider.passphrase_command) if provider.passphrase_command else None
        path = _where(provider.private_key, store_dir)
        return _Source(path, "private_key", provider.passphrase_file, command)
    return None


def _where(value: str, store_dir: Path | None) -> str:
    """The file *value* names: a path, or ``store:NAME`` in the daemon's store of signing keys.

    Raises:
        MintFailed: ``store:`` with a bad name, or where there is no store.
    """
    if not value.startswith(STORE_PREFIX):
        return value
    name = value[len(STORE_PREFIX) :]
    if not is_name(name):
        raise MintFailed(f"{value!r}: the name after store: must be a name of {NAME_RULE}", "key")
    if store_dir is None:
        raise MintFailed(f"{value!r}: this process has no store of signing keys", "key")
    return str(store_dir / name)


#: :func:`key_digest` of a key file that cannot be read now (missing, not
#: private, too large): like no content it ever had, so a token minted with it
#: is minted again, and that mint says what is wrong with the file.
UNREADABLE_KEY = "unreadable"


def key_digest(provider: Provider, store_dir: Path | None, *, uid: int | None = None) -> str | None:
    """A SHA-256 of the content of *provider*'s key file, or None when it has none.

    *provider*'s ``private_key`` or ``key_file`` (``store:NAME`` in *store_dir*),
    read as a mint reads it (a private regular file of *uid*), every time: a
    key replaced in place has another digest. :data:`UNREADABLE_KEY` when the
    file cannot be read. Blocking (a file of a few kilobytes at most).

    It goes into ``Provider.minted_with``'s digest, which is stored with the
    token and never served or logged (a SHA-256 of a key says nothing of it).
    """
    try:
        source = _source(provider, store_dir)
        if source is None:
            return None
        data = read_private_file(source.path, source.what, uid=uid)
    except MintFailed:
        return UNREADABLE_KEY
    return _digest(data)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SigningKeys:
    """The signing keys of every provider, loaded on demand and cached.

    A ``passphrase_command`` runs with :func:`trio.run_process` (no shell, no
    input) under *command_timeout* seconds; *uid* is the owner key files
    must have (this process's by default).
    """

    def __init__(
        self,
        *,
        command_timeout: float = COMMAND_TIMEOUT,
        uid: int | None = None,
        store_dir: Path | None = None,
    ) -> None:
        self._store_dir = store_dir
        self._timeout = command_timeout
        self._uid = os.getuid() if uid is None else uid
        self._cache: dict[_Source, tuple[str, SigningKey]] = {}  # (content digest, key)
        self._locks: dict[_Source, trio.Lock] = {}

    def __repr__(self) -> str:
        return f"<SigningKeys {len(self._cache)} cached>"

    async def load(self, provider: Provider) -> SigningKey | None:
        """*provider*'s key (``private_key`` or ``key_file``), or None when it has none.

        Raises:
            MintFailed: (cause ``"key"``) the file is refused or unreadable, is
                not a key, is encrypted without a passphrase, or the passphrase
                is wrong or could not be had.
        """
        source = _source(provider, self._store_dir)
        if source is None:
            return None
        lock = self._locks.setdefault(source, trio.Lock())
        async with lock:
            # Read every time and compared by content: a key rotated in place
            # may keep the file's inode, size and even mtime (two writes in one
            # tick of the file system's clock), and must still sign. Read here,
            # not in a thread, as the token store's files are: a private regular
            # file of a few kilobytes (anything else is refused unread).
            data = self._read(source.path, source.what)
            digest = _digest(data)
            cached = self._cache.get(source)
            if cached is not None and cached[0] == digest:
                return cached[1]  # the common case: no thread, no parse, no passphrase
            if source.what == "key_file":
                key = await trio.to_thread.run_sync(_google_key, data, source.path)
            else:
                password = None
                if _encrypted(data):
                    password = await self._passphrase(source)
                key = await trio.to_thread.run_sync(_pem_key, data, password, source.path)
            self._cache[source] = (digest, key)
            return key

    async def read_secret(self, path: str, what: str) -> str:
        """A secret kept in a private file (``client_secret_file``), without its line end.

        Raises:
            MintFailed: (cause ``"key"``) refused, unreadable, not UTF-8, or empty.
        """
        data = await trio.to_thread.run_sync(self._read, path, what)
        try:
            secret = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise MintFailed(f"{what} {path} is not UTF-8 text", "key") from None
        if not secret:
            raise MintFailed(f"{what} {path} is empty", "key")
        return secret

    def _read(self, path: str, what: str) -> bytes:
        return read_private_file(path, what, uid=self._uid)

    async def _passphrase(self, source: _Source) -> bytes:
        if source.passphrase_file:
            data = await trio.to_thread.run_sync(
                self._read, source.passphrase_file, "passphrase_file"
            )
            passphrase = _strip_line_end(data)
        elif source.passphrase_command:
            passphrase = _strip_line_end(await self._run(source.passphrase_command))
        else:
            raise MintFailed(
                f"{source.what} {source.path} is encrypted: set passphrase_file or "
                "passphrase_command",
                "key",
            )
        if not passphrase:
            raise MintFailed(f"the passphrase for {source.path} is empty", "key")
        return passphrase

    async def _run(self, command: Sequence[str]) -> bytes:
        name = command[0]
        with trio.move_on_after(self._timeout) as scope:
            try:
                done = await trio.run_process(
                    list(command),
                    stdin=b"",
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise MintFailed(f"cannot run passphrase_command {name}: {reason}", "key") from None
        if scope.cancelled_caught:
            raise MintFailed(
                f"passphrase_command {name} did not finish within {self._timeout:g} s", "key"
            )
        if done.returncode != 0:
            # Its stderr is not quoted: a password manager may say more than it should.
            raise MintFailed(
                f"passphrase_command {name} exited with status {done.returncode}", "key"
            )
        if len(done.stdout) > MAX_KEY_FILE_BYTES:
            raise MintFailed(f"passphrase_command {name} printed too much", "key")
        out: bytes = done.stdout
        return out


def _encrypted(pem: bytes) -> bool:
    """An encrypted PEM: PKCS#8 ``ENCRYPTED PRIVATE KEY``, or ``Proc-Type: 4,ENCRYPTED``."""
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in pem or b"Proc-Type: 4,ENCRYPTED" in pem


def describe_key(data: bytes, path: str) -> str:
    """What *data* (a key file's bytes) is, said without its content, for ``signing-key import``.

    Raises:
        MintFailed: it is not a private key credproxy can sign with.
    """
    if data.lstrip().startswith(b"{"):
        _google_key(data, path)
        return "Google's JSON service-account key (key_file)"
    if _encrypted(data):
        return "an encrypted PEM private key (private_key, with a passphrase_file or _command)"
    key = _pem_key(data, None, path)
    return f"a PEM private key that signs {algorithm_for(key.private_key)} (private_key)"


def _pem_key(data: bytes, password: bytes | None, path: str) -> SigningKey:
    """A PEM private key, or one in OpenSSH's own format (``ssh-keygen``'s default)."""
    if data.lstrip().startswith(b"{"):
        raise MintFailed(
            f"private_key {path} is a JSON file: a Google service-account key goes in "
            "key_file (the preset google-service-account reads it)",
            "key",
        )
    if b"-----BEGIN" not in data:
        raise MintFailed(f"private_key {path} is not a PEM file (no -----BEGIN line)", "key")
    openssh = b"-----BEGIN OPENSSH PRIVATE KEY-----" in data
    key: PrivateKeyTypes
    try:
        if openssh:
            key = serialization.load_ssh_private_key(data, password=password)  # type: ignore[assignment]  # (a subset of PrivateKeyTypes, typed apart)
        else:
            key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError, _unsupported()) as exc:
        if openssh and not isinstance(exc, ValueError):
            # A passphrase: OpenSSH's cipher needs bcrypt, not a dependency.
            raise MintFailed(
                f"private_key {path} is an OpenSSH key with a passphrase, which credproxy "
                f"cannot decrypt: remove the passphrase (ssh-keygen -p -N '' -f {path}; "
                "the file stays private) or use a PEM key",
                "key",
            ) from None
        # Neither the data nor the passphrase goes into the message.
        hint = "or the passphrase is wrong" if password is not None else "or it is a public key"
        kind = "an OpenSSH" if openssh else "a PEM"
        raise MintFailed(
            f"private_key {path} cannot be read as {kind} private key ({hint})", "key"
        ) from None
    return SigningKey(private_key=signable(key), path=path)


def _unsupported() -> type[Exception]:
    from cryptography.exceptions import UnsupportedAlgorithm

    return UnsupportedAlgorithm


def _google_key(data: bytes, path: str) -> SigningKey:
    """Google's JSON service-account key: ``private_key`` (PEM), ``client_email``, ``token_uri``."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise MintFailed(
            f"key_file {path} is not JSON (Google's service-account key)", "key"
        ) from None
    if not isinstance(doc, dict):
        raise MintFailed(f"key_file {path} is not a JSON object", "key")
    kind = doc.get("type")
    if kind is not None and kind != "service_account":
        shown = kind if isinstance(kind, str) and kind.isidentifier() else "another"
        raise MintFailed(f"key_file {path} is a {shown!r} key file, not a service account's", "key")
    pem = doc.get("private_key")
    if not isinstance(pem, str) or not pem:
        raise MintFailed(f"key_file {path} has no private_key", "key")
    fields: dict[str, str | None] = {}
    for name in ("client_email", "token_uri", "private_key_id"):
        value = doc.get(name)
        if value is not None and not isinstance(value, str):
            raise MintFailed(f"key_file {path}: {name} is not a string", "key")
        fields[name] = value or None
    try:
        key = serialization.load_pem_private_key(pem.encode("utf-8"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError, _unsupported()):
        raise MintFailed(f"key_file {path}: private_key is not a usable PEM key", "key") from None
    return SigningKey(
        private_key=signable(key),
        path=path,
        client_email=fields["client_email"],
        token_uri=fields["token_uri"],
        key_id=fields["private_key_id"],
    )
