"""`credproxy token --format F` and `credproxy git-credential`, end to end with the installed executable.

Tokens are canary strings. Each test opens real sessions with `credproxy run`
(which starts a background daemon, stopped by the `background_daemon`
fixture) and reads what the inner commands print. git is the real git; the
clone test serves a repository over smart HTTP from `git http-backend` behind
a loopback server that demands the token as a Basic credential.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import CREDPROXY, Dirs, cli
from credproxy.shell.store import TokenStore

EXPIRY = int(time.time()) + 3600
TOKEN = {
    "access_token": "AT-CANARY-1",
    "refresh_token": "RT-CANARY-1",
    "expiry": EXPIRY + 0.75,
    "token_type": "bearer",
    "account_id": "acct-7",
}
AWS = {
    "AccessKeyId": "ASIACANARY",
    "SecretAccessKey": "SK-CANARY-1",
    "SessionToken": "ST-CANARY-1",
}
GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


def rfc3339(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def store(dirs: Dirs, provider: str, token: dict[str, Any]) -> None:
    TokenStore(dirs.state).write(provider, "default", token)


def inside(dirs: Dirs, script: str, *grants: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run sh *script* inside a session granted *grants*; `$CP` is the credproxy executable."""
    allow = [a for g in grants for a in ("--allow", g)]
    return cli(dirs, "run", *allow, "--", "sh", "-c", script, CP=CREDPROXY, **env)


def sections(stdout: str) -> list[str]:
    """The outputs a script separated with `echo ---`."""
    return [part.strip("\n") for part in stdout.split("---\n")]


def git_version() -> tuple[int, ...]:
    out = subprocess.run([GIT or "git", "--version"], capture_output=True, text=True, check=True)
    return tuple(int(p) for p in out.stdout.split()[2].split(".")[:2])


def git_env(dirs: Dirs) -> dict[str, str]:
    """A git with no user or system configuration, no prompts, and `credproxy` on PATH."""
    home = dirs.root / "home"
    home.mkdir(exist_ok=True)
    return {
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "",
        "SSH_ASKPASS": "",
        "PATH": f"{Path(CREDPROXY).parent}:{os.environ.get('PATH', '')}",
    }


# -- credproxy token --format ---------------------------------------------------------------------


def test_every_format_prints_what_the_tools_read(background_daemon: Dirs) -> None:
    """Each --format prints the shape docs/integrations.md documents, from one served token."""
    dirs = background_daemon
    store(dirs, "prov", dict(TOKEN, **AWS))
    script = (
        '"$CP" token prov; echo ---; "$CP" token prov --format raw; echo ---; '
        '"$CP" token prov --json; echo ---; "$CP" token prov --format=json; echo ---; '
        '"$CP" token prov --format header; echo ---; "$CP" token prov --format env; echo ---; '
        '"$CP" token prov --format kubectl; echo ---; "$CP" token prov --format aws-process; '
        'echo ---; printf "https://ghcr.io\\n" | "$CP" token prov --format docker'
    )
    result = inside(dirs, script, "prov")
    assert result.returncode == 0, result.stderr
    raw, raw2, as_json, as_json2, header, env, kube, aws, docker = sections(result.stdout)
    served = {k: v for k, v in dict(TOKEN, **AWS).items() if k != "refresh_token"}

    assert raw == raw2 == "AT-CANARY-1"
    assert json.loads(as_json) == json.loads(as_json2) == served
    assert header == "Authorization: Bearer AT-CANARY-1"  # "bearer" written the way servers expect
    assert env.splitlines() == [
        "export CREDPROXY_ACCESS_TOKEN='AT-CANARY-1'",
        "export CREDPROXY_TOKEN_TYPE='Bearer'",
        f"export CREDPROXY_TOKEN_EXPIRY={EXPIRY}",
    ]
    assert json.loads(kube) == {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "AT-CANARY-1", "expirationTimestamp": rfc3339(EXPIRY)},
    }
    assert json.loads(aws) == {"Version": 1, **AWS, "Expiration": rfc3339(EXPIRY)}
    assert json.loads(docker) == {
        "ServerURL": "https://ghcr.io",
        "Username": "oauth2accesstoken",
        "Secret": "AT-CANARY-1",
    }
    assert "RT-CANARY" not in result.stdout + result.stderr


