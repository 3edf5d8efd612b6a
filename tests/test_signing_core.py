"""core/assertions.py, pure: the claims each grant signs, the algorithm per key type, the answers and their errors.

No network here: JWTs are decoded with PyJWT (and verified with the public
key), answers are fed as bytes. The end-to-end mints are tests/test_signing.py.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519

from credproxy.core import assertions
from credproxy.core.assertions import MintFailed, MintRequest, SigningKey
from credproxy.core.config import Narrowing, Provider, Secret, parse
from credproxy.devidp import public_key_fingerprint
from credproxy.errors import ConfigError

NOW = 1_800_000_000.0
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
TOKEN_URL = "https://issuer.example/token"


def counter_random() -> Any:
    """A random source that never repeats (so jti values are distinct and known)."""
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


def key(private: Any = RSA_KEY, **kw: Any) -> SigningKey:
    return SigningKey(private_key=private, path="/keys/k.pem", **kw)


def decode(token: str, private: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of *token*, verified with the public half of *private*."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(
        token,
        private.public_key(),
        algorithms=[header["alg"]],
        options={"verify_aud": False, "verify_exp": False, "verify_iat": False},
    )
    return header, claims


# -- claims ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("private", "alg"), [(RSA_KEY, "RS256"), (EC_KEY, "ES256"), (ED_KEY, "EdDSA")]
)
def test_jwt_bearer_assertion_claims_and_algorithm(private: Any, alg: str) -> None:
    """iss, sub, aud = token_url, iat backdated 60 s, exp 5 minutes ahead, a jti; the algorithm follows the key type."""
    provider = Provider(
        grant="jwt-bearer",
        token_url=TOKEN_URL,
        private_key="/keys/k.pem",
        issuer="agent@example.iam",
        subject="user@example.com",
        scopes=["a", "b"],
    )
    request = assertions.build_request(
        provider, "default", key=key(private), client_secret=None, now=NOW, random=counter_random()
    )
    assert request.url == TOKEN_URL
    assert request.form is not None
    assert request.form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert request.form["scope"] == "a b"
    header, claims = decode(request.form["assertion"], private)
    assert header["alg"] == alg
    assert claims["iss"] == "agent@example.iam"
    assert claims["sub"] == "user@example.com"
    assert claims["aud"] == TOKEN_URL
    assert claims["iat"] == NOW - 60
    assert claims["exp"] == NOW + 300
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 22
    assert request.secrets == (request.form["assertion"],)


def test_google_key_gives_iss_kid_token_url_and_scope_claim() -> None:
    """With a key file: iss is its client_email, kid its private_key_id, the endpoint its token_uri, scopes in the claim."""
    provider = Provider(
        grant="jwt-bearer", key_file="/keys/sa.json", scopes=["s1"], scope_in_assertion=True
    )
    google = key(
        client_email="sa@proj.iam.gserviceaccount.com",
        token_uri="https://oauth2.example/token",
        key_id="kid-1",
    )
    request = assertions.build_request(
        provider, "default", key=google, client_secret=None, now=NOW, random=counter_random()
    )
    assert request.url == "https://oauth2.example/token"
    assert request.form is not None
    assert set(request.form) == {"grant_type", "assertion"}
    header, claims = decode(request.form["assertion"], RSA_KEY)
    assert header["kid"] == "kid-1"
    assert claims["iss"] == "sa@proj.iam.gserviceaccount.com"
    assert claims["aud"] == "https://oauth2.example/token"
    assert claims["scope"] == "s1"


def test_a_key_files_token_uri_must_be_https() -> None:
    provider = Provider(grant="jwt-bearer", key_file="/keys/sa.json")
    bad = key(client_email="a@b", token_uri="http://evil.example/token")
    with pytest.raises(MintFailed, match="not an https"):
        assertions.build_request(
            provider, "default", key=bad, client_secret=None, now=NOW, random=counter_random()
        )


def test_private_key_jwt_client_assertion() -> None:
    """RFC 7523 2.2: iss = sub = client_id, aud the token endpoint, with the assertion type."""
    provider = Provider(
        grant="client_credentials", token_url=TOKEN_URL, client_id="m2m", private_key="/k"
    )
    request = assertions.build_request(
        provider, "default", key=key(EC_KEY), client_secret=None, now=NOW, random=counter_random()
    )
    assert request.form is not None
    assert request.form["grant_type"] == "client_credentials"
    assert request.form["client_id"] == "m2m"
    assert request.form["client_assertion_type"] == (
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    )
    assert "client_secret" not in request.form
    _, claims = decode(request.form["client_assertion"], EC_KEY)
    assert (claims["iss"], claims["sub"], claims["aud"]) == ("m2m", "m2m", TOKEN_URL)
    assert claims["exp"] - NOW <= 300


def test_client_credentials_with_a_secret_posts_it() -> None:
    provider = Provider(
        grant="client_credentials",
        token_url=TOKEN_URL,
        client_id="m2m",
        client_secret=Secret("s3cret"),
        scopes=["x"],
    )
    request = assertions.build_request(
        provider, "default", key=None, client_secret="s3cret", now=NOW, random=counter_random()
    )
    assert request.form == {
        "grant_type": "client_credentials",
        "client_id": "m2m",
        "scope": "x",
        "client_secret": "s3cret",
    }
    assert request.secrets == ("s3cret",)
    assert "s3cret" not in repr(request)


def test_github_app_jwt_and_request() -> None:
    """The App JWT: RS256, iss the App id as a string, iat now-60, exp 10 minutes after iat; the bucket's narrowing is the body."""
    provider = Provider(
        grant="github-app",
        app_id=12345,
        installation_id=678,
        private_key="/k",
        api_url="https://ghe.example/api/v3/",
        narrow={"ro": Narrowing(repositories=["alpha"], permissions={"contents": "read"})},
    )
    request = assertions.build_request(
        provider, "ro", key=key(), client_secret=None, now=NOW, random=counter_random()
    )
    assert request.url == "https://ghe.example/api/v3/app/installations/678/access_tokens"
    assert request.json == {"repositories": ["alpha"], "permissions": {"contents": "read"}}
    assert request.headers["Accept"] == "application/vnd.github+json"
    app_jwt = request.headers["Authorization"].removeprefix("Bearer ")
    header, claims = decode(app_jwt, RSA_KEY)
    assert header["alg"] == "RS256"
    assert claims == {"iss": "12345", "iat": NOW - 60, "exp": NOW - 60 + 600}
    # Another bucket: the installation's whole token.
    other = assertions.build_request(
        provider, "default", key=key(), client_secret=None, now=NOW, random=counter_random()
    )
    assert other.json == {}


