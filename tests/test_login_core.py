"""The login codec: PKCE, state, URLs, redirects, pasted codes and the device-flow machine (pure)."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgspec
import pytest

from credproxy.core import login
from credproxy.core.config import Provider
from credproxy.core.login import (
    DeviceAuthorization,
    DeviceFlow,
    Done,
    Failed,
    LoginFailed,
    Pkce,
    Poll,
)

NOW = 1_800_000_000.0
CANARY = "CANARY-secret-3f9d1e"
STATE = "the-state-value"


def _provider(**extra: Any) -> Provider:
    table = {"token_url": "https://idp.example/token", "client_id": "cid", **extra}
    return msgspec.convert(table, Provider)


def _body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _auth(interval: float = 5, expires_in: float = 600) -> DeviceAuthorization:
    return DeviceAuthorization(
        device_code="devdc-" + CANARY,
        user_code="BCDF-GHJK",
        verification_uri="https://idp.example/device",
        verification_uri_complete=None,
        interval=interval,
        expires_at=NOW + expires_in,
    )


# -- PKCE and state ----------------------------------------------------------------


def test_code_challenge_matches_the_rfc_7636_example() -> None:
    """The S256 challenge of RFC 7636 appendix B's verifier is the one the RFC gives."""
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert login.code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_pkce_from_32_bytes_is_a_43_character_verifier_with_its_challenge() -> None:
    """32 bytes of entropy give a 43-character unreserved verifier and its S256 challenge."""
    pkce = Pkce.from_entropy(bytes(range(32)))
    assert re.fullmatch(r"[A-Za-z0-9._~-]{43}", pkce.verifier)
    assert pkce.challenge == login.code_challenge(pkce.verifier)
    assert Pkce.from_entropy(bytes(range(1, 33))).verifier != pkce.verifier


def test_pkce_repr_hides_the_verifier() -> None:
    """repr() of a PKCE pair shows the challenge, never the verifier."""
    pkce = Pkce.from_entropy(b"\x07" * 32)
    assert pkce.verifier not in repr(pkce)
    assert pkce.challenge in repr(pkce)


def test_short_entropy_is_refused() -> None:
    """PKCE and state refuse entropy shorter than 32 and 16 bytes."""
    with pytest.raises(ValueError, match="32 bytes"):
        Pkce.from_entropy(b"x" * 31)
    with pytest.raises(ValueError, match="16 bytes"):
        login.new_state(b"x" * 15)


def test_state_is_url_safe() -> None:
    """A state from 16 bytes is 22 URL-safe characters."""
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", login.new_state(b"\xff" * 16))


# -- choosing a flow ---------------------------------------------------------------


def test_choose_flow_prefers_the_request_then_the_config_then_device() -> None:
    """--flow wins, then the provider's flow, then device if possible, else loopback."""
    both = _provider(
        authorization_url="https://idp.example/auth",
        device_authorization_url="https://idp.example/device",
    )
    assert login.choose_flow("p", both, "paste") == "paste"
    assert login.choose_flow("p", msgspec.structs.replace(both, flow="loopback"), None) == (
        "loopback"
    )
    assert login.choose_flow("p", both, None) == "device"
    code_only = _provider(authorization_url="https://idp.example/auth")
    assert login.choose_flow("p", code_only, None) == "loopback"


def test_choose_flow_names_the_missing_endpoint() -> None:
    """A flow whose endpoint is not configured fails with a message naming the key."""
    for flow in (None, "device", "loopback", "paste"):  # (no advice that points back)
        with pytest.raises(LoginFailed, match="neither authorization_url nor device"):
            login.choose_flow("p", _provider(), flow)
    with pytest.raises(LoginFailed, match="no device_authorization_url"):
        login.choose_flow("p", _provider(authorization_url="https://i/a"), "device")
    with pytest.raises(LoginFailed, match="no authorization_url"):
        login.choose_flow("p", _provider(device_authorization_url="https://i/d"), "loopback")


# -- authorization code + PKCE -------------------------------------------------------


