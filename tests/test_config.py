"""The configuration file: defaults, and errors that name the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Dirs, cli
from credproxy.errors import ConfigError
from credproxy.shell.paths import load_config

COMMENTED_EXAMPLE = """\
[providers.example]
token_url = "https://idp.example/oauth/token"
client_id = "abc"
client_secret_file = "~/.config/credproxy/example.secret"   # optional
scopes = ["read"]

[renewal]                     # optional overrides, all in seconds
min_lead = 300                # lead = max(min_lead, floor(remaining * lead_fraction))
lead_fraction = 0.1
max_jitter = 30
retry_base = 30
retry_cap = 1800
max_failures = 10
serve_margin = 60             # get_token refreshes first when less than this is left

[sandbox]
default_allow = []            # grants used by `credproxy run` when no --allow is given
"""

GOOD_PROVIDER = '[providers.ex]\ntoken_url = "https://idp.example/t"\nclient_id = "c"\n'


def error_of(tmp_path: Path, text: str) -> tuple[Path, str]:
    """Write *text* as a config file and return its path and the one-line error loading it gives."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    return path, message


def test_missing_file_means_the_documented_defaults(tmp_path: Path) -> None:
    """With no config file every setting has the default the README documents ("Use")."""
    cfg = load_config(tmp_path / "nonexistent" / "config.toml")
    assert cfg.providers == {}
    r = cfg.renewal
    assert (r.min_lead, r.lead_fraction, r.max_jitter) == (300, 0.1, 30)
    assert (r.retry_base, r.retry_cap, r.max_failures, r.serve_margin) == (30, 1800, 10, 60)
    assert cfg.sandbox.default_allow == []
    assert cfg.limits.max_in_flight == 16


def test_a_commented_example_loads(tmp_path: Path) -> None:
    """A config.toml with a provider, every [renewal] key, [sandbox] and comments is accepted as written."""
    path = tmp_path / "config.toml"
    path.write_text(COMMENTED_EXAMPLE)
    cfg = load_config(path)
    ex = cfg.providers["example"]
    assert (ex.token_url, ex.client_id, ex.scopes) == (
        "https://idp.example/oauth/token",
        "abc",
        ["read"],
    )
    assert ex.client_secret_file == "~/.config/credproxy/example.secret"


def test_wrong_type_names_file_line_and_field(tmp_path: Path) -> None:
    """A string where seconds are expected is reported at its line with its dotted field name."""
    path, msg = error_of(tmp_path, '# renewal\n[renewal]\nmax_jitter = 5\nmin_lead = "soon"\n')
    assert msg.startswith(f"{path}:4: field renewal.min_lead:")
    assert "str" in msg


def test_wrong_type_in_a_provider_names_the_provider(tmp_path: Path) -> None:
    """A bad value inside [providers.NAME] names that provider and the field."""
    path, msg = error_of(tmp_path, GOOD_PROVIDER.replace('"c"', '"c"\nscopes = "read"'))
    assert msg.startswith(f"{path}:4: field providers.ex.scopes:")


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ("[renewal]\nmin_lead = 5\nlead_fractoin = 0.2\n", 3, "renewal.lead_fractoin"),
        ("\n\nlogging = true\n", 3, "logging"),
        (GOOD_PROVIDER + 'client_secrt = "x"\n', 4, "providers.ex.client_secrt"),
        ("[sandbox]\ndefault_allow = []\nallow = []\n", 3, "sandbox.allow"),
    ],
    ids=["renewal", "top-level", "provider", "sandbox"],
)
def test_unknown_field_names_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str
) -> None:
    """A misspelt key is refused at its line, naming the full field."""
    path, msg = error_of(tmp_path, text)
    assert msg.startswith(f"{path}:{line}: field {field}:")
    assert "unknown field" in msg


@pytest.mark.parametrize("name", ["bad name", "a/b", "x" * 65, "ü"])
def test_bad_provider_name_names_its_table(tmp_path: Path, name: str) -> None:
    """A provider whose name breaks the name rule is refused at its [providers."..."] line."""
    path, msg = error_of(
        tmp_path, f'# c\n[providers."{name}"]\ntoken_url = "https://a/t"\nclient_id = "c"\n'
    )
    assert msg.startswith(f"{path}:2: field providers.{name}:")
    assert "provider name" in msg


def test_dot_dot_provider_name_is_refused(tmp_path: Path) -> None:
    """A provider named '..' (a path component, not a name) is refused, naming the file and the provider."""
    path, msg = error_of(tmp_path, '[providers.".."]\ntoken_url = "https://a/t"\nclient_id = "c"\n')
    assert msg.startswith(f"{path}")
    assert "provider name '..'" in msg


