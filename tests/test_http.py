"""HttpTokenEndpoint against a real development IdP on loopback, in the test's own trio loop."""

from __future__ import annotations

import socket
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from credproxy import devidp
from credproxy.core.config import Provider
from credproxy.errors import ReauthRequired, RefreshFailed, UpstreamError
from credproxy.shell.http import HttpTokenEndpoint

NOW = 1_700_000_000.0
CANARY_SECRET = "client-secret-CANARY-5e1f"


@pytest.fixture
async def endpoint() -> AsyncIterator[HttpTokenEndpoint]:
    ep = HttpTokenEndpoint(wall_clock=lambda: NOW)
    try:
        yield ep
    finally:
        await ep.aclose()


async def _start(nursery: trio.Nursery, idp: devidp.DevIdP) -> Provider:
    url: str = await nursery.start(devidp.serve, idp)
    return Provider(token_url=url, client_id=idp.client_id)


def _everything_said(exc: BaseException) -> str:
    """Message, repr and formatted traceback (with causes) of *exc*."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def _assert_secret_free(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


async def test_refresh_returns_a_parsed_token(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint
) -> None:
    """A refresh returns a new access token with an absolute expiry taken from the wall clock."""
    idp = devidp.DevIdP(lifetime=60)
    provider = await _start(nursery, idp)
    minted = idp.mint()
    token = await endpoint.refresh(provider, minted["refresh_token"])
    assert token["access_token"].startswith("devat-")
    assert token["access_token"] != minted["access_token"]
    assert token["token_type"] == "Bearer"
    assert token["expiry"] == NOW + 60
    assert "expires_in" not in token
    assert idp.is_access_token_valid(token["access_token"])
    assert idp.refresh_count == 1


async def test_refresh_follows_rotation(nursery: trio.Nursery, endpoint: HttpTokenEndpoint) -> None:
    """Each refresh hands back a rotated refresh token that works for the next one."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    refresh_token = idp.mint()["refresh_token"]
    seen = {refresh_token}
    for _ in range(3):
        token = await endpoint.refresh(provider, refresh_token)
        refresh_token = token["refresh_token"]
        seen.add(refresh_token)
    assert len(seen) == 4
    assert idp.refresh_count == 3
    assert idp.reuse_count == 0


async def test_reusing_a_rotated_token_revokes_the_family(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint
) -> None:
    """Presenting a rotated-away refresh token requires re-auth and logs the family out."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    first = idp.mint()["refresh_token"]
    rotated = await endpoint.refresh(provider, first)

    with pytest.raises(ReauthRequired) as info:
        await endpoint.refresh(provider, first)
    assert "HTTP 400, error invalid_grant" in str(info.value)
    assert idp.reuse_count == 1
    assert idp.families_revoked == 1
    # The legitimate holder of the newest token is logged out as well.
    assert not idp.is_access_token_valid(rotated["access_token"])
    with pytest.raises(ReauthRequired):
        await endpoint.refresh(provider, rotated["refresh_token"])
    _assert_secret_free(_everything_said(info.value), first, rotated["refresh_token"])


async def test_server_error_is_transient_and_burns_nothing(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint
) -> None:
    """A 500 is a RefreshFailed naming the status, and the same refresh token works afterwards."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    refresh_token = idp.mint()["refresh_token"]
    idp.fail_next("server_error")
    with pytest.raises(RefreshFailed) as info:
        await endpoint.refresh(provider, refresh_token)
    assert not isinstance(info.value, ReauthRequired)
    assert "HTTP 500" in str(info.value)
    token = await endpoint.refresh(provider, refresh_token)
    assert token["access_token"].startswith("devat-")


