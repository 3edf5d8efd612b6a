"""`credproxy login` end to end: the installed executable against the development IdP, both as processes.

The test plays the person: it approves or denies the device flow with a plain
HTTP GET on the IdP's approval URL, and plays the browser by following the
authorization redirect with httpx (which lands on credproxy's loopback
listener) or by pasting the redirect URL into credproxy's standard input.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from conftest import CREDPROXY, Dirs, Login, StartLogin, cli
from credproxy.core import login as codec
from credproxy.core.config import Provider
from credproxy.core.login import code_challenge
from credproxy.devidp import DevIdP

#: Prefixes of every secret the development IdP issues (device code,
#: authorization code, access and refresh tokens): none may reach a terminal.
SECRET_PREFIXES = ("devdc-", "devac-", "devat-", "devrt-")
Snapshot = dict[str, tuple[int, bytes]]
OLD_TOKEN = {
    "access_token": "AT-OLD-CANARY-51c0",
    "refresh_token": "RT-OLD-CANARY-9e2a",
    "expires_in": 3600,
}


@dataclass
class Idp:
    """``python -m credproxy.devidp`` running as a child of the test."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def events(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.events():
            if time.monotonic() > deadline:
                raise AssertionError(f"the IdP never logged {text!r}:\n{self.events()}")
            time.sleep(0.02)

    def device(self, user_code: str, action: str) -> httpx.Response:
        """Play the person on the approval page."""
        return httpx.get(f"{self.base}/device", params={"user_code": user_code, "action": action})


@pytest.fixture
def idp(background_daemon: Dirs) -> Iterator[Idp]:
    """The development IdP (1 s device interval) and a config whose provider ``dev`` logs in there."""
    dirs = background_daemon
    url_file, log = dirs.root / "idp.url", dirs.root / "idp.log"
    with log.open("wb") as log_out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "credproxy.devidp", "--port", "0"),
                *("--device-interval", "1", "--port-file", str(url_file)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log_out,
            env=dirs.env(),
        )
    try:
        deadline = time.monotonic() + 20
        while not url_file.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the IdP did not start"
            time.sleep(0.02)
        token_url = url_file.read_text().strip()
        base = token_url.removesuffix("/token")
        dirs.config.write_text(
            "[providers.dev]\n"
            f'token_url = "{token_url}"\n'
            'client_id = "credproxy-dev"\n'
            f'authorization_url = "{base}/authorize"\n'
            f'device_authorization_url = "{base}/device_authorization"\n'
        )
        yield Idp(proc, base, log)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def snapshot(root: Path) -> Snapshot:
    """Every file and directory under *root*: mode and content (directories: empty)."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            data = path.read_bytes() if path.is_file() else b""
            out[str(path.relative_to(root))] = (st.st_mode, data)
    return out


LoginDev = Callable[..., Login]


@pytest.fixture
def old_store(idp: Idp, background_daemon: Dirs) -> Snapshot:
    """Store an old token first, so that "unchanged" means it is still there, byte for byte."""
    proc = cli(background_daemon, "import", "dev", input=json.dumps(OLD_TOKEN))
    assert proc.returncode == 0, proc.stderr
    return snapshot(background_daemon.state)


@pytest.fixture
def login_dev(idp: Idp, background_daemon: Dirs, start_login: StartLogin) -> LoginDev:
    """``login_dev(*args)``: start ``credproxy login dev --no-browser ARGS`` against the IdP."""
    return lambda *args: start_login(background_daemon, "dev", *args)


def served(dirs: Dirs) -> tuple[str, dict[str, Any]]:
    """What a sandbox session is served for ``dev``, and the daemon's status seen from inside."""
    proc = cli(
        dirs,
        "run",
        "--allow",
        "dev",
        "--",
        "sh",
        "-c",
        f"{CREDPROXY} token dev && {CREDPROXY} status --json",
    )
    assert proc.returncode == 0, proc.stderr
    token, _, status = proc.stdout.partition("\n")
    return token.strip(), json.loads(status)


