"""The development IdP: rotation, family revocation, scripting, HTTP and the command line."""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from credproxy import devidp

NOW = 1_700_000_000.0


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _grant(refresh_token: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "refresh_token": refresh_token,
        "client_id": "credproxy-dev",
        **extra,
    }


# -- the state machine ---------------------------------------------------------------


def test_mint_starts_a_family_with_recognisable_tokens() -> None:
    """A minted token has prefixed tokens, an expiry one lifetime away and Bearer type."""
    idp = devidp.DevIdP(lifetime=30, clock=FakeClock())
    token = idp.mint()
    assert token["access_token"].startswith("devat-")
    assert token["refresh_token"].startswith("devrt-")
    assert token["expiry"] == NOW + 30
    assert token["token_type"] == "Bearer"
    assert idp.is_access_token_valid(token["access_token"])


def test_access_tokens_expire_with_the_clock() -> None:
    """An access token is valid until its lifetime has passed on the IdP's clock."""
    clock = FakeClock()
    idp = devidp.DevIdP(lifetime=60, clock=clock)
    access_token = idp.mint()["access_token"]
    clock.now += 59
    assert idp.is_access_token_valid(access_token)
    clock.now += 1
    assert not idp.is_access_token_valid(access_token)
    assert not idp.is_access_token_valid("devat-never-issued")


def test_refresh_rotates_the_refresh_token() -> None:
    """A refresh answers a new access and refresh token plus expires_in."""
    idp = devidp.DevIdP(lifetime=45, clock=FakeClock())
    minted = idp.mint()
    status, answer = idp.handle_token_request(_grant(minted["refresh_token"]))
    assert status == 200
    assert answer["refresh_token"] not in (minted["refresh_token"], "")
    assert answer["access_token"] != minted["access_token"]
    assert answer["expires_in"] == 45
    assert answer["token_type"] == "Bearer"
    assert idp.refresh_count == 1


def test_refresh_echoes_the_requested_scope() -> None:
    """A scope sent with the grant comes back in the answer."""
    idp = devidp.DevIdP()
    _, answer = idp.handle_token_request(_grant(idp.mint()["refresh_token"], scope="read write"))
    assert answer["scope"] == "read write"


def test_reuse_of_a_rotated_token_revokes_the_whole_family() -> None:
    """Reusing a rotated refresh token answers invalid_grant and logs out the newest holder too."""
    idp = devidp.DevIdP()
    minted = idp.mint()
    _, rotated = idp.handle_token_request(_grant(minted["refresh_token"]))

    status, answer = idp.handle_token_request(_grant(minted["refresh_token"]))
    assert (status, answer["error"]) == (400, "invalid_grant")
    assert idp.reuse_count == 1
    assert idp.families_revoked == 1
    assert not idp.is_access_token_valid(rotated["access_token"])
    assert not idp.is_access_token_valid(minted["access_token"])
    status, answer = idp.handle_token_request(_grant(rotated["refresh_token"]))
    assert (status, answer["error"]) == (400, "invalid_grant")
    assert idp.reuse_count == 1  # a revoked family is not "reused" again


def test_revocation_spares_other_families() -> None:
    """Another login's tokens keep working when one family is revoked."""
    idp = devidp.DevIdP()
    victim, bystander = idp.mint(), idp.mint()
    idp.handle_token_request(_grant(victim["refresh_token"]))
    idp.handle_token_request(_grant(victim["refresh_token"]))
    assert idp.is_access_token_valid(bystander["access_token"])
    status, _ = idp.handle_token_request(_grant(bystander["refresh_token"]))
    assert status == 200


def test_two_racing_refreshes_log_the_account_out() -> None:
    """Two clients refreshing the same token (the bug credproxy prevents) end in revocation."""
    idp = devidp.DevIdP()
    shared = idp.mint()["refresh_token"]
    first, _ = idp.handle_token_request(_grant(shared))
    second, answer = idp.handle_token_request(_grant(shared))
    assert (first, second, answer["error"]) == (200, 400, "invalid_grant")
    assert idp.families_revoked == 1


def test_unknown_refresh_token_is_invalid_grant_without_reuse() -> None:
    """A refresh token never issued is rejected but counts as no reuse."""
    idp = devidp.DevIdP()
    status, answer = idp.handle_token_request(_grant("devrt-made-up"))
    assert (status, answer["error"]) == (400, "invalid_grant")
    assert idp.reuse_count == 0


def test_wrong_client_is_rejected_with_401() -> None:
    """A wrong client_id or missing client secret answers 401 invalid_client."""
    idp = devidp.DevIdP(client_secret="s3cret")
    refresh_token = idp.mint()["refresh_token"]
    for form in (
        {**_grant(refresh_token, client_secret="s3cret"), "client_id": "someone-else"},
        _grant(refresh_token),
        _grant(refresh_token, client_secret="wrong"),
    ):
        assert idp.handle_token_request(form) == (401, {"error": "invalid_client"})
    status, _ = idp.handle_token_request(_grant(refresh_token, client_secret="s3cret"))
    assert status == 200


