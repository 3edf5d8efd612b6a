"""Minted tokens served by the daemon: first serve mints, the fast path serves, renewal mints again.

Against the live in-process daemon with the development issuers on loopback
(which verify every JWT they receive: signature, ``aud``, ``iss``, ``exp``,
``jti`` never reused). What a sandbox and a person can observe is checked: the
tokens served, what the issuer saw, what the API upstream received, the
errors and the log (never the key).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from test_proxy import HttpClient, Upstream, answer, upstream  # noqa: F401
from test_renewal import _writer_of
from test_signing import pem, write_private

from conftest import CREDPROXY, Dirs, Harness, StartDaemon
from credproxy.core.config import Narrowing
from credproxy.core.grantcheck import grant_problems
from credproxy.core.grants import Grants
from credproxy.devidp import DevIssuers

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
HOUR = 3600


def _pem(private: Any) -> bytes:
    return private.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_lines(private: Any) -> list[str]:
    return [line for line in _pem(private).decode().splitlines() if not line.startswith("-----")]


def _key_file(dirs_root: Path, name: str, private: Any) -> str:
    path = dirs_root / name
    path.write_bytes(_pem(private))
    path.chmod(0o600)
    return str(path)


def _github(key_path: str, api_url: str | None = None) -> dict[str, Any]:
    """A GitHub App provider at the development issuers: a read-only and a push bucket."""
    table: dict[str, Any] = {
        "grant": "github-app",
        "app_id": 42,
        "installation_id": 7,
        "private_key": key_path,
        "api_url": "{idp}",
        "narrow": {
            "readonly": {"repositories": ["alpha"], "permissions": {"contents": "read"}},
            "push": {"repositories": ["alpha"], "permissions": {"contents": "write"}},
        },
    }
    if api_url is not None:
        table["api"] = {"base_url": api_url, "headers": {"Authorization": "token {access_token}"}}
    return table


async def _github_daemon(
    start_daemon: StartDaemon, tmp_path: Path, api_url: str | None = None, **sections: Any
) -> Harness:
    """A daemon whose provider ``gh`` is a GitHub App, installed with repositories alpha and beta."""
    key = _key_file(tmp_path, "app.pem", RSA_KEY)
    h = await start_daemon(issuers=True, providers={"gh": _github(key, api_url)}, **sections)
    issuers = _issuers(h)
    issuers.register_app(42, RSA_KEY.public_key())
    issuers.add_installation(
        7, 42, repositories={"alpha": 1, "beta": 2}, permissions={"contents": "write"}
    )
    return h


def _issuers(h: Harness) -> DevIssuers:
    assert h.issuers is not None
    return h.issuers


async def _token(h: Harness, session: Any, bucket: str | None = None) -> dict[str, Any]:
    p = await h.peer(session)
    payload = {"provider": "gh"} if bucket is None else {"provider": "gh", "bucket": bucket}
    reply = await p.call("get_token", payload)
    p.close()
    return reply


async def test_a_github_app_bucket_is_minted_on_first_serve_then_served_and_renewed(
    start_daemon: StartDaemon,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """No login: the first get_token mints (verified by the issuer), later ones are served from memory, renewal mints before expiry."""
    h = await _github_daemon(start_daemon, tmp_path)
    issuers = _issuers(h)
    s = await h.session("gh:readonly")
    first = await _token(h, s, "readonly")
    assert first["ok"] is True, first
    token = first["data"]
    assert "refresh_token" not in token
    assert issuers.mint_count == 1
    assert issuers.refusals == []
    # The token works for what the bucket allows, and nothing more.
    bearer = f"token {token['access_token']}"
    assert issuers.answer_github_request("GET", "/repos/dev-org/alpha", bearer)[0] == 200
    assert issuers.answer_github_request("PUT", "/repos/dev-org/alpha/contents/x", bearer)[0] == 403
    for _ in range(5):
        again = await _token(h, s, "readonly")
        assert again["data"]["access_token"] == token["access_token"]
    assert issuers.mint_count == 1  # served from memory
    # Stored like a refreshed login (so a restarted daemon serves it too), without a key in it.
    stored = h.store.read("gh", "readonly")
    assert stored is not None and stored["access_token"] == token["access_token"]
    # Renewal: before the hour is out the daemon mints again on its own. (The
    # key file is read in a worker thread, which virtual time does not wait
    # for: poll rather than sleep a fixed time.)
    with trio.fail_after(HOUR):
        while issuers.mint_count < 2:
            await trio.sleep(1)
    assert h.wall() < token["expiry"]  # renewed ahead of expiry
    renewed = await _token(h, s, "readonly")
    assert renewed["data"]["access_token"] != token["access_token"]
    minted = [e for e in no_secrets_in_logs if e["event"] == "token_minted"]
    assert [(e["bucket"], e["grant"], e["reason"]) for e in minted] == [
        ("readonly", "github-app", "first-serve"),
        ("readonly", "github-app", "proactive"),
    ]
    said = repr(no_secrets_in_logs)
    assert all(line not in said for line in _pem_lines(RSA_KEY))


async def test_a_read_only_sandbox_cannot_get_the_push_buckets_token(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """One App, two buckets: the read-only session gets NOT_FOUND for push; the push session's token can write."""
    h = await _github_daemon(start_daemon, tmp_path)
    issuers = _issuers(h)
    reader = await h.session("gh:readonly")
    pusher = await h.session("gh:push")
    refused = await _token(h, reader, "push")
    assert refused["ok"] is False and refused["code"] == "NOT_FOUND"
    assert issuers.mint_count == 0  # nothing minted for a request that is not granted
    push = (await _token(h, pusher, "push"))["data"]["access_token"]
    assert (
        issuers.answer_github_request("PUT", "/repos/dev-org/alpha/contents/x", f"token {push}")[0]
        == 200
    )
    read = (await _token(h, reader, "readonly"))["data"]["access_token"]
    assert read != push