def assert_logged_in(dirs: Dirs, login: Login, *idps: Idp) -> None:
    """The store holds a fresh IdP token, a sandbox is served it and its renewal is scheduled.

    No secret reached the terminal, nor the log of any of *idps*.
    """
    stored = json.loads((dirs.state / "tokens" / "dev" / "default.json").read_text())
    assert stored["access_token"].startswith("devat-")
    assert stored["refresh_token"].startswith("devrt-")
    assert 0 < stored["expiry"] - time.time() <= 60
    assert "stored dev:default" in login.stdout
    token, status = served(dirs)
    assert token == stored["access_token"]
    renewals = [r for s in status["sessions"] for r in s["renewals"]]
    assert any(
        (r["provider"], r["bucket"]) == ("dev", "default") and r["next_renewal"] for r in renewals
    ), status
    assert_no_secrets(login, *idps)


def assert_no_secrets(login: Login, *idps: Idp) -> None:
    """No code, device code or token appears on the terminal or in the IdP's log."""
    for text in (login.stdout, login.stderr, *(i.events() for i in idps)):
        assert not any(p in text for p in SECRET_PREFIXES), text


def assert_failed_cleanly(dirs: Dirs, login: Login, before: Snapshot, why: str, *idps: Idp) -> None:
    """Exit 1, one line on stderr saying *why*, the store byte-for-byte unchanged, no secret shown.

    (Nor in the log of any of *idps*.)
    """
    assert login.finish() == 1
    last = login.stderr.strip().splitlines()[-1]
    assert last.startswith("credproxy login: ") and why in last, login.stderr
    assert "Traceback" not in login.stderr
    assert snapshot(dirs.state) == before
    assert_no_secrets(login, *idps)