def test_authorization_url_carries_every_parameter_and_keeps_its_own_query() -> None:
    """The URL has response_type, client_id, redirect_uri, scope, state and the S256 challenge."""
    provider = _provider(authorization_url="https://idp.example/auth?tenant=x", scopes=["a", "b"])
    pkce = Pkce.from_entropy(b"\x01" * 32)
    url = login.authorization_url(provider, login.loopback_redirect_uri(8123), STATE, pkce)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "idp.example", "/auth")
    assert parse_qs(parts.query) == {
        "tenant": ["x"],
        "response_type": ["code"],
        "client_id": ["cid"],
        "redirect_uri": ["http://127.0.0.1:8123/callback"],
        "scope": ["a b"],
        "state": [STATE],
        "code_challenge": [pkce.challenge],
        "code_challenge_method": ["S256"],
    }
    assert pkce.verifier not in url


def test_authorization_url_without_scopes_sends_no_scope() -> None:
    """A provider without scopes sends no scope parameter."""
    provider = _provider(authorization_url="https://idp.example/auth")
    url = login.authorization_url(
        provider, "http://127.0.0.1:1/callback", STATE, Pkce.from_entropy(b"\x02" * 32)
    )
    assert "scope" not in parse_qs(urlsplit(url).query)


def test_code_form_has_the_verifier_and_redirect_uri() -> None:
    """The code exchange sends grant_type, code, redirect_uri, client_id and code_verifier."""
    pkce = Pkce.from_entropy(b"\x03" * 32)
    form = login.code_form(_provider(), "C0DE", pkce, "http://127.0.0.1:9/callback")
    assert form == {
        "grant_type": "authorization_code",
        "code": "C0DE",
        "redirect_uri": "http://127.0.0.1:9/callback",
        "client_id": "cid",
        "code_verifier": pkce.verifier,
    }


def _answer(target: str, state: str = STATE, path: str = login.CALLBACK_PATH) -> Any:
    """parse_callback_target's answer, which must be this login's (not a Stray)."""
    result = login.parse_callback_target(target, state, path)
    assert isinstance(result, login.CallbackResult), result
    return result


def test_callback_with_the_right_state_gives_the_code() -> None:
    """GET /callback?code=..&state=<ours> yields the code; repr does not show it."""
    result = _answer(f"/callback?code={CANARY}&state={STATE}")
    assert (result.code, result.error) == (CANARY, None)
    assert CANARY not in repr(result)


@pytest.mark.parametrize(
    "query",
    [
        "code=c&state=other",
        "code=c",
        f"code=c&state={STATE}x",
        "code=c&state=",
        "",
        "error=access_denied&state=other",
        "error=access_denied",
    ],
)
def test_callback_with_a_wrong_or_missing_state_is_a_stray(query: str) -> None:
    """A callback whose state is not ours is no answer to the login: 400, keep waiting.

    Any web page can make the browser request the callback URL, so such a
    request must not end (or deny) the login, whatever code or error it carries.
    """
    result = login.parse_callback_target(f"/callback?{query}", STATE)
    assert isinstance(result, login.Stray)
    assert result.status == 400
    assert "does not match this login" in result.text and "still waiting" in result.text


def test_other_paths_are_strays_with_404() -> None:
    """/favicon.ico and / are not the callback: 404, keep waiting."""
    for target in ("/favicon.ico", f"/?code=c&state={STATE}", "/callback/x"):
        result = login.parse_callback_target(target, STATE)
        assert isinstance(result, login.Stray) and result.status == 404, target


def test_callback_errors_name_the_oauth_code_only() -> None:
    """An error redirect with our state ends the login naming a well-shaped code only."""
    result = _answer(f"/callback?error=access_denied&error_description={CANARY}&state={STATE}")
    assert result.code is None
    assert "access_denied" in (result.error or "") and CANARY not in (result.error or "")
    assert "declined" in (result.error or "")
    odd = _answer(f"/callback?error={CANARY}&state={STATE}")
    assert odd.code is None and CANARY not in (odd.error or "")


def test_callback_without_a_code_is_refused() -> None:
    """A callback with our state but no code fails clearly."""
    result = _answer(f"/callback?state={STATE}")
    assert result.error == "the redirect carried no authorization code"


@pytest.mark.parametrize(
    "pasted",
    [
        f"http://127.0.0.1:5/callback?code=THECODE&state={STATE}\n",
        f"  ?code=THECODE&state={STATE}  ",
        f"code=THECODE&state={STATE}",
        f"THECODE#{STATE}",
        "THECODE",
    ],
)
def test_pasted_url_query_code_hash_state_or_bare_code_gives_the_code(pasted: str) -> None:
    """Every accepted paste form yields the code."""
    assert login.parse_pasted(pasted, STATE) == login.CallbackResult(code="THECODE")


