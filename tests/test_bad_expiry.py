"""A token whose ``expiry`` is not a finite number (issue 16, item 13).

``"expiry": "soon"`` used to be served as it was and never refreshed. Now:

- a token already stored with such an expiry counts as expired: the daemon
  refreshes it (the development IdP counts the refresh) before serving it,
  and one without a refresh token asks for a new login instead of being served;
- ``credproxy import`` refuses one, naming the field (never a value), exit 2;
- ``credproxy login`` refuses one from the identity provider, naming the
  field, exit 1, and stores nothing.

``expires_in`` must likewise be a finite, non-negative number of seconds.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import Dirs, StartDaemon, cli

AT_CANARY = "AT-CANARY-expiry-7d1f"
RT_CANARY = "RT-CANARY-expiry-02be"


def _stored(dirs: Dirs) -> dict[str, Any] | None:
    path = dirs.state / "tokens" / "dev" / "default.json"
    return json.loads(path.read_text()) if path.exists() else None


# -- a token already stored with a broken expiry is refreshed before it is served ---------


@pytest.mark.parametrize(
    "expiry", ["soon", None, True, "1800003600", -5], ids=["soon", "null", "true", "str", "neg"]
)
async def test_a_stored_invalid_expiry_is_refreshed_before_serving(
    start_daemon: StartDaemon, expiry: Any, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """get_token on a stored token with "expiry": "soon" refreshes first and serves the new token; the log says why."""
    h = await start_daemon()
    minted = h.idp.mint()  # a real token family: its refresh token works at the IdP
    stale = {**minted, "access_token": AT_CANARY, "expiry": expiry}
    h.store.write("dev", "default", stale)
    s = await h.session("dev")
    p = await h.peer(s)
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is True, reply
    assert h.idp.refresh_count == 1, "the token with an invalid expiry was not refreshed"
    (said,) = [e for e in no_secrets_in_logs if e["event"] == "token_expiry_invalid"]
    assert "treated as expired" in said["why"]
    served = reply["data"]
    assert served["access_token"] != AT_CANARY
    assert h.idp.is_access_token_valid(served["access_token"])
    assert isinstance(served["expiry"], int | float) and served["expiry"] > h.wall()
    stored = h.store.read("dev", "default")
    assert stored is not None and stored["access_token"] == served["access_token"]
    assert isinstance(stored["expiry"], int | float)
    # Once the expiry is a real one, the token is served without another refresh.
    again = await p.call("get_token", {"provider": "dev"})
    assert again["ok"] is True and again["data"]["access_token"] == served["access_token"]
    assert h.idp.refresh_count == 1


async def test_a_stored_invalid_expiry_without_refresh_token_is_not_served(
    start_daemon: StartDaemon,
) -> None:
    """With nothing to refresh it with, a token whose expiry is "soon" asks for a login instead of being served."""
    h = await start_daemon()
    h.store.write(
        "dev", "default", {"access_token": AT_CANARY, "expiry": "soon", "token_type": "Bearer"}
    )
    s = await h.session("dev")
    p = await h.peer(s)
    reply = await p.call("get_token", {"provider": "dev"})
    assert reply["ok"] is False, reply
    assert reply["code"] == "REAUTH_REQUIRED", reply
    assert "has expired" in reply["error"]
    assert AT_CANARY not in json.dumps(reply)
    assert h.idp.refresh_count == 0


# -- credproxy import refuses it ------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ('"expiry": "soon"', "expiry"),
        ('"expiry": NaN', "expiry"),
        ('"expiry": Infinity', "expiry"),
        ('"expiry": -Infinity', "expiry"),
        ('"expiry": null', "expiry"),
        ('"expiry": true', "expiry"),
        ('"expiry": -1', "expiry"),
        ('"expires_in": "soon"', "expires_in"),
        ('"expires_in": NaN', "expires_in"),
        ('"expires_in": Infinity', "expires_in"),
        ('"expires_in": -5', "expires_in"),
        ('"expires_in": false', "expires_in"),
        ('"expires_in": 1e400', "expires_in"),
        ('"expires_in": 1' + "0" * 400, "expires_in"),
        ('"expiry": 1800003600, "expires_in": NaN', "expires_in"),
    ],
)
def test_import_refuses_an_invalid_expiry_naming_the_field(
    dirs: Dirs, fields: str, field: str
) -> None:
    """`credproxy import` of a token with a non-finite or non-number expiry exits 2 with one line naming the field."""
    text = f'{{"access_token": "{AT_CANARY}", "refresh_token": "{RT_CANARY}", {fields}}}'
    result = cli(dirs, "import", "dev", input=text)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("credproxy import: ") and f"'{field}'" in lines[0]
    assert "finite" in lines[0] or "too large" in lines[0]
    assert "CANARY" not in result.stdout + result.stderr
    assert _stored(dirs) is None


def test_import_still_takes_a_valid_expiry_or_expires_in(dirs: Dirs) -> None:
    """The check refuses only what is broken: an epoch expiry or a plain expires_in is stored."""
    token = {"access_token": AT_CANARY, "refresh_token": RT_CANARY, "expires_in": 3600}
    result = cli(dirs, "import", "dev", input=json.dumps(token))
    assert result.returncode == 0, result.stderr
    stored = _stored(dirs)
    assert stored is not None and isinstance(stored["expiry"], int)
    token = {"access_token": AT_CANARY, "expiry": 1_900_000_000.5}
    result = cli(dirs, "import", "dev", input=json.dumps(token))
    assert result.returncode == 0, result.stderr
    assert _stored(dirs) == {**token, "token_type": "Bearer"}


# -- credproxy login refuses it -----------------------------------------------------------


class _Idp(BaseHTTPRequestHandler):
    """A device-flow identity provider whose token answer is the server's ``token_body``."""

    server: _IdpServer

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/device_authorization":
            base = f"http://127.0.0.1:{self.server.server_port}"
            body = json.dumps(
                {
                    "device_code": "dc-fake",
                    "user_code": "FAKE-CODE",
                    "verification_uri": f"{base}/device",
                    "expires_in": 600,
                    "interval": 0,
                }
            ).encode()
        elif self.path == "/token":
            self.server.token_requests += 1
            body = self.server.token_body
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _IdpServer(ThreadingHTTPServer):
    token_body = b""
    token_requests = 0