def assert_port_closed(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def params_of(url: str) -> dict[str, str]:
    """The query parameters of *url*."""
    return dict(parse_qsl(urlsplit(url).query))


def user_code(login: Login) -> str:
    return login.line(lambda s: "enter the code:" in s).split(":")[-1].strip()


# -- the device flow ------------------------------------------------------------------


@pytest.mark.usefixtures("old_store")
def test_device_flow_pending_then_slow_down_then_approved(
    dirs: Dirs, idp: Idp, login_dev: LoginDev
) -> None:
    """Pending, then slow_down (honoured: +5 s), then approval stores the token and a sandbox is served it."""
    assert served(dirs)[0] == OLD_TOKEN["access_token"]  # a daemon now runs with the old token
    login = login_dev()
    code = user_code(login)
    idp.wait_for(f"device poll {code}: authorization_pending")
    assert idp.device(code, "slow_down").status_code == 200
    idp.wait_for(f"device poll {code}: slow_down (scripted)")
    assert idp.device(code, "approve").status_code == 200
    assert login.finish() == 0, login.stderr
    assert f"device poll {code}: approved" in idp.events()
    assert "polled too fast" not in idp.events()  # the +5 s of slow_down was kept
    assert code in login.stderr  # the one value meant for the person
    assert_logged_in(dirs, login, idp)


@pytest.mark.parametrize(("action", "why"), [("deny", "denied"), ("expire", "expired")])
def test_device_flow_denied_or_expired_stores_nothing(
    dirs: Dirs, idp: Idp, old_store: Snapshot, login_dev: LoginDev, action: str, why: str
) -> None:
    """A denied or expired device code ends the login with one line and an unchanged store."""
    login = login_dev("--flow", "device")
    code = user_code(login)
    assert idp.device(code, action).status_code == 200
    assert_failed_cleanly(dirs, login, old_store, why, idp)


# -- authorization code + PKCE with a loopback redirect ---------------------------------


@pytest.mark.usefixtures("old_store")
def test_loopback_flow_approved(dirs: Dirs, idp: Idp, login_dev: LoginDev) -> None:
    """The browser's redirect reaches the listener, the code is exchanged, the page says so, the port closes."""
    login = login_dev("--flow", "loopback")
    url = login.auth_url()
    page = httpx.get(url, follow_redirects=True)
    assert page.status_code == 200 and "Logged in" in page.text
    assert login.finish() == 0, login.stderr
    assert_logged_in(dirs, login, idp)
    assert_port_closed(login.callback_port(url))


def _forged(redirect: str, **params: str) -> str:
    """*redirect* (the IdP's answer) with its query replaced by *params*: a forged callback."""
    return urlunsplit(urlsplit(redirect)._replace(query=urlencode(params)))


@pytest.mark.usefixtures("old_store")
def test_loopback_stray_requests_are_refused_and_the_login_goes_on(
    dirs: Dirs, idp: Idp, login_dev: LoginDev
) -> None:
    """A wrong state, a missing state, a forged access_denied or /favicon.ico is refused; the real redirect after them logs in.

    Any web page in the person's browser can request the callback URL: such a
    request gets a 400 saying why, and must not end the login.
    """
    login = login_dev("--flow", "loopback")
    url = login.auth_url()
    redirect = httpx.get(url).headers["location"]  # the IdP's real answer, not followed yet
    real = params_of(redirect)
    assert real["code"].startswith("devac-")
    port = login.callback_port(url)
    for forged in (
        _forged(redirect, code="devac-forged-code", state="forged-state"),
        _forged(redirect, code=real["code"], state=real["state"] + "x"),
        _forged(redirect, code="devac-forged-code"),
        _forged(redirect, error="access_denied", state="forged-state"),
        _forged(redirect, error="access_denied"),
        _forged(redirect),
    ):
        page = httpx.get(forged)
        assert page.status_code == 400, forged
        assert "does not match this login" in page.text and "still waiting" in page.text
        assert "devac-" not in page.text
    favicon = httpx.get(f"http://127.0.0.1:{port}/favicon.ico")
    assert favicon.status_code == 404
    assert httpx.post(redirect).status_code == 405
    login.line(lambda s: "does not match this login; still waiting" in s)
    assert login.proc.poll() is None  # still waiting for the real redirect
    page = httpx.get(redirect)
    assert page.status_code == 200 and "Logged in" in page.text
    assert login.finish() == 0, login.stderr
    assert login.stderr.count("does not match this login") == 1  # said once, not per request
    assert_logged_in(dirs, login, idp)
    assert_port_closed(port)


def test_loopback_wrong_state_then_no_answer_times_out(
    dirs: Dirs, idp: Idp, old_store: Snapshot, login_dev: LoginDev
) -> None:
    """After a wrong-state callback the login waits on until --timeout; nothing is stored or exchanged."""
    login = login_dev("--flow", "loopback", "--timeout", "3")
    url = login.auth_url()
    redirect = httpx.get(url).headers["location"]
    query = params_of(redirect)
    page = httpx.get(_forged(redirect, code=query["code"], state="forged-state"))
    assert page.status_code == 400 and "does not match this login" in page.text
    assert_failed_cleanly(dirs, login, old_store, "no answer within 3 s")
    assert "login family" not in idp.events()  # the code was never exchanged
    assert_port_closed(login.callback_port(url))


def test_loopback_access_denied_with_the_right_state_ends_the_login(
    dirs: Dirs, idp: Idp, old_store: Snapshot, login_dev: LoginDev
) -> None:
    """The identity provider's own access_denied (our state) is the person's answer: the login ends, nothing stored."""
    login = login_dev("--flow", "loopback")
    url = login.auth_url()
    page = httpx.get(url + "&devidp_action=deny", follow_redirects=True)
    assert page.status_code == 400 and "access_denied" in page.text
    assert_failed_cleanly(dirs, login, old_store, "access_denied")
    assert "authorization denied (scripted)" in idp.events()
    assert_port_closed(login.callback_port(url))


def test_loopback_pkce_verifier_mismatch_is_refused_by_the_idp(
    dirs: Dirs, idp: Idp, old_store: Snapshot, login_dev: LoginDev
) -> None:
    """When the IdP holds another challenge, it refuses credproxy's verifier; nothing is stored."""
    login = login_dev("--flow", "loopback")
    parts = urlsplit(login.auth_url())
    query = dict(parse_qsl(parts.query))
    query["code_challenge"] = code_challenge("a-verifier-credproxy-does-not-have-0123456789")
    page = httpx.get(urlunsplit(parts._replace(query=urlencode(query))), follow_redirects=True)
    assert page.status_code == 400 and "invalid_grant" in page.text
    assert_failed_cleanly(dirs, login, old_store, "invalid_grant")
    assert "PKCE verifier does not match" in idp.events()


def test_loopback_time_out_ends_the_wait_cleanly(
    dirs: Dirs, old_store: Snapshot, login_dev: LoginDev
) -> None:
    """With no browser answer, --timeout ends the login with one line; store unchanged, port closed."""
    login = login_dev("--flow", "loopback", "--timeout", "1")
    url = login.auth_url()
    assert_failed_cleanly(dirs, login, old_store, "no answer within 1 s")
    assert_port_closed(login.callback_port(url))


def test_an_unreadable_client_secret_file_is_said_before_the_login_starts(
    dirs: Dirs, idp: Idp, old_store: Snapshot, login_dev: LoginDev
) -> None:
    """``client_secret_file`` names a file that is not there: the loopback login fails at once with one line naming the file (no link to follow, no listener, no traceback), and the store is unchanged."""
    missing = dirs.root / "no-such.secret"
    with dirs.config.open("a") as f:
        f.write(f'client_secret_file = "{missing}"\n')
    login = login_dev("--flow", "loopback")
    assert_failed_cleanly(dirs, login, old_store, f"cannot read client_secret_file {missing}")
    assert "http" not in login.stdout


def test_ctrl_c_leaves_the_store_unchanged_and_no_listener(
    dirs: Dirs, old_store: Snapshot, login_dev: LoginDev
) -> None:
    """SIGINT while waiting for the browser exits 130, stores nothing and closes the port."""
    login = login_dev("--flow", "loopback")
    url = login.auth_url()
    login.line(lambda s: s.startswith("Waiting"))
    login.proc.send_signal(signal.SIGINT)
    assert login.finish() == 130
    assert "Traceback" not in login.stderr
    assert snapshot(dirs.state) == old_store
    assert_port_closed(login.callback_port(url))


# -- paste ---------------------------------------------------------------------------


@pytest.mark.usefixtures("old_store")
def test_paste_flow_with_the_redirect_url(dirs: Dirs, idp: Idp, login_dev: LoginDev) -> None:
    """Pasting the URL the browser was sent to completes the login; a sandbox is served the token."""
    login = login_dev("--flow", "paste")
    redirect = httpx.get(login.auth_url()).headers["location"]
    login.line(lambda s: "paste the code" in s)
    login.type_line(redirect)
    assert login.finish() == 0, login.stderr
    assert_logged_in(dirs, login, idp)


def test_a_login_the_store_cannot_keep_says_what_to_check_and_to_log_in_again(
    dirs: Dirs, idp: Idp, login_dev: LoginDev
) -> None:
    """The login succeeds but its token cannot be written (a file where tokens/dev goes): exit 1, one line with the cause, the state directory to check and the command to log in again."""
    dirs.state.mkdir(mode=0o700)
    (dirs.state / "tokens").mkdir(mode=0o700)
    (dirs.state / "tokens" / "dev").write_text("")  # (root ignores modes: a file, not a dir)
    login = login_dev("--flow", "paste", "--bucket", "work")
    redirect = httpx.get(login.auth_url()).headers["location"]
    login.line(lambda s: "paste the code" in s)
    login.type_line(redirect)
    assert login.finish() == 1
    last = login.stderr.strip().splitlines()[-1]
    assert last == (
        "credproxy login: the login succeeded but its token was not stored: cannot create "
        f"{dirs.state}/tokens/dev: File exists; check that the state directory {dirs.state} "
        "is yours and writable and that its disk has free space, then log in again: "
        "credproxy login dev --bucket work"
    ), login.stderr
    assert "Traceback" not in login.stderr
    assert_no_secrets(login, idp)


def test_paste_flow_refuses_a_url_with_the_wrong_state(
    dirs: Dirs, old_store: Snapshot, login_dev: LoginDev
) -> None:
    """A pasted redirect URL with a foreign state is refused and nothing is stored."""
    login = login_dev("--flow", "paste")
    redirect = httpx.get(login.auth_url()).headers["location"]
    login.type_line(redirect.replace("state=", "state=x"))
    assert_failed_cleanly(dirs, login, old_store, "wrong state")


def test_login_to_an_unknown_provider_says_what_to_configure(background_daemon: Dirs) -> None:
    """A provider missing from the config exits 3 with a line naming the config table."""
    proc = cli(background_daemon, "login", "nosuch", "--no-browser")
    assert proc.returncode == 3
    assert "[providers.nosuch]" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# -- the development IdP's login endpoints, in process ----------------------------------


def test_devidp_code_grant_checks_pkce_and_records_no_secret() -> None:
    """The IdP issues a code for our challenge, exchanges it once for the right verifier only, and records fingerprints."""
    idp_state = DevIdP(lifetime=60)
    pkce = codec.Pkce.from_entropy(b"\x05" * 32)
    redirect_uri = codec.loopback_redirect_uri(4321)
    provider = Provider(
        token_url="http://127.0.0.1:1/token",
        client_id=idp_state.client_id,
        authorization_url="http://127.0.0.1:1/authorize",
    )
    url = codec.authorization_url(provider, redirect_uri, "st", pkce)
    status, location = idp_state.handle_authorize(params_of(url))
    assert status == 302
    result = codec.parse_callback_target(location.removeprefix("http://127.0.0.1:4321"), "st")
    assert isinstance(result, codec.CallbackResult) and result.code is not None
    wrong = codec.Pkce.from_entropy(b"\x06" * 32)
    form = codec.code_form(provider, result.code, wrong, redirect_uri)
    assert idp_state.handle_token_request(form)[1]["error"] == "invalid_grant"
    # The failed try burnt the code: a code is good for one exchange only.
    form = codec.code_form(provider, result.code, pkce, redirect_uri)
    assert idp_state.handle_token_request(form)[1]["error"] == "invalid_grant"
    status, location = idp_state.handle_authorize(params_of(url))
    result = codec.parse_callback_target(location.removeprefix("http://127.0.0.1:4321"), "st")
    assert isinstance(result, codec.CallbackResult) and result.code is not None
    status, answer = idp_state.handle_token_request(
        codec.code_form(provider, result.code, pkce, redirect_uri)
    )
    assert status == 200 and answer["access_token"].startswith("devat-")
    recorded = repr(idp_state.requests)
    assert pkce.verifier not in recorded and result.code not in recorded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_registered_localhost_redirect_uri_is_sent_as_is_and_listened_on(
    dirs: Dirs, login_dev: LoginDev
) -> None:
    """A provider whose client registered http://localhost:PORT/auth/callback (Codex's shape) logs in through exactly that URI."""
    port = _free_port()
    registered = f"http://localhost:{port}/auth/callback"
    dirs.config.write_text(dirs.config.read_text() + f'redirect_uri = "{registered}"\n')
    login = login_dev("--flow", "loopback")
    url = login.auth_url()
    assert params_of(url)["redirect_uri"] == registered
    redirect = httpx.get(url).headers["location"]
    assert redirect.startswith(registered + "?")
    page = httpx.get(redirect.replace("localhost", "127.0.0.1", 1))
    assert page.status_code == 200 and "Logged in" in page.text
    assert login.finish() == 0, login.stderr
    assert_logged_in(dirs, login)
    assert_port_closed(port)


def test_a_redirect_uri_off_this_machine_needs_the_paste_flow(
    dirs: Dirs, login_dev: LoginDev
) -> None:
    """With a registered https redirect page (Claude's shape), loopback is refused with advice and paste takes the code it shows."""
    dirs.config.write_text(
        dirs.config.read_text() + 'redirect_uri = "https://idp.invalid/oauth/code/callback"\n'
    )
    refused = login_dev("--flow", "loopback")
    assert refused.finish() != 0
    assert "use --flow paste" in refused.stderr
    login = login_dev("--flow", "paste")
    url = login.auth_url()
    assert params_of(url)["redirect_uri"].startswith("https://idp.invalid/")
    redirect = httpx.get(url).headers["location"]  # where the provider's page would show the code
    query = params_of(redirect)
    login.type_line(f"{query['code']}#{query['state']}")
    assert login.finish() == 0, login.stderr
    assert_logged_in(dirs, login)