async def test_the_api_proxy_sends_a_minted_token_and_mints_once_more_after_a_401(
    start_daemon: StartDaemon,
    tmp_path: Path,
    upstream: Upstream,  # noqa: F811
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A proxied request carries the App's installation token; a 401 (past the refresh cooldown) forces one new mint and one retry."""
    h = await _github_daemon(start_daemon, tmp_path, api_url=upstream.url)
    issuers = _issuers(h)
    s = await h.session("api:gh:push")
    client = await HttpClient.connect(s.socket_path)
    status, _headers, _body = await client.call("GET", "/gh:push/repos/dev-org/alpha")
    assert status == 200
    first = upstream.headers(0)["authorization"]
    assert first.startswith("token ghs_")
    assert issuers.mint_count == 1
    await trio.sleep(h.daemon.cfg.renewal.refresh_cooldown + 1)
    upstream.script = [answer(401)]  # the token was revoked early, say
    status, _headers, _body = await client.call("GET", "/gh:push/repos/dev-org/alpha")
    assert status == 200
    assert issuers.mint_count == 2
    assert upstream.headers(-2)["authorization"] == first
    assert upstream.headers(-1)["authorization"] != first
    await client.aclose()


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_jwt_bearer_and_client_credentials_are_served_to_a_sandbox(
    start_daemon: StartDaemon, tmp_path: Path, alg: str
) -> None:
    """A service account (JWT bearer), a machine client (private_key_jwt) and a key-pair JWT (signed-jwt): each sandbox token is one a resource server that verifies it takes."""
    private = RSA_KEY if alg == "RS256" else EC_KEY
    key = _key_file(tmp_path, "sa.pem", private)
    h = await start_daemon(
        issuers=True,
        providers={
            "sa": {
                "grant": "jwt-bearer",
                "token_url": "{idp}/token",
                "private_key": key,
                "issuer": "agent@example.iam",
                "scopes": ["read"],
            },
            "m2m": {
                "grant": "client_credentials",
                "token_url": "{idp}/token",
                "client_id": "m2m",
                "private_key": key,
            },
            "sf": {  # the JWT is the token (Snowflake's key-pair JWTs)
                "grant": "signed-jwt",
                "private_key": key,
                "issuer": "ACME.BOT",
                "subject": "ACME.BOT",
                "audience": "resource",
                "lifetime": 3600,
            },
        },
    )
    issuers = _issuers(h)
    issuers.register_assertion_issuer("agent@example.iam", private.public_key())
    issuers.register_client("m2m", public_key=private.public_key())
    issuers.register_signed_jwt(
        "ACME.BOT", private.public_key(), subject="ACME.BOT", audience="resource"
    )
    s = await h.session("sa", "m2m", "sf")
    p = await h.peer(s)
    for provider, sub in (("sa", "agent@example.iam"), ("m2m", "m2m"), ("sf", "ACME.BOT")):
        reply = await p.call("get_token", {"provider": provider})
        assert reply["ok"] is True, reply
        status, claims = issuers.answer_resource(f"Bearer {reply['data']['access_token']}")
        assert status == 200 and claims["sub"] == sub
    assert issuers.refusals == []


async def test_a_key_the_issuer_refuses_says_why_and_the_host_is_told_at_the_third_failure(
    start_daemon: StartDaemon,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """An App the issuer does not know: get_token answers REFRESH_FAILED with the issuer's reason (never the key); within the cooldown the issuer is not asked again; the third failure is one mint_failing line."""
    h = await _github_daemon(start_daemon, tmp_path)
    issuers = _issuers(h)
    issuers.register_app(42, EC_KEY.public_key())  # not the key the config names
    s = await h.session("gh:readonly")
    p = await h.peer(s)
    replies = []
    for _ in range(3):
        replies.append(await p.call("get_token", {"provider": "gh", "bucket": "readonly"}))
        await trio.sleep(h.daemon.cfg.renewal.refresh_cooldown + 1)
    within = await p.call("get_token", {"provider": "gh", "bucket": "readonly"})
    asked = len(issuers.refusals)
    again = await p.call("get_token", {"provider": "gh", "bucket": "readonly"})
    assert len(issuers.refusals) == asked  # inside the cooldown: not asked again
    for reply in [*replies, within, again]:
        assert reply["ok"] is False and reply["code"] == "REFRESH_FAILED", reply
    assert "401" in replies[0]["error"] or "refused" in replies[0]["error"], replies[0]
    told = [e for e in no_secrets_in_logs if e["event"] == "mint_failing"]
    assert len(told) == 1 and told[0]["failures"] == 3 and told[0]["bucket"] == "readonly"
    # status names the key (nothing is stored yet), its grant and narrowing, and why it fails.
    (row,) = [
        t
        for t in (await h.daemon.status())["tokens"]
        if (t["provider"], t["bucket"]) == ("gh", "readonly")
    ]
    assert row["grant"] == "github-app"
    assert row["narrow"] == {
        "repositories": ["alpha"],
        "repository_ids": [],
        "permissions": {"contents": "read"},
    }
    assert row["failures"] >= 3 and row["last_error"] == told[0]["error"]
    assert "expiry" not in row
    said = repr(no_secrets_in_logs) + json.dumps([*replies, within, again])
    assert all(line not in said for line in _pem_lines(RSA_KEY))
    # The key is put right: the next get_token after the cooldown mints.
    issuers.register_app(42, RSA_KEY.public_key())
    await trio.sleep(h.daemon.cfg.renewal.refresh_cooldown + 1)
    fixed = await p.call("get_token", {"provider": "gh", "bucket": "readonly"})
    assert fixed["ok"] is True, fixed


async def test_a_private_key_imported_into_the_store_signs_without_a_file_of_its_own(
    start_daemon: StartDaemon, tmp_path: Path, dirs: Dirs
) -> None:
    """private_key = "store:NAME": the key kept in the daemon's store (0600, under signing/, apart from the API keys a sandbox may be granted) mints the App's tokens."""
    from credproxy.shell.store import TokenStore

    store = TokenStore(dirs.state)
    store.write_signing_key("app", _pem(RSA_KEY))
    path = store.signing_key_path("app")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert "app" not in store.key_names()  # not an API key: no grant can name it
    table = _github("store:app")
    h = await start_daemon(issuers=True, providers={"gh": table})
    issuers = _issuers(h)
    issuers.register_app(42, RSA_KEY.public_key())
    issuers.add_installation(
        7, 42, repositories={"alpha": 1, "beta": 2}, permissions={"contents": "write"}
    )
    s = await h.session("gh:push", "gh:readonly", "key:app")
    reply = await _token(h, s, "push")
    assert reply["ok"] is True, reply
    p = await h.peer(s)
    leaked = await p.call("get_api_key", {"name": "app"})
    assert leaked["ok"] is False and leaked["code"] == "NOT_FOUND"
    # A name that is not stored says so, naming the store and never a key.
    h.daemon.cfg.providers["gh"] = msgspec.structs.replace(
        h.daemon.cfg.providers["gh"], private_key="store:missing"
    )
    h.daemon.tokens.cfg = h.daemon.cfg
    h.daemon.tokens.refresher.cfg = h.daemon.cfg
    other = await _token(h, s, "readonly")
    assert other["ok"] is False and "missing" in other["error"], other


def test_signing_key_import_keeps_a_private_copy_and_refuses_what_is_not_a_key(
    dirs: Dirs, tmp_path: Path
) -> None:
    """`credproxy signing-key import NAME FILE` checks the file is a key, stores it 0600 under signing/, says how to name it; list and rm; a non-key is refused without quoting it."""
    from conftest import cli

    key_file = tmp_path / "app.pem"
    key_file.write_bytes(_pem(EC_KEY))
    key_file.chmod(0o644)  # imported all the same, with a warning
    done = cli(dirs, "signing-key", "import", "app", str(key_file))
    assert done.returncode == 0, done.stderr
    assert "ES256" in done.stdout and 'private_key = "store:app"' in done.stdout
    assert "readable by others" in done.stderr
    stored = dirs.state / "signing" / "app"
    assert stored.read_bytes() == _pem(EC_KEY)
    assert oct(stored.stat().st_mode & 0o777) == "0o600"
    assert cli(dirs, "signing-key", "list").stdout.split() == ["app"]
    assert cli(dirs, "key", "rm", "app").returncode == 3  # not an API key

    junk = tmp_path / "notes.txt"
    junk.write_text("CANARY-not-a-key\n")
    refused = cli(dirs, "signing-key", "import", "bad", str(junk))
    assert refused.returncode != 0
    assert "not a PEM file" in refused.stderr and "CANARY" not in refused.stderr
    said = done.stdout + done.stderr + refused.stdout + refused.stderr
    assert all(line not in said for line in _pem_lines(EC_KEY))
    assert cli(dirs, "signing-key", "import", "gone", str(tmp_path / "nope")).returncode == 3
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (1 << 20))
    too_big = cli(dirs, "signing-key", "import", "big", str(big))
    assert too_big.returncode == 2 and "larger than" in too_big.stderr
    # From a pipe, as `credproxy signing-key import piped <(pass show app-key)` gives it.
    piped = subprocess.run(
        ["bash", "-c", f'"{CREDPROXY}" signing-key import piped <(cat "{key_file}")'],
        capture_output=True,
        text=True,
        env=dirs.env(),
        check=False,
        timeout=30,
    )
    assert piped.returncode == 0, piped.stderr
    assert (dirs.state / "signing" / "piped").read_bytes() == _pem(EC_KEY)

    assert cli(dirs, "signing-key", "rm", "app").returncode == 0
    assert not stored.exists()
    assert cli(dirs, "signing-key", "rm", "app").returncode == 3


async def test_a_bucket_the_configuration_does_not_name_is_never_minted(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A grant with a typo (gh:readonyl) gets NOT_FOUND, not the installation's whole token, and is warned about; 40 made-up buckets asked by a sandbox granted gh mint nothing and store nothing."""
    h = await _github_daemon(start_daemon, tmp_path)
    issuers = _issuers(h)
    typo = await _token(h, await h.session("gh:readonyl"), "readonyl")
    assert (typo["ok"], typo["code"]) == (False, "NOT_FOUND")
    (warned,) = grant_problems(
        Grants.parse(["gh:readonyl"]), h.daemon.cfg.providers, [], None, "config.toml"
    )
    assert warned.cause == "unknown_bucket"
    assert "gh mints no bucket readonyl (it mints: default, push, readonly)" in warned.line()
    p = await h.peer(await h.session("gh"))
    for i in range(40):
        reply = await p.call("get_token", {"provider": "gh", "bucket": f"made-up-{i}"})
        assert (reply["ok"], reply["code"]) == (False, "NOT_FOUND")
    assert issuers.mint_count == 0
    assert h.store.buckets("gh") == []
    assert (await p.call("get_token", {"provider": "gh", "bucket": "readonly"}))["ok"]
    assert issuers.mint_count == 1


async def test_a_narrowing_taken_back_by_a_reload_or_a_restart_is_not_served_again(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """Bucket push narrowed from contents:write to contents:read: after the reload the sandbox gets a new, read-only token, and a daemon started afresh with that config does not serve the stored write token either."""
    h = await _github_daemon(start_daemon, tmp_path)
    issuers = _issuers(h)
    s = await h.session("gh:push")
    wide = (await _token(h, s, "push"))["data"]["access_token"]
    put = ("PUT", "/repos/dev-org/alpha/contents/x")
    assert issuers.answer_github_request(*put, f"token {wide}")[0] == 200
    cfg = h.daemon.cfg
    narrow = dict(cfg.providers["gh"].narrow)
    narrow["push"] = Narrowing(repositories=["alpha"], permissions={"contents": "read"})
    gh = msgspec.structs.replace(cfg.providers["gh"], narrow=narrow)
    await h.daemon._apply(  # (what `credproxy reload` does once the file is parsed)
        msgspec.structs.replace(cfg, providers={**cfg.providers, "gh": gh})
    )
    after = (await _token(h, s, "push"))["data"]["access_token"]
    assert after != wide
    assert issuers.answer_github_request(*put, f"token {after}")[0] == 403
    stored = h.store.read("gh", "push")
    assert (
        stored["access_token"] == after
        and "minted_with" not in (await _token(h, s, "push"))["data"]
    )
    # A daemon started with the old narrowing again finds the stored token minted
    # under another configuration, and mints anew.
    h.daemon.stop()
    h2 = await start_daemon(issuers=True, providers={"gh": _github(str(tmp_path / "app.pem"))})
    _issuers(h2).register_app(42, RSA_KEY.public_key())
    _issuers(h2).add_installation(
        7, 42, repositories={"alpha": 1, "beta": 2}, permissions={"contents": "write"}
    )
    again = (await _token(h2, await h2.session("gh:push"), "push"))["data"]["access_token"]
    assert again != after


class _GatedMint:
    """The daemon's own endpoint, whose mints wait for *gate* first (a slow issuer)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.gate = trio.Event()
        self.waiting = trio.Event()

    async def mint(self, provider: Any, bucket: str = "default", **kw: Any) -> dict[str, Any]:
        self.waiting.set()
        await self.gate.wait()
        return await self.real.mint(provider, bucket, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_mint_under_way_when_a_reload_narrows_its_bucket_is_minted_again(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """get_token of push waits for its first mint; a reload narrows push to contents:read meanwhile: what the sandbox gets cannot write."""
    h = await _github_daemon(start_daemon, tmp_path)
    issuers = _issuers(h)
    gated = _GatedMint(h.daemon.tokens.refresher.endpoint)
    h.daemon.tokens.refresher.endpoint = gated
    s = await h.session("gh:push")
    got: list[dict[str, Any]] = []

    async def ask() -> None:
        got.append(await _token(h, s, "push"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await gated.waiting.wait()
        cfg = h.daemon.cfg
        narrow = dict(cfg.providers["gh"].narrow)
        narrow["push"] = Narrowing(repositories=["alpha"], permissions={"contents": "read"})
        gh = msgspec.structs.replace(cfg.providers["gh"], narrow=narrow)
        await h.daemon._apply(msgspec.structs.replace(cfg, providers={**cfg.providers, "gh": gh}))
        gated.gate.set()  # the issuer answers after the reload
    ((reply),) = got
    token = reply["data"]["access_token"]
    put = ("PUT", "/repos/dev-org/alpha/contents/x")
    assert issuers.answer_github_request(*put, f"token {token}")[0] == 403


async def test_a_token_an_earlier_version_minted_for_a_made_up_bucket_is_not_served(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    """A whole-installation token stored for a made-up bucket (as an earlier version minted one for any name asked): that bucket answers NOT_FOUND, and nothing more is minted."""
    h = await _github_daemon(start_daemon, tmp_path, api_url="https://api.example")
    issuers = _issuers(h)
    wide = (await _token(h, await h.session("gh"), "default"))["data"]
    h.store.write("gh", "readonyl", {**wide, "expiry": h.wall() + 3000})
    reply = await _token(h, await h.session("gh:readonyl"), "readonyl")
    assert (reply["ok"], reply["code"]) == (False, "NOT_FOUND")
    assert issuers.mint_count == 1
    (warned,) = grant_problems(
        Grants.parse(["api:gh:readonyl"]), h.daemon.cfg.providers, [], None, "config.toml"
    )
    assert warned.cause == "unknown_bucket"


def test_a_header_template_cannot_name_what_a_minted_token_keeps_to_itself() -> None:
    """An api header naming {minted_with} or {refresh_token} is refused (502, no such field), on the trio path as on the relay's (which reads the token as served): the digest of what a token was minted from never goes upstream."""
    from credproxy.core.config import MINTED_WITH
    from credproxy.core.names import Key
    from credproxy.shell.proxy import HttpError, fill_headers, token_fields

    stored = {"access_token": "ghs_x", MINTED_WITH: "d" * 64, "refresh_token": "rt", "expiry": 9}
    fields = token_fields(stored)
    grants = Grants.parse(["api:gh"])
    for name in (MINTED_WITH, "refresh_token"):
        with pytest.raises(HttpError) as refused:
            fill_headers({"X-Field": f"{{{name}}}"}, fields, Key("gh"), grants, lambda _: None)
        assert refused.value.status == 502
        assert stored[name] not in str(refused.value)
    filled = fill_headers({"A": "token {access_token}"}, fields, Key("gh"), grants, lambda _: None)
    assert filled == {"A": "token ghs_x"}


async def test_a_clock_step_while_a_key_is_unlocked_does_not_move_the_minted_tokens_renewal(
    start_daemon: StartDaemon,
    tmp_path: Path,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """The host's clock, a minute ahead, is put right while the first mint waits for its key's passphrase (a passphrase_command reading a FIFO; trio's real clock, for the command's time limit): the JWT is dated after the step and taken, and the hour token's renewal is due 3240-3270 s after the mint (status), not a minute early."""
    key = write_private(tmp_path / "sa.pem", pem(RSA_KEY, "unlock-CANARY"))
    fifo = tmp_path / "passphrase"
    os.mkfifo(fifo, 0o600)
    h = await start_daemon(
        HOUR,
        issuers=True,
        limits={"idle_timeout": 1e9},
        providers={
            "sa": {
                "grant": "jwt-bearer",
                "token_url": "{idp}/token",
                "private_key": str(key),
                "passphrase_command": ["cat", str(fifo)],
                "issuer": "agent@example.iam",
            }
        },
    )
    _issuers(h).register_assertion_issuer("agent@example.iam", RSA_KEY.public_key())
    h.wall.step(60)  # the host is a minute ahead
    p = await h.peer(await h.session("sa"))
    await p.send({"v": 2, "id": "m", "op": "get_token", "payload": {"provider": "sa"}})
    fd = await _writer_of(fifo)  # the mint waits for the passphrase
    h.wall.step(-60)  # NTP puts the clock right
    os.write(fd, b"unlock-CANARY\n")
    os.close(fd)
    reply = await p.recv()
    assert reply is not None and reply["ok"] is True, reply
    assert _issuers(h).refusals == []
    # Due 3240-3270 s after the mint (lead 0.1 of an hour, jitter up to 30 s);
    # with the step counted, a minute sooner.
    (renewal,) = (await h.daemon.status())["sessions"][0]["renewals"]
    assert 3230 <= renewal["next_renewal_in"] <= 3270, renewal
    assert not [e for e in no_secrets_in_logs if e["event"] == "clock_step_during_refresh"]