def test_other_grant_types_are_unsupported() -> None:
    """Only the refresh_token grant is implemented."""
    idp = devidp.DevIdP()
    status, answer = idp.handle_token_request({"grant_type": "password", "client_id": "x"})
    assert (status, answer["error"]) == (400, "unsupported_grant_type")


def test_requests_are_recorded_with_fingerprints_only() -> None:
    """The request log holds fingerprints in place of refresh tokens and client secrets."""
    idp = devidp.DevIdP(client_secret="s3cret-value")
    refresh_token = idp.mint()["refresh_token"]
    idp.handle_token_request(_grant(refresh_token, client_secret="s3cret-value"))
    assert idp.requests == [
        {
            "grant_type": "refresh_token",
            "refresh_token": devidp.fingerprint(refresh_token),
            "client_id": "credproxy-dev",
            "client_secret": devidp.fingerprint("s3cret-value"),
        }
    ]
    assert refresh_token not in repr(idp.requests) + repr(idp)
    assert "s3cret-value" not in repr(idp.requests) + repr(idp)


def test_events_name_tokens_by_fingerprint() -> None:
    """Refresh and reuse events say what happened without a token in them."""
    idp = devidp.DevIdP()
    minted = idp.mint()
    _, rotated = idp.handle_token_request(_grant(minted["refresh_token"]))
    idp.handle_token_request(_grant(minted["refresh_token"]))
    assert len(idp.events) == 2
    assert devidp.fingerprint(minted["refresh_token"]) in idp.events[0]
    assert devidp.fingerprint(rotated["refresh_token"]) in idp.events[0]
    assert "revoked" in idp.events[1]
    text = "\n".join(idp.events)
    for key in ("access_token", "refresh_token"):
        assert minted[key] not in text
        assert rotated[key] not in text


def test_fingerprint_is_short_and_stable() -> None:
    """A fingerprint is 12 hex digits that depend only on the value."""
    assert devidp.fingerprint("abc") == devidp.fingerprint("abc")
    assert devidp.fingerprint("abc") != devidp.fingerprint("abd")
    assert len(devidp.fingerprint("abc")) == 12
    int(devidp.fingerprint("abc"), 16)


# -- scripted faults ------------------------------------------------------------------


def test_scripted_server_error_leaves_the_token_usable() -> None:
    """A scripted 500 consumes nothing: the same refresh token works next time."""
    idp = devidp.DevIdP()
    refresh_token = idp.mint()["refresh_token"]
    idp.fail_next("server_error")
    assert idp.handle_token_request(_grant(refresh_token))[0] == 500
    assert idp.handle_token_request(_grant(refresh_token))[0] == 200


def test_scripted_invalid_grant_revokes_nothing() -> None:
    """A scripted invalid_grant answers 400 but the token stays valid."""
    idp = devidp.DevIdP()
    refresh_token = idp.mint()["refresh_token"]
    idp.fail_next("invalid_grant")
    status, answer = idp.handle_token_request(_grant(refresh_token))
    assert (status, answer["error"]) == (400, "invalid_grant")
    assert idp.families_revoked == 0
    assert idp.handle_token_request(_grant(refresh_token))[0] == 200


def test_faults_apply_in_order_one_per_request() -> None:
    """count=2 fails two requests, then later faults follow, then normal service resumes."""
    idp = devidp.DevIdP()
    refresh_token = idp.mint()["refresh_token"]
    idp.fail_next("server_error", count=2)
    idp.fail_next("invalid_grant")
    statuses = [idp.handle_token_request(_grant(refresh_token))[0] for _ in range(4)]
    assert statuses == [500, 500, 400, 200]


def test_no_refresh_token_fault_skips_rotation() -> None:
    """A non-rotating answer omits refresh_token and the old one keeps working."""
    idp = devidp.DevIdP()
    refresh_token = idp.mint()["refresh_token"]
    idp.fail_next("no_refresh_token")
    status, answer = idp.handle_token_request(_grant(refresh_token))
    assert status == 200
    assert "refresh_token" not in answer
    assert idp.is_access_token_valid(answer["access_token"])
    assert idp.handle_token_request(_grant(refresh_token))[0] == 200
    assert idp.reuse_count == 0


def test_malformed_fault_called_directly_gives_no_token() -> None:
    """Without HTTP, a malformed answer is a 200 with nothing usable in it."""
    idp = devidp.DevIdP()
    idp.fail_next("malformed")
    assert idp.handle_token_request(_grant(idp.mint()["refresh_token"])) == (200, {})


def test_unknown_fault_kind_is_refused() -> None:
    """A typo in a fault kind fails loudly instead of scripting nothing."""
    idp = devidp.DevIdP()
    with pytest.raises(ValueError, match="unknown fault"):
        idp.fail_next("server-error")


# -- over HTTP, in the test's trio loop ----------------------------------------------