@pytest.mark.parametrize(
    ("pasted", "why"),
    [
        ("http://127.0.0.1:5/callback?code=THECODE&state=forged", "wrong state"),
        ("THECODE#forged", "wrong state"),
        ("", "nothing was pasted"),
        ("two words", "not an authorization code"),
    ],
)
def test_bad_pastes_are_refused(pasted: str, why: str) -> None:
    """A pasted URL with the wrong state, an empty line or text with spaces is refused."""
    result = login.parse_pasted(pasted, STATE)
    assert result.code is None and why in (result.error or "")


# -- the device authorization response ----------------------------------------------------


def test_device_authorization_response_is_parsed() -> None:
    """All fields are read; expires_in becomes an absolute time; repr hides the device code."""
    body = _body(
        {
            "device_code": CANARY,
            "user_code": "BCDF-GHJK",
            "verification_uri": "https://idp.example/device",
            "verification_uri_complete": "https://idp.example/device?user_code=BCDF-GHJK",
            "expires_in": 900,
            "interval": 2,
        }
    )
    auth = login.parse_device_authorization(200, body, NOW)
    assert auth.device_code == CANARY
    assert (auth.user_code, auth.interval, auth.expires_at) == ("BCDF-GHJK", 2, NOW + 900)
    assert auth.verification_uri_complete == "https://idp.example/device?user_code=BCDF-GHJK"
    assert CANARY not in repr(auth)


@pytest.mark.parametrize("interval", [0, 0.01, "0"])
def test_a_device_interval_of_zero_is_polled_at_one_second(interval: object) -> None:
    """An identity provider that says to poll every 0 s is polled once a second, not in a tight loop."""
    body = _body(
        {
            "device_code": "d",
            "user_code": "U",
            "verification_uri": "https://idp.example/device",
            "expires_in": 900,
            "interval": interval,
        }
    )
    auth = login.parse_device_authorization(200, body, NOW)
    assert auth.interval == 1
    flow = login.DeviceFlow(auth)
    assert flow.start(NOW) == login.Poll(1)


def test_device_authorization_defaults_and_google_spelling() -> None:
    """No interval means 5 s (RFC 8628 3.2); Google's verification_url is accepted."""
    body = _body(
        {
            "device_code": "d",
            "user_code": "U",
            "verification_url": "https://www.google.com/device",
            "expires_in": "1800",
        }
    )
    auth = login.parse_device_authorization(200, body, NOW)
    assert (auth.interval, auth.verification_uri, auth.expires_at) == (
        5,
        "https://www.google.com/device",
        NOW + 1800,
    )


@pytest.mark.parametrize(
    ("status", "obj", "match"),
    [
        (
            400,
            {"error": "invalid_client", "error_description": CANARY},
            "HTTP 400, error invalid_client",
        ),
        (500, None, "HTTP 500"),
        (
            200,
            {"user_code": "U", "verification_uri": "https://i/d", "expires_in": 5},
            "device_code",
        ),
        (
            200,
            {
                "device_code": CANARY,
                "user_code": "U",
                "verification_uri": "javascript:x",
                "expires_in": 5,
            },
            "verification_uri",
        ),
        (
            200,
            {"device_code": CANARY, "user_code": "U", "verification_uri": "https://i/d"},
            "expires_in",
        ),
        (
            200,
            {
                "device_code": CANARY,
                "user_code": "U\nX",
                "verification_uri": "https://i/d",
                "expires_in": 5,
            },
            "user_code",
        ),
    ],
)
def test_unusable_device_authorization_responses_are_refused(
    status: int, obj: Any, match: str
) -> None:
    """Errors and incomplete responses fail with a message naming status or field, not the body."""
    body = b"<html>" + CANARY.encode() if obj is None else _body(obj)
    with pytest.raises(LoginFailed, match=match) as info:
        login.parse_device_authorization(status, body, NOW)
    assert CANARY not in str(info.value)


def test_device_forms() -> None:
    """The device authorization request sends client_id and scope; a poll sends the grant type."""
    provider = _provider(scopes=["read", "write"])
    assert login.device_authorization_form(provider) == {"client_id": "cid", "scope": "read write"}
    assert login.device_token_form(provider, "dc") == {
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
        "device_code": "dc",
        "client_id": "cid",
    }