@pytest.fixture
def fake_idp(dirs: Dirs) -> Iterator[_IdpServer]:
    """The fake IdP on 127.0.0.1, and a config whose provider ``dev`` logs in there."""
    server = _IdpServer(("127.0.0.1", 0), _Idp)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_port}"
    dirs.config.write_text(
        "[providers.dev]\n"
        f'token_url = "{base}/token"\n'
        'client_id = "credproxy-dev"\n'
        f'device_authorization_url = "{base}/device_authorization"\n'
    )
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ('"expires_in": "soon"', "expires_in"),
        ('"expires_in": NaN', "expires_in"),
        ('"expires_in": -5', "expires_in"),
        ('"expiry": "soon"', "expiry"),
        ('"expiry": Infinity', "expiry"),
        ('"expiry": null', "expiry"),
    ],
)
def test_login_refuses_a_token_with_an_invalid_expiry(
    dirs: Dirs, fake_idp: _IdpServer, fields: str, field: str
) -> None:
    """`credproxy login` whose IdP answers an unusable expiry exits 1 naming the field; nothing is stored."""
    fake_idp.token_body = (
        f'{{"access_token": "{AT_CANARY}", "refresh_token": "{RT_CANARY}", '
        f'"token_type": "Bearer", {fields}}}'
    ).encode()
    result = cli(dirs, "login", "dev", "--flow", "device", "--no-browser", "--timeout", "20")
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("credproxy login: ") and f"invalid {field}" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert "CANARY" not in result.stdout + result.stderr
    assert fake_idp.token_requests == 1
    assert not Path(dirs.state / "tokens").exists()
