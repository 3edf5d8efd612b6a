"""The RFC 6749 refresh-grant codec: request form, response parsing, merging."""

from __future__ import annotations

import json
import traceback

import pytest

from credproxy.core import oauth
from credproxy.core.config import Provider
from credproxy.errors import ReauthRequired, RefreshFailed, UpstreamError

NOW = 1_700_000_000.0
PROVIDER = Provider(token_url="https://idp.example/oauth/token", client_id="abc")

# Canary values: if one of these shows up in an error message, a secret leaked.
CANARY_RT = "rt-CANARY-7f3a9c1e5b"
CANARY_AT = "at-CANARY-c0ffee1234"
CANARY_SECRET = "secret-CANARY-99aa00"


def _body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _everything_said(exc: BaseException) -> str:
    """Message, repr and formatted traceback of *exc*: all a log line could show."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


# -- the request form -------------------------------------------------------------


def test_form_is_a_refresh_token_grant() -> None:
    """Without secret or scopes the form carries grant type, refresh token and client id."""
    assert oauth.refresh_form(PROVIDER, "rt1", None) == {
        "grant_type": "refresh_token",
        "refresh_token": "rt1",
        "client_id": "abc",
    }


def test_form_carries_client_secret_and_scopes_when_configured() -> None:
    """A client secret is posted (client_secret_post) and scopes are space-joined."""
    provider = Provider(token_url=PROVIDER.token_url, client_id="abc", scopes=["read", "write"])
    form = oauth.refresh_form(provider, "rt1", "s3cret")
    assert form["client_secret"] == "s3cret"
    assert form["scope"] == "read write"


def test_codex_refresh_names_its_originator_and_other_refreshes_add_no_header() -> None:
    """A codex-preset provider's refresh adds ``originator: codex_cli_rs``; one without a preset, or of another preset, adds nothing."""
    codex = Provider(token_url=PROVIDER.token_url, client_id="abc", preset="codex")
    assert oauth.refresh_headers(codex) == {"originator": "codex_cli_rs"}
    assert oauth.refresh_headers(PROVIDER) == {}
    for preset in ("claude", "gemini", "qwen", "github"):
        provider = Provider(token_url=PROVIDER.token_url, client_id="abc", preset=preset)
        assert oauth.refresh_headers(provider) == {}, preset


# -- successful responses -------------------------------------------------------------


def test_success_turns_expires_in_into_an_absolute_expiry() -> None:
    """expires_in is counted from the given now and then dropped."""
    token = oauth.parse_refresh_response(
        200, _body({"access_token": "at2", "token_type": "Bearer", "expires_in": 3600}), NOW
    )
    assert token == {"access_token": "at2", "token_type": "Bearer", "expiry": NOW + 3600}


def test_success_accepts_expires_in_as_a_numeric_string() -> None:
    """Some IdPs send expires_in as "3600"; that still gives an expiry."""
    token = oauth.parse_refresh_response(
        200, _body({"access_token": "at2", "expires_in": "3600"}), NOW
    )
    assert token["expiry"] == NOW + 3600


def test_success_keeps_an_explicit_expiry() -> None:
    """An absolute expiry sent instead of expires_in is kept as is."""
    token = oauth.parse_refresh_response(200, _body({"access_token": "a", "expiry": 1234}), NOW)
    assert token["expiry"] == 1234


def test_success_without_expiry_information_has_no_expiry() -> None:
    """With neither expires_in nor expiry, the token carries no expiry."""
    token = oauth.parse_refresh_response(200, _body({"access_token": "a"}), NOW)
    assert "expiry" not in token


def test_success_defaults_token_type_to_bearer() -> None:
    """A response without token_type yields a Bearer token."""
    token = oauth.parse_refresh_response(200, _body({"access_token": "a"}), NOW)
    assert token["token_type"] == "Bearer"