def test_github_app_needs_an_rsa_key() -> None:
    provider = Provider(grant="github-app", app_id=1, installation_id=2, private_key="/k")
    with pytest.raises(MintFailed, match="RS256 only") as info:
        assertions.build_request(
            provider,
            "default",
            key=key(EC_KEY),
            client_secret=None,
            now=NOW,
            random=counter_random(),
        )
    assert info.value.cause == "key"


def test_signed_jwt_is_the_token_with_its_lifetime() -> None:
    """Snowflake's shape: iss ACCOUNT.USER.SHA256:fp, sub ACCOUNT.USER, exp = iat + lifetime."""
    cfg = parse(
        '[providers.sf]\npreset = "snowflake"\nsubject = "ACME.ALICE"\nprivate_key = "/k"\n'
        "lifetime = 1800\n",
        Path("config.toml"),
    )
    token = assertions.signed_jwt_token(
        cfg.providers["sf"], key(), now=NOW, random=counter_random()
    )
    _, claims = decode(token["access_token"], RSA_KEY)
    fingerprint = public_key_fingerprint(RSA_KEY.public_key())
    assert claims["iss"] == f"ACME.ALICE.{fingerprint}"
    assert claims["sub"] == "ACME.ALICE"
    assert claims["iat"] == NOW - 60
    assert claims["exp"] == NOW - 60 + 1800
    assert token["expiry"] == claims["exp"]
    assert token["token_type"] == "Bearer"
    assert "refresh_token" not in token


