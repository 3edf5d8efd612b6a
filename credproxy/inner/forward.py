"""``credproxy forward``: a TCP port inside the sandbox that leads to the session socket.

Standard library only, like ``credproxy token``: it runs inside sandboxes and
must start in the time Python itself needs.

    credproxy forward [--port N] [--provider P[:BUCKET]]... [--env NAME=P[:BUCKET]]...
                      -- CMD [ARGS...]

Tools that take nothing but a base URL (the ``anthropic`` and ``openai`` SDKs,
Claude Code, Codex, Gemini CLI) cannot speak to a Unix socket. The session
socket answers HTTP/1.1 (``GET /PROVIDER[:BUCKET]/REST`` is sent on to the
provider's ``[providers.PROVIDER.api] base_url`` + ``/REST`` with the
``Authorization`` header added by the daemon, outside the sandbox), so all a
tool needs is a TCP port that leads there. This command listens on
``127.0.0.1:N`` in the sandbox's own network namespace, runs CMD with base-URL
variables pointing at that port, and exits with CMD's status.

Theory of operation
-------------------

The relay does not parse HTTP: every accepted TCP connection gets a new
connection to ``$CREDPROXY_SOCKET`` (else ``$LLXPRT_CREDENTIAL_SOCKET``) and
bytes are copied both ways as they arrive, by two threads per connection (one
per direction, each a blocking ``recv``/``sendall`` loop). So a streamed
answer (SSE) reaches the tool event by event, keep-alive and pipelining are
whatever the two ends make of them, and the daemon sees exactly the bytes the
tool sent (the ``Host`` header is ``127.0.0.1:N``, not ``credproxy``).

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
- The session socket cannot be reached: the tool's connection is closed with
  nothing sent (one note on stderr, the first time).

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
socket variable is unset or names no socket, or the port cannot be bound
(PRODUCT.md section 3: 1 is "anything else", as for ``credproxy token``).
"""

from __future__ import annotations

import contextlib
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
from credproxy.inner.client import socket_from_env

# `typing` costs ~5 ms of start-up; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import Any

USAGE = (
    "usage: credproxy forward [--port N] [--provider P[:BUCKET]]... "
    "[--env NAME=P[:BUCKET]]... -- CMD [ARGS...]"
)
HOST = "127.0.0.1"
BUFSIZE = 64 * 1024
CONNECT_TIMEOUT = 10.0  # seconds to wait for the session socket to accept a connection
ROOT_VAR = "CREDPROXY_BASE_URL"
# The variables set when no --env is given, by provider name (what the tools
# read: reference/providers.md section 2).
DEFAULT_VARS = {
    "claude": "ANTHROPIC_BASE_URL",
    "anthropic": "ANTHROPIC_BASE_URL",
    "codex": "OPENAI_BASE_URL",
    "openai": "OPENAI_BASE_URL",
    "gemini": "GOOGLE_GEMINI_BASE_URL",
}
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@-")
_VAR_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


class ForwardUsage(CredproxyError):
    """The command line is malformed (exit 2)."""

    exit_code = EXIT_USAGE


# --- the command line and the environment (pure) -------------------------------


def parse_args(argv: Sequence[str]) -> tuple[int, list[str], list[tuple[str, str]], list[str]]:
    """``(port, providers, [(NAME, provider)], cmd)`` from the arguments after ``forward``.

    Options come first; CMD starts after ``--`` or at the first argument that
    is not an option. Raises :class:`ForwardUsage`.
    """
    port = 0
    providers: list[str] = []
    env_map: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-"):
            break
        name, eq, value = arg.partition("=")
        if name not in ("--port", "--provider", "--env"):
            raise ForwardUsage(f"unknown option {arg}")
        if not eq:
            i += 1
            if i == len(argv):
                raise ForwardUsage(f"{name} needs a value")
            value = argv[i]
        if name == "--port":
            if not (value.isascii() and value.isdigit() and int(value) <= 65535):
                raise ForwardUsage(f"--port wants a number from 0 to 65535, not {value!r}")
            port = int(value)
        elif name == "--provider":
            providers.append(_check_grant(value))
        else:
            var, eq, grant = value.partition("=")
            if not eq or not var or var[0].isdigit() or not _VAR_CHARS.issuperset(var):
                raise ForwardUsage(f"--env wants NAME=PROVIDER[:BUCKET], not {value!r}")
            env_map.append((var, _check_grant(grant)))
        i += 1
    cmd = list(argv[i:])
    if not cmd:
        raise ForwardUsage("CMD is required")
    return port, providers, env_map, cmd


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


class Forwarder:
    """Accepts TCP connections on *listener* and relays each to the socket at *path*."""

    def __init__(self, listener: socket.socket, path: str) -> None:
        self.listener = listener
        self.path = path
        self._closing = threading.Event()
        self._noted = False
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
        with contextlib.suppress(OSError):  # SSE events are small writes: send them at once
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.settimeout(CONNECT_TIMEOUT)
            upstream.connect(self.path)
            upstream.settimeout(None)
        except OSError as exc:
            upstream.close()
            client.close()
            self._note(f"cannot reach credproxy at {self.path}: {exc.strerror or exc}")
            return
        _Relay(client, upstream).run()

    def _note(self, message: str) -> None:
        if not self._noted:  # CMD's terminal is not ours to flood
            self._noted = True
            print(f"credproxy forward: {message} (connection closed)", file=sys.stderr)


def listen(port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:*port* (0: an ephemeral port), not inheritable."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
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


def run_child(argv: list[str], env: dict[str, str]) -> int:
    """Run CMD to its end, passing on SIGTERM, SIGHUP and SIGINT; its exit status.

    SIGINT is passed on unless this process is in the foreground of its
    terminal: then the terminal has sent it to CMD as well (same process
    group), and passing it on would deliver it twice (two Ctrl-C quit some
    tools).
    """
    try:
        child = subprocess.Popen(argv, env=env)
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


def main(argv: list[str]) -> int:
    """``credproxy forward ...``: see the module docstring."""
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        print("Listen on 127.0.0.1:N, relay each connection to $CREDPROXY_SOCKET, run CMD")
        print("with ANTHROPIC_BASE_URL/OPENAI_BASE_URL/... pointing there; exit with its status.")
        return EXIT_OK
    try:
        port, providers, env_map, cmd = parse_args(argv)
        base_url_env(port, providers, env_map)  # usage errors before anything is opened
        path = session_socket()
        forwarder = Forwarder(listen(port), path)
    except CredproxyError as exc:
        hint = f" ({USAGE})" if isinstance(exc, ForwardUsage) else ""
        print(f"credproxy forward: {exc}{hint}", file=sys.stderr)
        return exc.exit_code
    try:
        env = dict(os.environ, **base_url_env(forwarder.port, providers, env_map))
        forwarder.start()
        return run_child(cmd, env)
    finally:
        forwarder.close()
