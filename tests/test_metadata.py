"""`credproxy forward --metadata`: a GCE metadata server for google-auth, from a granted provider.

Everything here is the installed executable as a user runs it: `credproxy run`
starts the real daemon and a session, `credproxy forward --metadata google`
runs inside it (inside bubblewrap with its own network namespace where bwrap
is installed), and the client is the real google-auth library
(``google.auth.compute_engine.Credentials`` and ``google.auth.default()``
with ``google.auth.transport.requests.Request``), which finds the emulator
through ``GCE_METADATA_HOST`` and ``GCE_METADATA_IP`` only. The refresh tokens
are canaries: no byte the sandbox can read may hold one.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sandbox import bwrap
from test_forward_peer import AS_NOBODY, PEER_CLIENT, assert_refused, nobody_python

from conftest import CREDPROXY, Dirs, cli

__all__ = ["nobody_python"]  # a fixture, used by name

REPO = str(Path(__file__).resolve().parents[1])
WAIT = 60  # seconds a sandboxed run may take before the test gives up (never a timing claim)
NO_BWRAP = "bubblewrap (bwrap) is not installed: the sandboxed google-auth test needs it"
FIRST_AT = "ya29.first-access-5e1c"
SECOND_AT = "ya29.second-access-9a7d"
FIRST_RT = "RT-GOOGLE-CANARY-2f8b1c"
SECOND_RT = "RT-GOOGLE-CANARY-77d0ae"
OTHER_AT = "AT-OTHER-CANARY-3c9e"
RT_CANARIES = (FIRST_RT, SECOND_RT)
EMAIL = "agent@example-project.iam.gserviceaccount.com"
SCOPES = ["https://www.googleapis.com/auth/cloud-platform", "openid"]
PROJECT = "example-project-42"
LIFETIME = 2400  # seconds the stored google tokens last (not the emulator's 3600 s fallback)
# Variables that would let google-auth find credentials some other way, or send
# its loopback requests through a proxy.
FOREIGN_VARS = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "GCLOUD_PROJECT",
    "CLOUDSDK_CORE_PROJECT",
    "GCE_METADATA_HOST",
    "GCE_METADATA_ROOT",
    "GCE_METADATA_IP",
    "NO_GCE_CHECK",
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
)


def _id_token(claims: dict[str, Any]) -> str:
    """A JWT-shaped id_token with these claims (unsigned: only its claims are read)."""

    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def _store(dirs: Dirs, access: str, refresh: str, provider: str = "google") -> None:
    token = {
        "access_token": access,
        "refresh_token": refresh,
        "expires_in": LIFETIME,
        "scope": " ".join(SCOPES),
        "id_token": _id_token({"email": EMAIL, "sub": "1234"}),
    }
    proc = cli(dirs, "import", provider, input=json.dumps(token))
    assert proc.returncode == 0, proc.stderr


def _setup(dirs: Dirs) -> None:
    """`google` and `other` configured and stored (never refreshed: their tokens last long)."""
    dirs.config.write_text(
        "[providers.google]\n"
        'token_url = "http://127.0.0.1:9/token"\n'
        'client_id = "google-client"\n'
        "[providers.other]\n"
        'token_url = "http://127.0.0.1:9/token"\n'
        'client_id = "other-client"\n'
    )
    _store(dirs, FIRST_AT, FIRST_RT)
    proc = cli(
        dirs,
        "import",
        "other",
        input=json.dumps({"access_token": OTHER_AT, "refresh_token": "RT-x", "expires_in": 3600}),
    )
    assert proc.returncode == 0, proc.stderr


def _env(dirs: Dirs) -> dict[str, str]:
    """The test's environment for `credproxy run`, with nothing Google-related or proxied."""
    env = dirs.env(CLOUDSDK_CONFIG=str(dirs.root / "no-gcloud"))  # no gcloud login to find
    for name in FOREIGN_VARS:
        env.pop(name, None)
    return env


def _bwrap(dirs: Dirs, *cmd: str) -> list[str]:
    """A bubblewrap sandbox with its own network namespace (loopback only), as test_proxy_e2e builds it."""
    return bwrap(
        dirs,
        *cmd,
        options=("--unsetenv", "LLXPRT_CREDENTIAL_SOCKET"),
    )