def test_env_format_survives_eval_with_shell_metacharacters(background_daemon: Dirs) -> None:
    """`eval "$(credproxy token P --format env)"` sets the exact token even when it holds quotes and `$`."""
    dirs = background_daemon
    nasty = 'AT-CANARY-it\'s $HOME `id` "q"'
    store(dirs, "prov", {"access_token": nasty, "token_type": "DPoP", "username": "robot"})
    script = (
        'eval "$("$CP" token prov --format env)" || exit 9; '
        'printf "%s\\n" "$CREDPROXY_ACCESS_TOKEN" "$CREDPROXY_TOKEN_TYPE" '
        '"${CREDPROXY_TOKEN_EXPIRY-unset}"; echo ---; "$CP" token prov --format header; '
        'echo ---; echo registry.example | "$CP" token prov --format docker; echo ---; '
        '"$CP" token prov --format kubectl'
    )
    result = inside(dirs, script, "prov")
    assert result.returncode == 0, result.stderr
    env, header, docker, kube = sections(result.stdout)
    assert env.splitlines() == [nasty, "DPoP", "unset"]  # no expiry: the variable is not set
    assert header == f"Authorization: DPoP {nasty}"  # another token_type is kept as it is
    assert json.loads(docker)["Username"] == "robot"  # the token's own username field wins
    assert json.loads(kube)["status"] == {"token": nasty}  # no expiry: no expirationTimestamp


def test_formats_that_cannot_be_made_fail_with_one_line(background_daemon: Dirs) -> None:
    """aws-process without AWS fields and docker without a server URL exit 1 naming what is missing, no secret printed; docker's reason is on stdout too, where docker reads a helper's error."""
    dirs = background_daemon
    store(dirs, "prov", dict(TOKEN, AccessKeyId="ASIACANARY"))
    aws = inside(dirs, '"$CP" token prov --format aws-process', "prov")
    docker = inside(dirs, '"$CP" token prov --format docker </dev/null', "prov")
    assert aws.stdout == ""
    assert docker.stdout == docker.stderr
    for result in (aws, docker):
        assert result.returncode == 1
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("credproxy token: ")
        assert "CANARY" not in result.stderr + result.stdout
    assert "this one has no SecretAccessKey" in aws.stderr
    assert "server URL on stdin" in docker.stderr


def test_aws_process_serves_long_term_keys_without_a_session_token(
    background_daemon: Dirs,
) -> None:
    """Long-term AWS keys (no SessionToken): the credential_process answer has Version 1 and both keys, and no SessionToken field (which the AWS CLI and SDKs take as it is)."""
    dirs = background_daemon
    keys = {"AccessKeyId": "AKIACANARY", "SecretAccessKey": "SK-CANARY-2"}
    store(dirs, "prov", {**TOKEN, **keys})
    result = inside(dirs, '"$CP" token prov --format aws-process', "prov")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["Version"] == 1
    assert {k: answer[k] for k in keys} == keys
    assert "SessionToken" not in answer


def test_kubectl_gets_the_exec_credential_version_it_asks_for(background_daemon: Dirs) -> None:
    """kubectl names the ExecCredential version it reads in KUBERNETES_EXEC_INFO: a kubeconfig on v1beta1 gets a v1beta1 answer, on v1 a v1 one; without the variable, v1."""
    dirs = background_daemon
    store(dirs, "prov", TOKEN)
    got = {}
    for version in ("v1beta1", "v1", None):
        env = {}
        if version is not None:
            info = {
                "apiVersion": f"client.authentication.k8s.io/{version}",
                "kind": "ExecCredential",
            }
            env["KUBERNETES_EXEC_INFO"] = json.dumps(info)
        result = inside(dirs, '"$CP" token prov --format kubectl', "prov", **env)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert answer["status"]["token"] == TOKEN["access_token"]
        got[version] = answer["apiVersion"]
    assert got == {
        "v1beta1": "client.authentication.k8s.io/v1beta1",
        "v1": "client.authentication.k8s.io/v1",
        None: "client.authentication.k8s.io/v1",
    }