@pytest.mark.parametrize(
    ("subject", "said"),
    [
        ("acme.alice", "subject must be uppercase, as Snowflake compares it: ACME.ALICE"),
        ("ACME", "subject must be ACCOUNT.USER"),
    ],
)
def test_a_snowflake_subject_snowflake_refuses_is_refused_at_load(subject: str, said: str) -> None:
    """A lowercase or shapeless subject is said at load, not met as a 401 at the first use."""
    text = f'[providers.sf]\npreset = "snowflake"\nsubject = "{subject}"\nprivate_key = "/k"\n'
    with pytest.raises(ConfigError, match=said):
        parse(text, Path("config.toml"))


def test_a_snowflake_key_that_is_not_rsa_is_refused() -> None:
    """Snowflake takes RSA key pairs only: an Ed25519 key is refused before anything is signed."""
    cfg = parse(
        '[providers.sf]\npreset = "snowflake"\nsubject = "ACME.ALICE"\nprivate_key = "/k"\n',
        Path("config.toml"),
    )
    with pytest.raises(assertions.MintFailed, match="Snowflake takes RSA key pairs only"):
        assertions.signed_jwt_token(
            cfg.providers["sf"], key(ED_KEY), now=NOW, random=counter_random()
        )


def test_jti_is_unique_per_assertion() -> None:
    """A thousand assertions from the real random source: a thousand jti values."""
    import os

    provider = Provider(grant="jwt-bearer", token_url=TOKEN_URL, private_key="/k", issuer="i")
    signing = key(ED_KEY)
    seen = set()
    for _ in range(1000):
        request = assertions.build_request(
            provider, "default", key=signing, client_secret=None, now=NOW, random=os.urandom
        )
        assert request.form is not None
        seen.add(decode(request.form["assertion"], ED_KEY)[1]["jti"])
    assert len(seen) == 1000


# -- keys ----------------------------------------------------------------------------------


def test_algorithm_per_key_type_and_refusals() -> None:
    assert assertions.algorithm_for(RSA_KEY) == "RS256"
    assert assertions.algorithm_for(EC_KEY) == "ES256"
    assert assertions.algorithm_for(ec.generate_private_key(ec.SECP384R1())) == "ES384"
    assert assertions.algorithm_for(ED_KEY) == "EdDSA"
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(MintFailed, match="1024 bits"):
        assertions.signable(small)
    with pytest.raises(MintFailed, match="secp256k1"):
        assertions.signable(ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(MintFailed, match="cannot sign a JWT"):
        assertions.signable(x25519.X25519PrivateKey.generate())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("private", [RSA_KEY, EC_KEY])
def test_fingerprint_is_what_openssl_computes(private: Any) -> None:
    """SHA256: + base64 of SHA-256 of the DER SubjectPublicKeyInfo, as `openssl pkey -pubout -outform DER | openssl dgst -sha256 -binary | openssl enc -base64`."""
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    der = subprocess.run(
        ["openssl", "pkey", "-pubout", "-outform", "DER"],
        input=pem,
        capture_output=True,
        check=True,
    ).stdout
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary"], input=der, capture_output=True, check=True
    ).stdout
    b64 = subprocess.run(
        ["openssl", "enc", "-base64", "-A"], input=digest, capture_output=True, check=True
    ).stdout.decode()
    assert assertions.key_fingerprint(private) == f"SHA256:{b64}"


# -- answers -------------------------------------------------------------------------------


def _request(grant: str = "jwt-bearer", secrets: tuple[str, ...] = ()) -> MintRequest:
    url = (
        "https://api.github.example/app/installations/1/access_tokens"
        if grant == "github-app"
        else TOKEN_URL
    )
    return MintRequest(grant=grant, method="POST", url=url, form={}, secrets=secrets)


def _body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_an_rfc6749_answer_becomes_a_stored_token_without_refresh_token() -> None:
    token = assertions.parse_answer(
        _request(),
        200,
        _body({"access_token": "at", "expires_in": 3600, "refresh_token": "rt", "scope": "s"}),
        now=NOW,
    )
    assert token == {
        "access_token": "at",
        "expiry": NOW + 3600,
        "token_type": "Bearer",
        "scope": "s",
    }


