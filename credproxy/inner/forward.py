"""``credproxy forward``: a TCP port inside the sandbox that leads to the session socket.

Standard library only, like ``credproxy token``: it runs inside sandboxes and
must start in the time Python itself needs.

    credproxy forward [--port N] [--provider P[:BUCKET]]... [--env NAME=P[:BUCKET]]...
                      [--metadata P[:BUCKET] [--metadata-port N] [--metadata-email E]
                       [--metadata-project ID] [--metadata-scopes S[,S...]]]
                      -- CMD [ARGS...]

Tools that take nothing but a base URL (the ``anthropic`` and ``openai`` SDKs,
Claude Code, Codex, Gemini CLI) cannot speak to a Unix socket. The session
socket answers HTTP/1.1 (``GET /PROVIDER[:BUCKET]/REST`` is sent on to the
provider's ``[providers.PROVIDER.api] base_url`` + ``/REST`` with the
``Authorization`` header added by the daemon, outside the sandbox), so all a
tool needs is a TCP port that leads there. This command listens on
``127.0.0.1:N`` in the sandbox's own network namespace, runs CMD with base-URL
variables pointing at that port, and exits with CMD's status.

With ``--metadata P[:BUCKET]``, a second port (``127.0.0.1:M``, ``--metadata-port
M``, default an ephemeral port) serves a GCE metadata server answered from P's
token (:mod:`credproxy.inner.metadata` says what it serves and where each value
comes from; ``--metadata-email``, ``--metadata-project`` and
``--metadata-scopes`` set values the token does not carry), for tools built on
Google's client libraries, which find it through ``GCE_METADATA_HOST``.

Theory of operation
-------------------

Who may connect (the same on both ports). A port is on a loopback interface,
and without ``--unshare-net`` that is the host's, where every local user can
reach it. So each accepted connection is first traced to the uid that owns its
other end: the line of ``/proc/net/tcp`` (``/proc/net/tcp6`` for an IPv6 socket
connected to ``::ffff:127.0.0.1``) whose ``local_address`` is the peer's address
and port and whose ``rem_address`` is ours gives that socket's ``uid``. Only a
connection from this process's own uid is served (relayed, or answered by the
metadata server). Any other, and one whose
owner cannot be told (no such line, as when ``/proc`` is not mounted; or a
socket its process has already closed: its inode is 0, and from FIN_WAIT2 on
the kernel shows it as uid 0, so a line with inode 0 does not count), gets a
fixed ``403 Forbidden`` (a JSON body naming both uids; the request is not
parsed), and nothing reaches the session socket. The first refusal is noted on stderr, the
later ones are not.

The preamble. Before any byte of the tool's, the connection to the session
socket carries one line that tells the daemon that this is ``credproxy
forward`` and on which port it listens (so the daemon can check the ``Host``
the tool sent), and presents the session's capability token when there is one::

    CREDPROXY/1 forward=PORT capability=TOKEN\\r\\n     (or without " capability=TOKEN")

``TOKEN`` is 64 lowercase hex characters, read once at start the way
``credproxy token`` reads it (:func:`credproxy.inner.client.capability_from_env`:
``$CREDPROXY_CAPABILITY``, else the descriptor named by
``$CREDPROXY_CAPABILITY_FD`` or ``$LLXPRT_CAPABILITY_FD``), so the tools behind
the port need not know about it. If it cannot be read, one note on stderr says
why and connections go without (a session that requires one refuses them).
CMD keeps the variables and the descriptor (passed on with ``pass_fds``; it is
read with ``pread``, which moves nothing, and a pipe, which reading empties, is
replaced by a memfd holding the same token), so clients of the session socket
inside CMD present the capability themselves.

The relay does not parse HTTP: every accepted TCP connection gets a new
connection to ``$CREDPROXY_SOCKET`` (else ``$LLXPRT_CREDENTIAL_SOCKET``) and,
after the preamble, bytes are copied both ways as they arrive, by two threads
per connection (one per direction, each a blocking ``recv``/``sendall`` loop).
So a streamed answer (SSE) reaches the tool event by event, keep-alive and
pipelining are whatever the two ends make of them, and the daemon sees exactly
the bytes the tool sent (the ``Host`` header is ``127.0.0.1:N``, not
``credproxy``).

How a connection ends, and why:

- End of stream from one side (``recv`` returns nothing) is passed on as a
  half-close (``shutdown(SHUT_WR)``) to the other side; the other direction
  keeps flowing until it ends too. Both sockets are closed when both
  directions have ended.
- The tool's connection fails (reset): the connection is aborted, so the
  daemon sees its socket closed at once and can cancel the upstream request.
- The daemon's connection fails, or the tool cannot take what it sends: the
  connection is aborted and the tool gets a reset, never a clean end of stream
  that could pass for a complete answer.
- The daemon stops reading (it answered an error and closed): only that
  direction ends; its answer may still be on its way back.
- The session socket cannot be reached (or closes before the preamble is
  sent): the tool's connection is closed with nothing sent (one note on
  stderr, the first time).
- The tool's uid is not ours: the 403 is sent, then a half-close, and what the
  tool sends is read and dropped until it closes (for at most a few seconds),
  because closing a socket with unread bytes sends a reset that can destroy
  the answer before the tool reads it.

When CMD exits, the listener is closed and this process exits (connections
still open end with it). The listening socket is never inherited by CMD.

Which variables CMD gets (``http://127.0.0.1:N`` is ``ROOT``):

- ``CREDPROXY_BASE_URL=ROOT`` always (any provider is ``ROOT/PROVIDER``).
- ``CREDPROXY_BASE_URL_<P>=ROOT/P`` for every provider named by ``--provider``
  or ``--env`` (``P`` upper-cased, characters other than letters and digits
  made ``_``: ``claude:work`` gives ``CREDPROXY_BASE_URL_CLAUDE_WORK``).
- ``--env NAME=P`` sets ``NAME=ROOT/P``. Without any ``--env``, a provider
  named ``claude`` or ``anthropic`` sets ``ANTHROPIC_BASE_URL``, ``codex`` or
  ``openai`` sets ``OPENAI_BASE_URL``, and ``gemini`` sets
  ``GOOGLE_GEMINI_BASE_URL`` (a bucket, ``claude:work``, keeps the mapping).

- With ``--metadata``: ``GCE_METADATA_HOST``, ``GCE_METADATA_ROOT`` (its older
  name) and ``GCE_METADATA_IP`` (where google-auth sends its ping), each
  ``127.0.0.1:M``.

The value is ``ROOT/P`` with nothing appended, because the daemon maps
``/P/REST`` to ``base_url + /REST``: a tool's base-URL variable stands for the
provider's ``base_url``, and the tool appends the rest itself. So the provider's
``base_url`` must be the URL the tool itself uses by default: with
``base_url = "https://api.openai.com/v1"``, ``OPENAI_BASE_URL=ROOT/openai`` and
the SDK's ``/chat/completions`` reaches ``https://api.openai.com/v1/chat/completions``;
with ``base_url = "https://api.anthropic.com"``, the SDK's ``/v1/messages``
reaches ``https://api.anthropic.com/v1/messages``.

Exit status: CMD's (128 + N when a signal N ended it; 127 when CMD is not
found, 126 when it cannot be run); 2 for a usage error; 1 when the session
socket variable is unset or names no socket, or a port cannot be bound
(the exit codes every command shares, in docs/cli.md: 1 is "anything else",
as for ``credproxy token``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time

from credproxy.errors import EXIT_OK, EXIT_USAGE, CredproxyError, DaemonUnavailable
from credproxy.inner.client import (
    CAPABILITY_ENV,
    CAPABILITY_FD_ENV,
    CapabilityUnavailable,
    capability_from_env,
    socket_from_env,
)

# `typing` costs ~5 ms of start-up; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Any, Literal

USAGE = (
    "usage: credproxy forward [--port N] [--provider P[:BUCKET]]... "
    "[--env NAME=P[:BUCKET]]... [--metadata P[:BUCKET] [--metadata-port N] "
    "[--metadata-email E] [--metadata-project ID] [--metadata-scopes S,...]] -- CMD [ARGS...]"
)
OPTIONS = (
    "--port",
    "--provider",
    "--env",
    "--metadata",
    "--metadata-port",
    "--metadata-email",
    "--metadata-project",
    "--metadata-scopes",
)
# What CMD gets with --metadata: google-auth reads GCE_METADATA_HOST (else the older
# GCE_METADATA_ROOT) for its requests and GCE_METADATA_IP for its ping; Node's
# gcp-metadata reads GCE_METADATA_IP, then GCE_METADATA_HOST; Go's reads GCE_METADATA_HOST.
METADATA_VARS = ("GCE_METADATA_HOST", "GCE_METADATA_ROOT", "GCE_METADATA_IP")
HOST = "127.0.0.1"
BUFSIZE = 64 * 1024
CONNECT_TIMEOUT = 10.0  # seconds to wait for the session socket to accept a connection
REFUSE_LINGER = 2.0  # seconds a refused tool may take to read the 403 and close
REFUSE_DRAIN = 1024 * 1024  # bytes of a refused tool's request read (and dropped) at most
PROC_NET_TCP = "/proc/net/tcp"
PROC_NET_TCP6 = "/proc/net/tcp6"
V4_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:a.b.c.d
PREAMBLE_MAGIC = b"CREDPROXY/1"
ROOT_VAR = "CREDPROXY_BASE_URL"
# The variables set when no --env is given, by provider name (the base-URL
# variables the tools read: docs/integrations.md).
DEFAULT_VARS = {
    "claude": "ANTHROPIC_BASE_URL",
    "anthropic": "ANTHROPIC_BASE_URL",
    "codex": "OPENAI_BASE_URL",
    "openai": "OPENAI_BASE_URL",
    "gemini": "GOOGLE_GEMINI_BASE_URL",
}
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@-")
_VAR_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_HEX_UPPER = frozenset("0123456789ABCDEFabcdef")
_HEX_LOWER = frozenset("0123456789abcdef")


class ForwardUsage(CredproxyError):
    """The command line is malformed (exit 2)."""

    exit_code = EXIT_USAGE


# --- the command line and the environment (pure) -------------------------------


class Options:
    """What the command line says (see :func:`parse_args`)."""

    def __init__(self) -> None:
        self.port = 0
        self.providers: list[str] = []
        self.env_map: list[tuple[str, str]] = []
        self.cmd: list[str] = []
        self.metadata: str | None = None  # the grant the metadata server serves
        self.metadata_port = 0
        self.metadata_email: str | None = None
        self.metadata_project: str | None = None
        self.metadata_scopes: list[str] | None = None


def parse_args(argv: Sequence[str]) -> Options:
    """The options and CMD from the arguments after ``forward``.

    Options come first; CMD starts after ``--`` or at the first argument that
    is not an option. Raises :class:`ForwardUsage`.
    """
    opts = Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-"):
            break
        name, eq, value = arg.partition("=")
        if name not in OPTIONS:
            raise ForwardUsage(f"unknown option {arg}")
        if not eq:
            i += 1
            if i == len(argv):
                raise ForwardUsage(f"{name} needs a value")
            value = argv[i]
        if name in ("--port", "--metadata-port"):
            if not (value.isascii() and value.isdigit() and int(value) <= 65535):
                raise ForwardUsage(f"{name} wants a number from 0 to 65535, not {value!r}")
            if name == "--port":
                opts.port = int(value)
            else:
                opts.metadata_port = int(value)
        elif name == "--provider":
            opts.providers.append(_check_grant(value))
        elif name == "--env":
            var, eq, grant = value.partition("=")
            if not eq or not var or var[0].isdigit() or not _VAR_CHARS.issuperset(var):
                raise ForwardUsage(f"--env wants NAME=PROVIDER[:BUCKET], not {value!r}")
            opts.env_map.append((var, _check_grant(grant)))
        elif name == "--metadata":
            if opts.metadata is not None:
                raise ForwardUsage("--metadata is given twice (the metadata server serves one)")
            opts.metadata = _check_grant(value)
        elif name == "--metadata-scopes":
            scopes = value.split(",")
            if not all(_metadata_value(s) for s in scopes):
                raise ForwardUsage(
                    "--metadata-scopes wants SCOPE[,SCOPE...], each printable ASCII "
                    f"without spaces, not {value!r}"
                )
            opts.metadata_scopes = scopes
        else:
            if not _metadata_value(value) or "/" in value:
                raise ForwardUsage(
                    f"{name} wants printable ASCII without spaces or '/', not {value!r}"
                )
            if name == "--metadata-email":
                opts.metadata_email = value
            else:
                opts.metadata_project = value
        i += 1
    opts.cmd = list(argv[i:])
    if not opts.cmd:
        raise ForwardUsage("CMD is required")
    if opts.metadata is None:
        given = [
            name
            for name, value in (
                ("--metadata-port", opts.metadata_port or None),
                ("--metadata-email", opts.metadata_email),
                ("--metadata-project", opts.metadata_project),
                ("--metadata-scopes", opts.metadata_scopes),
            )
            if value is not None
        ]
        if given:
            raise ForwardUsage(f"{given[0]} needs --metadata PROVIDER[:BUCKET]")
    return opts


def _metadata_value(value: str) -> bool:
    """Printable ASCII without spaces, at most 256 characters (a served value)."""
    return 0 < len(value) <= 256 and value.isascii() and value.isprintable() and " " not in value


def _check_grant(value: str) -> str:
    provider, colon, bucket = value.partition(":")
    for part in (provider, bucket) if colon else (provider,):
        if not (0 < len(part) <= 64 and _NAME_CHARS.issuperset(part)):
            raise ForwardUsage(
                f"{value!r} is not PROVIDER or PROVIDER:BUCKET "
                "(names: letters, digits, '.', '_', '@', '-'; at most 64)"
            )
    return value


def base_url_env(
    port: int, providers: Iterable[str], env_map: Sequence[tuple[str, str]]
) -> dict[str, str]:
    """The base-URL variables CMD gets (see the module docstring for the mapping).

    Raises:
        ForwardUsage: two providers would set one variable to different URLs.
    """
    root = f"http://{HOST}:{port}"
    grants = list(dict.fromkeys([*providers, *(g for _, g in env_map)]))
    env = {ROOT_VAR: root}
    named = [(f"{ROOT_VAR}_{_var_suffix(g)}", g) for g in grants]
    if env_map:
        named += env_map
    else:
        defaults = ((DEFAULT_VARS.get(g.partition(":")[0]), g) for g in grants)
        named += [(var, g) for var, g in defaults if var]
    chosen: dict[str, str] = {}
    for var, grant in named:
        if chosen.setdefault(var, grant) != grant:
            raise ForwardUsage(
                f"{chosen[var]} and {grant} would both set {var}; say which with --env {var}=..."
            )
        env[var] = f"{root}/{grant}"
    return env


def _var_suffix(grant: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in grant).upper()


# --- who is at the other end (parsing is pure; the lookup reads /proc) ---------------


def decode_proc_address(
    field: str, byteorder: Literal["little", "big"] = sys.byteorder
) -> tuple[bytes, int]:
    """A ``/proc/net/tcp`` or ``tcp6`` address ``HEXADDR:HEXPORT`` as (packed address, port).

    The kernel prints the address as 32-bit words (one for IPv4, four for
    IPv6), each the ``%08X`` of a word read in host byte order, so on a
    little-endian machine ``0100007F`` is 127.0.0.1; the port is a plain hex
    number. *byteorder* is the host's (``"little"`` on x86 and arm64).

    Raises:
        ValueError: *field* is not such an address.
    """
    hexaddr, colon, hexport = field.partition(":")
    if (
        not colon
        or len(hexaddr) not in (8, 32)
        or not 0 < len(hexport) <= 4
        or not _HEX_UPPER.issuperset(hexaddr + hexport)
    ):
        raise ValueError(f"not a /proc/net/tcp address: {field!r}")
    packed = b"".join(
        int(hexaddr[i : i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(hexaddr), 8)
    )
    return packed, int(hexport, 16)


def socket_owner(
    table: Iterable[str],
    local: tuple[bytes, int],
    remote: tuple[bytes, int],
    byteorder: Literal["little", "big"] = sys.byteorder,
) -> int | None:
    """The uid of the socket in *table* with this local and remote (packed address, port).

    *table* is the lines of ``/proc/net/tcp`` or ``/proc/net/tcp6`` (the
    header line and malformed lines are skipped). None when no line matches
    with a non-zero inode: a socket its process has closed (still shutting
    down, or in TIME_WAIT) has inode 0 and is shown as uid 0, which says
    nothing about who opened it.
    """
    for line in table:
        fields = line.split()
        if len(fields) < 10 or not fields[0].endswith(":"):
            continue
        try:
            if decode_proc_address(fields[1], byteorder) != local:
                continue
            if decode_proc_address(fields[2], byteorder) != remote:
                continue
            uid, inode = int(fields[7]), int(fields[9])
        except ValueError:
            continue
        if inode:
            return uid
    return None


def peer_uid(conn: socket.socket) -> int | None:
    """The uid owning the other end of *conn*, a TCP connection within this host.

    Looked up in ``/proc/net/tcp`` (an IPv4 peer) and then ``/proc/net/tcp6``
    (an IPv6 socket connected to the IPv4-mapped address); the tables are
    those of the caller's network namespace, which is the peer's. None when it
    cannot be told (no matching line, ``/proc`` not mounted, *conn* closed).
    """
    try:
        peer, ours = conn.getpeername(), conn.getsockname()
        if conn.family == socket.AF_INET:
            p4 = socket.inet_pton(socket.AF_INET, peer[0])
            o4 = socket.inet_pton(socket.AF_INET, ours[0])
            tables = [
                (PROC_NET_TCP, (p4, peer[1]), (o4, ours[1])),
                (PROC_NET_TCP6, (V4_MAPPED + p4, peer[1]), (V4_MAPPED + o4, ours[1])),
            ]
        elif conn.family == socket.AF_INET6:
            p6 = socket.inet_pton(socket.AF_INET6, peer[0].partition("%")[0])
            o6 = socket.inet_pton(socket.AF_INET6, ours[0].partition("%")[0])
            tables = [(PROC_NET_TCP6, (p6, peer[1]), (o6, ours[1]))]
        else:
            return None
    except (OSError, ValueError):
        return None
    for path, local, remote in tables:
        try:
            with open(path, encoding="ascii") as table:
                uid = socket_owner(table, local, remote)
        except (OSError, ValueError):  # ValueError: not ASCII
            continue
        if uid is not None:
            return uid
    return None


def refusal(our_uid: int, their_uid: int | None) -> bytes:
    """The whole HTTP answer to a connection whose owner is not *our_uid*."""
    who = (
        f"uid {their_uid}"
        if their_uid is not None
        else "a uid that cannot be told (no entry in /proc/net/tcp)"
    )
    message = (
        f"credproxy forward serves only processes of uid {our_uid}; "
        f"this connection comes from {who}"
    )
    body = json.dumps({"error": {"type": "credproxy", "message": message}}).encode()
    head = (
        "HTTP/1.1 403 Forbidden\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


# --- the preamble and the capability ------------------------------------------------


def preamble(port: int, capability: str | None) -> bytes:
    """The line sent on the session socket before the tool's bytes (module docstring).

    Raises:
        ValueError: *capability* is not 64 lowercase hex characters.
    """
    line = PREAMBLE_MAGIC + b" forward=%d" % port
    if capability is not None:
        if not is_capability(capability):
            raise ValueError("a capability token is 64 lowercase hex characters")
        line += b" capability=" + capability.encode("ascii")
    return line + b"\r\n"


def is_capability(value: str) -> bool:
    return len(value) == 64 and _HEX_LOWER.issuperset(value)


def capability_fd() -> int | None:
    """The descriptor named by ``$CREDPROXY_CAPABILITY_FD`` (else ``$LLXPRT_CAPABILITY_FD``).

    None when neither is set, or when the first one set does not hold a
    number from 3 up. (:func:`capability_from_env` reads it only when
    ``$CREDPROXY_CAPABILITY`` is unset; llxprt reads it either way.)
    """
    for name in CAPABILITY_FD_ENV:
        spec = os.environ.get(name)
        if spec:
            if spec.isascii() and spec.isdigit() and len(spec) <= 7 and int(spec) >= 3:
                return int(spec)
            return None
    return None


def session_capability() -> tuple[str | None, int | None]:
    """The capability to present, and the descriptor CMD must get (each may be None).

    Read once, at start. A problem is one note on stderr, and no capability.
    The descriptor named in the environment is passed on to CMD whenever it is
    open, so CMD's own clients find what the variable promises; if it was a
    pipe (which reading empties), it is first replaced by a memfd holding the
    token that was read.
    """
    fd = capability_fd()
    if fd is not None:
        try:
            os.fstat(fd)
        except OSError:
            fd = None  # not open: CMD's clients will say so themselves
    try:
        capability = capability_from_env()
    except CapabilityUnavailable as exc:
        print(
            f"credproxy forward: {exc}; connections are relayed without a capability "
            "(a session opened with --capability will refuse them)",
            file=sys.stderr,
        )
        return None, fd
    if capability is not None and not is_capability(capability):
        print(
            f"credproxy forward: ${CAPABILITY_ENV} does not hold a capability token "
            "(64 lowercase hex characters); connections are relayed without one",
            file=sys.stderr,
        )
        return None, fd
    if capability is not None and fd is not None and not os.environ.get(CAPABILITY_ENV):
        _keep_readable(fd, capability)  # it was read from fd
    return capability, fd


def _keep_readable(fd: int, token: str) -> None:
    """Put *token* back on *fd* for CMD if reading it has emptied *fd* (a pipe).

    A file or memfd was read with ``pread`` and still holds the token: it is
    left alone. Otherwise *fd* becomes a sealed memfd holding the token and a
    newline, at offset 0, as ``credproxy run --capability`` makes it.
    """
    try:
        os.lseek(fd, 0, os.SEEK_CUR)
        return  # seekable: pread read it, nothing moved
    except OSError:
        pass
    import fcntl  # only here: a pipe on the capability descriptor is rare

    try:
        memfd = os.memfd_create("credproxy-capability", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        print(
            f"credproxy forward: cannot keep the capability readable on fd {fd} for CMD "
            f"(memfd_create: {exc.strerror}); CMD's own clients will find it empty",
            file=sys.stderr,
        )
        return
    try:
        os.write(memfd, f"{token}\n".encode())  # 65 bytes into fresh memory: never short
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, seals)
        os.lseek(memfd, 0, os.SEEK_SET)
        os.dup2(memfd, fd, inheritable=False)  # pass_fds makes it inheritable in CMD
    finally:
        os.close(memfd)


# --- the relay ----------------------------------------------------------------------


class _Relay:
    """One TCP connection from the sandbox and its connection to the session socket."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._aborted = False

    def run(self) -> None:
        back = threading.Thread(target=self._to_client, daemon=True)
        try:
            back.start()
        except RuntimeError:  # no thread to be had: this connection cannot be served
            self.abort()
        else:
            self._to_upstream()
            back.join()
        self.upstream.close()
        self.client.close()  # a reset if aborted (SO_LINGER 0)

    def _to_upstream(self) -> None:
        while True:
            try:
                data = self.client.recv(BUFSIZE)
            except OSError:
                self.abort()
                return
            if not data:
                break
            try:
                self.upstream.sendall(data)
            except OSError:
                # The daemon stopped reading (it answered and closed, say): its
                # answer may still be on its way back, so only this direction ends.
                return
        with contextlib.suppress(OSError):
            self.upstream.shutdown(socket.SHUT_WR)

    def _to_client(self) -> None:
        try:
            while data := self.upstream.recv(BUFSIZE):
                self.client.sendall(data)
        except OSError:
            self.abort()
            return
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        """End both directions now; the tool gets a reset when the socket is closed.

        ``SHUT_RD`` on the TCP side wakes a thread in ``recv`` without sending
        a FIN (which could pass for a complete answer); the session socket is
        shut both ways, which wakes the other thread wherever it waits and
        tells the daemon the tool is gone.
        """
        with self._lock:
            if self._aborted:
                return
            self._aborted = True
        with contextlib.suppress(OSError):
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            self.upstream.shutdown(socket.SHUT_RDWR)


