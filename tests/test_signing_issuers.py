"""The development issuers verify what they receive: each check refuses what it should.

Driven as a state machine (forms and headers in, status and JSON out), with
JWTs made here by PyJWT directly, so that each one breaks exactly one rule.
tests/test_signing.py mints against the same issuers over HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from credproxy.devidp import DevIssuers
from credproxy.devidp.issuers import CLIENT_ASSERTION_TYPE, JWT_BEARER

NOW = 1_800_000_000.0
TOKEN_URL = "http://127.0.0.1:9/token"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def issuers() -> DevIssuers:
    iss = DevIssuers(clock=lambda: NOW)
    iss.register_assertion_issuer("sa@example", RSA_KEY.public_key())
    iss.register_client("m2m", public_key=EC_KEY.public_key())
    iss.register_client("secret-client", secret="CANARY-s3cret")
    iss.register_app(42, RSA_KEY.public_key())
    iss.add_installation(
        7,
        42,
        repositories={"alpha": 1, "beta": 2},
        permissions={"contents": "write", "metadata": "read"},
    )
    return iss


def claims(**over: Any) -> dict[str, Any]:
    base = {
        "iss": "sa@example",
        "aud": TOKEN_URL,
        "iat": int(NOW) - 60,
        "exp": int(NOW) + 300,
        "jti": "jti-1",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def bearer_form(token: str) -> dict[str, str]:
    return {"grant_type": JWT_BEARER, "assertion": token}


def signed(private: Any = RSA_KEY, alg: str = "RS256", **over: Any) -> str:
    return jwt.encode(claims(**over), private, algorithm=alg)


def test_a_good_assertion_mints_once_and_its_replay_is_refused(issuers: DevIssuers) -> None:
    token = signed()
    status, answer = issuers.answer_token_request(bearer_form(token), TOKEN_URL)
    assert status == 200
    assert answer["access_token"].startswith("devst-")
    assert issuers.answer_resource(f"Bearer {answer['access_token']}")[0] == 200
    status, answer = issuers.answer_token_request(bearer_form(token), TOKEN_URL)
    assert (status, answer["error"]) == (400, "invalid_grant")
    assert "jti was used before" in answer["error_description"]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (signed(OTHER_RSA), "signature does not verify"),
        (signed(aud="https://elsewhere/token"), "aud must be"),
        (signed(exp=int(NOW) + 301), "more than 300 s ahead"),
        (signed(exp=int(NOW) - 1), "expired"),
        (signed(iat=int(NOW) + 60), "iat is in the future"),
        (signed(jti=None), "jti claim is missing"),
        (signed(iss="nobody@example"), "no key is registered"),
        (signed(EC_KEY, "ES256"), "is not RS256"),
        (jwt.encode(claims(), None, algorithm="none"), "is not RS256"),
        ("not-a-jwt", "not a JWT"),
    ],
)
def test_jwt_bearer_refusals(issuers: DevIssuers, token: str, reason: str) -> None:
    status, answer = issuers.answer_token_request(bearer_form(token), TOKEN_URL)
    assert status == 400
    assert answer["error"] == "invalid_grant"
    assert reason in answer["error_description"]


def test_hmac_with_the_public_key_as_secret_is_refused(issuers: DevIssuers) -> None:
    """The classic confusion: HS256 'signed' with the RSA public key's PEM."""
    import base64
    import hashlib
    import hmac

    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = b64(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    status, answer = issuers.answer_token_request(bearer_form(f"{head}.{body}.{sig}"), TOKEN_URL)
    assert status == 400
    assert "is not RS256" in answer["error_description"]


def test_wrong_grant_type_or_assertion_type(issuers: DevIssuers) -> None:
    assert issuers.answer_token_request({"grant_type": "password"}, TOKEN_URL)[0] == 400
    form = {
        "grant_type": "client_credentials",
        "client_id": "m2m",
        "client_assertion_type": "urn:example:other",
        "client_assertion": signed(EC_KEY, "ES256", iss="m2m", sub="m2m"),
    }
    status, answer = issuers.answer_token_request(form, TOKEN_URL)
    assert (status, answer["error"]) == (401, "invalid_client")
    assert "client_assertion_type" in answer["error_description"]


def test_private_key_jwt_needs_sub_and_iss_to_be_the_client(issuers: DevIssuers) -> None:
    def form(token: str) -> dict[str, str]:
        return {
            "grant_type": "client_credentials",
            "client_id": "m2m",
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": token,
        }

    ok = signed(EC_KEY, "ES256", iss="m2m", sub="m2m", jti="a")
    assert issuers.answer_token_request(form(ok), TOKEN_URL)[0] == 200
    bad_sub = signed(EC_KEY, "ES256", iss="m2m", sub="someone", jti="b")
    status, answer = issuers.answer_token_request(form(bad_sub), TOKEN_URL)
    assert status == 401
    assert "sub must be the client_id" in answer["error_description"]


def test_client_secret_is_checked(issuers: DevIssuers) -> None:
    form = {"grant_type": "client_credentials", "client_id": "secret-client"}
    assert issuers.answer_token_request({**form, "client_secret": "wrong"}, TOKEN_URL)[0] == 401
    assert (
        issuers.answer_token_request({**form, "client_secret": "CANARY-s3cret"}, TOKEN_URL)[0]
        == 200
    )
    assert not any("CANARY" in line for line in issuers.events)


# -- GitHub App ----------------------------------------------------------------------------


def app_jwt(private: Any = RSA_KEY, alg: str = "RS256", **over: Any) -> str:
    base = {"iss": "42", "iat": int(NOW) - 60, "exp": int(NOW) + 540}
    base.update(over)
    return jwt.encode(base, private, algorithm=alg)


def installation(
    issuers: DevIssuers, token: str, body: dict[str, Any] | None = None, inst: int = 7
) -> tuple[int, dict[str, Any]]:
    raw = json.dumps(body).encode() if body is not None else b""
    return issuers.answer_installation_token(
        f"/app/installations/{inst}/access_tokens", f"Bearer {token}", raw
    )


def test_installation_token_whole_and_narrowed(issuers: DevIssuers) -> None:
    status, whole = installation(issuers, app_jwt())
    assert status == 201
    assert whole["token"].startswith("ghs_")
    assert whole["repository_selection"] == "all"
    assert whole["permissions"] == {"contents": "write", "metadata": "read"}
    status, narrow = installation(
        issuers, app_jwt(), {"repositories": ["alpha"], "permissions": {"contents": "read"}}
    )
    assert status == 201
    assert narrow["repositories"][0]["name"] == "alpha"
    auth = f"token {narrow['token']}"
    assert issuers.answer_github_request("GET", "/repos/dev-org/alpha", auth)[0] == 200
    assert issuers.answer_github_request("GET", "/repos/dev-org/beta", auth)[0] == 404
    assert issuers.answer_github_request("PUT", "/repos/dev-org/alpha/contents/f", auth)[0] == 403
    full = f"Bearer {whole['token']}"
    assert issuers.answer_github_request("PUT", "/repos/dev-org/beta/contents/f", full)[0] == 200


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"permissions": {"contents": "admin"}}, 422, "not granted to this installation"),
        ({"permissions": {"issues": "read"}}, 422, "not granted to this installation"),
        ({"repositories": ["gamma"]}, 422, "not accessible to the parent installation"),
        ({"repository_ids": [99]}, 422, "not accessible to the parent installation"),
    ],
)
def test_narrowing_beyond_the_installation_is_refused(
    issuers: DevIssuers, body: dict[str, Any], status: int, message: str
) -> None:
    got, answer = installation(issuers, app_jwt(), body)
    assert got == status
    assert message in answer["message"]


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (app_jwt(exp=int(NOW) + 700, iat=int(NOW)), "too far in the future"),
        (app_jwt(exp=int(NOW) - 1), "expired"),
        (app_jwt(iat=int(NOW) + 120, exp=int(NOW) + 300), "iat is in the future"),
        (app_jwt(OTHER_RSA), "signature does not verify"),
        (app_jwt(iss="43"), "Integration not found"),
        (app_jwt(EC_KEY, "ES256"), "is not RS256"),
    ],
)
def test_app_jwt_refusals(issuers: DevIssuers, token: str, message: str) -> None:
    status, answer = installation(issuers, token)
    assert status == 401
    assert message in answer["message"]