async def test_scripted_invalid_grant_requires_reauth(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint
) -> None:
    """An invalid_grant answer over HTTP surfaces as ReauthRequired."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    idp.fail_next("invalid_grant")
    with pytest.raises(ReauthRequired, match="invalid_grant"):
        await endpoint.refresh(provider, idp.mint()["refresh_token"])


async def test_malformed_answer_is_transient(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint
) -> None:
    """A 200 whose body is not JSON is a RefreshFailed."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    idp.fail_next("malformed")
    with pytest.raises(RefreshFailed, match="no JSON object"):
        await endpoint.refresh(provider, idp.mint()["refresh_token"])


async def test_answer_without_refresh_token_omits_it(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint
) -> None:
    """A non-rotating answer yields a token without refresh_token (the caller keeps the old one)."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    refresh_token = idp.mint()["refresh_token"]
    idp.fail_next("no_refresh_token")
    token = await endpoint.refresh(provider, refresh_token)
    assert "refresh_token" not in token
    again = await endpoint.refresh(provider, refresh_token)
    assert again["refresh_token"] != refresh_token


async def test_endpoint_slower_than_the_timeout_fails(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """An endpoint that takes 30 s against a 1 s timeout is a RefreshFailed naming the timeout."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    ep = HttpTokenEndpoint(timeout=1)
    try:
        idp.fail_next("slow", delay=30)
        started = trio.current_time()
        with pytest.raises(RefreshFailed) as info:
            await ep.refresh(provider, idp.mint()["refresh_token"])
        assert str(info.value) == (
            "the refresh to 127.0.0.1 failed: no answer in time (ReadTimeout); "
            "the server is slow or unreachable; try again later"
        )
        assert trio.current_time() - started == pytest.approx(1, abs=0.1)
    finally:
        await ep.aclose()