def test_error_under_a_provider_with_a_dotted_name_names_the_line(tmp_path: Path) -> None:
    """A bad field of provider "idp.example" (a valid name) is still reported at its line."""
    text = '\n[providers."idp.example"]\ntoken_url = "http://idp.example/t"\nclient_id = "c"\n'
    path, msg = error_of(tmp_path, text)
    assert msg.startswith(f"{path}:3: field providers.idp.example.token_url:")


@pytest.mark.parametrize(
    "url", ["http://idp.example/t", "ftp://idp.example/t", "idp.example/t", "http://10.0.0.1/t"]
)
def test_non_https_token_url_is_refused(tmp_path: Path, url: str) -> None:
    """A token_url that is not https (and not loopback http) is refused at its line."""
    path, msg = error_of(tmp_path, GOOD_PROVIDER.replace("https://idp.example/t", url))
    assert msg.startswith(f"{path}:2: field providers.ex.token_url:")
    assert "https" in msg


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("https://user:pw@api.example/v1", "may not carry a user, a query or a fragment"),
        ("https://api.example/v1?key=1", "may not carry a user, a query or a fragment"),
        ("https://api.example/v1#frag", "may not carry a user, a query or a fragment"),
        ("https://api.example:99999/v1", "invalid port"),
    ],
)
def test_an_api_base_url_with_a_user_query_fragment_or_bad_port_is_refused(
    tmp_path: Path, url: str, said: str
) -> None:
    """The API proxy puts each request's path and query after base_url: a base_url with a user, a query, a fragment or an impossible port is refused at its line, naming the field."""
    text = GOOD_PROVIDER + f'[providers.ex.api]\nbase_url = "{url}"\n'
    path, msg = error_of(tmp_path, text)
    assert msg.startswith(f"{path}:5: field providers.ex.api.base_url:"), msg
    assert said in msg


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ('redirect_uri = "http://[::1]:1234/cb"\n', "must name 127.0.0.1 or localhost"),
        ('redirect_uri = "http://127.0.0.1:1234/cb?tenant=x"\n', "may not carry a query"),
        (
            'redirect_uri = "http://127.0.0.1:1234/cb"\nredirect_port = 5678\n',
            "redirect_port 5678 differs from redirect_uri's port 1234",
        ),
    ],
)
def test_a_loopback_redirect_uri_the_login_could_not_serve_is_refused(
    tmp_path: Path, extra: str, said: str
) -> None:
    """A plain-http redirect_uri the login's listener (on 127.0.0.1, the URI's path, its port) could not answer as registered is refused at its line."""
    path, msg = error_of(tmp_path, GOOD_PROVIDER + extra)
    assert msg.startswith(f"{path}:4: field providers.ex.redirect_uri:"), msg
    assert said in msg


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/token", "http://localhost/token", "http://[::1]:9/token"]
)
def test_plain_http_is_allowed_for_loopback(tmp_path: Path, url: str) -> None:
    """A loopback token_url may use plain http (a local development IdP)."""
    path = tmp_path / "config.toml"
    path.write_text(GOOD_PROVIDER.replace("https://idp.example/t", url))
    assert load_config(path).providers["ex"].token_url == url


@pytest.mark.parametrize(
    "field", ["min_lead", "max_jitter", "retry_base", "retry_cap", "serve_margin"]
)
def test_negative_renewal_values_are_refused(tmp_path: Path, field: str) -> None:
    """A negative renewal duration is refused, naming its line and field."""
    path, msg = error_of(tmp_path, f"[renewal]\nmax_failures = 3\n{field} = -1\n")
    assert msg.startswith(f"{path}:3: field renewal.{field}:")
    assert "(got -1.0)" in msg


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("[renewal]\nlead_fraction = 1.5\n", "renewal.lead_fraction"),
        ("[renewal]\nmax_failures = 0\n", "renewal.max_failures"),
        ("[renewal]\nretry_base = 60\nretry_cap = 10\n", "renewal.retry_cap"),
        ("[limits]\nmax_in_flight = 0\n", "limits.max_in_flight"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, text: str, field: str) -> None:
    """Values outside their meaningful range are refused, naming the field."""
    path, msg = error_of(tmp_path, text)
    assert msg.startswith(f"{path}:")
    assert f"field {field}:" in msg