def test_githubs_answer_becomes_a_stored_token() -> None:
    token = assertions.parse_answer(
        _request("github-app"),
        201,
        _body(
            {
                "token": "ghs_x",
                "expires_at": "2027-01-15T08:00:00Z",
                "permissions": {"contents": "read"},
                "repository_selection": "selected",
                "repositories": [{"id": 1, "name": "alpha"}],
            }
        ),
        now=NOW,
    )
    assert token["access_token"] == "ghs_x"
    assert token["expiry"] == datetime(2027, 1, 15, 8, 0, 0, tzinfo=UTC).timestamp()
    assert token["permissions"] == {"contents": "read"}
    assert token["repositories"] == ["alpha"]
    assert "refresh_token" not in token


@pytest.mark.parametrize(
    ("status", "payload", "cause"),
    [
        (400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}, "refused"),
        (401, {"error": "invalid_client"}, "refused"),
        (
            400,
            {
                "error": "invalid_grant",
                "error_description": "Token must be a short-lived token and in a reasonable timeframe. Check your iat and exp values",
            },
            "clock_skew",
        ),
        (503, {"error": "temporarily_unavailable"}, "transient"),
        (429, {}, "transient"),
        (200, {"no": "token"}, "transient"),
    ],
)
def test_errors_are_classified_with_the_issuers_text(
    status: int, payload: dict[str, Any], cause: str
) -> None:
    with pytest.raises(MintFailed) as info:
        assertions.parse_answer(_request(), status, _body(payload), now=NOW)
    assert info.value.cause == cause
    assert f"HTTP {status}" in str(info.value)
    if "error_description" in payload:
        assert payload["error_description"][:40] in str(info.value)


def test_a_clock_far_from_the_issuers_is_named() -> None:
    """A refusal from an issuer whose Date is 10 minutes behind ours names the skew."""
    with pytest.raises(MintFailed) as info:
        assertions.parse_answer(
            _request(), 400, _body({"error": "invalid_grant"}), now=NOW, server_date=NOW - 600
        )
    assert info.value.cause == "clock_skew"
    assert "600 s ahead of issuer.example's" in str(info.value)


def test_github_refusals_say_what_to_do() -> None:
    with pytest.raises(MintFailed) as info:
        assertions.parse_answer(
            _request("github-app"),
            422,
            _body({"message": "The permissions requested are not granted to this installation."}),
            now=NOW,
        )
    assert info.value.cause == "refused"
    assert "not granted to this installation" in str(info.value)
    assert "narrowing" in str(info.value)
    with pytest.raises(MintFailed, match="installation_id"):
        assertions.parse_answer(
            _request("github-app"), 404, _body({"message": "Not Found"}), now=NOW
        )


def test_issuer_text_never_quotes_what_was_sent_or_looks_like_a_token() -> None:
    secret = "CANARY-client-secret-0123"
    assertion = "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJhIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    text = (
        f"bad client_secret {secret}; assertion {assertion}; other "
        + "A" * 50
        + "\x1b[31m\n"
        + "x" * 500
    )
    with pytest.raises(MintFailed) as info:
        assertions.parse_answer(
            _request(secrets=(secret, assertion)),
            401,
            _body({"error": "invalid_client", "error_description": text}),
            now=NOW,
        )
    said = "\n".join([str(info.value), repr(info.value), *traceback.format_exception(info.value)])
    assert secret not in said
    assert assertion not in said
    assert "A" * 40 not in said
    assert "\x1b" not in said
    assert "[redacted]" in said
    assert len(str(info.value)) < 600


def test_issuer_text_keeps_words() -> None:
    """Long hyphenated words (a documentation anchor) are not mistaken for a token."""
    text = (
        "see create-an-installation-access-token-for-an-app; key 9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    )
    assert assertions.issuer_text(text) == (
        "see create-an-installation-access-token-for-an-app; key [redacted]"
    )


def test_reprs_show_no_secret() -> None:
    provider = Provider(
        grant="client_credentials",
        token_url=TOKEN_URL,
        client_id="c",
        client_secret=Secret("CANARY-s"),
    )
    assert "CANARY" not in repr(provider)
    assert "CANARY" not in str(provider.client_secret)
    assert provider.client_secret is not None and provider.client_secret.reveal() == "CANARY-s"
    signing = key()
    assert repr(signing) == "<SigningKey RS256 /keys/k.pem>"