async def test_endpoint_slower_than_usual_but_within_the_timeout_succeeds(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A 5 s answer under the default 10 s timeout is still a success."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    ep = HttpTokenEndpoint()
    try:
        idp.fail_next("slow", delay=5)
        token = await ep.refresh(provider, idp.mint()["refresh_token"])
        assert token["access_token"].startswith("devat-")
    finally:
        await ep.aclose()


async def test_unreachable_endpoint_is_transient(endpoint: HttpTokenEndpoint) -> None:
    """A refused connection is a RefreshFailed naming the host, the cause in words and what next."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = Provider(token_url=f"http://127.0.0.1:{port}/token", client_id="x")
    with pytest.raises(RefreshFailed) as info:
        await endpoint.refresh(provider, "rt")
    assert str(info.value) == (
        "the refresh to 127.0.0.1 failed: connection refused (ConnectError); "
        "check the host and port in the config, then try again"
    )


async def test_wrong_path_is_transient(nursery: trio.Nursery, endpoint: HttpTokenEndpoint) -> None:
    """A 404 from a mistyped token URL is a RefreshFailed naming the status."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    wrong = Provider(token_url=provider.token_url.replace("/token", "/oauth"), client_id="x")
    with pytest.raises(RefreshFailed, match="HTTP 404"):
        await endpoint.refresh(wrong, "rt")


async def test_client_secret_file_is_read_and_posted(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint, tmp_path: Path
) -> None:
    """The secret file's content (trailing newline stripped) authenticates the client."""
    idp = devidp.DevIdP(client_secret=CANARY_SECRET)
    provider = await _start(nursery, idp)
    secret_file = tmp_path / "client.secret"
    secret_file.write_text(CANARY_SECRET + "\n")
    with_secret = Provider(
        token_url=provider.token_url, client_id=idp.client_id, client_secret_file=str(secret_file)
    )
    token = await endpoint.refresh(with_secret, idp.mint()["refresh_token"])
    assert token["access_token"].startswith("devat-")
    assert idp.requests[-1]["client_secret"] == devidp.fingerprint(CANARY_SECRET)


async def test_wrong_client_secret_requires_reauth_without_leaking_it(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint, tmp_path: Path
) -> None:
    """A rejected client secret is a ReauthRequired that quotes neither secret nor token."""
    idp = devidp.DevIdP(client_secret="the-right-one")
    provider = await _start(nursery, idp)
    secret_file = tmp_path / "client.secret"
    secret_file.write_text(CANARY_SECRET)
    with_secret = Provider(
        token_url=provider.token_url, client_id=idp.client_id, client_secret_file=str(secret_file)
    )
    refresh_token = idp.mint()["refresh_token"]
    with pytest.raises(ReauthRequired) as info:
        await endpoint.refresh(with_secret, refresh_token)
    assert "HTTP 401" in str(info.value)
    _assert_secret_free(_everything_said(info.value), CANARY_SECRET, refresh_token)


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot read client_secret_file"), (b"", "is empty"), (b"\xff\xfe", "not UTF-8")],
)
async def test_unusable_client_secret_file_fails_before_sending(
    nursery: trio.Nursery,
    endpoint: HttpTokenEndpoint,
    tmp_path: Path,
    content: bytes | None,
    expected: str,
) -> None:
    """A missing, empty or binary secret file fails naming the file, and nothing is sent."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    secret_file = tmp_path / "client.secret"
    if content is not None:
        secret_file.write_bytes(content)
    with_secret = Provider(
        token_url=provider.token_url, client_id=idp.client_id, client_secret_file=str(secret_file)
    )
    with pytest.raises(RefreshFailed) as info:
        await endpoint.refresh(with_secret, "rt")
    assert expected in str(info.value)
    assert str(secret_file) in str(info.value)
    assert idp.requests == []


async def test_no_failure_says_a_secret(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint, tmp_path: Path
) -> None:
    """Across every failure kind, neither exceptions nor the endpoint's repr carry a secret."""
    idp = devidp.DevIdP(client_secret=CANARY_SECRET)
    provider = await _start(nursery, idp)
    secret_file = tmp_path / "client.secret"
    secret_file.write_text(CANARY_SECRET)
    with_secret = Provider(
        token_url=provider.token_url, client_id=idp.client_id, client_secret_file=str(secret_file)
    )
    minted = idp.mint()
    secrets = [CANARY_SECRET, minted["refresh_token"], minted["access_token"]]
    failures: list[UpstreamError] = []
    for kind in ("server_error", "invalid_grant", "malformed"):
        idp.fail_next(kind)
        try:
            await endpoint.refresh(with_secret, minted["refresh_token"])
        except UpstreamError as exc:
            failures.append(exc)
    token: dict[str, Any] = await endpoint.refresh(with_secret, minted["refresh_token"])
    secrets += [token["refresh_token"], token["access_token"]]
    try:
        await endpoint.refresh(with_secret, minted["refresh_token"])  # reuse
    except UpstreamError as exc:
        failures.append(exc)
    assert len(failures) == 4
    for failure in failures:
        _assert_secret_free(_everything_said(failure), *secrets)
    _assert_secret_free(repr(endpoint), *secrets)
    _assert_secret_free(repr(idp) + repr(idp.requests) + "\n".join(idp.events), *secrets)


async def test_concurrent_refreshes_share_the_client(
    nursery: trio.Nursery, endpoint: HttpTokenEndpoint
) -> None:
    """Refreshes of several families running at once all succeed."""
    idp = devidp.DevIdP()
    provider = await _start(nursery, idp)
    tokens = [idp.mint()["refresh_token"] for _ in range(5)]
    results: list[dict[str, Any]] = []

    async def one(refresh_token: str) -> None:
        results.append(await endpoint.refresh(provider, refresh_token))

    async with trio.open_nursery() as inner:
        for refresh_token in tokens:
            inner.start_soon(one, refresh_token)
    assert len(results) == 5
    assert idp.refresh_count == 5


async def test_refresh_after_aclose_fails(endpoint: HttpTokenEndpoint) -> None:
    """A closed endpoint refuses to refresh with a RefreshFailed, and closing twice is fine."""
    await endpoint.aclose()
    await endpoint.aclose()
    provider = Provider(token_url="http://127.0.0.1:9/token", client_id="x")
    with pytest.raises(RefreshFailed, match="closed"):
        await endpoint.refresh(provider, "rt")