def _forward(*options: str, code: str) -> list[str]:
    return [
        CREDPROXY,
        "forward",
        *options,
        "--",
        sys.executable,
        "-c",
        textwrap.dedent(code),
    ]


# Runs under `credproxy forward --metadata google` (in bwrap): google-auth as
# anyone uses it, a refresh after the test has stored a new token, the raw
# answers, then everything the sandbox can read.
GOOGLE_AUTH_SCRIPT = r"""
import calendar, glob, json, os, socket, subprocess, sys, urllib.error, urllib.request
import google.auth
from google.auth import compute_engine
from google.auth.compute_engine import _metadata
from google.auth.transport.requests import Request

out = {"env": {k: v for k, v in os.environ.items() if k.startswith("GCE_METADATA")}}
request = Request()
out["ping"] = _metadata.ping(request)
creds = compute_engine.Credentials()
creds.refresh(request)
out["first"] = {
    "token": creds.token,
    "expiry": calendar.timegm(creds.expiry.utctimetuple()),
    "email": creds.service_account_email,
    "scopes": creds.scopes,
}
served = subprocess.run(
    ["CREDPROXY", "token", "google", "--format", "json"], capture_output=True, text=True
)
out["served"] = json.loads(served.stdout) if served.returncode == 0 else served.stderr
print(json.dumps({"first": creds.token}), flush=True)
sys.stdin.readline()  # the test has stored a new token for google meanwhile
creds.refresh(request)
out["second"] = {"token": creds.token, "email": creds.service_account_email}
found, project = google.auth.default()
found.refresh(request)
out["default"] = {"type": type(found).__name__, "project": project, "token": found.token}

host = "http://" + os.environ["GCE_METADATA_HOST"]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def raw(path, headers):
    req = urllib.request.Request(host + path, headers=headers)
    try:
        with opener.open(req, timeout=10) as r:
            return [r.status, dict(r.headers), r.read().decode()]
    except urllib.error.HTTPError as e:
        return [e.code, dict(e.headers), e.read().decode()]
flavor = {"Metadata-Flavor": "Google"}
sa = "/computeMetadata/v1/instance/service-accounts/default/"
out["raw"] = {
    "no_flavor": raw(sa + "token", {}),
    "wrong_flavor": raw(sa + "token", {"Metadata-Flavor": "google"}),
    "token": raw(sa + "token", flavor),
    "email": raw(sa + "email", flavor),
    "scopes": raw(sa + "scopes", flavor),
    "recursive": raw(sa + "?recursive=true", flavor),
    "project": raw("/computeMetadata/v1/project/project-id", flavor),
}
try:
    socket.create_connection(("127.0.0.1", 9), timeout=2).close()
except OSError as exc:
    out["direct"] = type(exc).__name__
procs = {}
for d in glob.glob("/proc/[0-9]*"):
    for f in ("environ", "cmdline"):
        try:
            procs[d + "/" + f] = open(d + "/" + f, "rb").read().decode("latin-1")
        except OSError:
            pass
out["proc"] = procs
print(json.dumps(out))
"""