# -- the device flow machine -------------------------------------------------------------


def test_pending_polls_again_at_the_interval() -> None:
    """authorization_pending keeps polling at the announced interval."""
    flow = DeviceFlow(_auth(interval=3))
    assert flow.start(NOW) == Poll(3)
    assert flow.on_response(400, _body({"error": "authorization_pending"}), NOW + 3) == Poll(3)


def test_slow_down_adds_five_seconds_each_time() -> None:
    """Each slow_down adds 5 s to the interval for every later poll (RFC 8628 3.5)."""
    flow = DeviceFlow(_auth(interval=1))
    assert flow.on_response(400, _body({"error": "slow_down"}), NOW) == Poll(6)
    assert flow.on_response(400, _body({"error": "authorization_pending"}), NOW + 6) == Poll(6)
    assert flow.on_response(400, _body({"error": "slow_down"}), NOW + 12) == Poll(11)


def test_github_style_200_with_an_error_is_judged_by_the_error() -> None:
    """An IdP that answers pending with HTTP 200 (GitHub) is still told to keep polling."""
    flow = DeviceFlow(_auth())
    assert flow.on_response(200, _body({"error": "authorization_pending"}), NOW) == Poll(5)


def test_a_token_finishes_the_flow_with_an_absolute_expiry() -> None:
    """An access token ends the flow; expires_in becomes expiry counted from the poll."""
    flow = DeviceFlow(_auth())
    body = _body({"access_token": "at", "refresh_token": "rt", "expires_in": 3600})
    decision = flow.on_response(200, body, NOW + 10)
    assert isinstance(decision, Done)
    assert decision.token == {
        "access_token": "at",
        "refresh_token": "rt",
        "expiry": NOW + 10 + 3600,
        "token_type": "Bearer",
    }
    assert "rt" not in repr(decision).replace("repr", "")
    with pytest.raises(RuntimeError):
        flow.on_response(200, body, NOW + 11)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("access_denied", "denied"),
        ("expired_token", "expired"),
        ("invalid_client", "HTTP 400, error invalid_client"),
        (CANARY, "unrecognised code"),
    ],
)
def test_final_errors_fail_with_one_line(error: str, reason: str) -> None:
    """access_denied, expired_token and other errors end the flow with a reason, never a body."""
    flow = DeviceFlow(_auth())
    decision = flow.on_response(400, _body({"error": error, "error_description": CANARY}), NOW)
    assert isinstance(decision, Failed)
    assert reason in decision.reason and CANARY not in decision.reason
    assert "\n" not in decision.reason


def test_a_poll_past_the_expiry_is_not_made() -> None:
    """When the next poll would come after expires_in, the flow fails as expired instead."""
    flow = DeviceFlow(_auth(interval=5, expires_in=12))
    assert flow.on_response(400, _body({"error": "authorization_pending"}), NOW + 5) == Poll(5)
    decision = flow.on_response(400, _body({"error": "authorization_pending"}), NOW + 10)
    assert isinstance(decision, Failed) and "expired" in decision.reason


def test_transport_errors_are_retried_a_few_times() -> None:
    """A network failure is retried at the interval; three in a row end the flow."""
    flow = DeviceFlow(_auth())
    assert flow.on_transport_error("no route", NOW) == Poll(5)
    assert flow.on_transport_error("no route", NOW + 5) == Poll(5)
    decision = flow.on_transport_error("no route", NOW + 10)
    assert isinstance(decision, Failed) and decision.reason == "no route (3 times in a row)"


def test_a_busy_token_endpoint_is_polled_again_like_a_network_error() -> None:
    """A 503 or 429 without an OAuth error while polling is polled again at the interval; three in a row end the flow, and a real answer in between resets the count."""
    flow = DeviceFlow(_auth())
    assert flow.on_response(503, b"<html>busy</html>", NOW) == Poll(5)
    assert flow.on_response(429, b"", NOW + 5) == Poll(5)
    flow.on_response(400, _body({"error": "authorization_pending"}), NOW + 10)
    assert flow.on_response(502, b"", NOW + 15) == Poll(5)
    assert flow.on_response(503, b"", NOW + 20) == Poll(5)
    decision = flow.on_response(503, b"", NOW + 25)
    assert isinstance(decision, Failed)
    assert decision.reason == "the token endpoint answered HTTP 503 (3 times in a row)"