class Notes:
    """Notes on stderr, each kind the first time only (CMD's terminal is not ours to flood).

    One is shared by forward's ports, so a refusal is noted once for both.
    """

    def __init__(self) -> None:
        self._noted: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self._noted:
                return
            self._noted.add(kind)
        print(f"credproxy forward: {message}", file=sys.stderr)


class Listener:
    """Accepts TCP connections on *listener*: this uid's go to :meth:`_handle`, others get 403.

    Each accepted connection gets a thread of its own; see the module docstring
    for who may connect and what a refused connection gets.
    """

    def __init__(self, listener: socket.socket, notes: Notes | None = None) -> None:
        self.listener = listener
        self.uid = os.getuid()
        self.notes = notes if notes is not None else Notes()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def port(self) -> int:
        port: int = self.listener.getsockname()[1]
        return port

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop listening: new connections are refused from here on."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept() in the loop
        self._thread.join(5)
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                if not self._closing.is_set():
                    time.sleep(0.05)  # EMFILE and the like: wait for descriptors to free up
                continue
            try:
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one, keep listening
                client.close()

    def _serve(self, client: socket.socket) -> None:
        uid = peer_uid(client)
        if uid != self.uid:
            self._refuse(client, uid)
            return
        self._handle(client)

    def _handle(self, client: socket.socket) -> None:
        """Serve *client*, a connection from this uid, and close it."""
        raise NotImplementedError

    def _refuse(self, client: socket.socket, uid: int | None) -> None:
        """Answer 403, then read what the tool sends until it closes, and close.

        Reading the rest is what lets the tool see the answer: closing with
        unread bytes sends a reset, which may destroy the answer on its way.
        """
        deadline = time.monotonic() + REFUSE_LINGER
        try:
            client.settimeout(REFUSE_LINGER)
            client.sendall(refusal(self.uid, uid))
            client.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < REFUSE_DRAIN and (left := deadline - time.monotonic()) > 0:
                client.settimeout(left)
                chunk = client.recv(BUFSIZE)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass
        finally:
            client.close()
        who = f"uid {uid}" if uid is not None else "a uid that cannot be told"
        self._note(
            "refused",
            f"answered 403 to a connection from {who}: only processes of uid {self.uid} "
            "are served (noted once; later refusals are not)",
        )

    def _note(self, kind: str, message: str) -> None:
        """*message* on stderr, the first time something of this *kind* happens."""
        self.notes(kind, message)


