"""The signing grants end to end: config text → key file on disk → mint over loopback HTTP → verified.

Each test writes a config and key files (mode 0600) in a temporary directory,
parses the config with :func:`credproxy.core.config.parse`, and mints with
:meth:`HttpTokenEndpoint.mint` against :class:`credproxy.devidp.DevIssuers`
served on 127.0.0.1, which verifies every JWT it receives. What a user could
observe is checked: the token, what the issuer accepted, and every error
message (which must never carry the key, a passphrase or a secret). A key
rotated in place is followed through the daemon itself (in this process, on
a config file, reloaded with ``credproxy reload``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import Dirs, Peer, cli, serve_config_file
from credproxy import devidp
from credproxy.core.assertions import MintFailed
from credproxy.core.config import Provider, parse
from credproxy.core.grants import Grants
from credproxy.errors import RefreshFailed
from credproxy.shell.daemon import Daemon
from credproxy.shell.http import HttpTokenEndpoint
from credproxy.shell.signing_keys import SigningKeys
from credproxy.shell.store import TokenStore

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
KEYS = {"RS256": RSA_KEY, "ES256": EC_KEY, "EdDSA": ED_KEY}
PASSPHRASE = "CANARY-passphrase-7f3a"
CLIENT_SECRET = "CANARY-client-secret-91bd"


def pem(private: Any, passphrase: str | None = None, traditional: bool = False) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if traditional
        else serialization.PrivateFormat.PKCS8
    )
    return private.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def pem_lines(private: Any) -> list[str]:
    """The base64 lines of *private*'s PEM: none may appear in anything said."""
    return [
        line for line in pem(private).decode().splitlines() if line and not line.startswith("-----")
    ]


def write_private(path: Path, data: bytes | str, mode: int = 0o600) -> Path:
    raw = data.encode() if isinstance(data, str) else data
    path.write_bytes(raw)
    path.chmod(mode)
    return path