def test_a_success_resets_the_transport_error_count() -> None:
    """An answer between network failures resets their count."""
    flow = DeviceFlow(_auth())
    flow.on_transport_error("x", NOW)
    flow.on_transport_error("x", NOW)
    flow.on_response(400, _body({"error": "authorization_pending"}), NOW)
    assert flow.on_transport_error("x", NOW) == Poll(5)


# -- token responses of the new grants ----------------------------------------------------


def test_token_response_is_parsed_like_a_refresh() -> None:
    """A code or device grant answer keeps its fields and turns expires_in into expiry."""
    body = _body({"access_token": "at", "expires_in": 60, "scope": "s", "extra": 1})
    assert login.parse_token_response(200, body, NOW) == {
        "access_token": "at",
        "expiry": NOW + 60,
        "token_type": "Bearer",
        "scope": "s",
        "extra": 1,
    }


@pytest.mark.parametrize(
    ("status", "body", "match"),
    [
        (400, _body({"error": "invalid_grant", "error_description": CANARY}), "PKCE check failed"),
        (401, _body({"error": "invalid_client"}), "client_secret_file"),
        (200, b"<html>" + CANARY.encode(), "no JSON object"),
        (200, _body({"access_token": "at", "expires_in": "soon"}), "invalid expires_in"),
        (502, CANARY.encode(), "HTTP 502"),
    ],
)
def test_token_errors_name_status_and_code_only(status: int, body: bytes, match: str) -> None:
    """A refused or unusable token answer fails with status and error code, never the body."""
    with pytest.raises(LoginFailed, match=match) as info:
        login.parse_token_response(status, body, NOW)
    assert CANARY not in str(info.value)


# --- the registered redirect URI ---------------------------------------------------------


def _registered(**kw: Any) -> Provider:
    return Provider(token_url="https://idp.example/token", client_id="c", **kw)


def test_without_a_registered_redirect_any_loopback_port_will_do() -> None:
    """No redirect_uri: listen on any free port (or redirect_port) at /callback, and send 127.0.0.1."""
    assert login.redirect_for(_registered()) == login.Redirect(None, 0, "/callback")
    assert login.redirect_for(_registered(redirect_port=8085)).port == 8085


@pytest.mark.parametrize(
    ("uri", "port", "path"),
    [
        ("http://localhost:1455/auth/callback", 1455, "/auth/callback"),
        ("http://127.0.0.1:8080/cb", 8080, "/cb"),
        ("https://platform.example/oauth/code/callback", -1, "/oauth/code/callback"),
    ],
)
def test_a_registered_redirect_is_sent_as_is(uri: str, port: int, path: str) -> None:
    """A registered loopback redirect is listened on at its own port and path and sent as it is; any other leaves only paste (port -1)."""
    redirect = login.redirect_for(_registered(redirect_uri=uri))
    assert (redirect.port, redirect.path) == (port, path)
    assert redirect.uri_for(port) == uri


def test_a_loopback_redirect_without_a_port_takes_any_free_one_and_keeps_host_and_path() -> None:
    """http://localhost/callback (Claude Code's shape): any free port, named in the URI sent."""
    redirect = login.redirect_for(_registered(redirect_uri="http://localhost/callback"))
    assert (redirect.port, redirect.host, redirect.path) == (0, "localhost", "/callback")
    assert redirect.uri_for(54545) == "http://localhost:54545/callback"


def test_fallback_ports_follow_the_redirect() -> None:
    """Codex's 1455 then 1457: the fallbacks are kept for the listener, the URI names the port got."""
    redirect = login.redirect_for(
        _registered(redirect_uri="http://localhost:1455/auth/callback", fallback_ports=[1457])
    )
    assert (redirect.port, redirect.fallbacks) == (1455, (1457,))
    assert redirect.uri_for(1457) == "http://localhost:1457/auth/callback"


def test_the_callback_path_is_the_registered_one() -> None:
    """The listener answers the registered path and 404s the default one."""
    ok = _answer("/auth/callback?code=c&state=s", "s", "/auth/callback")
    assert ok.code == "c"
    other = login.parse_callback_target("/callback?code=c&state=s", "s", "/auth/callback")
    assert isinstance(other, login.Stray) and other.status == 404