@pytest.mark.skipif(shutil.which("bwrap") is None, reason=NO_BWRAP)
def test_google_auth_gets_and_refreshes_its_token_from_the_emulator_in_bwrap(
    background_daemon: Dirs,
) -> None:
    """In bwrap with --unshare-net, google-auth's compute_engine.Credentials gets the daemon's token for the grant from the emulator, a refresh gets the newly stored one, google.auth.default() finds it by GCE_METADATA_HOST; no flavor is 403; no refresh token reaches the sandbox."""
    dirs = background_daemon
    _setup(dirs)
    forward = _forward(
        "--metadata",
        "google",
        "--metadata-project",
        PROJECT,
        code=GOOGLE_AUTH_SCRIPT.replace("CREDPROXY", CREDPROXY),
    )
    argv = [CREDPROXY, "run", "--allow", "google", "--", *_bwrap(dirs, *forward)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(dirs),
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        first = json.loads(proc.stdout.readline() or "{}")
        assert first == {"first": FIRST_AT}, proc.stderr.read() if proc.stderr else ""
        _store(dirs, SECOND_AT, SECOND_RT)  # the running daemon serves it at once
        stdout, stderr = proc.communicate("go\n", timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    out = json.loads(stdout)

    port = out["env"]["GCE_METADATA_HOST"].rpartition(":")[2]
    assert out["env"] == dict.fromkeys(
        ("GCE_METADATA_HOST", "GCE_METADATA_ROOT", "GCE_METADATA_IP"), f"127.0.0.1:{port}"
    )
    assert out["ping"] is True
    # The first token: exactly what the daemon serves for the grant, with its expiry.
    served = out["served"]
    assert isinstance(served, dict), served
    assert out["first"]["token"] == served["access_token"] == FIRST_AT
    assert abs(out["first"]["expiry"] - served["expiry"]) < WAIT
    assert out["first"]["email"] == EMAIL  # from the token's id_token
    assert out["first"]["scopes"] == SCOPES  # from the token's scope
    # The refresh asked again (under the email now, as google-auth does) and got the new one.
    assert out["second"] == {"token": SECOND_AT, "email": EMAIL}
    assert out["default"] == {"type": "Credentials", "project": PROJECT, "token": SECOND_AT}

    raw = out["raw"]
    for name in ("no_flavor", "wrong_flavor"):
        status, headers, body = raw[name]
        assert status == 403, raw[name]
        assert headers["Metadata-Flavor"] == "Google"
        assert SECOND_AT not in body and "Metadata-Flavor" in body
    status, headers, body = raw["token"]
    assert (status, headers["Metadata-Flavor"], headers["Content-Type"]) == (
        200,
        "Google",
        "application/json",
    )
    token = json.loads(body)
    assert sorted(token) == ["access_token", "expires_in", "token_type"]
    assert (token["access_token"], token["token_type"]) == (SECOND_AT, "Bearer")
    assert LIFETIME - WAIT < token["expires_in"] <= LIFETIME
    assert raw["email"][:1] == [200] and raw["email"][2] == EMAIL
    assert raw["scopes"][:1] == [200] and raw["scopes"][2] == "".join(f"{s}\n" for s in SCOPES)
    assert raw["recursive"][0] == 200
    assert json.loads(raw["recursive"][2]) == {
        "aliases": ["default"],
        "email": EMAIL,
        "scopes": SCOPES,
    }
    assert raw["project"][:1] == [200] and raw["project"][2] == PROJECT
    assert out["direct"] == "ConnectionRefusedError"  # only the sandbox's own loopback

    # The canary: no refresh token in anything the sandbox could read, or said.
    assert out["proc"], "no /proc file was readable in the sandbox"
    log = (dirs.runtime / "daemon.log").read_text()
    for canary in RT_CANARIES:
        for where, text in (("output", stdout), ("stderr", stderr), ("daemon log", log)):
            assert canary not in text, f"{canary} in the sandbox's {where}"
    assert OTHER_AT not in stdout


NOT_GRANTED_SCRIPT = r"""
import json, os, urllib.error, urllib.request
from google.auth import compute_engine, exceptions
from google.auth.compute_engine import _metadata
from google.auth.transport.requests import Request

out = {"ping": _metadata.ping(Request())}
try:
    compute_engine.Credentials().refresh(Request())
    out["refresh"] = "no error"
except exceptions.RefreshError as exc:
    out["refresh"] = str(exc)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
host = "http://" + os.environ["GCE_METADATA_HOST"]
statuses = []
for _ in range(3):
    req = urllib.request.Request(
        host + "/computeMetadata/v1/instance/service-accounts/default/token",
        headers={"Metadata-Flavor": "Google"},
    )
    try:
        opener.open(req, timeout=10)
        statuses.append(200)
    except urllib.error.HTTPError as e:
        statuses.append([e.code, e.headers["Metadata-Flavor"]])
out["statuses"] = statuses
print(json.dumps(out))
"""


def test_a_provider_not_granted_is_a_404_service_account_and_one_note(
    background_daemon: Dirs,
) -> None:
    """With --metadata google in a session granted only `other`, google-auth's refresh fails on a 404 (as on a VM without a service account), the ping still answers, and stderr says why once."""
    dirs = background_daemon
    _setup(dirs)
    forward = _forward("--metadata", "google", code=NOT_GRANTED_SCRIPT)
    proc = subprocess.run(
        [CREDPROXY, "run", "--allow", "other", "--", *forward],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=_env(dirs),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ping"] is True
    assert "404" in out["refresh"] and "no service account: google" in out["refresh"]
    assert out["statuses"] == [[404, "Google"]] * 3
    notes = [line for line in proc.stderr.splitlines() if "metadata server" in line]
    assert len(notes) == 1, proc.stderr
    assert notes[0].startswith("credproxy forward: metadata server: no service account: google: ")
    assert notes[0].endswith("(noted once)")
    for text in (proc.stdout, proc.stderr):
        assert FIRST_RT not in text and FIRST_AT not in text and OTHER_AT not in text


@pytest.fixture
def idle_socket(dirs: Dirs) -> Iterator[Path]:
    """A listening Unix socket that nothing reads: forward only checks that it is a socket.

    The tests using it ask for nothing that needs the daemon.
    """
    dirs.root.mkdir(exist_ok=True)
    path = dirs.root / "session.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen(8)
        yield path


RAW_SCRIPT = r"""
import json, os, socket
host, port = os.environ["GCE_METADATA_HOST"].split(":")
HOST = os.environ["GCE_METADATA_HOST"].encode()
def exchange(request):
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got.decode("latin-1")
print(json.dumps({
    "root": exchange(b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\nConnection: close\r\n\r\n"),
    "universe": exchange(
        b"GET /computeMetadata/v1/universe/universe-domain HTTP/1.1\r\nHost: " + HOST + b"\r\n"
        b"Metadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    ),
    "no_flavor": exchange(
        b"GET /computeMetadata/v1/universe/universe-domain HTTP/1.1\r\nHost: " + HOST + b"\r\n"
        b"Connection: close\r\n\r\n"
    ),
    "forwarded": exchange(
        b"GET /computeMetadata/v1/universe/universe-domain HTTP/1.1\r\nHost: " + HOST + b"\r\n"
        b"Metadata-Flavor: Google\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n"
    ),
    "post": exchange(
        b"POST /computeMetadata/v1/universe/universe-domain HTTP/1.1\r\nHost: " + HOST + b"\r\n"
        b"Metadata-Flavor: Google\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    ),
    "missing": exchange(
        b"GET /computeMetadata/v1/instance/zone HTTP/1.1\r\nHost: " + HOST + b"\r\n"
        b"Metadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    ),
    "wait": exchange(
        b"GET /computeMetadata/v1/universe/universe-domain?wait_for_change=true HTTP/1.1\r\n"
        b"Host: " + HOST + b"\r\nMetadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    ),
    "rebound": exchange(
        b"GET /computeMetadata/v1/universe/universe-domain HTTP/1.1\r\n"
        b"Host: attacker.example:" + port.encode() + b"\r\n"
        b"Metadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    ),
    "from_page": exchange(
        b"GET /computeMetadata/v1/universe/universe-domain HTTP/1.1\r\nHost: " + HOST + b"\r\n"
        b"Origin: http://127.0.0.1:8000\r\nSec-Fetch-Site: same-site\r\n"
        b"Metadata-Flavor: Google\r\nConnection: close\r\n\r\n"
    ),
    "keepalive": exchange(
        b"GET / HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n"
        b"GET /computeMetadata/v1/universe/universe-domain HTTP/1.1\r\nHost: " + HOST + b"\r\n"
        b"Metadata-Flavor: Google\r\n\r\n"
    ),
}))
"""


def _status_and_head(answer: str) -> tuple[str, list[str], str]:
    head, _, body = answer.partition("\r\n\r\n")
    lines = head.split("\r\n")
    return lines[0], lines[1:], body


def test_the_flavor_rules_on_the_wire(dirs: Dirs, idle_socket: Path) -> None:
    """On the wire: `/` answers 200 to anyone (the ping); other paths want Metadata-Flavor: Google (else 403), refuse X-Forwarded-For, POST and wait_for_change, and refuse a Host other than the server's (a page reaching the port through DNS rebinding) or a request from a web page (Origin, Sec-Fetch-Site); every answer carries the flavor; keep-alive serves two requests on one connection."""
    proc = subprocess.run(
        _forward("--metadata", "google", code=RAW_SCRIPT),
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=dict(_env(dirs), CREDPROXY_SOCKET=str(idle_socket)),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing here needs the daemon, so nothing to note
    out = json.loads(proc.stdout)
    expected = {
        "root": ("HTTP/1.1 200 OK", "computeMetadata/\n"),
        "universe": ("HTTP/1.1 200 OK", "googleapis.com"),
        "no_flavor": ("HTTP/1.1 403 Forbidden", None),
        "forwarded": ("HTTP/1.1 403 Forbidden", None),
        "post": ("HTTP/1.1 405 Method Not Allowed", None),
        "missing": ("HTTP/1.1 404 Not Found", None),
        "wait": ("HTTP/1.1 400 Bad Request", None),
        "rebound": ("HTTP/1.1 403 Forbidden", None),
        "from_page": ("HTTP/1.1 403 Forbidden", None),
    }
    for name, (status, body) in expected.items():
        got_status, headers, got_body = _status_and_head(out[name])
        assert got_status == status, out[name]
        assert "Metadata-Flavor: Google" in headers, out[name]
        if body is not None:
            assert got_body == body
    assert "Missing required header" in out["no_flavor"] or "Metadata-Flavor" in out["no_flavor"]
    first, _, second = out["keepalive"].partition("computeMetadata/\n")
    assert first.startswith("HTTP/1.1 200 OK\r\n")
    assert second.startswith("HTTP/1.1 200 OK\r\n") and second.endswith("googleapis.com")


NOBODY_SCRIPT = r"""
import json, os, subprocess
port = os.environ["GCE_METADATA_HOST"].rpartition(":")[2]
client = [NOBODY_PYTHON, "-I", "-c", PEER_CLIENT, port, "ipv4", "half-close"]
theirs = subprocess.run([*AS_NOBODY, *client], capture_output=True).stdout.decode("latin-1")
ours = subprocess.run(client, capture_output=True).stdout.decode("latin-1")
print(json.dumps({"theirs": theirs, "ours": ours}))
"""


def test_another_uid_gets_403_from_the_metadata_port(
    nobody_python: str, dirs: Dirs, idle_socket: Path
) -> None:
    """A client running as nobody gets forward's 403 naming both uids on the metadata port too; the same client as our uid gets the metadata server's answer."""
    code = (
        NOBODY_SCRIPT.replace("NOBODY_PYTHON", repr(nobody_python))
        .replace("PEER_CLIENT", repr(PEER_CLIENT))
        .replace("AS_NOBODY", repr(AS_NOBODY))
    )
    proc = subprocess.run(
        _forward("--metadata", "google", code=code),
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=dict(_env(dirs), CREDPROXY_SOCKET=str(idle_socket)),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert_refused(out["theirs"])
    # PEER_CLIENT asks for /p/x without the flavor: the metadata server's own 403.
    status, headers, _ = _status_and_head(out["ours"])
    assert status == "HTTP/1.1 403 Forbidden" and "Metadata-Flavor: Google" in headers
    assert proc.stderr.count("answered 403 to a connection from uid 65534") == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--metadata-email", "a@b"], "--metadata-email needs --metadata PROVIDER[:BUCKET]"),
        (["--metadata-port", "8080"], "--metadata-port needs --metadata PROVIDER[:BUCKET]"),
        (["--metadata", "google", "--metadata", "other"], "--metadata is given twice"),
        (["--metadata", "google", "--metadata-port", "70000"], "--metadata-port wants a number"),
        (["--metadata", "goo gle"], "is not PROVIDER or PROVIDER:BUCKET"),
        (["--metadata", "google", "--metadata-email", "a b"], "--metadata-email wants printable"),
        (["--metadata", "google", "--metadata-project", "a/b"], "--metadata-project wants"),
        (["--metadata", "google", "--metadata-scopes", "a,,b"], "--metadata-scopes wants"),
    ],
)
def test_metadata_usage_errors_exit_2_with_one_line(
    dirs: Dirs, options: list[str], message: str
) -> None:
    """A malformed --metadata option is one line on stderr and exit 2, before anything is opened or run."""
    marker = dirs.root / "ran"
    proc = subprocess.run(
        [CREDPROXY, "forward", *options, "--", "touch", str(marker)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env=_env(dirs),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("credproxy forward: "), proc.stderr
    assert message in lines[0]
    assert not marker.exists()
    assert proc.stdout == ""


def test_help_names_the_metadata_option() -> None:
    """`credproxy forward --help` shows --metadata and what it sets."""
    proc = subprocess.run(
        [CREDPROXY, "forward", "--help"], capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert proc.returncode == 0
    assert "--metadata P[:BUCKET]" in proc.stdout and "GCE_METADATA_HOST" in proc.stdout