def test_success_passes_unknown_fields_through() -> None:
    """Scope, id_token and vendor fields survive parsing; the new refresh token too."""
    answer = {
        "access_token": "a",
        "refresh_token": "rt2",
        "scope": "read",
        "id_token": "eyJ.x.y",
        "resource_url": "https://api.example",
    }
    token = oauth.parse_refresh_response(200, _body(answer), NOW)
    assert {k: token[k] for k in answer} == answer


@pytest.mark.parametrize("empty", [None, ""])
def test_success_drops_an_empty_refresh_token(empty: str | None) -> None:
    """A null or empty refresh_token is removed so the stored one is kept on merge."""
    token = oauth.parse_refresh_response(
        200, _body({"access_token": "a", "refresh_token": empty}), NOW
    )
    assert "refresh_token" not in token


@pytest.mark.parametrize("expires_in", [-1, True, "soon", "1e3", [], float("nan")])
def test_invalid_expires_in_is_a_transient_failure(expires_in: object) -> None:
    """A negative, boolean or non-numeric expires_in is not guessed at."""
    body = json.dumps({"access_token": "a", "expires_in": expires_in}).encode()
    with pytest.raises(RefreshFailed, match="expires_in"):
        oauth.parse_refresh_response(200, body, NOW)


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", ["invalid_grant", "invalid_client", "unauthorized_client"])
def test_rejected_grant_requires_reauth(code: str) -> None:
    """400 with a grant/client rejection code means log in again, with status and code named."""
    with pytest.raises(ReauthRequired) as info:
        oauth.parse_refresh_response(400, _body({"error": code}), NOW)
    assert "HTTP 400" in str(info.value)
    assert code in str(info.value)
    assert info.value.code == "REAUTH_REQUIRED"


@pytest.mark.parametrize("body", [b"", b"Unauthorized", _body({"error": "invalid_token"})])
def test_any_401_requires_reauth(body: bytes) -> None:
    """HTTP 401 means the client or token was rejected, whatever the body says."""
    with pytest.raises(ReauthRequired, match="HTTP 401"):
        oauth.parse_refresh_response(401, body, NOW)


def test_invalid_grant_inside_a_200_requires_reauth() -> None:
    """Non-compliant IdPs that answer 200 with an invalid_grant error are still understood."""
    with pytest.raises(ReauthRequired, match="invalid_grant"):
        oauth.parse_refresh_response(200, _body({"error": "invalid_grant"}), NOW)


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (500, _body({"error": "server_error"}), "HTTP 500, error server_error"),
        (503, b"<html>down</html>", "HTTP 503"),
        (429, b"", "HTTP 429"),
        (400, _body({"error": "invalid_scope"}), "HTTP 400, error invalid_scope"),
        (400, _body({"error": "invalid_request"}), "HTTP 400, error invalid_request"),
        (302, b"", "HTTP 302"),
        (200, b"<html>captive portal</html>", "no JSON object"),
        (200, b"[1, 2]", "no JSON object"),
        (200, b"\xff\xfe", "no JSON object"),
        (200, _body({"token_type": "Bearer"}), "no access_token"),
        (200, _body({"access_token": 42}), "unusable access_token"),
        (200, _body({"access_token": ""}), "unusable access_token"),
        (200, _body({"access_token": "a", "refresh_token": 7}), "invalid refresh_token"),
    ],
)
def test_everything_else_is_a_transient_failure(status: int, body: bytes, expected: str) -> None:
    """5xx, 429, other 4xx and unusable 200 answers are retried later, with status named."""
    with pytest.raises(RefreshFailed) as info:
        oauth.parse_refresh_response(status, body, NOW)
    assert not isinstance(info.value, ReauthRequired)
    assert expected in str(info.value)
    assert info.value.code == "REFRESH_FAILED"