FLOAT_FIELDS = [
    ("renewal", "min_lead"),
    ("renewal", "lead_fraction"),
    ("renewal", "max_jitter"),
    ("renewal", "retry_base"),
    ("renewal", "retry_cap"),
    ("renewal", "serve_margin"),
    ("renewal", "refresh_cooldown"),
    ("limits", "requests_per_second"),
    ("limits", "idle_timeout"),
]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan"])
@pytest.mark.parametrize(("section", "field"), FLOAT_FIELDS, ids=[f for _, f in FLOAT_FIELDS])
def test_nan_and_infinity_are_refused(tmp_path: Path, section: str, field: str, value: str) -> None:
    """TOML's nan and inf are refused for every number, naming the file, the line and the field."""
    path, msg = error_of(tmp_path, f"# tuning\n[{section}]\n{field} = {value}\n")
    assert msg.startswith(f"{path}:3: field {section}.{field}:")
    assert "finite" in msg


@pytest.mark.parametrize(
    ("section", "field", "value", "expect"),
    [
        ("renewal", "refresh_cooldown", "-1", "at least 0"),
        ("renewal", "retry_base", "0", "greater than 0"),
        ("renewal", "lead_fraction", "0.6", "from 0 to 0.5"),
        ("renewal", "lead_fraction", "-0.1", "from 0 to 0.5"),
        ("renewal", "max_failures", "0", "at least 1"),
        ("limits", "requests_per_second", "-5", "at least 0"),
        ("limits", "request_burst", "0", "at least 1"),
        ("limits", "max_connections", "0", "at least 1"),
        ("limits", "max_connections", "-3", "at least 1"),
        ("limits", "idle_timeout", "0", "greater than 0"),
        ("limits", "max_in_flight", "0", "at least 1"),
    ],
)
def test_numbers_outside_their_documented_range_are_refused(
    tmp_path: Path, section: str, field: str, value: str, expect: str
) -> None:
    """Each number outside its documented range is refused with the range it must lie in."""
    path, msg = error_of(tmp_path, f"[{section}]\n\n{field} = {value}\n")
    assert msg.startswith(f"{path}:3: field {section}.{field}:")
    assert expect in msg


@pytest.mark.parametrize(
    "text",
    [
        "[renewal]\nmin_lead = 0\nmax_jitter = 0\nserve_margin = 0\nrefresh_cooldown = 0\n",
        "[renewal]\nlead_fraction = 0.5\nretry_base = 0.001\nretry_cap = 0.001\nmax_failures = 1\n",
        "[limits]\nrequests_per_second = 0\nrequest_burst = 1\nmax_connections = 1\n"
        "idle_timeout = 0.5\nmax_in_flight = 1\n",
    ],
    ids=["renewal-zeros", "renewal-edges", "limits-edges"],
)
def test_the_edges_of_each_documented_range_are_accepted(tmp_path: Path, text: str) -> None:
    """The smallest (and largest) value each documented range allows loads without complaint."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    load_config(path)


def test_serve_refuses_to_start_on_a_nan(dirs: Dirs) -> None:
    """`credproxy serve` with `min_lead = nan` exits 2 naming the file, line and field, and binds nothing."""
    dirs.config.write_text("[renewal]\nmin_lead = nan\n")
    result = cli(dirs, "serve", timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"credproxy serve: {dirs.config}:2: field renewal.min_lead:")
    assert not (dirs.runtime / "credproxy.sock").exists()


def test_missing_required_provider_field_is_named(tmp_path: Path) -> None:
    """A provider without client_id is refused with the provider's line and the missing field."""
    path, msg = error_of(tmp_path, '\n[providers.ex]\ntoken_url = "https://a/t"\n')
    assert msg.startswith(f"{path}:2: field providers.ex:")
    assert "client_id" in msg


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the line of the mistake."""
    path, msg = error_of(tmp_path, "[renewal]\nmin_lead = 1\nmax_jitter = = 2\n")
    assert msg.startswith(f"{path}:")
    assert "line 3" in msg
    assert "TOML" in msg


def test_dotted_key_error_names_the_line(tmp_path: Path) -> None:
    """An error in a dotted key (`renewal.min_lead = -1`) still names its line."""
    path, msg = error_of(tmp_path, "# tuning\nrenewal.min_lead = -1\n")
    assert msg.startswith(f"{path}:2: field renewal.min_lead:")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[renewal]\nretry_base = 1\nmin_lead = "soon"\n', ":3: field renewal.min_lead:"),
        ("[renewal\nmin_lead = 1\n", "line 1"),
    ],
    ids=["wrong-type", "invalid-toml"],
)
def test_serve_refuses_to_start_on_a_bad_config(dirs: Dirs, text: str, where: str) -> None:
    """`credproxy serve` with a bad config exits 2 with one stderr line naming the file and line, binding nothing."""
    dirs.config.write_text(text)
    result = cli(dirs, "serve", timeout=60)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"credproxy serve: {dirs.config}")
    assert where in lines[0]
    assert not (dirs.runtime / "credproxy.sock").exists()
