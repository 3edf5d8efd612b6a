"""`credproxy forward`: a TCP port inside the sandbox that relays to the session socket.

The daemon's HTTP side is not needed here: the session socket is a fake, a
threaded Unix-socket server in the test that records every byte it receives
and answers as each test scripts it. Each connection begins with forward's
preamble line (``CREDPROXY/1 forward=PORT``), which the fake reads, checks and
keeps apart (``preambles``), so handlers see the tool's bytes only; the
preamble and the uid check have their own tests in ``test_forward_peer.py``. `credproxy forward` is the installed
executable, and CMD is a Python one-liner that calls the base URL it was given.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import CREDPROXY, Dirs, UnixServer

BASE_VARS = ("ANTHROPIC_BASE_URL", "OPENAI_BASE_URL", "GOOGLE_GEMINI_BASE_URL")
WAIT = 10.0  # seconds any one step may take before a test gives up (never a timing claim)
PREAMBLE = re.compile(rb"CREDPROXY/1 forward=[0-9]+( capability=[0-9a-f]{64})?\r\n")

Handler = Callable[[socket.socket, "FakeSocket"], None]


class FakeSocket(UnixServer):
    """A stand-in for the session socket: one thread per connection runs *handler*.

    Each connection's preamble line is read, checked and kept apart first.
    Handlers record what they saw in ``self.received`` / ``self.events``; an
    exception in a handler is kept and raised when the test ends.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.handler = handler
        self.received: list[bytes] = []
        self.preambles: list[bytes] = []
        self.events: list[Any] = []
        self.lock = threading.Lock()
        super().__init__(path)

    def serve(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\r\n") and len(line) < 200:
            byte = conn.recv(1)  # one at a time: the tool's bytes stay for the handler
            if not byte:
                break
            line += byte
        assert PREAMBLE.fullmatch(line), f"no preamble line first: {line!r}"
        with self.lock:
            self.preambles.append(line)
        self.handler(conn, self)


@pytest.fixture
def fake(unix_servers: Callable[..., Any]) -> Callable[[Handler], FakeSocket]:
    """Start fakes of the session socket in the test's directory; stop them after."""
    return functools.partial(unix_servers, FakeSocket)


def read_until_eof(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_request(conn: socket.socket) -> bytes:
    """One HTTP request (head and Content-Length body), exactly as it arrived."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise AssertionError(f"connection ended inside the request head: {data!r}")
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(data) < len(head) + 4 + length:
        chunk = conn.recv(65536)
        if not chunk:
            raise AssertionError("connection ended inside the request body")
        data += chunk
    return data


def request_line(raw: bytes) -> bytes:
    return raw.split(b"\r\n", 1)[0]


def reply(conn: socket.socket, body: bytes, status: str = "200 OK") -> None:
    conn.sendall(
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )


def run_forward(
    dirs: Dirs,
    sock: Path | None,
    *options: str,
    code: str,
    timeout: float = 60,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run `credproxy forward OPTIONS -- python -c CODE` with CREDPROXY_SOCKET=*sock*."""
    return subprocess.run(
        forward_argv(*options, code=code),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=forward_env(dirs, sock, **env),
        check=False,
    )


def forward_argv(*options: str, code: str) -> list[str]:
    return [CREDPROXY, "forward", *options, "--", sys.executable, "-c", textwrap.dedent(code)]


def forward_env(dirs: Dirs, sock: Path | None, **extra: str) -> dict[str, str]:
    env = dirs.env(**({"CREDPROXY_SOCKET": str(sock)} if sock else {}), **extra)
    for name in (*BASE_VARS, "CREDPROXY_BASE_URL"):
        env.pop(name, None)
    return env


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# -- the relay --------------------------------------------------------------------------------------


def test_request_and_answer_cross_byte_for_byte_with_half_close(
    dirs: Dirs, fake: Callable[[Handler], FakeSocket]
) -> None:
    """Every byte the client sends reaches the socket unchanged, and every byte of the answer comes back, each ended by a half-close."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 256\r\n\r\n" + bytes(range(256))[::-1]

    def handler(conn: socket.socket, server: FakeSocket) -> None:
        server.received.append(read_until_eof(conn))  # the client's half-close arrives as EOF
        conn.sendall(answer)

    server = fake(handler)
    code = """
        import json, os, socket, urllib.parse
        url = urllib.parse.urlsplit(os.environ["ANTHROPIC_BASE_URL"])
        body = bytes(range(256))
        sent = (
            b"POST " + url.path.encode() + b"/v1/messages HTTP/1.1\\r\\nHost: x\\r\\n"
            + b"Content-Length: 256\\r\\n\\r\\n" + body
        )
        with socket.create_connection((url.hostname, url.port)) as s:
            s.sendall(sent)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        print(json.dumps({"sent": sent.hex(), "got": got.hex()}))
    """
    result = run_forward(dirs, server.path, "--provider", "claude", code=code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert server.received == [bytes.fromhex(out["sent"])]
    assert request_line(server.received[0]) == b"POST /claude/v1/messages HTTP/1.1"
    assert bytes.fromhex(out["got"]) == answer


def test_an_http_client_on_the_base_url_reaches_provider_path_and_gets_the_answer(
    dirs: Dirs, fake: Callable[[Handler], FakeSocket]
) -> None:
    """urllib on OPENAI_BASE_URL + /chat/completions sends /openai/chat/completions to the socket and reads the answer."""

    def handler(conn: socket.socket, server: FakeSocket) -> None:
        raw = read_request(conn)
        server.received.append(raw)
        reply(conn, b'{"id": "cmpl-1"}')

    server = fake(handler)
    code = """
        import os, urllib.request
        req = urllib.request.Request(
            os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=b'{"model": "m"}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            print(resp.status, resp.read().decode())
    """
    result = run_forward(dirs, server.path, "--provider", "openai", code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '200 {"id": "cmpl-1"}\n'
    (raw,) = server.received
    assert request_line(raw) == b"POST /openai/chat/completions HTTP/1.1"
    assert raw.endswith(b'\r\n\r\n{"model": "m"}')


def test_the_socket_side_may_half_close_first_and_still_receive(
    dirs: Dirs, fake: Callable[[Handler], FakeSocket]
) -> None:
    """When the socket side ends its stream first, the client sees the end and can still send bytes that arrive."""

    def handler(conn: socket.socket, server: FakeSocket) -> None:
        conn.sendall(b"early answer")
        conn.shutdown(socket.SHUT_WR)
        server.received.append(read_until_eof(conn))

    server = fake(handler)
    code = """
        import os, socket, urllib.parse
        url = urllib.parse.urlsplit(os.environ["CREDPROXY_BASE_URL"])
        with socket.create_connection((url.hostname, url.port)) as s:
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            s.sendall(b"sent after the end of the answer")
            s.shutdown(socket.SHUT_WR)
            s.recv(1)  # wait for the relay to close
        print(got.decode())
    """
    result = run_forward(dirs, server.path, code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "early answer\n"
    assert server.received == [b"sent after the end of the answer"]


def test_streamed_events_reach_the_client_one_by_one(
    dirs: Dirs, fake: Callable[[Handler], FakeSocket]
) -> None:
    """Each SSE event reaches the client before the socket side sends the next one (it waits for the client to acknowledge)."""
    acks = dirs.root / "acks"
    acks.mkdir()
    events = 4

    def handler(conn: socket.socket, server: FakeSocket) -> None:
        read_request(conn)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        for i in range(events):
            event = f"data: event {i}\n\n".encode()
            server.events.append(("sent", i, time.monotonic()))
            conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            deadline = time.monotonic() + WAIT
            while not (acks / str(i)).exists():  # the client saw event i
                if time.monotonic() > deadline:
                    server.events.append(("no ack", i, time.monotonic()))
                    break
                time.sleep(0.005)
        conn.sendall(b"0\r\n\r\n")

    server = fake(handler)
    code = """
        import http.client, json, os, pathlib, time, urllib.parse
        url = urllib.parse.urlsplit(os.environ["ANTHROPIC_BASE_URL"])
        acks = pathlib.Path(os.environ["ACKS"])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.request("POST", url.path + "/v1/messages", body=b"{}")
        resp = conn.getresponse()
        seen = []
        while line := resp.readline():
            if line.startswith(b"data: event "):
                i = int(line.split()[-1])
                seen.append((i, time.monotonic()))
                (acks / str(i)).touch()
        print(json.dumps(seen))
    """
    result = run_forward(dirs, server.path, "--provider", "claude", code=code, ACKS=str(acks))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert [i for i, _ in seen] == list(range(events))
    assert [e for e in server.events if e[0] == "no ack"] == []
    sent = [t for kind, _, t in server.events if kind == "sent"]
    for i, received in seen:
        assert sent[i] <= received  # CLOCK_MONOTONIC is one clock for every process
        if i + 1 < events:
            assert received < sent[i + 1]  # event i arrived before event i + 1 was sent


def test_twenty_connections_are_served_at_the_same_time(
    dirs: Dirs, fake: Callable[[Handler], FakeSocket]
) -> None:
    """Twenty requests in flight at once all reach the socket before any is answered, and each gets its own answer."""
    barrier = threading.Barrier(20, timeout=WAIT)

    def handler(conn: socket.socket, server: FakeSocket) -> None:
        raw = read_request(conn)
        try:
            barrier.wait()  # only if all 20 connections are open at once
            status = "200 OK"
        except threading.BrokenBarrierError:
            status = "503 Not Concurrent"
        path = request_line(raw).split()[1]
        reply(conn, path, status)

    fake_server = fake(handler)
    code = """
        import json, os, threading, urllib.request
        base = os.environ["CREDPROXY_BASE_URL_P"]
        out = {}
        def get(i):
            with urllib.request.urlopen(f"{base}/r{i}", timeout=30) as resp:
                out[i] = resp.read().decode()
        threads = [threading.Thread(target=get, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(json.dumps(out))
    """
    result = run_forward(dirs, fake_server.path, "--provider", "p", code=code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {str(i): f"/p/r{i}" for i in range(20)}


def test_a_client_that_resets_closes_its_socket_connection(
    dirs: Dirs, fake: Callable[[Handler], FakeSocket]
) -> None:
    """A client that resets mid-request makes the socket side see its connection end (so the daemon can cancel upstream)."""
    ended = threading.Event()
    sent = b"POST /p/x HTTP/1.1\r\nContent-Length: 100\r\n\r\npart"

    def handler(conn: socket.socket, server: FakeSocket) -> None:
        got = b""
        while len(got) < len(sent) and (chunk := conn.recv(65536)):
            got += chunk
        # Tell the client its bytes arrived: it resets only once the relay is set
        # up (a socket already reset is no longer in /proc/net/tcp, and forward
        # refuses a connection whose owner it cannot tell).
        conn.sendall(b"!")
        server.received.append(got + read_until_eof(conn))
        ended.set()

    server = fake(handler)
    code = """
        import os, socket, struct, sys, urllib.parse
        url = urllib.parse.urlsplit(os.environ["CREDPROXY_BASE_URL"])
        s = socket.create_connection((url.hostname, url.port))
        s.sendall(b"POST /p/x HTTP/1.1\\r\\nContent-Length: 100\\r\\n\\r\\npart")
        assert s.recv(1) == b"!"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # a reset, not an end of stream
        sys.stdin.read()  # stay alive until the test has seen the socket side end
    """
    proc = subprocess.Popen(
        forward_argv(code=code),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=forward_env(dirs, server.path),
    )
    try:
        assert ended.wait(WAIT)
        assert server.received == [sent]
    finally:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.close()
        assert proc.wait(WAIT) == 0
        assert proc.stderr.read() == b""
        proc.stderr.close()


def test_a_socket_side_that_fails_resets_the_client(
    dirs: Dirs, fake: Callable[[Handler], FakeSocket]
) -> None:
    """A socket connection that breaks reaches the client as a reset, never as an end of stream that could pass for a whole answer."""
    request = b"GET /p/x HTTP/1.1\r\nHost: x\r\n\r\n" + b"pipelined" * 10

    def handler(conn: socket.socket, server: FakeSocket) -> None:
        deadline = time.monotonic() + WAIT
        while len(conn.recv(len(request), socket.MSG_PEEK)) < len(request):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        conn.recv(10)
        # Closing with unread bytes is a broken connection on a Unix socket (ECONNRESET).

    server = fake(handler)
    code = f"""
        import os, socket, urllib.parse
        url = urllib.parse.urlsplit(os.environ["CREDPROXY_BASE_URL"])
        with socket.create_connection((url.hostname, url.port)) as s:
            s.sendall({request!r})
            try:
                print(repr(s.recv(100)))
            except ConnectionResetError:
                print("reset")
    """
    result = run_forward(dirs, server.path, code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "reset\n"


def test_an_unreachable_socket_closes_the_client_with_nothing_sent(dirs: Dirs) -> None:
    """When the socket refuses the connection, the client's connection is closed with nothing sent, and stderr says why once."""
    sock = dirs.root / "refusing.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))  # bound, never listening: connect() is refused
        code = """
            import os, socket, urllib.parse
            url = urllib.parse.urlsplit(os.environ["CREDPROXY_BASE_URL"])
            for _ in range(2):
                with socket.create_connection((url.hostname, url.port)) as s:
                    print(repr(s.recv(100)))
        """
        result = run_forward(dirs, sock, code=code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "b''\nb''\n"
    line = one_line(result.stderr)
    assert line.startswith(f"credproxy forward: cannot reach credproxy at {sock}: "), line


def test_llxprt_socket_variable_is_used_without_credproxy_socket(
    dirs: Dirs, fake: Callable[[Handler], FakeSocket]
) -> None:
    """With only LLXPRT_CREDENTIAL_SOCKET set, connections are relayed to that socket."""

    def handler(conn: socket.socket, server: FakeSocket) -> None:
        server.received.append(read_request(conn))
        reply(conn, b"via llxprt")

    server = fake(handler)
    code = """
        import os, urllib.request
        print(urllib.request.urlopen(os.environ["CREDPROXY_BASE_URL"] + "/p/", timeout=10).read().decode())
    """
    result = run_forward(dirs, None, code=code, LLXPRT_CREDENTIAL_SOCKET=str(server.path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "via llxprt\n"
    assert request_line(server.received[0]) == b"GET /p/ HTTP/1.1"


# -- CMD: environment, exit status, signals ---------------------------------------------------------

PRINT_ENV = """
    import json, os
    print(json.dumps({k: v for k, v in os.environ.items() if "BASE_URL" in k or k == "MY_TOOL_URL"}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_default_variables_follow_the_provider_names(dirs: Dirs) -> None:
    """Without --env, claude/anthropic set ANTHROPIC_BASE_URL, codex/openai OPENAI_BASE_URL, gemini GOOGLE_GEMINI_BASE_URL, every provider CREDPROXY_BASE_URL_<P>."""
    dirs.root.mkdir(exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dirs.root / "unused.sock"))
        port = free_port()
        options = ["--port", str(port)]
        for p in ("claude", "codex:work", "gemini", "my-idp.example"):
            options += ["--provider", p]
        result = run_forward(dirs, dirs.root / "unused.sock", *options, code=PRINT_ENV)
    assert result.returncode == 0, result.stderr
    root = f"http://127.0.0.1:{port}"
    assert json.loads(result.stdout) == {
        "CREDPROXY_BASE_URL": root,
        "CREDPROXY_BASE_URL_CLAUDE": f"{root}/claude",
        "CREDPROXY_BASE_URL_CODEX_WORK": f"{root}/codex:work",
        "CREDPROXY_BASE_URL_GEMINI": f"{root}/gemini",
        "CREDPROXY_BASE_URL_MY_IDP_EXAMPLE": f"{root}/my-idp.example",
        "ANTHROPIC_BASE_URL": f"{root}/claude",
        "OPENAI_BASE_URL": f"{root}/codex:work",
        "GOOGLE_GEMINI_BASE_URL": f"{root}/gemini",
    }


def test_env_options_replace_the_defaults(dirs: Dirs) -> None:
    """--env NAME=PROVIDER sets exactly the variables named; the default set is then not applied."""
    dirs.root.mkdir(exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dirs.root / "unused.sock"))
        result = run_forward(
            dirs,
            dirs.root / "unused.sock",
            "--provider",
            "openai",
            "--env",
            "ANTHROPIC_BASE_URL=claude:work",
            "--env=MY_TOOL_URL=openai",
            code=PRINT_ENV,
        )
    assert result.returncode == 0, result.stderr
    env = json.loads(result.stdout)
    root = env["CREDPROXY_BASE_URL"]
    assert root.startswith("http://127.0.0.1:") and int(root.rsplit(":", 1)[1]) > 0
    assert env == {
        "CREDPROXY_BASE_URL": root,
        "CREDPROXY_BASE_URL_OPENAI": f"{root}/openai",
        "CREDPROXY_BASE_URL_CLAUDE_WORK": f"{root}/claude:work",
        "ANTHROPIC_BASE_URL": f"{root}/claude:work",
        "MY_TOOL_URL": f"{root}/openai",
    }


@pytest.mark.parametrize(
    ("exit_code", "expected"),
    [("0", 0), ("7", 7), ("os.kill(os.getpid(), signal.SIGKILL)", 128 + 9)],
    ids=["zero", "seven", "killed"],
)
def test_the_exit_status_is_cmds(dirs: Dirs, exit_code: str, expected: int) -> None:
    """credproxy forward exits with CMD's status, 128 + N when signal N killed it."""
    dirs.root.mkdir(exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dirs.root / "unused.sock"))
        code = f"import os, signal, sys; sys.exit({exit_code})"
        result = run_forward(dirs, dirs.root / "unused.sock", code=code)
    assert result.returncode == expected
    assert result.stderr == ""


def test_a_missing_cmd_exits_127(dirs: Dirs) -> None:
    """A CMD that does not exist exits 127 with one line on stderr."""
    dirs.root.mkdir(exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dirs.root / "unused.sock"))
        result = subprocess.run(
            [CREDPROXY, "forward", "--", str(dirs.root / "no-such-command")],
            capture_output=True,
            text=True,
            timeout=30,
            env=forward_env(dirs, dirs.root / "unused.sock"),
            check=False,
        )
    assert result.returncode == 127
    assert one_line(result.stderr).startswith("credproxy forward: cannot start ")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_are_passed_on_to_cmd(dirs: Dirs, signum: signal.Signals) -> None:
    """SIGTERM, SIGHUP and SIGINT sent to credproxy forward reach CMD, whose exit status is returned."""
    dirs.root.mkdir(exist_ok=True)
    code = """
        import signal, sys
        def got(signum, frame):
            print(f"got {signum}", flush=True)
            sys.exit(42)
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, got)
        print("ready", flush=True)
        signal.pause()
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dirs.root / "unused.sock"))
        proc = subprocess.Popen(
            forward_argv(code=code),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            env=forward_env(dirs, dirs.root / "unused.sock"),
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            proc.send_signal(signum)
            assert proc.wait(WAIT) == 42
            assert proc.stdout.read() == f"got {int(signum)}\n"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def test_the_port_is_closed_once_cmd_exits(dirs: Dirs) -> None:
    """After CMD exits the port refuses connections, even while a process CMD started lives on."""
    dirs.root.mkdir(exist_ok=True)
    code = """
        import os, subprocess, sys, urllib.parse
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        print(child.pid, urllib.parse.urlsplit(os.environ["CREDPROXY_BASE_URL"]).port)
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dirs.root / "unused.sock"))
        result = run_forward(dirs, dirs.root / "unused.sock", code=code)
    pid, port = (int(x) for x in result.stdout.split())
    try:
        assert result.returncode == 0, result.stderr
        os.kill(pid, 0)  # CMD's child still runs
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", port), timeout=WAIT),
        ):
            pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- errors before CMD starts -----------------------------------------------------------------------


def test_without_a_socket_variable_it_exits_1_in_one_line(dirs: Dirs) -> None:
    """With neither CREDPROXY_SOCKET nor LLXPRT_CREDENTIAL_SOCKET set, it exits 1 with one line naming the variable, and CMD never runs."""
    marker = dirs.root / "ran"
    result = run_forward(dirs, None, code=f"open({str(marker)!r}, 'w').close()")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith("credproxy forward: ") and "CREDPROXY_SOCKET" in line
    assert not marker.exists()


def test_a_socket_variable_naming_no_socket_exits_1(dirs: Dirs) -> None:
    """A socket variable naming a missing path or a regular file exits 1 with one line naming the path."""
    marker = dirs.root / "ran"
    plain = dirs.root / "plain-file"
    plain.write_text("")
    for path in (dirs.root / "missing.sock", plain):
        result = run_forward(dirs, path, code=f"open({str(marker)!r}, 'w').close()")
        assert result.returncode == 1
        line = one_line(result.stderr)
        assert line.startswith(f"credproxy forward: cannot reach credproxy at {path}: "), line
    assert not marker.exists()


def test_a_port_in_use_exits_1(dirs: Dirs) -> None:
    """--port naming a port already in use exits 1 with one line naming it."""
    dirs.root.mkdir(exist_ok=True)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s,
        socket.socket() as taken,
    ):
        s.bind(str(dirs.root / "unused.sock"))
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_forward(dirs, dirs.root / "unused.sock", "--port", str(port), code="")
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(
        f"credproxy forward: cannot listen on 127.0.0.1:{port}"
    )


def test_a_fixed_port_is_listened_on_again_right_after_a_run(dirs: Dirs) -> None:
    """A run on --port P whose connection forward ended first (the daemon's side closed) leaves P in TIME-WAIT; the next `forward --port P` listens on it at once (before, 'Address already in use' for a minute)."""
    dirs.root.mkdir(exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = """
        import os, socket, urllib.parse
        port = urllib.parse.urlsplit(os.environ["CREDPROXY_BASE_URL"]).port
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"GET /x HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
            try:
                while c.recv(65536):
                    pass
            except ConnectionResetError:
                pass
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as daemon:
        daemon.bind(str(dirs.root / "closing.sock"))
        daemon.listen()

        def hang_up() -> None:  # (a daemon that answers, then closes the connection)
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = daemon.accept()
                    conn.recv(65536)
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        first = run_forward(dirs, dirs.root / "closing.sock", "--port", str(port), code=code)
        assert first.returncode == 0, first.stderr
        again = run_forward(dirs, dirs.root / "closing.sock", "--port", str(port), code="")
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "CMD is required"),
        (["--port", "70000", "--", "true"], "--port"),
        (["--port"], "--port needs a value"),
        (["--bogus", "--", "true"], "unknown option --bogus"),
        (["--provider", "a/b", "--", "true"], "'a/b'"),
        (["--provider", "claude:", "--", "true"], "'claude:'"),
        (["--env", "1X=claude", "--", "true"], "--env"),
        (["--env", "X", "--", "true"], "--env"),
        (["--provider", "claude", "--provider", "anthropic", "--", "true"], "ANTHROPIC_BASE_URL"),
    ],
    ids=[
        "no-cmd",
        "port-range",
        "port-no-value",
        "unknown-option",
        "provider-slash",
        "bucket-empty",
        "env-name",
        "env-no-provider",
        "two-for-one-variable",
    ],
)
def test_usage_errors_exit_2_before_anything_opens(dirs: Dirs, args: list[str], says: str) -> None:
    """Malformed arguments exit 2 with one line saying what is wrong, before the socket is looked at."""
    result = subprocess.run(
        [CREDPROXY, "forward", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=forward_env(dirs, dirs.root / "never-used.sock"),
        check=False,
    )
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith("credproxy forward: ") and says in line, line
    assert "usage: credproxy forward" in line
    assert "cannot reach" not in line


def test_help_exits_0(dirs: Dirs) -> None:
    """`credproxy forward --help` prints the usage and exits 0."""
    result = subprocess.run(
        [CREDPROXY, "forward", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env=forward_env(dirs, None),
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: credproxy forward")


def test_forward_imports_only_the_standard_library() -> None:
    """Importing credproxy.inner.forward (and running `credproxy forward --help`) loads no third-party module."""
    probe = """
import json, sys
before = set(sys.modules)
from credproxy.cli import main
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["forward", "--help"]) == 0
loaded = set(sys.modules) - before
foreign = sorted(
    m for m in loaded
    if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "credproxy"
)
print(json.dumps({"foreign": foreign, "credproxy": sorted(m for m in loaded if m.startswith("credproxy"))}))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["foreign"] == []
    assert "credproxy.inner.forward" in report["credproxy"]
    assert not any(m.startswith("credproxy.shell") for m in report["credproxy"])