def test_docker_is_told_not_found_as_its_helpers_say_it(background_daemon: Dirs) -> None:
    """A registry whose provider the session was not granted: the docker helper answer is docker's own 'credentials not found in native keychain' on stdout with exit 1 (docker then pulls anonymously), and the reason for a person on stderr."""
    dirs = background_daemon
    store(dirs, "prov", TOKEN)
    result = inside(dirs, 'echo ghcr.io | "$CP" token other --format docker', "prov")
    assert result.returncode == 1
    assert result.stdout == "credentials not found in native keychain\n"
    assert result.stderr.startswith("credproxy token: ")


@pytest.mark.parametrize(
    "args", [["prov", "--format", "yaml"], ["prov", "--format"], ["prov", "--format="]]
)
def test_an_unknown_format_is_a_usage_error_before_any_connection(
    dirs: Dirs, args: list[str]
) -> None:
    """`--format` with a missing or unknown name exits 2 listing the formats, without connecting."""
    result = cli(dirs, "token", *args, CREDPROXY_SOCKET=str(dirs.root / "never-used.sock"))
    assert result.returncode == 2
    assert result.stderr.startswith("credproxy token: --format needs one of raw, json, header")
    assert "cannot reach" not in result.stderr


def test_the_usage_names_every_format_the_formatter_knows() -> None:
    """`credproxy token` accepts exactly the formats `credproxy.inner.formats` implements."""
    from credproxy.inner.client import FORMAT_NAMES
    from credproxy.inner.formats import FORMATS

    assert tuple(FORMATS) == FORMAT_NAMES


# -- credproxy git-credential ---------------------------------------------------------------------


def test_git_credential_store_and_erase_do_nothing(dirs: Dirs) -> None:
    """`store`, `erase` and unknown actions read their input, print nothing and exit 0, with no socket at all."""
    request = "protocol=https\nhost=example.com\nusername=u\npassword=p\n\n"
    for action in ("store", "erase", "frobnicate"):
        result = cli(dirs, "git-credential", "--provider", "prov", action, input=request)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_git_credential_usage_errors_exit_2(dirs: Dirs) -> None:
    """`get` without --provider, no action, or an unknown option exits 2 with the usage."""
    for args in (["get"], ["--provider", "prov"], ["--bogus", "get"], ["--provider"]):
        result = cli(dirs, "git-credential", *args, input="\n")
        assert result.returncode == 2, args
        assert result.stderr.startswith("credproxy git-credential: ")
        assert "usage: credproxy git-credential --provider PROVIDER" in result.stderr


def test_git_credential_get_answers_in_the_helper_protocol(background_daemon: Dirs) -> None:
    """`get` prints username, password and password_expiry_utc; with --bearer and git's authtype capability, a Bearer credential."""
    dirs = background_daemon
    store(dirs, "prov", TOKEN)
    plain = "protocol=https\nhost=git.example\n\n"
    with_user = "protocol=https\nhost=git.example\nusername=alice\n\n"
    capable = "capability[]=authtype\nprotocol=https\nhost=git.example\n\n"
    script = (
        'printf "$1" | "$CP" git-credential --provider prov get; echo ---; '
        'printf "$2" | "$CP" git-credential --provider=prov get; echo ---; '
        'printf "$1" | "$CP" git-credential --provider prov --username oauth2 get; echo ---; '
        'printf "$3" | "$CP" git-credential --provider prov --bearer get; echo ---; '
        'printf "$1" | "$CP" git-credential --provider prov --bearer get; echo ---; '
        'printf "$1" | "$CP" git-credential --provider other get; echo "exit $?"'
    )
    allow = ["--allow", "prov"]
    result = cli(
        dirs, "run", *allow, "--", "sh", "-c", script, "sh", plain, with_user, capable, CP=CREDPROXY
    )
    assert result.returncode == 0, result.stderr
    default, given, named, bearer, old_git, missing = sections(result.stdout)
    expiry = f"password_expiry_utc={EXPIRY}"
    assert default.splitlines() == ["username=x-access-token", "password=AT-CANARY-1", expiry]
    assert given.splitlines() == ["username=alice", "password=AT-CANARY-1", expiry]
    assert named.splitlines() == ["username=oauth2", "password=AT-CANARY-1", expiry]
    assert bearer.splitlines() == [
        "capability[]=authtype",
        "authtype=Bearer",
        "credential=AT-CANARY-1",
        "ephemeral=1",
        expiry,
    ]
    assert old_git == default  # a git that did not announce authtype gets a password
    assert missing == "exit 3"  # not granted: git moves on to its next helper
    assert result.stderr.startswith("credproxy git-credential: ")