class Forwarder(Listener):
    """Relays each connection of this uid on *listener* to the socket at *path*.

    Each relayed connection begins with the preamble that presents
    *capability* (see the module docstring).
    """

    def __init__(
        self,
        listener: socket.socket,
        path: str,
        capability: str | None = None,
        notes: Notes | None = None,
    ) -> None:
        super().__init__(listener, notes)
        self.path = path
        self.preamble = preamble(self.port, capability)

    def _handle(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):  # SSE events are small writes: send them at once
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.settimeout(CONNECT_TIMEOUT)
            upstream.connect(self.path)
            upstream.sendall(self.preamble)  # a few dozen bytes: never blocks for long
            upstream.settimeout(None)
        except OSError as exc:
            upstream.close()
            client.close()
            self._note(
                "unreachable",
                f"cannot reach credproxy at {self.path}: {exc.strerror or exc} (connection closed)",
            )
            return
        _Relay(client, upstream).run()


class MetadataPort(Listener):
    """The metadata server's port: each connection of this uid goes to *server*.

    *server* is a :class:`credproxy.inner.metadata.MetadataServer` (imported by
    :func:`main` only when ``--metadata`` is given).
    """

    def __init__(self, listener: socket.socket, server: Any, notes: Notes | None = None) -> None:
        super().__init__(listener, notes)
        self.server = server

    def _handle(self, client: socket.socket) -> None:
        self.server.serve(client)