def everything_said(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def assert_secret_free(text: str, private: Any = None) -> None:
    assert "CANARY" not in text
    assert PASSPHRASE not in text and CLIENT_SECRET not in text
    if private is not None:
        for line in pem_lines(private):
            assert line not in text


@dataclass
class World:
    """The dev issuers on loopback, a minting endpoint, and a directory for keys and config."""

    base_url: str
    issuers: devidp.DevIssuers
    endpoint: HttpTokenEndpoint
    dir: Path
    log: list[str] = field(default_factory=list)

    def provider(self, toml: str, name: str = "p") -> Provider:
        text = toml.replace("{base}", self.base_url).replace("{dir}", str(self.dir))
        return parse(text, self.dir / "config.toml").providers[name]


@pytest.fixture
async def world(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[World]:
    issuers = devidp.DevIssuers()
    log: list[str] = []
    token_url = await nursery.start(
        partial(devidp.serve, devidp.DevIdP(), log=log.append, issuers=issuers)
    )
    endpoint = HttpTokenEndpoint()
    try:
        yield World(token_url.removesuffix("/token"), issuers, endpoint, tmp_path, log)
    finally:
        await endpoint.aclose()
        # The issuers' log lines name fingerprints only.
        assert_secret_free("\n".join(log))


# -- each grant, end to end ------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(KEYS))
async def test_jwt_bearer_with_a_pem_key(world: World, alg: str) -> None:
    """RS256, ES256 and EdDSA assertions are accepted by an issuer that verifies them; the token is served."""
    private = KEYS[alg]
    write_private(world.dir / "sa.pem", pem(private))
    world.issuers.register_assertion_issuer("agent@example.iam", private.public_key())
    provider = world.provider(
        '[providers.p]\ngrant = "jwt-bearer"\ntoken_url = "{base}/token"\n'
        'private_key = "{dir}/sa.pem"\nissuer = "agent@example.iam"\nscopes = ["read"]\n'
    )
    before = time.time()
    token = await world.endpoint.mint(provider)
    assert set(token) == {"access_token", "token_type", "expiry", "scope"}
    assert token["access_token"].startswith("devst-")
    assert token["scope"] == "read"
    assert before + 3600 - 5 <= token["expiry"] <= time.time() + 3600
    # The issuer minted it, and a resource server takes it.
    assert world.issuers.answer_resource(f"Bearer {token['access_token']}")[0] == 200
    assert world.issuers.refusals == []


async def test_google_service_account_preset_with_its_json_key(world: World) -> None:
    """The preset with Google's JSON key: iss its client_email, kid its key id, scopes in the assertion."""
    key_json = {
        "type": "service_account",
        "project_id": "proj",
        "private_key_id": "kid-123",
        "private_key": pem(RSA_KEY).decode(),
        "client_email": "sa@proj.iam.gserviceaccount.com",
        "token_uri": f"{world.base_url}/token",
    }
    write_private(world.dir / "sa.json", json.dumps(key_json))
    world.issuers.register_assertion_issuer("sa@proj.iam.gserviceaccount.com", RSA_KEY.public_key())
    # token_url set to the key's token_uri (the preset's is Google's own).
    provider = world.provider(
        '[providers.p]\npreset = "google-service-account"\nkey_file = "{dir}/sa.json"\n'
        'token_url = "{base}/token"\nscopes = ["https://www.googleapis.com/auth/cloud-platform"]\n'
    )
    token = await world.endpoint.mint(provider)
    assert token["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    assert world.issuers.mint_count == 1


async def test_jwt_bearer_takes_token_url_from_the_key_file(world: World) -> None:
    key_json = {
        "type": "service_account",
        "private_key": pem(EC_KEY).decode(),
        "client_email": "ec@example",
        "token_uri": f"{world.base_url}/token",
    }
    write_private(world.dir / "sa.json", json.dumps(key_json))
    world.issuers.register_assertion_issuer("ec@example", EC_KEY.public_key())
    provider = world.provider('[providers.p]\ngrant = "jwt-bearer"\nkey_file = "{dir}/sa.json"\n')
    assert (await world.endpoint.mint(provider))["access_token"].startswith("devst-")


@pytest.mark.parametrize("how", ["client_secret_file", "client_secret"])
async def test_client_credentials_with_a_secret(world: World, how: str) -> None:
    world.issuers.register_client("m2m", secret=CLIENT_SECRET)
    write_private(world.dir / "m2m.secret", CLIENT_SECRET + "\n")
    line = (
        'client_secret_file = "{dir}/m2m.secret"'
        if how == "client_secret_file"
        else f'client_secret = "{CLIENT_SECRET}"'
    )
    provider = world.provider(
        '[providers.p]\ngrant = "client_credentials"\ntoken_url = "{base}/token"\n'
        f'client_id = "m2m"\n{line}\nscopes = ["jobs"]\n'
    )
    token = await world.endpoint.mint(provider)
    assert token["scope"] == "jobs"
    assert world.issuers.answer_resource(f"Bearer {token['access_token']}")[1]["sub"] == "m2m"


async def test_client_credentials_with_private_key_jwt(world: World) -> None:
    write_private(world.dir / "m2m.pem", pem(EC_KEY))
    world.issuers.register_client("m2m", public_key=EC_KEY.public_key())
    provider = world.provider(
        '[providers.p]\ngrant = "client_credentials"\ntoken_url = "{base}/token"\n'
        'client_id = "m2m"\nprivate_key = "{dir}/m2m.pem"\n'
    )
    for _ in range(3):  # a fresh assertion (and jti) each time
        await world.endpoint.mint(provider)
    assert world.issuers.mint_count == 3
    assert world.issuers.refusals == []


GITHUB_TOML = """
[providers.gh]
preset = "github-app"
app_id = 42
installation_id = 7
private_key = "{dir}/app.pem"
api_url = "{base}"

[providers.gh.narrow.readonly]
repositories = ["alpha"]
permissions = { contents = "read", metadata = "read" }

[providers.gh.narrow.push]
repositories = ["alpha"]
permissions = { contents = "write" }

[providers.gh.narrow.toomuch]
permissions = { administration = "write" }
"""


async def test_github_app_tokens_narrowed_per_bucket(world: World) -> None:
    """One App, three buckets: the whole installation, a read-only token and a push token."""
    write_private(world.dir / "app.pem", pem(RSA_KEY))
    world.issuers.register_app(42, RSA_KEY.public_key())
    world.issuers.add_installation(
        7,
        42,
        repositories={"alpha": 1, "beta": 2},
        permissions={"contents": "write", "metadata": "read"},
    )
    provider = world.provider(GITHUB_TOML, "gh")
    whole = await world.endpoint.mint(provider)
    readonly = await world.endpoint.mint(provider, "readonly")
    push = await world.endpoint.mint(provider, "push")
    assert whole["repository_selection"] == "all"
    assert readonly["permissions"] == {"contents": "read", "metadata": "read"}
    assert readonly["repositories"] == ["alpha"]
    assert "refresh_token" not in readonly
    assert time.time() + 3500 < readonly["expiry"] <= time.time() + 3600

    def github(method: str, path: str, token: dict[str, Any]) -> int:
        return world.issuers.answer_github_request(method, path, f"token {token['access_token']}")[
            0
        ]

    assert github("GET", "/repos/dev-org/alpha", readonly) == 200
    assert github("PUT", "/repos/dev-org/alpha/contents/README", readonly) == 403
    assert github("GET", "/repos/dev-org/beta", readonly) == 404
    assert github("PUT", "/repos/dev-org/alpha/contents/README", push) == 200
    assert github("PUT", "/repos/dev-org/beta/contents/README", whole) == 200

    # Asking for more than the installation has: GitHub's own words, and what to do.
    with pytest.raises(MintFailed) as info:
        await world.endpoint.mint(provider, "toomuch")
    assert info.value.cause == "refused"
    assert "HTTP 422" in str(info.value)
    assert "not granted to this installation" in str(info.value)
    assert_secret_free(everything_said(info.value), RSA_KEY)


async def test_snowflake_signed_jwt_is_accepted_by_the_resource_server(world: World) -> None:
    """The preset's iss is ACCOUNT.USER.SHA256:<fingerprint>, computed from the key; the JWT itself is the token."""
    write_private(world.dir / "sf.p8", pem(RSA_KEY, PASSPHRASE))
    write_private(world.dir / "sf.pass", PASSPHRASE + "\n")
    expected_iss = world.issuers.register_snowflake_user("ACME.ALICE", RSA_KEY.public_key())
    provider = world.provider(
        '[providers.p]\npreset = "snowflake"\nsubject = "ACME.ALICE"\n'
        'private_key = "{dir}/sf.p8"\npassphrase_file = "{dir}/sf.pass"\n'
    )
    token = await world.endpoint.mint(provider)
    claims = jwt.decode(token["access_token"], options={"verify_signature": False})
    assert claims["iss"] == expected_iss
    assert claims["exp"] - claims["iat"] == 3600
    assert token["expiry"] == claims["exp"]
    assert world.issuers.answer_resource(f"Bearer {token['access_token']}") == (
        200,
        {"sub": "ACME.ALICE", "kind": "signed-jwt"},
    )


async def test_refresh_of_a_minting_grant_says_to_mint(world: World) -> None:
    """refresh() has no bucket, so it does not mint (a GitHub token depends on the bucket)."""
    provider = Provider(grant="signed-jwt", private_key="/nonexistent", issuer="x")
    with pytest.raises(RefreshFailed, match="is minted, not refreshed"):
        await world.endpoint.refresh(provider, "unused")


# -- jti, replay, the issuer's refusals -----------------------------------------------------


async def test_jti_is_fresh_every_mint_and_a_repeat_is_refused(world: World) -> None:
    """Five mints are five jti values (all accepted); a random source that repeats is caught by the issuer."""
    write_private(world.dir / "sa.pem", pem(ED_KEY))
    world.issuers.register_assertion_issuer("ed@example", ED_KEY.public_key())
    toml = (
        '[providers.p]\ngrant = "jwt-bearer"\ntoken_url = "{base}/token"\n'
        'private_key = "{dir}/sa.pem"\nissuer = "ed@example"\n'
    )
    provider = world.provider(toml)
    for _ in range(5):
        await world.endpoint.mint(provider)
    assert world.issuers.mint_count == 5

    stuck = HttpTokenEndpoint(random=lambda n: b"\x00" * n)
    try:
        await stuck.mint(provider)
        with pytest.raises(MintFailed) as info:
            await stuck.mint(provider)
    finally:
        await stuck.aclose()
    assert info.value.cause == "refused"
    assert "jti was used before" in str(info.value)


async def test_an_unregistered_key_is_refused_with_the_issuers_words(world: World) -> None:
    write_private(world.dir / "sa.pem", pem(RSA_KEY))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    world.issuers.register_assertion_issuer("agent@example", other.public_key())
    provider = world.provider(
        '[providers.p]\ngrant = "jwt-bearer"\ntoken_url = "{base}/token"\n'
        'private_key = "{dir}/sa.pem"\nissuer = "agent@example"\n'
    )
    with pytest.raises(MintFailed) as info:
        await world.endpoint.mint(provider)
    assert info.value.cause == "refused"
    message = str(info.value)
    assert "HTTP 400, error invalid_grant" in message
    assert "signature does not verify" in message
    assert "public key registered" in message
    assert_secret_free(everything_said(info.value), RSA_KEY)


async def test_a_wrong_client_secret_never_shows(world: World) -> None:
    world.issuers.register_client("m2m", secret="the-right-one")
    provider = world.provider(
        '[providers.p]\ngrant = "client_credentials"\ntoken_url = "{base}/token"\n'
        f'client_id = "m2m"\nclient_secret = "{CLIENT_SECRET}"\n'
    )
    with pytest.raises(MintFailed) as info:
        await world.endpoint.mint(provider)
    assert info.value.cause == "refused"
    assert "HTTP 401, error invalid_client" in str(info.value)
    assert_secret_free(everything_said(info.value))
    assert_secret_free(repr(provider))


async def test_a_clock_skew_is_named(nursery: trio.Nursery, tmp_path: Path) -> None:
    """An issuer 10 minutes ahead refuses the assertion as expired, and its Date names the skew."""
    issuers = devidp.DevIssuers(clock=lambda: time.time() + 600)
    issuers.register_assertion_issuer("agent@example", RSA_KEY.public_key())
    token_url = await nursery.start(partial(devidp.serve, devidp.DevIdP(), issuers=issuers))
    write_private(tmp_path / "sa.pem", pem(RSA_KEY))
    provider = parse(
        f'[providers.p]\ngrant = "jwt-bearer"\ntoken_url = "{token_url}"\n'
        f'private_key = "{tmp_path}/sa.pem"\nissuer = "agent@example"\n',
        tmp_path / "config.toml",
    ).providers["p"]
    endpoint = HttpTokenEndpoint()
    try:
        with pytest.raises(MintFailed) as info:
            await endpoint.mint(provider)
    finally:
        await endpoint.aclose()
    assert info.value.cause == "clock_skew"
    assert "behind" in str(info.value)
    assert "NTP" in str(info.value)


async def test_issuer_trouble_is_transient(world: World, nursery: trio.Nursery) -> None:
    """A 500, or an issuer that is not there, is worth trying again."""
    write_private(world.dir / "sa.pem", pem(RSA_KEY))
    world.issuers.register_assertion_issuer("agent@example", RSA_KEY.public_key())
    toml = (
        '[providers.p]\ngrant = "jwt-bearer"\ntoken_url = "{base}/token"\n'
        'private_key = "{dir}/sa.pem"\nissuer = "agent@example"\n'
    )
    world.issuers.fail_next(500)
    with pytest.raises(MintFailed) as info:
        await world.endpoint.mint(world.provider(toml))
    assert info.value.cause == "transient"
    assert "HTTP 500" in str(info.value)
    await world.endpoint.mint(world.provider(toml))  # the next one works

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there now
    unreachable = toml.replace("{base}", f"http://127.0.0.1:{port}")
    with pytest.raises(MintFailed) as info:
        await world.endpoint.mint(world.provider(unreachable))
    assert info.value.cause == "transient"
    assert "ConnectError" in str(info.value)


# -- key files --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
async def test_a_key_file_others_can_read_is_refused(world: World, mode: int) -> None:
    path = write_private(world.dir / "sa.pem", pem(RSA_KEY), mode)
    provider = world.provider(
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/sa.pem"\nissuer = "i"\n'
    )
    with pytest.raises(MintFailed) as info:
        await world.endpoint.mint(provider)
    assert info.value.cause == "key"
    assert str(info.value) == (
        f"private_key {path} has mode {mode:04o}: group or others may read or change it; "
        f"make it private with: chmod 600 {path}"
    )
    path.chmod(0o400)  # 0400 is stricter than 0600: fine
    assert (await world.endpoint.mint(provider))["access_token"].count(".") == 2


async def test_a_key_file_of_another_user_is_refused(world: World) -> None:
    path = write_private(world.dir / "sa.pem", pem(RSA_KEY))
    provider = world.provider(
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/sa.pem"\nissuer = "i"\n'
    )
    # The file is ours; a daemon running as someone else must refuse it.
    endpoint = HttpTokenEndpoint(signing_keys=SigningKeys(uid=os.getuid() + 1))
    try:
        with pytest.raises(MintFailed, match=f"is owned by uid {os.getuid()}, not by this user"):
            await endpoint.mint(provider)
    finally:
        await endpoint.aclose()
    assert path.exists()


@pytest.mark.parametrize("kind", ["directory", "fifo", "missing"])
async def test_a_key_path_that_is_no_regular_file_is_refused(world: World, kind: str) -> None:
    path = world.dir / "sa.pem"
    if kind == "directory":
        path.mkdir(mode=0o700)
        expected = "is not a regular file"
    elif kind == "fifo":
        os.mkfifo(path, 0o600)  # opening it must not wait for a writer
        expected = "is not a regular file"
    else:
        expected = "No such file or directory"
    provider = world.provider(
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/sa.pem"\nissuer = "i"\n'
    )
    with trio.fail_after(5), pytest.raises(MintFailed, match=expected) as info:
        await world.endpoint.mint(provider)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a key at all", "is not a PEM file"),
        (
            b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
            "cannot be read as an OpenSSH private key",
        ),
        (
            b'{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----"}',
            "is a JSON file: a Google service-account key goes in key_file",
        ),
        (
            RSA_KEY.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "cannot be read as a PEM private key (or it is a public key)",
        ),
    ],
)
async def test_a_file_that_is_not_a_private_key(
    world: World, content: bytes, expected: str
) -> None:
    write_private(world.dir / "sa.pem", content)
    provider = world.provider(
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/sa.pem"\nissuer = "i"\n'
    )
    with pytest.raises(MintFailed) as info:
        await world.endpoint.mint(provider)
    assert expected in str(info.value)


async def test_an_openssh_ed25519_key_as_ssh_keygen_writes_it_signs(world: World) -> None:
    """ssh-keygen's default format (OpenSSH, here Ed25519) is read as it is: no conversion asked."""
    openssh = ED_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    write_private(world.dir / "id_ed25519", openssh)
    world.issuers.register_assertion_issuer("agent@example", ED_KEY.public_key())
    provider = world.provider(
        '[providers.p]\ngrant = "jwt-bearer"\ntoken_url = "{base}/token"\n'
        'private_key = "{dir}/id_ed25519"\nissuer = "agent@example"\n'
    )
    assert (await world.endpoint.mint(provider))["access_token"].startswith("devst-")


async def test_an_openssh_key_with_a_passphrase_says_how_to_use_it(world: World) -> None:
    """An encrypted OpenSSH key cannot be decrypted here: the message says what to do instead."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen (openssh-client) is not installed")
    path = world.dir / "id_ed25519"
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", PASSPHRASE, "-f", str(path)]
    subprocess.run(keygen, check=True, capture_output=True)
    write_private(world.dir / "pass", PASSPHRASE + "\n")
    provider = world.provider(
        '[providers.p]\ngrant = "jwt-bearer"\ntoken_url = "{base}/token"\n'
        'private_key = "{dir}/id_ed25519"\npassphrase_file = "{dir}/pass"\n'
        'issuer = "agent@example"\n'
    )
    with pytest.raises(MintFailed) as info:
        await world.endpoint.mint(provider)
    assert f"remove the passphrase (ssh-keygen -p -N '' -f {path}" in str(info.value)
    assert PASSPHRASE not in str(info.value)


# -- encrypted keys ---------------------------------------------------------------------------


def _counting_command(dir: Path, output: str, status: int = 0, sleep: float = 0) -> str:
    """A passphrase_command (TOML array) that counts its runs in dir/runs and prints *output*."""
    script = dir / "pass.py"
    script.write_text(
        "import pathlib, sys, time\n"
        f"p = pathlib.Path({str(dir / 'runs')!r})\n"
        "p.write_text(str(int(p.read_text() or 0) + 1) if p.exists() else '1')\n"
        f"time.sleep({sleep})\n"
        f"sys.stdout.write({output!r})\n"
        f"sys.exit({status})\n"
    )
    return json.dumps([sys.executable, str(script)])


def _runs(dir: Path) -> int:
    runs = dir / "runs"
    return int(runs.read_text()) if runs.exists() else 0


@pytest.mark.parametrize("traditional", [False, True])
async def test_encrypted_pem_with_a_passphrase_file(world: World, traditional: bool) -> None:
    """PKCS#8 'ENCRYPTED PRIVATE KEY' and OpenSSL's traditional 'Proc-Type: 4,ENCRYPTED' both open."""
    write_private(world.dir / "sa.pem", pem(RSA_KEY, PASSPHRASE, traditional=traditional))
    write_private(world.dir / "pass", PASSPHRASE + "\n")
    world.issuers.register_assertion_issuer("agent@example", RSA_KEY.public_key())
    provider = world.provider(
        '[providers.p]\ngrant = "jwt-bearer"\ntoken_url = "{base}/token"\n'
        'private_key = "{dir}/sa.pem"\npassphrase_file = "{dir}/pass"\nissuer = "agent@example"\n'
    )
    assert (await world.endpoint.mint(provider))["access_token"].startswith("devst-")


async def test_a_passphrase_file_must_be_private_too(world: World) -> None:
    write_private(world.dir / "sa.pem", pem(RSA_KEY, PASSPHRASE))
    path = write_private(world.dir / "pass", PASSPHRASE, 0o644)
    provider = world.provider(
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/sa.pem"\n'
        'passphrase_file = "{dir}/pass"\nissuer = "i"\n'
    )
    with pytest.raises(MintFailed, match=f"passphrase_file {path} has mode 0644") as info:
        await world.endpoint.mint(provider)
    assert_secret_free(everything_said(info.value), RSA_KEY)


async def test_passphrase_command_runs_once_per_key_file(world: World) -> None:
    """Run without a shell; its output is the passphrase; cached until the key file changes."""
    path = write_private(world.dir / "sa.pem", pem(EC_KEY, PASSPHRASE))
    command = _counting_command(world.dir, PASSPHRASE + "\n")
    provider = world.provider(
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/sa.pem"\n'
        f'passphrase_command = {command}\nissuer = "i"\n'
    )
    for _ in range(3):
        await world.endpoint.mint(provider)
    assert _runs(world.dir) == 1
    # A new key in the same file is read (and decrypted) again.
    write_private(path, pem(EC_KEY, PASSPHRASE))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    await world.endpoint.mint(provider)
    assert _runs(world.dir) == 2


@pytest.mark.parametrize(
    ("output", "status", "sleep", "expected"),
    [
        (
            "wrong-CANARY-passphrase\n",
            0,
            0,
            "cannot be read as a PEM private key (or the passphrase is wrong)",
        ),
        (PASSPHRASE, 3, 0, "exited with status 3"),
        (PASSPHRASE, 0, 5, "did not finish within 0.5 s"),
        ("\n", 0, 0, "the passphrase for"),
    ],
)
async def test_passphrase_command_failures(
    world: World, output: str, status: int, sleep: float, expected: str
) -> None:
    write_private(world.dir / "sa.pem", pem(RSA_KEY, PASSPHRASE))
    command = _counting_command(world.dir, output, status, sleep)
    provider = world.provider(
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/sa.pem"\n'
        f'passphrase_command = {command}\nissuer = "i"\n'
    )
    endpoint = HttpTokenEndpoint(signing_keys=SigningKeys(command_timeout=0.5))
    try:
        with pytest.raises(MintFailed) as info:
            await endpoint.mint(provider)
    finally:
        await endpoint.aclose()
    assert info.value.cause == "key"
    assert expected in str(info.value)
    assert_secret_free(everything_said(info.value), RSA_KEY)


async def test_an_encrypted_key_without_a_passphrase_says_what_to_set(world: World) -> None:
    write_private(world.dir / "sa.pem", pem(RSA_KEY, PASSPHRASE))
    provider = world.provider(
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/sa.pem"\nissuer = "i"\n'
    )
    with pytest.raises(MintFailed, match="is encrypted: set passphrase_file or passphrase_command"):
        await world.endpoint.mint(provider)


async def test_a_missing_passphrase_command_is_named(world: World) -> None:
    write_private(world.dir / "sa.pem", pem(RSA_KEY, PASSPHRASE))
    provider = world.provider(
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/sa.pem"\n'
        'passphrase_command = ["/nonexistent/pass-CANARY"]\nissuer = "i"\n'
    )
    with pytest.raises(MintFailed, match="cannot run passphrase_command /nonexistent"):
        await world.endpoint.mint(provider)


# -- a key rotated in place, in the daemon ---------------------------------------------------


def _rotate_in_place(path: Path, private: Any) -> None:
    """Write *private* over the key file at *path*: the same inode, size and mtime (a key
    rotated within one tick of the file system's clock looks unchanged to a stat)."""
    before = path.stat()
    path.write_bytes(pem(private))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


async def test_a_key_rotated_in_place_signs_the_next_token_after_a_reload_and_after_a_restart(
    nursery: trio.Nursery, dirs: Dirs, no_secrets_in_logs: list[dict[str, Any]]
) -> None:
    """A jwt-bearer key file replaced in place (same path, a new key; the issuer now knows only the new one): after `credproxy reload` the sandbox gets a token minted with the new key, not the revoked key's, and so after a restart that follows another rotation."""
    issuers = devidp.DevIssuers()
    token_url = await nursery.start(partial(devidp.serve, devidp.DevIdP(), issuers=issuers))
    key = write_private(dirs.root / "sa.pem", pem(EC_KEY))
    dirs.config.write_text(
        f'[providers.sa]\ngrant = "jwt-bearer"\ntoken_url = "{token_url}"\n'
        f'private_key = "{key}"\nissuer = "agent@example.iam"\n'
    )
    issuers.register_assertion_issuer("agent@example.iam", EC_KEY.public_key())
    store = TokenStore(dirs.state)

    async def token(daemon: Daemon) -> str:
        session = await daemon.open_session(Grants.parse(["sa"]), frozenset(), "test", None, None)
        peer = await Peer.connect(session.socket_path)
        try:
            assert (await peer.handshake())["ok"] is True
            reply = await peer.call("get_token", {"provider": "sa"})
        finally:
            peer.close()
        assert reply["ok"] is True, reply
        assert "minted_with" not in reply["data"]
        access_token: str = reply["data"]["access_token"]
        return access_token

    def rotate() -> None:
        new = ec.generate_private_key(ec.SECP256R1())
        _rotate_in_place(key, new)
        issuers.register_assertion_issuer("agent@example.iam", new.public_key())  # the old: revoked

    endpoint = HttpTokenEndpoint(timeout=10, signing_store=store.signing_dir)

    def start(nursery: trio.Nursery) -> Awaitable[Daemon]:
        return serve_config_file(nursery, dirs, endpoint, store=store)

    try:
        async with trio.open_nursery() as first:
            daemon = await start(first)
            old = await token(daemon)
            assert await token(daemon) == old and issuers.mint_count == 1
            rotate()
            done = await trio.to_thread.run_sync(partial(cli, dirs, "reload"))
            assert done.returncode == 0, done.stderr
            rotated = await token(daemon)
            assert rotated != old and issuers.mint_count == 2 and issuers.refusals == []
            assert store.read("sa", "default")["access_token"] == rotated
            daemon.stop()
        rotate()  # while the daemon is stopped; it starts again with the same config
        async with trio.open_nursery() as second:
            daemon = await start(second)
            restarted = await token(daemon)
            assert restarted != rotated and issuers.mint_count == 3 and issuers.refusals == []
            daemon.stop()
    finally:
        await endpoint.aclose()
    said = repr(no_secrets_in_logs)
    assert store.read("sa", "default")["minted_with"] not in said  # never logged


# -- canaries across every failure -----------------------------------------------------------


async def test_no_failure_says_a_secret(world: World) -> None:
    """Every failure above, gathered: message, repr and traceback carry no PEM line, passphrase or secret."""
    write_private(world.dir / "enc.pem", pem(RSA_KEY, PASSPHRASE))
    write_private(world.dir / "open.pem", pem(RSA_KEY), 0o644)
    write_private(world.dir / "pass", "not-it\n")
    write_private(world.dir / "sec", CLIENT_SECRET)
    world.issuers.register_client("m2m", secret="other")
    tables = [
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/open.pem"\nissuer = "i"\n',
        '[providers.p]\ngrant = "signed-jwt"\nprivate_key = "{dir}/enc.pem"\n'
        'passphrase_file = "{dir}/pass"\nissuer = "i"\n',
        '[providers.p]\ngrant = "client_credentials"\ntoken_url = "{base}/token"\n'
        'client_id = "m2m"\nclient_secret_file = "{dir}/sec"\n',
        '[providers.p]\ngrant = "jwt-bearer"\ntoken_url = "{base}/token"\n'
        'private_key = "{dir}/enc.pem"\npassphrase_command = ["sh", "-c", "echo '
        + PASSPHRASE
        + '"]\nissuer = "nobody"\n',
    ]
    said: list[str] = []
    for table in tables:
        with pytest.raises(MintFailed) as info:
            await world.endpoint.mint(world.provider(table))
        said.append(everything_said(info.value))
    assert len(said) == 4
    assert_secret_free("\n".join(said), RSA_KEY)
    assert_secret_free("\n".join(world.issuers.events + world.issuers.refusals))