@needs_git
def test_real_git_credential_fill_takes_the_token_as_password(background_daemon: Dirs) -> None:
    """`git credential fill` with credential.helper `!credproxy git-credential --provider dev` returns the token as password."""
    dirs = background_daemon
    store(dirs, "dev", TOKEN)
    result = inside(
        dirs,
        "printf 'protocol=https\\nhost=git.example\\npath=team/repo.git\\n\\n' | "
        "git -c 'credential.helper=!credproxy git-credential --provider dev' credential fill",
        "dev",
        **git_env(dirs),
    )
    assert result.returncode == 0, result.stderr
    attrs = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert attrs["host"] == "git.example"
    assert attrs["username"] == "x-access-token"
    assert attrs["password"] == "AT-CANARY-1"
    if git_version() >= (2, 41):  # older git drops the attribute it does not know
        assert attrs["password_expiry_utc"] == str(EXPIRY)


class GitServer(ThreadingHTTPServer):
    """Smart HTTP from `git http-backend` (CGI), for requests carrying the right Basic credential."""

    daemon_threads = True

    def __init__(self, root: Path, username: str, password: str) -> None:
        super().__init__(("127.0.0.1", 0), GitHandler)
        self.root = root
        self.expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class GitHandler(BaseHTTPRequestHandler):
    server: GitServer

    def do_GET(self) -> None:
        self.serve()

    def do_POST(self) -> None:
        self.serve()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def serve(self) -> None:
        path, _, query = self.path.partition("?")
        if self.headers.get("Authorization") != self.server.expected:
            self.server.seen.append((self.command, path, 401))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="credproxy test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {
            "PATH": os.environ.get("PATH", ""),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": "127.0.0.1",
        }
        cgi = subprocess.run(
            [GIT or "git", "http-backend"], input=body, capture_output=True, env=env, check=False
        )
        head, _, payload = cgi.stdout.partition(b"\r\n\r\n")
        headers = [line.split(": ", 1) for line in head.decode("latin-1").split("\r\n") if line]
        status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
        self.server.seen.append((self.command, path, status))
        self.send_response(status)
        for key, value in headers:
            if key.lower() != "status":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def bare_repo(dirs: Dirs, name: str, readme: str) -> Path:
    """``DIRS/srv/NAME.git``: a bare repository with one commit (a README saying *readme*)."""
    env = dict(os.environ, **git_env(dirs))
    work, bare = dirs.root / "work", dirs.root / "srv" / f"{name}.git"

    def git(*args: str) -> None:
        subprocess.run([GIT or "git", *args], env=env, check=True, capture_output=True)

    git("init", "-q", "-b", "main", str(work))
    (work / "README").write_text(readme)
    git("-C", str(work), "add", "README")
    git("-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    git("clone", "-q", "--bare", str(work), str(bare))
    return bare


@pytest.fixture
def git_server(dirs: Dirs) -> Iterator[GitServer]:
    """A bare repository with one commit, served on loopback to holders of the canary token."""
    bare = bare_repo(dirs, "repo", "served through credproxy\n")
    server = GitServer(bare.parent, "x-access-token", "AT-CANARY-1")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@needs_git
def test_real_git_clone_over_smart_http_with_the_helper(
    background_daemon: Dirs, git_server: GitServer
) -> None:
    """`git clone` from a server that demands the token clones with the helper, and fails without it."""
    dirs = background_daemon
    store(dirs, "dev", TOKEN)
    env = git_env(dirs)
    url = f"{git_server.url}/repo.git"
    helper = "credential.helper=!credproxy git-credential --provider dev"
    target = dirs.root / "clone"
    cloned = cli(
        dirs,
        "run",
        "--allow",
        "dev",
        "--",
        "git",
        "-c",
        helper,
        "clone",
        "-q",
        url,
        str(target),
        **env,
    )
    assert cloned.returncode == 0, cloned.stderr
    assert (target / "README").read_text() == "served through credproxy\n"
    assert (401 in [s for _, _, s in git_server.seen]) and git_server.seen[-1][2] == 200

    refused = cli(
        dirs, "run", "--allow", "dev", "--", "git", "clone", "-q", url, str(dirs.root / "no"), **env
    )
    assert refused.returncode != 0  # no helper: the server's 401 stands
    assert not (dirs.root / "no" / "README").exists()
    assert "CANARY" not in cloned.stdout + cloned.stderr + refused.stdout + refused.stderr


# -- kubectl and the AWS CLI, where installed --------------------------------------------------------

STS_REPLY = (
    b'<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
    b"<GetCallerIdentityResult><Arn>arn:aws:iam::123456789012:user/t</Arn><UserId>U</UserId>"
    b"<Account>123456789012</Account></GetCallerIdentityResult>"
    b"<ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></GetCallerIdentityResponse>"
)


class Recorder(ThreadingHTTPServer):
    """A loopback API that records each request's path and headers: kube `/version` or STS."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.seen: list[tuple[str, str, dict[str, str]]] = []


class RecordingHandler(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, body: bytes, kind: str) -> None:
        self.server.seen.append((self.command, self.path, dict(self.headers.items())))
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.reply(b'{"major": "1", "minor": "32", "gitVersion": "v1.32.0"}', "application/json")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.reply(STS_REPLY, "text/xml")


@contextlib.contextmanager
def recorder(tls_dir: Path | None = None) -> Iterator[tuple[Recorder, Path | None]]:
    """A running :class:`Recorder`; over HTTPS with a fresh test CA (its PEM path yielded) if *tls_dir*."""
    server = Recorder()
    ca_path = None
    if tls_dir is not None:
        trustme = pytest.importorskip("trustme")
        ca = trustme.CA()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(ctx)
        ca_path = tls_dir / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, ca_path
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_real_kubectl_sends_the_exec_credential_token(background_daemon: Dirs) -> None:
    """kubectl with a `users[].user.exec` of `credproxy token dev --format kubectl` sends `Bearer <token>`."""
    dirs = background_daemon
    store(dirs, "dev", TOKEN)
    with recorder(dirs.root) as (server, ca):
        kubeconfig = dirs.root / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "c",
                            "cluster": {
                                "server": f"https://127.0.0.1:{server.server_address[1]}",
                                "certificate-authority": str(ca),
                            },
                        }
                    ],
                    "users": [
                        {
                            "name": "u",
                            "user": {
                                "exec": {
                                    "apiVersion": "client.authentication.k8s.io/v1",
                                    "command": CREDPROXY,
                                    "args": ["token", "dev", "--format", "kubectl"],
                                    "interactiveMode": "Never",
                                }
                            },
                        }
                    ],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        result = cli(
            dirs,
            "run",
            "--allow",
            "dev",
            "--",
            "kubectl",
            "--kubeconfig",
            str(kubeconfig),
            "get",
            "--raw",
            "/version",
            HOME=str(dirs.root),
        )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["gitVersion"] == "v1.32.0"
    assert server.seen
    assert {h.get("Authorization") for _, _, h in server.seen} == {"Bearer AT-CANARY-1"}


@pytest.mark.skipif(shutil.which("aws") is None, reason="the AWS CLI is not installed")
def test_real_aws_cli_signs_with_the_credential_process_answer(background_daemon: Dirs) -> None:
    """The AWS CLI with `credential_process = credproxy token aws --format aws-process` signs with those keys."""
    dirs = background_daemon
    store(dirs, "aws", dict(TOKEN, **AWS))
    config = dirs.root / "aws-config"
    config.write_text(
        f"[profile t]\ncredential_process = {CREDPROXY} token aws --format aws-process\n"
        "region = us-east-1\n"
    )
    with recorder() as (server, _):
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = cli(
            dirs,
            "run",
            "--allow",
            "aws",
            "--",
            "aws",
            "--profile",
            "t",
            "--endpoint-url",
            url,
            "sts",
            "get-caller-identity",
            HOME=str(dirs.root),
            AWS_CONFIG_FILE=str(config),
            AWS_SHARED_CREDENTIALS_FILE=str(dirs.root / "none"),
            AWS_EC2_METADATA_DISABLED="true",
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["Account"] == "123456789012"
    [(method, _, headers)] = server.seen
    assert method == "POST"
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=ASIACANARY/")
    assert headers["X-Amz-Security-Token"] == "ST-CANARY-1"