def listen(port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:*port* (0: an ephemeral port), not inheritable."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A fixed port is bound again at once after a run whose connections
        # forward closed first (TIME-WAIT); on Linux this still lets no second
        # socket listen on it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise CredproxyError(f"cannot listen on {HOST}:{port}: {exc.strerror or exc}") from None
    return sock


def session_socket() -> str:
    """The session socket's path from the environment, checked to be a socket.

    Raises:
        DaemonUnavailable: no variable names one, or the path is not a socket.
    """
    path = socket_from_env()
    try:
        is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError as exc:
        raise DaemonUnavailable(f"cannot reach credproxy at {path}: {exc.strerror}") from None
    if not is_socket:
        raise DaemonUnavailable(f"cannot reach credproxy at {path}: not a socket")
    return path


# --- CMD ----------------------------------------------------------------------------


def run_child(argv: list[str], env: dict[str, str], pass_fds: Sequence[int] = ()) -> int:
    """Run CMD to its end, passing on SIGTERM, SIGHUP and SIGINT; its exit status.

    CMD inherits no descriptor above 2 but those in *pass_fds*.

    SIGINT is passed on unless this process is in the foreground of its
    terminal: then the terminal has sent it to CMD as well (same process
    group), and passing it on would deliver it twice (two Ctrl-C quit some
    tools).
    """
    try:
        child = subprocess.Popen(argv, env=env, pass_fds=tuple(pass_fds))
    except OSError as exc:
        print(f"credproxy forward: cannot start {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126

    return wait_forwarding_signals(child)


def wait_forwarding_signals(child: subprocess.Popen[Any]) -> int:
    """Wait for *child*, passing on SIGTERM, SIGHUP and SIGINT; its status (128+N if killed).

    SIGINT is passed on unless this process is in the foreground of its
    terminal: then the terminal has sent it to the child as well (same
    process group), and passing it on would deliver it twice (two Ctrl-C quit
    some tools). ``credproxy run`` waits for its command the same way.
    """

    def forward(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT and _terminal_foreground():
            return
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        status = child.wait()
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status


def _terminal_foreground() -> bool:
    """Whether this process group is the foreground group of a terminal on fd 0, 1 or 2."""
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            return os.tcgetpgrp(fd) == os.getpgrp()
    return False


def metadata_env(port: int) -> dict[str, str]:
    """The variables that point CMD's Google client libraries at the metadata server."""
    return dict.fromkeys(METADATA_VARS, f"{HOST}:{port}")


def main(argv: list[str]) -> int:
    """``credproxy forward ...``: see the module docstring."""
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        print("Listen on 127.0.0.1:N, relay each connection to $CREDPROXY_SOCKET, run CMD")
        print("with ANTHROPIC_BASE_URL/OPENAI_BASE_URL/... pointing there; exit with its status.")
        print("--metadata P[:BUCKET] also serves a GCE metadata server (GCE_METADATA_HOST) on a")
        print("second port, with P's token for google-auth and other Google client libraries.")
        print("Only connections from processes of this uid are served; others get 403.")
        return EXIT_OK
    metadata_listener = None
    try:
        opts = parse_args(argv)
        base_url_env(opts.port, opts.providers, opts.env_map)  # usage errors before anything opens
        path = session_socket()
        listener = listen(opts.port)
        if opts.metadata is not None:
            try:
                metadata_listener = listen(opts.metadata_port)
            except CredproxyError:
                listener.close()
                raise
    except CredproxyError as exc:
        hint = f" ({USAGE})" if isinstance(exc, ForwardUsage) else ""
        print(f"credproxy forward: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    capability, fd = session_capability()
    notes = Notes()
    ports: list[Listener] = [Forwarder(listener, path, capability, notes)]
    env = dict(os.environ, **base_url_env(ports[0].port, opts.providers, opts.env_map))
    if metadata_listener is not None and opts.metadata is not None:
        from credproxy.inner.metadata import MetadataServer, Settings

        settings = Settings(
            opts.metadata,
            email=opts.metadata_email,
            project=opts.metadata_project,
            scopes=opts.metadata_scopes,
        )
        server = MetadataServer(settings, path, capability, notes)
        ports.append(MetadataPort(metadata_listener, server, notes))
        env.update(metadata_env(ports[1].port))
    try:
        for port in ports:
            port.start()
        return run_child(opts.cmd, env, () if fd is None else (fd,))
    finally:
        for port in ports:
            port.close()
