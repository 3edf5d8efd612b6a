"""`credproxy forward`: only this uid's connections are relayed, each after the preamble.

Two rules of ``credproxy.inner.forward`` (its module docstring has them in full):

- the owner of the other end of each TCP connection is looked up in
  ``/proc/net/tcp`` (``tcp6`` for an IPv6 socket on the v4-mapped address), and
  anyone but this uid, or an owner that cannot be told, gets a fixed 403 and
  nothing reaches the session socket;
- the session socket gets ``CREDPROXY/1 forward=PORT[ capability=TOKEN]\\r\\n``
  before the tool's bytes.

The parsing is tested on sample text; the rest with real sockets: a recording
Unix-socket server in the test stands for the session socket, a Forwarder runs
in this process or as the installed ``credproxy forward``, and the other uid is
a real process run with ``setpriv`` as ``nobody`` (65534), which needs root.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from conftest import CREDPROXY, Dirs, UnixServer
from credproxy.inner import forward
from credproxy.inner.forward import (
    Forwarder,
    decode_proc_address,
    listen,
    peer_uid,
    preamble,
    refusal,
    socket_owner,
)

WAIT = 10.0  # seconds any one step may take before a test gives up (never a timing claim)
NOBODY = 65534
CAP = "0123456789abcdef" * 4
CAP_VARS = ("CREDPROXY_CAPABILITY", "CREDPROXY_CAPABILITY_FD", "LLXPRT_CAPABILITY_FD")
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nrelayed"


def pack(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


# -- /proc/net/tcp, parsed (pure) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "byteorder", "address", "port"),
    [
        ("0100007F:1F90", "little", "127.0.0.1", 8080),
        ("7F000001:1F90", "big", "127.0.0.1", 8080),
        ("00000000:0000", "little", "0.0.0.0", 0),
        ("0102A8C0:E3C2", "little", "192.168.2.1", 58306),
        ("0000000000000000FFFF00000100007F:C4F4", "little", "::ffff:127.0.0.1", 50420),
        ("00000000000000000000000001000000:0050", "little", "::1", 80),
        ("000080FE000000000000000001000000:0016", "little", "fe80::1", 22),
        ("FE800000000000000000000000000001:0016", "big", "fe80::1", 22),
        ("0000000000000000ffff00000100007f:c4f4", "little", "::ffff:127.0.0.1", 50420),
    ],
)
def test_proc_addresses_decode_word_by_word_in_host_order(
    field: str, byteorder: Literal["little", "big"], address: str, port: int
) -> None:
    """An address of /proc/net/tcp(6) is 32-bit words in host byte order (little-endian: 0100007F is 127.0.0.1), its port plain hex."""
    assert decode_proc_address(field, byteorder) == (pack(address), port)


@pytest.mark.parametrize(
    "field",
    ["0100007F", "0100007F:", "7F:0050", "0100007G:0050", "0100007F:12345", "+100007F:0050", ""],
)
def test_malformed_proc_addresses_are_refused(field: str) -> None:
    """Anything but 8 or 32 hex digits, a colon and 1 to 4 hex digits raises ValueError."""
    with pytest.raises(ValueError, match="not a /proc/net/tcp address"):
        decode_proc_address(field, "little")


# A listener on 127.0.0.1:8080 (uid 1000), a connection to it from port 50000
# owned by uid 1001 (and the listener's accepted end, uid 1000), one from port
# 50001 whose process has closed it (inode 0, shown as uid 0), and a TIME_WAIT.
TCP_SAMPLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4101 1 0000000000000000 100 0 0 10 0
   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 4102 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 4103 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:C351 0100007F:1F90 04 00000000:00000000 01:00000014 00000000     0        0 0 2 0000000000000000 20 4 30 10 -1
   4: 0100007F:C352 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   5: garbage line
   6: 0100007F:ZZZZ 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1002        0 4104 1
"""

TCP6_SAMPLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000100007F:C4F4 0000000000000000FFFF00000100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 6887 2 0000000000000000 20 0 0 10 -1
   1: 00000000000000000000000001000000:C4F5 00000000000000000000000001000000:1F90 01 00000000:00000000 00:00000000 00000000  1002        0 6888 2 0000000000000000 20 0 0 10 -1
