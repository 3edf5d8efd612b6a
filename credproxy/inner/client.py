"""A blocking client for credproxy sockets. Standard library only.

This is what runs inside a sandbox (``credproxy token``) and what programs
import, so it must start in the time Python itself needs: no trio, httpx,
structlog, msgspec or platformdirs here.

    from credproxy.inner.client import Client
    with Client() as c:                      # $CREDPROXY_SOCKET
        token = c.get_token("example")       # dict without refresh_token
        print(token["access_token"])

Errors are :mod:`credproxy.errors` exceptions: ``NotFound`` for a token that is
missing or not granted, ``Unauthorized``/``Forbidden``/``RateLimited``/
``ReauthRequired`` for refusals, ``DaemonUnavailable`` when nothing answers.

A session opened with ``credproxy run --capability`` also wants its capability
token in the handshake. The client takes it from, in this order: the
``capability`` argument; ``$CREDPROXY_CAPABILITY`` (for people who set it
themselves); the file descriptor named by ``$CREDPROXY_CAPABILITY_FD`` or
``$LLXPRT_CAPABILITY_FD`` (what ``credproxy run --capability`` hands over: fd 3,
64 lowercase hex characters and a newline).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import select
import socket
import sys

from credproxy.errors import (
    BY_CODE,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    AllBucketsExhausted,
    CredproxyError,
    DaemonUnavailable,
    NotFound,
    ProtocolError,
    RateLimited,
    Unauthorized,
)

# `typing` costs ~5 ms of `credproxy token`'s start-up; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SOCKET_ENV = ("CREDPROXY_SOCKET", "LLXPRT_CREDENTIAL_SOCKET")
CAPABILITY_ENV = "CREDPROXY_CAPABILITY"
CAPABILITY_FD_ENV = ("CREDPROXY_CAPABILITY_FD", "LLXPRT_CAPABILITY_FD")
CAPABILITY_READ_LIMIT = 129  # 64 hex + newline is 65 bytes; reading more shows trailing junk
CAPABILITY_PIPE_WAIT = 2.0  # seconds to wait for a pipe's writer before giving up
_HEX = frozenset("0123456789abcdef")
MAX_FRAME = 4 * 1024 * 1024  # what we accept from the server (v2 allows large replies)


def socket_from_env() -> str:
    """The socket named by ``CREDPROXY_SOCKET`` or ``LLXPRT_CREDENTIAL_SOCKET``.

    Raises:
        DaemonUnavailable: neither is set.
    """
    for name in SOCKET_ENV:
        value = os.environ.get(name)
        if value:
            return value
    raise DaemonUnavailable(
        "CREDPROXY_SOCKET is not set; run this inside `credproxy run -- ...` "
        "or point CREDPROXY_SOCKET at a session socket"
    )


class CapabilityUnavailable(Unauthorized):
    """The capability file descriptor named in the environment cannot be used.

    The message names the variable and the descriptor, never what was read.
    """


def capability_from_env() -> str | None:
    """The capability token this process was given, or None if it was given none.

    ``$CREDPROXY_CAPABILITY`` wins; otherwise the descriptor named by
    ``$CREDPROXY_CAPABILITY_FD`` (else ``$LLXPRT_CAPABILITY_FD``) is read.

    Raises:
        CapabilityUnavailable: the named descriptor is not open, not readable,
            or does not hold 64 lowercase hex characters (and a newline).
    """
    value = os.environ.get(CAPABILITY_ENV)
    if value:
        return value
    for name in CAPABILITY_FD_ENV:
        spec = os.environ.get(name)
        if spec:
            return read_capability_fd(name, spec)
    return None


def read_capability_fd(name: str, spec: str) -> str:
    """Read and check the capability token on the descriptor *spec* (from ``$name``).

    The descriptor is read with ``pread`` at offset 0 where it allows that (a
    file or a memfd, which is what ``credproxy run --capability`` passes): that
    moves no shared file offset, so every process that inherits the
    descriptor, and the same process again, reads the whole token. A pipe
    cannot be read that way; its content goes to its first reader only, and a
    second reader gets an empty pipe and this error. The descriptor is left
    open for the next reader.

    Raises:
        CapabilityUnavailable: see :func:`capability_from_env`.
    """
    # Echo the value only once it is known to be a short number: someone may
    # have put the token itself in the variable by mistake.
    if not (spec.isascii() and spec.isdigit() and len(spec) <= 7 and int(spec) >= 3):
        raise CapabilityUnavailable(
            f"{name} is not a file descriptor number (3 or more); run this inside "
            "`credproxy run --capability -- ...`, which sets it"
        )
    fd = int(spec)
    where = f"{name}={fd}: file descriptor {fd}"
    try:
        data = _read_fd(fd)
    except TimeoutError:
        raise CapabilityUnavailable(
            f"{where} is a pipe that stayed empty for {CAPABILITY_PIPE_WAIT:g} s"
        ) from None
    except OSError as exc:
        what = "is not open" if exc.errno == errno.EBADF else f"cannot be read ({exc.strerror})"
        raise CapabilityUnavailable(
            f"{where} {what}; run this inside `credproxy run --capability -- ...`, which opens it"
        ) from None
    token = data.removesuffix(b"\n")
    if not data:
        problem = "is empty (a pipe gives its content to its first reader only)"
    elif len(token) != 64 or not _HEX.issuperset(token.decode("latin-1")):
        problem = "does not hold a capability token (64 lowercase hex characters and a newline)"
    else:
        return token.decode("ascii")
    raise CapabilityUnavailable(f"{where} {problem}")


def _read_fd(fd: int) -> bytes:
    """Up to CAPABILITY_READ_LIMIT bytes of *fd*: pread from 0, else (a pipe) read."""
    chunks: list[bytes] = []
    got = 0
    try:
        while got < CAPABILITY_READ_LIMIT:
            chunk = os.pread(fd, CAPABILITY_READ_LIMIT - got, got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        if exc.errno != errno.ESPIPE or chunks:  # ESPIPE: a pipe, socket or terminal
            raise
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while got < CAPABILITY_READ_LIMIT:
        if not poller.poll(CAPABILITY_PIPE_WAIT * 1000):
            raise TimeoutError
        chunk = os.read(fd, CAPABILITY_READ_LIMIT - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Client:
    """One connection to a credproxy socket; requests are sent one at a time."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        capability: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.path = os.fspath(path) if path is not None else socket_from_env()
        self.capability = capability
        # A capability descriptor that cannot be read matters only to a session
        # that requires a token: the control socket and sessions opened without
        # --capability accept the connection without one. So the problem is
        # kept, and raised only if the handshake is refused.
        self._capability_problem: CapabilityUnavailable | None = None
        if capability is None:
            try:
                self.capability = capability_from_env()
            except CapabilityUnavailable as exc:
                self._capability_problem = exc
        self.timeout = timeout
        self.version = 0
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)

    # -- connection --

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(
                f"cannot reach credproxy at {self.path}: {exc.strerror or exc}"
            ) from None
        self._sock = sock
        payload: dict[str, Any] = {"minVersion": 1, "maxVersion": 2}
        if self.capability:
            payload["capabilityToken"] = self.capability
        reply = self._roundtrip({"v": 1, "op": "handshake", "payload": payload})
        if reply.get("ok") is not True:
            self.close()
            if self._capability_problem is not None and reply.get("code") == "UNAUTHORIZED":
                raise CapabilityUnavailable(
                    f"this session requires a capability token: {self._capability_problem}"
                )
            raise _error_from(reply)
        self.version = int(reply.get("data", {}).get("version", 1))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --

    def call(self, op: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return its ``data``, or raise its error."""
        if self._sock is None:
            self.connect()
        rid = str(next(self._ids))
        reply = self._roundtrip({"v": self.version, "id": rid, "op": op, "payload": payload or {}})
        if reply.get("id") != rid:
            self.close()
            raise ProtocolError("credproxy answered a different request; connection closed")
        if reply.get("ok") is True:
            data = reply.get("data", {})
            return data if isinstance(data, dict) else {}
        raise _error_from(reply)

    def get_token(self, provider: str, bucket: str | None = None) -> dict[str, Any]:
        return self.call("get_token", _key(provider, bucket))

    def refresh_token(self, provider: str, bucket: str | None = None) -> dict[str, Any]:
        return self.call("refresh_token", _key(provider, bucket))

    def get_api_key(self, name: str) -> str:
        return str(self.call("get_api_key", {"name": name})["key"])

    def list_providers(self) -> list[str]:
        return list(self.call("list_providers")["providers"])

    def list_buckets(self, provider: str) -> list[str]:
        return list(self.call("list_buckets", {"provider": provider})["buckets"])

    # -- framing --

    def _roundtrip(self, obj: dict[str, Any]) -> dict[str, Any]:
        sock = self._sock
        assert sock is not None
        body = json.dumps(obj, separators=(",", ":")).encode()
        try:
            sock.sendall(len(body).to_bytes(4, "big") + body)
            size = int.from_bytes(self._recv_exact(4), "big")
            if size > MAX_FRAME:
                raise ProtocolError(f"credproxy sent an oversized frame ({size} bytes)")
            reply = json.loads(self._recv_exact(size))
        except (OSError, ValueError) as exc:
            self.close()
            if isinstance(exc, TimeoutError):
                raise DaemonUnavailable(
                    f"credproxy at {self.path} did not answer in time"
                ) from None
            raise DaemonUnavailable(f"connection to credproxy at {self.path} lost") from None
        if not isinstance(reply, dict):
            self.close()
            raise ProtocolError("credproxy sent a reply that is not a JSON object")
        return reply

    def _recv_exact(self, n: int) -> bytes:
        assert self._sock is not None
        chunks, left = [], n
        while left:
            chunk = self._sock.recv(min(left, 1 << 16))
            if not chunk:
                raise ConnectionResetError("connection closed by credproxy")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def _key(provider: str, bucket: str | None) -> dict[str, Any]:
    return {"provider": provider} if bucket is None else {"provider": provider, "bucket": bucket}


def _error_from(reply: dict[str, Any]) -> CredproxyError:
    code = str(reply.get("code") or "INTERNAL_ERROR")
    message = str(reply.get("error") or code)
    if code == "RATE_LIMITED":
        return RateLimited(message, int(reply.get("retryAfter") or 1))
    if code == "ALL_BUCKETS_EXHAUSTED":
        reasons = reply.get("bucketFailureReasons")
        retry = reply.get("retryAfter")
        return AllBucketsExhausted(
            message,
            {str(k): str(v) for k, v in reasons.items()} if isinstance(reasons, dict) else {},
            retry if isinstance(retry, int) else None,
        )
    err = BY_CODE.get(code, CredproxyError)(message)
    err.code = code
    return err


# --- `credproxy token` -------------------------------------------------------

TOKEN_USAGE = (
    "usage: credproxy token PROVIDER [--bucket BUCKET] "  # noqa: S105
    "[--format raw|json|header|env|kubectl|aws-process|docker] [--json]"
)
TOKEN_HELP = """\
Print the access token for PROVIDER from the socket in $CREDPROXY_SOCKET.

--format raw          the access token (the default)
--format json         the served JSON (--json is the same)
--format header       Authorization: Bearer <token>, for curl -H
--format env          export CREDPROXY_ACCESS_TOKEN=... lines, for eval
--format kubectl      an ExecCredential (client.authentication.k8s.io/v1)
--format aws-process  a credential_process answer (needs AWS fields in the token)
--format docker       a docker credential helper answer; the server URL on stdin
See docs/integrations.md for each tool's configuration."""  # noqa: S105
STDIN_LIMIT = 64 * 1024  # a server URL, for --format docker
#: What a docker credential helper prints (on stdout, exit 1) when it has no
#: credentials for the registry: docker then goes on without (anonymous pulls).
DOCKER_NOT_FOUND = "credentials not found in native keychain"
# The names of credproxy.inner.formats.FORMATS (a test keeps them equal): raw and
# json, what helpers run most often, are printed here without importing that module.
FORMAT_NAMES = ("raw", "json", "header", "env", "kubectl", "aws-process", "docker")


def token_main(argv: list[str]) -> int:
    """``credproxy token PROVIDER [--bucket B] [--format F]``: print an access token."""
    provider = bucket = None
    fmt = "raw"
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            print(TOKEN_USAGE)
            print(TOKEN_HELP)
            return EXIT_OK
        if arg == "--json":
            fmt = "json"
        elif arg == "--bucket" or arg.startswith("--bucket="):
            bucket = arg.partition("=")[2] if "=" in arg else next(args, None)
            if not bucket:
                return _usage("--bucket needs a value")
        elif arg == "--format" or arg.startswith("--format="):
            value = arg.partition("=")[2] if "=" in arg else next(args, None)
            if value not in FORMAT_NAMES:
                return _usage(f"--format needs one of {', '.join(FORMAT_NAMES)}")
            fmt = value
        elif arg.startswith("-"):
            return _usage(f"unknown option {arg}")
        elif provider is None:
            provider = arg
        else:
            return _usage(f"unexpected argument {arg!r}")
    if provider is None:
        return _usage("PROVIDER is required")
    hint = _grant_form_hint(provider)
    if hint:
        return _usage(hint)
    for what, value in (("PROVIDER", provider), ("--bucket", bucket)):
        if value is not None and not _sendable(value):
            return _usage(f"{what} is not a name ({NAME_RULE})")
    stdin = sys.stdin.read(STDIN_LIMIT) if fmt == "docker" and sys.stdin else ""
    if fmt == "kubectl":  # (kubectl's request: the ExecCredential version it reads)
        stdin = os.environ.get("KUBERNETES_EXEC_INFO", "")
    try:
        with Client() as client:
            token = client.get_token(provider, bucket)
        if fmt == "raw":
            out = token.get("access_token")
            if not isinstance(out, str) or not out:
                raise CredproxyError("the served token has no access_token")
        elif fmt == "json":
            out = json.dumps(token, sort_keys=True)
        else:
            from credproxy.inner.formats import FORMATS

            out = FORMATS[fmt](token, stdin)
    except NotFound as exc:
        print(
            f"credproxy token: {exc}: the session must be granted {provider}, and logged in "
            "on the host; `credproxy status` on the host says which is missing",
            file=sys.stderr,
        )
        if fmt == "docker":  # (docker reads a helper's error on stdout: this one means none)
            print(DOCKER_NOT_FOUND)
            return 1
        return exc.exit_code
    except CredproxyError as exc:
        print(f"credproxy token: {exc}", file=sys.stderr)
        if fmt == "docker":
            print(f"credproxy token: {exc}")
            return 1
        return exc.exit_code
    return print_out(out)


def _grant_form_hint(provider: str) -> str | None:
    """What to do instead when *provider* is written as a grant (``key:NAME``, ``api:P``)."""
    head, sep, tail = provider.partition(":")
    if not sep:
        return None
    if head == "key":
        return f"{provider} is an API key: print it with `credproxy key get {tail}`"
    if head == "api":
        return (
            f"{provider} grants {tail}'s API through the HTTP proxy, never its token: "
            f"send requests to http://credproxy/{tail}/... (credproxy forward --provider {tail})"
        )
    return f"give the bucket as an option: credproxy token {head} --bucket {tail}"


KEY_USAGE = "usage: credproxy key get NAME"
KEY_HELP = """\
Print the API key NAME from the socket in $CREDPROXY_SOCKET (the session must be
granted key:NAME). A key that is not stored and one that is not granted are the
same "not found" (exit 3)."""


def key_get_main(argv: list[str]) -> int:
    """``credproxy key get NAME``: print a granted API key (inside a sandbox)."""
    name = None
    for arg in argv:
        if arg in ("-h", "--help"):
            print(KEY_USAGE)
            print(KEY_HELP)
            return EXIT_OK
        if arg.startswith("-"):
            return _key_usage(f"unknown option {arg}")
        if name is not None:
            return _key_usage(f"unexpected argument {arg!r}")
        name = arg
    if name is None:
        return _key_usage("NAME is required")
    if name.startswith("key:"):
        name = name[4:]  # the grant's spelling, key:NAME, means the same key
    if not _sendable(name):
        return _key_usage(f"NAME is not a name ({NAME_RULE})")
    try:
        with Client() as client:
            value = client.get_api_key(name)
    except NotFound as exc:
        print(
            f"credproxy key get: {exc}: the session must be granted key:{name}, and the key "
            f"stored on the host (credproxy key set {name}); `credproxy status` on the host "
            "says which is missing",
            file=sys.stderr,
        )
        return exc.exit_code
    except CredproxyError as exc:
        print(f"credproxy key get: {exc}", file=sys.stderr)
        return exc.exit_code
    return print_out(value)


def _key_usage(message: str) -> int:
    print(f"credproxy key get: {message} ({KEY_USAGE})", file=sys.stderr)
    return EXIT_USAGE


def print_out(out: str) -> int:
    """Print *out* and a newline; a reader that went away is exit 1, not a traceback."""
    try:
        print(out, flush=True)
    except BrokenPipeError:
        # The reader went away (`credproxy token x | head -c0`): not our error
        # to report, but stdout must not be flushed again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    return EXIT_OK


def silent_daemon(path: str | os.PathLike[str]) -> str | None:
    """What to say of a daemon that listens on the control socket *path* but did not answer.

    None when nothing listens there (no daemon runs). The kernel queues a
    connection and names the listener (``SO_PEERCRED``) before it has accepted
    anything, so a stopped or stuck daemon is told from none.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(os.fspath(path))
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return None
    pid = int.from_bytes(creds[:4], sys.byteorder)
    if not pid:
        return None
    return (
        f"the credproxy daemon (pid {pid}) holds {os.fspath(path)} but does not answer "
        f"(stopped, or stuck: see its log); end it with kill -TERM {pid}"
    )


#: What the daemon takes as a name (credproxy.core.names; kept here: this client is stdlib only).
NAME_RULE = "1-64 of A-Z a-z 0-9 . _ @ - (not . or ..)"


def _sendable(name: str) -> bool:
    """Whether *name* may be a name at all: short, and text (not undecodable bytes).

    The daemon says what is wrong with any other; these could not even reach it
    (a lone surrogate is no JSON, a long one no frame).
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return 0 < len(name) <= 64


def _usage(message: str) -> int:
    print(f"credproxy token: {message} ({TOKEN_USAGE})", file=sys.stderr)
    return EXIT_USAGE