def test_error_messages_never_carry_secrets_from_the_body() -> None:
    """error_description, echoed tokens and the raw body never reach an error message."""
    echoes = [
        (400, {"error": "invalid_grant", "error_description": f"bad token {CANARY_RT}"}),
        (400, {"error": CANARY_RT}),
        (400, {"error": f"invalid_grant {CANARY_SECRET}"}),
        (401, {"error": "invalid_client", "client_secret": CANARY_SECRET}),
        (500, {"error": "server_error", "refresh_token": CANARY_RT, "access_token": CANARY_AT}),
        (200, {"refresh_token": CANARY_RT, "note": CANARY_SECRET}),
        (200, {"access_token": CANARY_AT, "expires_in": CANARY_SECRET}),
    ]
    for status, obj in echoes:
        with pytest.raises(UpstreamError) as info:
            oauth.parse_refresh_response(status, _body(obj), NOW)
        said = _everything_said(info.value)
        for canary in (CANARY_RT, CANARY_AT, CANARY_SECRET, "bad token"):
            assert canary not in said, (status, obj)


def test_unrecognisable_error_codes_are_replaced_not_quoted() -> None:
    """An error value that does not look like a registered code is named as unrecognised."""
    with pytest.raises(RefreshFailed) as info:
        oauth.parse_refresh_response(400, _body({"error": "x" * 65}), NOW)
    assert "unrecognised" in str(info.value)
    assert "x" * 65 not in str(info.value)


def test_messages_are_single_lines_even_for_hostile_bodies() -> None:
    """A body full of control characters cannot split or forge a log line."""
    with pytest.raises(RefreshFailed) as info:
        oauth.parse_refresh_response(500, _body({"error": "a\nFAKE LOG LINE"}), NOW)
    assert "\n" not in str(info.value)


# -- merging --------------------------------------------------------------------------


OLD = {
    "access_token": "at1",
    "refresh_token": "rt1",
    "expiry": NOW + 10,
    "token_type": "Bearer",
    "scope": "read",
    "account_id": "acct-7",
}


def test_merge_keeps_the_old_refresh_token_when_the_idp_does_not_rotate() -> None:
    """RFC 6749 section 6: a response without refresh_token keeps the one we have."""
    new = {"access_token": "at2", "expiry": NOW + 3600, "token_type": "Bearer"}
    merged = oauth.merge_refreshed(OLD, new)
    assert merged["refresh_token"] == "rt1"
    assert merged["access_token"] == "at2"
    assert merged["expiry"] == NOW + 3600


def test_merge_keeps_the_old_refresh_token_when_the_new_one_is_empty() -> None:
    """An empty refresh_token in the response never blanks the stored one."""
    merged = oauth.merge_refreshed(OLD, {"access_token": "at2", "refresh_token": ""})
    assert merged["refresh_token"] == "rt1"


def test_merge_takes_a_rotated_refresh_token() -> None:
    """A rotated refresh token replaces the old one."""
    merged = oauth.merge_refreshed(OLD, {"access_token": "at2", "refresh_token": "rt2"})
    assert merged["refresh_token"] == "rt2"


def test_merge_keeps_fields_the_response_does_not_repeat() -> None:
    """Scope and vendor fields from the old token survive a minimal response."""
    merged = oauth.merge_refreshed(OLD, {"access_token": "at2", "expiry": NOW + 60})
    assert merged["scope"] == "read"
    assert merged["account_id"] == "acct-7"


def test_merge_drops_the_stale_expiry_when_the_new_token_has_none() -> None:
    """The old access token's expiry does not outlive it."""
    merged = oauth.merge_refreshed(OLD, {"access_token": "at2"})
    assert "expiry" not in merged


def test_merge_does_not_modify_its_arguments() -> None:
    """Both inputs are left as they were."""
    old, new = dict(OLD), {"access_token": "at2"}
    oauth.merge_refreshed(old, new)
    assert old == OLD
    assert new == {"access_token": "at2"}


def test_parse_then_merge_round_trip() -> None:
    """A realistic non-rotating answer merges into a complete token."""
    new = oauth.parse_refresh_response(
        200, _body({"access_token": "at2", "expires_in": 3600, "token_type": "bearer"}), NOW
    )
    merged = oauth.merge_refreshed(OLD, new)
    assert merged == {**OLD, "access_token": "at2", "expiry": NOW + 3600, "token_type": "bearer"}