"""

LISTENER = (pack("127.0.0.1"), 8080)


@pytest.mark.parametrize(
    ("local", "remote", "uid"),
    [
        ((pack("127.0.0.1"), 50000), LISTENER, 1001),  # the peer's socket
        (LISTENER, (pack("127.0.0.1"), 50000), 1000),  # our end of it
        ((pack("127.0.0.1"), 50001), LISTENER, None),  # closed by its process: inode 0
        ((pack("127.0.0.1"), 50002), LISTENER, None),  # TIME_WAIT: inode 0
        ((pack("127.0.0.1"), 50003), LISTENER, None),  # no such line
        ((pack("127.0.0.2"), 50000), LISTENER, None),  # another address, same port
        ((pack("127.0.0.1"), 50000), (pack("127.0.0.1"), 8081), None),  # another listener
    ],
    ids=["peer", "ours", "orphan", "time-wait", "absent", "other-address", "other-remote"],
)
def test_socket_owner_is_the_uid_of_the_exactly_matching_line(
    local: tuple[bytes, int], remote: tuple[bytes, int], uid: int | None
) -> None:
    """The uid column of the line whose local and remote addresses both match; None for no line or for a socket with inode 0."""
    assert socket_owner(TCP_SAMPLE.splitlines(), local, remote, "little") == uid


def test_socket_owner_reads_tcp6_lines_and_v4_mapped_addresses() -> None:
    """tcp6 lines match by 128-bit address: a v4-mapped peer and a ::1 peer each give their own uid."""
    lines = TCP6_SAMPLE.splitlines()
    mapped = pack("::ffff:127.0.0.1")
    assert socket_owner(lines, (mapped, 50420), (mapped, 8080), "little") == 1001
    assert socket_owner(lines, (pack("::1"), 50421), (pack("::1"), 8080), "little") == 1002
    assert socket_owner(lines, (pack("::1"), 50420), (pack("::1"), 8080), "little") is None
    # An IPv4 address is never equal to a 16-byte one.
    assert socket_owner(lines, (pack("127.0.0.1"), 50420), LISTENER, "little") is None


@pytest.mark.parametrize("family", ["ipv4", "ipv6-mapped"])
def test_peer_uid_of_a_real_local_connection_is_ours(family: str) -> None:
    """For a real connection on 127.0.0.1 (from an IPv4 socket, or an IPv6 one on ::ffff:127.0.0.1), the lookup finds this process's uid."""
    with listen(0) as listener:
        port = listener.getsockname()[1]
        if family == "ipv4":
            client = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        else:
            client = ipv6_socket_or_skip()
            client.connect(("::ffff:127.0.0.1", port))
        with client:
            conn, _ = listener.accept()
            with conn:
                assert peer_uid(conn) == os.getuid()


def ipv6_socket_or_skip() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:
        pytest.skip(f"no IPv6 sockets here ({exc.strerror})")
    sock.settimeout(WAIT)
    return sock


def test_the_refusal_is_a_complete_http_403_with_a_json_body() -> None:
    """The canned answer: 403, Content-Type application/json, Connection: close, an exact Content-Length, and a body naming both uids."""
    for theirs, says in [(NOBODY, f"from uid {NOBODY}"), (None, "cannot be told")]:
        raw = refusal(1000, theirs)
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 403 Forbidden"
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert headers == {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Connection": "close",
        }
        error = json.loads(body)["error"]
        assert error["type"] == "credproxy"
        assert error["message"].startswith("credproxy forward serves only processes of uid 1000; ")
        assert says in error["message"]


def test_the_preamble_line() -> None:
    """CREDPROXY/1 forward=PORT, then capability=TOKEN if there is one, ended by CRLF; a malformed token is refused."""
    assert preamble(8080, None) == b"CREDPROXY/1 forward=8080\r\n"
    assert preamble(8080, CAP) == f"CREDPROXY/1 forward=8080 capability={CAP}\r\n".encode()
    for bad in (CAP.upper(), CAP[:-1], CAP + "0", "x" * 64, CAP[:-2] + "\r\n"):
        with pytest.raises(ValueError, match="64 lowercase hex"):
            preamble(8080, bad)


# -- a recording session socket ---------------------------------------------------------------------