async def test_userinfo_accepts_only_live_access_tokens(nursery: trio.Nursery) -> None:
    """GET /userinfo answers the subject for a valid bearer token and 401 otherwise."""
    idp = devidp.DevIdP()
    token_url: str = await nursery.start(devidp.serve, idp)
    userinfo = token_url.replace("/token", "/userinfo")
    access_token = idp.mint()["access_token"]
    async with httpx.AsyncClient(trust_env=False) as client:
        ok = await client.get(userinfo, headers={"Authorization": f"Bearer {access_token}"})
        bad = await client.get(userinfo, headers={"Authorization": "Bearer devat-nope"})
        missing = await client.get(userinfo)
    assert (ok.status_code, ok.json()) == (200, {"sub": "dev-user"})
    assert bad.status_code == 401
    assert bad.headers["www-authenticate"].startswith("Bearer")
    assert missing.status_code == 401


async def test_http_token_endpoint_and_errors(nursery: trio.Nursery) -> None:
    """POST /token works over HTTP; wrong paths, methods and malformed faults answer as such."""
    idp = devidp.DevIdP()
    token_url: str = await nursery.start(devidp.serve, idp)
    refresh_token = idp.mint()["refresh_token"]
    async with httpx.AsyncClient(trust_env=False) as client:
        ok = await client.post(token_url, data=_grant(refresh_token))
        idp.fail_next("malformed")
        garbled = await client.post(token_url, data=_grant(ok.json()["refresh_token"]))
        wrong_method = await client.get(token_url)
        wrong_path = await client.post(token_url.replace("/token", "/nope"), data={})
    assert ok.status_code == 200
    assert ok.headers["cache-control"] == "no-store"
    assert ok.json()["access_token"].startswith("devat-")
    assert garbled.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        garbled.json()
    assert wrong_method.status_code == 405
    assert wrong_path.status_code == 404


async def test_a_broken_client_does_not_stop_the_server(nursery: trio.Nursery) -> None:
    """Garbage on one connection closes that connection only; the next request is served."""
    idp = devidp.DevIdP()
    token_url: str = await nursery.start(devidp.serve, idp)
    port = urllib.parse.urlsplit(token_url).port
    assert port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"\x00\x01 not http at all\r\n\r\n")
        with trio.fail_after(5):
            assert await stream.receive_some() == b""  # closed without an answer
    async with httpx.AsyncClient(trust_env=False) as client:
        ok = await client.post(token_url, data=_grant(idp.mint()["refresh_token"]))
    assert ok.status_code == 200


async def test_serve_logs_one_line_per_refresh(nursery: trio.Nursery) -> None:
    """The log callback receives a fingerprint-only line per refresh and per reuse."""
    idp = devidp.DevIdP()
    lines: list[str] = []
    token_url: str = await nursery.start(partial(devidp.serve, idp, log=lines.append))
    minted = idp.mint()
    async with httpx.AsyncClient(trust_env=False) as client:
        first = await client.post(token_url, data=_grant(minted["refresh_token"]))
        await client.post(token_url, data=_grant(minted["refresh_token"]))
    assert len(lines) == 2
    assert "refresh family 1" in lines[0]
    assert "revoked" in lines[1]
    joined = "\n".join(lines)
    assert minted["refresh_token"] not in joined
    assert first.json()["refresh_token"] not in joined
    assert first.json()["access_token"] not in joined


# -- python -m credproxy.devidp ---------------------------------------------------------


def _read_line(proc: subprocess.Popen[str], timeout: float = 15) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError("devidp did not print its URL in time")
    return proc.stdout.readline().strip()


def test_command_line_serves_mints_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The module starts, writes a 0600 token and its URL, refreshes over HTTP and exits 0."""
    mint = tmp_path / "token.json"
    port_file = tmp_path / "url"
    cmd = [sys.executable, "-m", "credproxy.devidp", "--port", "0", "--lifetime", "30"]
    cmd += ["--mint", str(mint), "--port-file", str(port_file)]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    ) as proc:
        try:
            url = _read_line(proc)
            assert url.startswith("http://127.0.0.1:")
            assert url.endswith("/token")
            assert port_file.read_text().strip() == url

            assert stat.S_IMODE(os.stat(mint).st_mode) == 0o600
            token = json.loads(mint.read_text())
            assert token["refresh_token"].startswith("devrt-")
            assert token["access_token"].startswith("devat-")
            assert token["token_type"] == "Bearer"
            assert isinstance(token["expiry"], float)

            form = urllib.parse.urlencode(_grant(token["refresh_token"])).encode()
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, data=form, timeout=10) as response:
                answer = json.loads(response.read())
            assert answer["refresh_token"] != token["refresh_token"]
            assert answer["expires_in"] == 30

            with pytest.raises(urllib.error.HTTPError) as reused:
                opener.open(url, data=form, timeout=10)
            assert reused.value.code == 400
            reused.value.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "refresh family 1" in stderr
    assert "revoked" in stderr
    for secret in (token["refresh_token"], token["access_token"], answer["refresh_token"]):
        assert secret not in stderr


def test_command_line_reports_a_busy_port(tmp_path: Path) -> None:
    """A port already in use gives exit status 1 and one clear line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "credproxy.devidp", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )
    assert result.returncode == 1
    assert "Address already in use" in result.stderr
    assert result.stdout == ""