def test_unknown_installation_is_not_found(issuers: DevIssuers) -> None:
    assert installation(issuers, app_jwt(), inst=8)[0] == 404


# -- signed JWTs at the resource server ----------------------------------------------------


def test_snowflake_style_jwt_at_the_resource_server(issuers: DevIssuers) -> None:
    issuer = issuers.register_snowflake_user("ACME.ALICE", RSA_KEY.public_key())
    assert issuer.startswith("ACME.ALICE.SHA256:")
    base = {"iss": issuer, "sub": "ACME.ALICE", "iat": int(NOW) - 60, "exp": int(NOW) + 3540}
    ok = jwt.encode(base, RSA_KEY, algorithm="RS256")
    assert issuers.answer_resource(f"Bearer {ok}") == (
        200,
        {"sub": "ACME.ALICE", "kind": "signed-jwt"},
    )
    # Used again: a signed JWT is the bearer token, not a one-time assertion.
    assert issuers.answer_resource(f"Bearer {ok}")[0] == 200
    too_long = jwt.encode({**base, "exp": int(NOW) + 3600}, RSA_KEY, algorithm="RS256")
    status, answer = issuers.answer_resource(f"Bearer {too_long}")
    assert status == 401
    assert "longer than 3600" in answer["error_description"]
    wrong_sub = jwt.encode({**base, "sub": "ACME.BOB"}, RSA_KEY, algorithm="RS256")
    assert issuers.answer_resource(f"Bearer {wrong_sub}")[0] == 401
    wrong_key = jwt.encode(base, OTHER_RSA, algorithm="RS256")
    assert issuers.answer_resource(f"Bearer {wrong_key}")[0] == 401


def test_eddsa_assertions_verify(issuers: DevIssuers) -> None:
    issuers.register_assertion_issuer("ed@example", ED_KEY.public_key())
    token = jwt.encode(claims(iss="ed@example"), ED_KEY, algorithm="EdDSA")
    assert issuers.answer_token_request(bearer_form(token), TOKEN_URL)[0] == 200