class Recorder(UnixServer):
    """A Unix-socket server: records each connection's bytes; answers ANSWER.

    It reads until the end of the request head that follows the preamble
    line (or to the end of stream with ``until_eof``), then answers and closes.
    """

    conn_timeout = WAIT

    def __init__(self, path: Path, *, until_eof: bool = False) -> None:
        self.until_eof = until_eof
        self.connections: list[bytes] = []
        super().__init__(path)

    def serve(self, conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
            if not self.until_eof and b"\r\n\r\n" in data.partition(b"\r\n")[2]:
                break
        self.connections.append(data)
        conn.sendall(ANSWER)


@pytest.fixture
def recorder(unix_servers: Callable[..., Any]) -> Callable[..., Recorder]:
    """Start recording session sockets in the test's directory; stop them after."""
    return functools.partial(unix_servers, Recorder)


class CountingForwarder(Forwarder):
    """A Forwarder that counts the connections it has finished with.

    A test may set ``gate``: it is called with each accepted connection before
    the Forwarder looks at it.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.served = 0
        self.served_changed = threading.Condition()
        self.gate: Callable[[socket.socket], None] | None = None

    def _serve(self, client: socket.socket) -> None:
        try:
            if self.gate is not None:
                self.gate(client)
            super()._serve(client)
        finally:
            with self.served_changed:
                self.served += 1
                self.served_changed.notify_all()

    def wait_served(self, n: int) -> None:
        with self.served_changed:
            assert self.served_changed.wait_for(lambda: self.served >= n, WAIT), self.served


@contextlib.contextmanager
def forwarding(path: Path, capability: str | None = None) -> Iterator[CountingForwarder]:
    fwd = CountingForwarder(listen(0), str(path), capability)
    fwd.start()
    try:
        yield fwd
    finally:
        fwd.close()


def exchange(port: int, request: bytes, *, family: int = socket.AF_INET) -> bytes:
    """Send *request*, half-close, read the answer to its end."""
    host = "127.0.0.1" if family == socket.AF_INET else "::ffff:127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect((host, port))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


REQUEST = b"POST /p/v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 256\r\n\r\n" + bytes(
    range(256)
)


@pytest.mark.parametrize("capability", [None, CAP], ids=["without", "with-capability"])
def test_the_preamble_comes_first_then_the_clients_exact_bytes(
    recorder: Callable[..., Recorder], capability: str | None
) -> None:
    """The session socket gets the preamble line (with the port, and the capability when given), then exactly the bytes the client sent; the answer comes back."""
    server = recorder(until_eof=True)
    with forwarding(server.path, capability) as fwd:
        port = fwd.port
        got = exchange(port, REQUEST)
    assert got == ANSWER
    line = f"CREDPROXY/1 forward={port}"
    line += f" capability={capability}\r\n" if capability else "\r\n"
    assert server.connections == [line.encode() + REQUEST]


def test_an_owner_that_cannot_be_told_is_refused(
    recorder: Callable[..., Recorder], monkeypatch: pytest.MonkeyPatch, dirs: Dirs
) -> None:
    """With no /proc/net/tcp to read (as when /proc is not mounted), even this uid's connection gets the 403: the check fails closed."""
    monkeypatch.setattr(forward, "PROC_NET_TCP", str(dirs.root / "no-proc-net-tcp"))
    monkeypatch.setattr(forward, "PROC_NET_TCP6", str(dirs.root / "no-proc-net-tcp6"))
    server = recorder()
    with forwarding(server.path) as fwd:
        got = exchange(fwd.port, b"GET /p/x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"cannot be told" in got
    assert server.connections == []


# -- the preamble from the installed `credproxy forward` --------------------------------------------

# CMD: one request through the port; reports the answer, and the capability
# this process finds itself (credproxy's own client, reading the variables).
CMD_CLIENT = """
    import json, os, socket, urllib.parse
    from credproxy.inner.client import CapabilityUnavailable, capability_from_env
    url = urllib.parse.urlsplit(os.environ["CREDPROXY_BASE_URL"])
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(b"GET /p/x HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    try:
        mine = [capability_from_env(), capability_from_env()]  # twice: nothing is used up
    except CapabilityUnavailable as exc:
        mine = str(exc)
    print(json.dumps({"got": got.decode(), "port": url.port, "mine": mine}))
"""


def run_forward(
    dirs: Dirs,
    sock: Path,
    code: str = CMD_CLIENT,
    *,
    pass_fds: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    base = dirs.env(CREDPROXY_SOCKET=str(sock))
    for name in CAP_VARS:
        base.pop(name, None)
    base.update(env or {})
    return subprocess.run(
        [CREDPROXY, "forward", "--", sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=base,
        pass_fds=pass_fds,
        check=False,
    )


def relayed_quietly(
    result: subprocess.CompletedProcess[str], server: Recorder
) -> tuple[dict[str, Any], bytes]:
    """forward exited 0 and said nothing; CMD's report, and the one connection the socket got."""
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out: dict[str, Any] = json.loads(result.stdout)
    (received,) = server.connections
    return out, received


def test_credproxy_capability_variable_reaches_the_preamble(
    dirs: Dirs, recorder: Callable[..., Recorder]
) -> None:
    """With $CREDPROXY_CAPABILITY set, forward's preamble presents it, and CMD still has the variable."""
    server = recorder()
    result = run_forward(dirs, server.path, env={"CREDPROXY_CAPABILITY": CAP})
    out, received = relayed_quietly(result, server)
    assert out["got"] == ANSWER.decode()
    assert out["mine"] == [CAP, CAP]
    assert (
        received
        == (
            f"CREDPROXY/1 forward={out['port']} capability={CAP}\r\n"
            "GET /p/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        ).encode()
    )


def test_no_capability_means_a_preamble_without_one(
    dirs: Dirs, recorder: Callable[..., Recorder]
) -> None:
    """With no capability variable at all, the preamble names the port only, and nothing is said on stderr."""
    server = recorder()
    result = run_forward(dirs, server.path)
    out, received = relayed_quietly(result, server)
    assert out["mine"] == [None, None]
    assert received.startswith(f"CREDPROXY/1 forward={out['port']}\r\nGET /p/x ".encode())


def memfd_with(content: bytes) -> int:
    fd = os.memfd_create("test-capability", 0)
    os.write(fd, content)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


@pytest.mark.parametrize("variable", ["CREDPROXY_CAPABILITY_FD", "LLXPRT_CAPABILITY_FD"])
@pytest.mark.parametrize("kind", ["memfd", "pipe"])
def test_a_capability_descriptor_reaches_the_preamble_and_stays_readable_for_cmd(
    dirs: Dirs, recorder: Callable[..., Recorder], variable: str, kind: str
) -> None:
    """The token on the descriptor named by the variable is presented in the preamble, and CMD still reads it there (twice), whether it was a memfd or a pipe that forward's read emptied."""
    server = recorder()
    if kind == "memfd":
        fd = memfd_with(f"{CAP}\n".encode())
    else:
        fd, writer = os.pipe()
        os.write(writer, f"{CAP}\n".encode())
        os.close(writer)
    try:
        result = run_forward(dirs, server.path, pass_fds=(fd,), env={variable: str(fd)})
    finally:
        os.close(fd)
    out, received = relayed_quietly(result, server)
    assert out["mine"] == [CAP, CAP]
    assert received.startswith(f"CREDPROXY/1 forward={out['port']} capability={CAP}\r\n".encode())


def test_the_variable_wins_and_the_descriptor_still_reaches_cmd(
    dirs: Dirs, recorder: Callable[..., Recorder]
) -> None:
    """With both $CREDPROXY_CAPABILITY and a descriptor variable, the preamble presents the variable's token (as credproxy's client would), and CMD still gets the descriptor, untouched (llxprt reads only that)."""
    server = recorder()
    other = "f" * 64
    fd = memfd_with(f"{other}\n".encode())
    code = CMD_CLIENT.replace(
        "print(json.dumps(",
        "mine = [mine, os.pread(int(os.environ['LLXPRT_CAPABILITY_FD']), 200, 0).decode()]\n    print(json.dumps(",
    )
    try:
        result = run_forward(
            dirs,
            server.path,
            code,
            pass_fds=(fd,),
            env={"CREDPROXY_CAPABILITY": CAP, "LLXPRT_CAPABILITY_FD": str(fd)},
        )
    finally:
        os.close(fd)
    out, received = relayed_quietly(result, server)
    assert out["mine"] == [[CAP, CAP], f"{other}\n"]
    assert received.startswith(f"CREDPROXY/1 forward={out['port']} capability={CAP}\r\n".encode())


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"CREDPROXY_CAPABILITY_FD": "9"},
            "CREDPROXY_CAPABILITY_FD=9: file descriptor 9 is not open",
        ),
        ({"CREDPROXY_CAPABILITY_FD": "token"}, "is not a file descriptor number"),
        ({"CREDPROXY_CAPABILITY": "not-a-token"}, "$CREDPROXY_CAPABILITY does not hold"),
    ],
    ids=["closed-fd", "not-a-number", "malformed-variable"],
)
def test_an_unusable_capability_is_one_note_and_no_capability(
    dirs: Dirs, recorder: Callable[..., Recorder], env: dict[str, str], says: str
) -> None:
    """A capability that cannot be read or is malformed: one line on stderr saying why, and connections are relayed with a preamble that has no capability."""
    server = recorder()
    result = run_forward(dirs, server.path, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("credproxy forward: ") and says in lines[0], lines[0]
    assert "relayed without" in lines[0]
    out = json.loads(result.stdout)
    (received,) = server.connections
    assert received.startswith(f"CREDPROXY/1 forward={out['port']}\r\nGET /p/x ".encode())


# -- another uid, for real --------------------------------------------------------------------------

SETPRIV = shutil.which("setpriv")
AS_NOBODY = [SETPRIV or "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

# A client run as nobody (or as us): connect (IPv4, or IPv6 on the v4-mapped
# address), send a request, half-close unless told to close at once, and print
# what came back.
PEER_CLIENT = r"""
import socket, sys
port, family, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if family == "ipv4":
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
else:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(("::ffff:127.0.0.1", port))
s.sendall(b"GET /p/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
if mode == "close":  # gone before forward may even look: it must not count as anyone
    s.close()
    sys.exit(0)
s.shutdown(socket.SHUT_WR)
got = b""
while chunk := s.recv(65536):
    got += chunk
sys.stdout.write(got.decode())
"""


@pytest.fixture(scope="module")
def nobody_python() -> str:
    """An interpreter that nobody may run, or skip (not root, no setpriv)."""
    if os.geteuid() != 0:
        pytest.skip("running a client as another uid (setpriv) needs root")
    if SETPRIV is None:
        pytest.skip("setpriv (util-linux) is not installed")
    for python in (sys.executable, "/usr/bin/python3"):
        probe = subprocess.run(
            [*AS_NOBODY, python, "-I", "-c", "import os; print(os.getuid())"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == str(NOBODY):
            return python
    pytest.skip(f"no Python interpreter that uid {NOBODY} may run (tried {sys.executable})")


def peer_client(
    python: str, port: int, *, nobody: bool, family: str = "ipv4", mode: str = "half-close"
) -> subprocess.CompletedProcess[str]:
    argv = [python, "-I", "-c", PEER_CLIENT, str(port), family, mode]
    done = subprocess.run(
        [*AS_NOBODY, *argv] if nobody else argv,
        capture_output=True,
        timeout=60,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        check=False,
    )
    # Bytes in, str out: text=True would turn the answer's CRLFs into LFs.
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def assert_refused(answer: str, our_uid: int = 0) -> None:
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 403 Forbidden\r\n"), answer
    assert "Content-Type: application/json" in head.split("\r\n")
    assert json.loads(body)["error"] == {
        "type": "credproxy",
        "message": f"credproxy forward serves only processes of uid {our_uid}; "
        f"this connection comes from uid {NOBODY}",
    }


@pytest.mark.parametrize("family", ["ipv4", "ipv6-mapped"])
def test_another_uid_gets_403_and_reaches_nothing_while_ours_is_relayed(
    nobody_python: str, recorder: Callable[..., Recorder], family: str
) -> None:
    """A client running as nobody gets the 403 naming both uids and the session socket gets no connection; the same client as our uid is relayed."""
    if family != "ipv4":
        ipv6_socket_or_skip().close()
    server = recorder()
    with forwarding(server.path) as fwd:
        port = fwd.port
        theirs = peer_client(nobody_python, port, nobody=True, family=family)
        assert theirs.returncode == 0, theirs.stderr
        assert_refused(theirs.stdout)
        assert server.connections == []
        ours = peer_client(nobody_python, port, nobody=False, family=family)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == ANSWER.decode()
    assert server.connections == [
        f"CREDPROXY/1 forward={port}\r\nGET /p/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    ]


def test_curl_as_another_uid_gets_the_403(
    nobody_python: str, recorder: Callable[..., Recorder]
) -> None:
    """curl run as nobody reads the whole 403 (status, JSON body); curl as our uid gets the session socket's answer."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    server = recorder()

    def run(argv: list[str]) -> tuple[int, str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        done = subprocess.run(argv, capture_output=True, timeout=60, env=env, check=False)
        return done.returncode, done.stdout.decode(), done.stderr.decode()  # CRLFs kept

    with forwarding(server.path) as fwd:
        port = fwd.port
        argv = [curl, "-sS", "--noproxy", "*", "--max-time", "10", "-i"]
        argv.append(f"http://127.0.0.1:{port}/p/x")
        code, out, err = run([*AS_NOBODY, *argv])
        assert code == 0, err
        assert_refused(out)
        assert server.connections == []
        code, out, err = run(argv)
    assert code == 0, err
    assert out == ANSWER.decode()
    (received,) = server.connections
    assert received.startswith(f"CREDPROXY/1 forward={port}\r\nGET /p/x HTTP/1.1\r\n".encode())


def test_another_uid_that_closes_at_once_reaches_nothing(
    nobody_python: str, recorder: Callable[..., Recorder]
) -> None:
    """nobody sending a request and closing at once is not relayed, even when its closed socket is shown as uid 0 (root's, ours here): such a line has inode 0 and does not count."""
    shown: list[str] = []

    def until_shown_as_root(client: socket.socket) -> None:
        """Wait until the peer's line says uid 0 (or is gone): the case a uid-only check gets wrong."""
        peer, ours = client.getpeername(), client.getsockname()
        local, remote = (pack(peer[0]), peer[1]), (pack(ours[0]), ours[1])
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with open("/proc/net/tcp", encoding="ascii") as table:
                rows = [row.split() for row in table]
            uids = [
                row[7]
                for row in rows[1:]
                if decode_proc_address(row[1]) == local and decode_proc_address(row[2]) == remote
            ]
            if not uids or set(uids) == {"0"}:
                shown.append("uid 0" if uids else "gone")
                return
            time.sleep(0.005)
        shown.append(f"still uid {uids}")

    server = recorder()
    with forwarding(server.path) as fwd:
        fwd.gate = until_shown_as_root
        for _ in range(3):
            theirs = peer_client(nobody_python, fwd.port, nobody=True, mode="close")
            assert theirs.returncode == 0, theirs.stderr
        fwd.wait_served(3)
        fwd.gate = None
        ours = peer_client(nobody_python, fwd.port, nobody=False)
        fwd.wait_served(4)
    assert ours.stdout == ANSWER.decode()
    assert len(server.connections) == 1
    if "uid 0" not in shown:
        pytest.skip(
            f"this kernel never showed the closed socket as uid 0 ({shown}); nothing to test"
        )


def test_credproxy_forward_notes_the_first_refusal_only(
    nobody_python: str, dirs: Dirs, recorder: Callable[..., Recorder]
) -> None:
    """Under the installed `credproxy forward`, three connections from nobody each get the 403 and stderr has one line about it; CMD's own connection is relayed."""
    server = recorder()
    code = f"""
        import json, os, subprocess, sys, urllib.parse
        port = urllib.parse.urlsplit(os.environ["CREDPROXY_BASE_URL"]).port
        client = [{nobody_python!r}, "-I", "-c", {PEER_CLIENT!r}, str(port), "ipv4", "half-close"]
        theirs = [
            subprocess.run([*{AS_NOBODY!r}, *client], capture_output=True).stdout.decode()
            for _ in range(3)
        ]
        ours = subprocess.run(client, capture_output=True).stdout.decode()
        print(json.dumps({{"theirs": theirs, "ours": ours, "port": port}}))
    """
    result = run_forward(dirs, server.path, code=code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for answer in out["theirs"]:
        assert_refused(answer)
    assert out["ours"] == ANSWER.decode()
    assert len(server.connections) == 1
    assert result.stderr == (
        f"credproxy forward: answered 403 to a connection from uid {NOBODY}: only processes "
        "of uid 0 are served (noted once; later refusals are not)\n"
    )
