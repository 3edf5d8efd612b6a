"""One sandbox, one session, end to end (issue 16): the installed daemon, as users and attackers meet it.

The installed ``credproxy`` runs the daemon (started by ``credproxy run``); the
fake HTTPS API of ``test_proxy_e2e`` is the upstream. What is asserted is what
someone could observe: status codes and error bodies, what the upstream
received, the daemon's memory (``/proc/PID/status``), its log, ``credproxy
status`` and ``credproxy release``. Another uid is a real one (``setpriv`` to
``nobody``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_proxy_e2e import (  # noqa: F401
    Upstream,
    _api_lines,
    _run,
    _setup,
    _wait_api_lines,
    _wait_or_kill,
    upstream,
)

from conftest import CREDPROXY, Dirs, cli

# Holds a session open: prints its socket (and capability, if any), then waits for stdin to close.
HOLD = """
import json, os, sys
from credproxy.inner.client import capability_from_env
print(json.dumps({"socket": os.environ["CREDPROXY_SOCKET"], "capability": capability_from_env()}),
      flush=True)
sys.stdin.read()
"""

# Reports a 429 for openai:default (held for a day), then keeps its session until stdin closes.
REPORT_429 = """
import sys
from credproxy.inner.client import Client
with Client() as c:
    print(c.call('report_failure', {'provider': 'openai', 'bucket': 'default',
                                    'status': 429, 'retryAfter': 86400}), flush=True)
    sys.stdin.read()
"""

PY = (sys.executable, "-c")
NOT_ROOT = "needs root, to run a client as another uid with setpriv"
OPENAI = ("--allow", "openai", "--allow", "key:canary-key")


@pytest.fixture
def api(background_daemon: Dirs, upstream: Upstream) -> Upstream:
    """The fake API, with `openai` and `claude` set up for it in the background daemon's directories."""
    _setup(background_daemon, upstream)
    return upstream


