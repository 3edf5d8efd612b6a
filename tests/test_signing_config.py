"""The signing grants' config: each mistake is refused naming the file, the line and the key at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Dirs, cli
from credproxy.core.config import parse
from credproxy.errors import ConfigError

PATH = Path("config.toml")


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, PATH)
    return str(info.value)


GH = '[providers.gh]\ngrant = "github-app"\napp_id = 1\ninstallation_id = 2\nprivate_key = "k"\n'
CC = '[providers.m]\ngrant = "client_credentials"\ntoken_url = "https://a/t"\nclient_id = "c"\n'


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        (
            '[providers.gh]\ngrant = "github-app"\napp_id = 1\ninstallation_id = 2\n',
            "config.toml:1: field providers.gh:",
            "missing required field `private_key`: grant 'github-app' needs",
        ),
        (
            '[providers.gh]\ngrant = "github-app"\nprivate_key = "k"\ninstallation_id = 2\n',
            "config.toml:1: field providers.gh:",
            "missing required field `app_id`",
        ),
        (
            CC,
            "config.toml:1: field providers.m:",
            "needs exactly one of client_secret, client_secret_file and private_key (got none)",
        ),
        (
            CC + 'client_secret = "CANARY-s"\nprivate_key = "k"\n',
            "config.toml:1: field providers.m:",
            "(got client_secret, private_key)",
        ),
        (
            CC + 'client_secret_file = "s"\naudience = "x"\n',
            "config.toml:6: field providers.m.audience:",
            "audience is used only with private_key (private_key_jwt)",
        ),
        (
            '[providers.s]\ngrant = "signed-jwt"\nprivate_key = "k"\nissuer = "i"\nlifetime = 3601\n',
            "config.toml:5: field providers.s.lifetime:",
            "lifetime must be from 120 to 3600 seconds (got 3601)",
        ),
        (
            '[providers.s]\ngrant = "signed-jwt"\nprivate_key = "k"\nissuer = "i"\nlifetime = 0\n',
            "config.toml:5: field providers.s.lifetime:",
            "lifetime must be from 120 to 3600",
        ),
        (
            '[providers.s]\ngrant = "signed-jwt"\nprivate_key = "k"\n',
            "config.toml:1: field providers.s:",
            "missing required field `issuer`",
        ),
        (
            '[providers.s]\ngrant = "signed-jwt"\nprivate_key = "k"\nissuer = "{user}.x"\n',
            "config.toml:4: field providers.s.issuer:",
            "placeholder",
        ),
        (
            '[providers.s]\ngrant = "jwt-bearer"\ntoken_url = "https://a/t"\nprivate_key = "k"\n'
            'key_file = "j"\n',
            "config.toml:1: field providers.s:",
            "exactly one of private_key and key_file",
        ),
        (
            '[providers.s]\ngrant = "jwt-bearer"\nprivate_key = "k"\nissuer = "i"\n',
            "config.toml:1: field providers.s:",
            "missing required field `token_url`",
        ),
        (
            '[providers.s]\ngrant = "jwt-bearer"\nkey_file = "j"\npassphrase_file = "p"\n',
            "config.toml:4: field providers.s.passphrase_file:",
            "a key_file's key is not encrypted",
        ),
        (
            '[providers.s]\ngrant = "signed-jwt"\nprivate_key = "k"\nissuer = "i"\n'
            'passphrase_file = "p"\npassphrase_command = ["pass", "x"]\n',
            "config.toml:6: field providers.s.passphrase_command:",
            "not both",
        ),
        (
            '[providers.s]\ngrant = "signed-jwt"\nprivate_key = "k"\nissuer = "i"\n'
            "passphrase_command = []\n",
            "config.toml:5: field providers.s.passphrase_command:",
            "must name a program",
        ),
        (
            '[providers.r]\ntoken_url = "https://a/t"\nclient_id = "c"\nprivate_key = "k"\n',
            "config.toml:4: field providers.r.private_key:",
            "private_key is not used by grant 'refresh_token' (only by: client_credentials, "
            "github-app, jwt-bearer, signed-jwt)",
        ),
        (
            GH + 'token_url = "https://a/t"\n',
            "config.toml:6: field providers.gh.token_url:",
            "token_url is not used by grant 'github-app'",
        ),
        (
            GH + "scope_in_assertion = true\n",
            "config.toml:6: field providers.gh.scope_in_assertion:",
            "not used by grant 'github-app'",
        ),
        (
            GH + 'api_url = "http://ghe.example/api/v3"\n',
            "config.toml:6: field providers.gh.api_url:",
            "must be an https:// URL",
        ),
        (
            GH.replace("installation_id = 2", "installation_id = 0"),
            "config.toml:4: field providers.gh.installation_id:",
            "must be a positive number",
        ),
        (
            GH + '\n[providers.gh.narrow.ro]\nrepositories = ["octo/alpha"]\n',
            "config.toml:8: field providers.gh.narrow.ro.repositories:",
            "names without the owner (got 'octo/alpha')",
        ),
        (
            GH + '\n[providers.gh.narrow.ro]\npermissions = { contents = "push" }\n',
            "config.toml:8: field providers.gh.narrow.ro.permissions:",
            "Invalid enum value 'push'",
        ),
        (
            GH + "\n[providers.gh.narrow.ro]\n",
            "config.toml:7: field providers.gh.narrow.ro:",
            "narrows nothing",
        ),
        (
            GH + '\n[providers.gh.narrow."a/b"]\npermissions = { contents = "read" }\n',
            "config.toml:7: field providers.gh.narrow.a/b:",
            "bucket name 'a/b' must be",
        ),
        (
            GH + '\n[providers.gh.narrow.ro]\nrepos = ["a"]\n',
            "config.toml:8: field providers.gh.narrow.ro.repos:",
            "unknown field",
        ),
        (
            CC + "client_secret = 3\n",
            "config.toml:5: field providers.m.client_secret:",
            "Expected `str`",
        ),
    ],
)
def test_signing_config_mistakes_name_the_key(text: str, where: str, says: str) -> None:
    message = error(text)
    assert message.startswith(where), message
    assert says in message
    assert "CANARY" not in message


def test_good_signing_configs_load() -> None:
    text = (
        GH + '\n[providers.gh.narrow.readonly]\nrepositories = ["alpha"]\nrepository_ids = [3]\n'
        'permissions = { contents = "read" }\n'
        '\n[providers.sa]\ngrant = "jwt-bearer"\nkey_file = "~/sa.json"\n'
        '\n[providers.m]\ngrant = "client_credentials"\ntoken_url = "https://a/t"\n'
        'client_id = "c"\nprivate_key = "k"\npassphrase_command = ["pass", "show", "k"]\n'
        'audience = "https://a"\nkey_id = "kid"\n'
        '\n[providers.sf]\npreset = "snowflake"\nsubject = "ACME.ALICE"\nprivate_key = "k"\n'
        '\n[providers.legacy]\ntoken_url = "https://a/t"\nclient_id = "c"\n'
    )
    cfg = parse(text, PATH)
    gh = cfg.providers["gh"]
    assert gh.narrow["readonly"].permissions == {"contents": "read"}
    assert gh.api_url is None  # the default, https://api.github.com, is applied when minting
    assert cfg.providers["sa"].token_url == ""  # taken from the key file's token_uri
    assert cfg.providers["sf"].issuer == "{subject}.{key_fingerprint}"
    assert cfg.providers["legacy"].grant == "refresh_token"


def test_the_client_secret_is_hidden_in_the_parsed_config() -> None:
    cfg = parse(CC + 'client_secret = "CANARY-inline"\n', PATH)
    assert "CANARY" not in repr(cfg)
    secret = cfg.providers["m"].client_secret
    assert secret is not None and secret.reveal() == "CANARY-inline"


def test_login_to_a_minting_provider_says_there_is_nothing_to_log_in_to(dirs: Dirs) -> None:
    """`credproxy login` on a signing grant exits with one line, and stores nothing."""
    dirs.config.write_text(GH.replace('"k"', '"~/app.pem"'))
    proc = cli(dirs, "login", "gh", "--no-browser")
    assert proc.returncode != 0
    assert "grant 'github-app'" in proc.stderr
    assert "nothing to log in to" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (dirs.state / "tokens").exists() or not any((dirs.state / "tokens").iterdir())