@contextmanager
def running(dirs: Dirs, up: Upstream, *args: str, code: str) -> Iterator[subprocess.Popen[str]]:
    """`credproxy run ARGS -- python -c CODE`, CODE's stdin and stdout piped; ended by closing stdin."""
    with subprocess.Popen(
        [CREDPROXY, "run", *args, "--", *PY, code],
        env=dirs.env(SSL_CERT_FILE=str(up.ca_file)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        try:
            yield proc
        finally:
            proc.stdin.close()
            _wait_or_kill(proc, 30)


@contextmanager
def session(dirs: Dirs, up: Upstream, *args: str) -> Iterator[dict[str, Any]]:
    """A session opened by `credproxy run ARGS -- (hold)`; yields its socket and capability."""
    with running(dirs, up, *args, code=HOLD) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "credproxy run did not open a session"
        yield json.loads(line)


def _request(path: str, raw: bytes) -> bytes:
    """One request on a new connection to the Unix socket *path*; the whole answer."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    s.sendall(raw)
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    return got


def _daemon_pid(dirs: Dirs) -> int:
    proc = cli(dirs, "status", "--json")
    return int(json.loads(proc.stdout)["daemon"]["pid"])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


POST_CHAT = (
    b"POST /openai/chat/completions HTTP/1.1\r\nHost: credproxy\r\nConnection: close\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)
# A request for a stream that goes on (the fake API's /slow), on a connection kept open.
POST_SLOW = (
    b"POST /openai/slow HTTP/1.1\r\nHost: credproxy\r\n"
    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
)

# Runs under `credproxy forward` on the host's loopback (no --unshare-net): the
# tool's own request, then what a web page or another uid could send to the port.
PROBE = r"""
import json, os, subprocess, urllib.request, urllib.error

base = os.environ["CREDPROXY_BASE_URL"]
port = base.rsplit(":", 1)[1]
out = {}

def ask(name, headers=None, data=b"{}"):
    req = urllib.request.Request(base + "/openai/chat/completions", data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            out[name] = [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        out[name] = [e.code, e.read().decode()]

ask("tool", {"content-type": "application/json"})
ask("rebinding", {"Host": "attacker.example:" + port})
ask("cross_site_form", {"Origin": "https://attacker.example", "content-type": "text/plain"})
ask("fetch_metadata", {"Sec-Fetch-Site": "cross-site"})
other = subprocess.run(
    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
     "curl", "-s", "-w", "\n%{http_code}", "-d", "{}",
     base + "/openai/chat/completions"],
    capture_output=True, text=True, timeout=60,
)
body, _, code = other.stdout.rpartition("\n")
out["other_uid"] = [int(code or 0), body]
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason=NOT_ROOT)
@pytest.mark.skipif(
    shutil.which("setpriv") is None or shutil.which("curl") is None,
    reason="setpriv and curl are needed for the other-uid client",
)
def test_7_and_1_forward_serves_only_its_own_sandbox(dirs: Dirs, api: Upstream) -> None:
    """Through `credproxy forward` on the host's loopback, in a --capability session: the tool gets 200 with no capability of its own; a rebinding Host, a cross-site form post, Sec-Fetch-Site: cross-site and another uid get 403 saying which rule; the socket without the capability gets 407; the upstream saw the tool's request only."""
    forward = (CREDPROXY, "forward", "--provider", "openai", "--", *PY, PROBE)
    proc = _run(dirs, api, "--capability", *OPENAI, "--", *forward)
    assert proc.returncode == 0, proc.stderr + (dirs.runtime / "daemon.log").read_text()[-3000:]
    out = json.loads(proc.stdout)
    assert out["tool"][0] == 200, out["tool"]
    for name, rule in (
        ("rebinding", "Host must be 127.0.0.1:"),
        ("cross_site_form", "Origin"),
        ("fetch_metadata", "Sec-Fetch-Site"),
        ("other_uid", "uid 65534"),
    ):
        status, body = out[name]
        assert status == 403, (name, out[name])
        assert body and rule in json.loads(body)["error"]["message"], (name, out)
    assert len(api.requests()) == 1
    with session(dirs, api, "--capability", *OPENAI) as s:
        refused = _request(s["socket"], POST_CHAT)
        assert refused.startswith(b"HTTP/1.1 407"), refused[:80]
        cap = s["capability"]
        with_cap = POST_CHAT.replace(
            b"Connection:", b"Proxy-Authorization: Bearer " + cap.encode() + b"\r\nConnection:"
        )
        assert _request(s["socket"], with_cap).startswith(b"HTTP/1.1 200")
    assert len(api.requests()) == 2


def test_5_big_bodies_leave_no_memory_behind(dirs: Dirs, api: Upstream) -> None:
    """64 concurrent POSTs of 8 MiB in one session, then the clients gone: the daemon's RSS is back within 20 MB of before, and every body reached the upstream."""
    size = 8 * 1024 * 1024
    head = (
        b"POST /openai/upload HTTP/1.1\r\nHost: credproxy\r\nConnection: close\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size
    )
    payload = b"\x00" * size
    with session(dirs, api, *OPENAI) as s:
        assert _request(s["socket"], POST_CHAT).startswith(b"HTTP/1.1 200")  # warm: httpx, TLS
        pid = _daemon_pid(dirs)
        before = _rss_mb(pid)
        answers: list[bytes] = []

        def one() -> None:
            answers.append(_request(s["socket"], head + payload))

        threads = [threading.Thread(target=one) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(answers) == 64 and all(a.startswith(b"HTTP/1.1 404") for a in answers)
        time.sleep(1)
        after = _rss_mb(pid)
    print(f"RSS {before:.1f} MB before, {after:.1f} MB after")
    assert after - before < 20, f"RSS {before:.0f} MB before, {after:.0f} MB after"
    uploads = [r for r in api.requests() if r["path"] == "/v1/upload"]
    assert len(uploads) == 64


def test_6_dropped_streams_are_one_short_line_each(dirs: Dirs, api: Upstream) -> None:
    """200 clients that hang up mid-stream: 200 audit lines with status 499, no traceback, and the log grows by less than 100 KiB."""
    with session(dirs, api, *OPENAI) as s:
        log = dirs.runtime / "daemon.log"
        size_before = log.stat().st_size
        for _ in range(4):
            socks = []
            for _ in range(50):
                c = socket.socket(socket.AF_UNIX)
                c.settimeout(30)
                c.connect(s["socket"])
                c.sendall(POST_SLOW)
                socks.append(c)
            for c in socks:
                assert c.recv(65536).startswith(b"HTTP/1.1 200")  # the stream has begun
            for c in socks:
                c.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                c.close()
        _wait_api_lines(dirs, 200, timeout=10)
        text = log.read_text()
        lines = _api_lines(dirs)
    assert [line["status"] for line in lines] == [499] * 200
    assert "Traceback" not in text and "crashed" not in text
    assert log.stat().st_size - size_before < 100 * 1024


def test_3_holds_are_listed_with_their_source_and_released_from_the_host(
    dirs: Dirs, api: Upstream
) -> None:
    """A sandbox's 429 report holds the bucket for its session only; `credproxy status` shows it with its source and end; `credproxy release` ends it."""
    with (
        session(dirs, api, *OPENAI) as other,
        running(dirs, api, *OPENAI, code=REPORT_429) as holder,
    ):
        assert holder.stdout is not None and holder.stdin is not None
        assert "quota-exhausted" in holder.stdout.readline()
        status = cli(dirs, "status")
        assert "holds: 1" in status.stdout, status.stdout
        assert "openai:default: quota-exhausted, held by session " in status.stdout
        assert "(in 86" in status.stdout
        assert _request(other["socket"], POST_CHAT).startswith(b"HTTP/1.1 200")
        released = cli(dirs, "release", "openai")
        assert released.returncode == 0 and "released 1 hold on openai" in released.stdout
        assert "holds: 0" in cli(dirs, "status").stdout
        holder.stdin.close()
        holder.wait(30)
