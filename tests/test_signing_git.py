"""`git clone` and `git push` with a GitHub App's installation token, minted by the daemon.

The real git, its credential helper set to `credproxy git-credential`, talks
smart HTTP to `git http-backend` behind a server that checks each request's
token with the development issuers, as GitHub would: reading needs the
token's `contents: read`, pushing `contents: write`. The daemon (in-process,
with the issuers on loopback) mints one token per bucket from the App's
private key; the sandbox's git only ever holds the minted token.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from test_inner_formats import GIT, GitHandler, GitServer, bare_repo, git_env, needs_git
from test_signing_daemon import RSA_KEY, _github_daemon, _pem_lines

from conftest import Dirs, Harness, StartDaemon
from credproxy.devidp import DevIssuers


class AppGitServer(GitServer):
    """Smart HTTP for holders of an installation token that the issuers say may do it."""

    issuers: DevIssuers
    trio_token: trio.lowlevel.TrioToken  # the issuers keep the test's (trio) time


class AppGitHandler(GitHandler):
    server: AppGitServer

    def serve(self) -> None:
        path, _, query = self.path.partition("?")
        write = "git-receive-pack" in path or "service=git-receive-pack" in query
        status = self._allowed(write)
        if status != 200:
            self.server.seen.append((self.command, path, status))
            self.send_response(status)
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="github"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        # The token is good for this: let the parent serve it (it checks `expected`).
        self.server.expected = self.headers.get("Authorization", "")
        super().serve()

    def _allowed(self, write: bool) -> int:
        given = self.headers.get("Authorization", "")
        if not given.startswith("Basic "):
            return 401
        _user, _, password = base64.b64decode(given[6:]).decode().partition(":")
        method, target = (
            ("PUT", "/repos/dev-org/alpha/contents/x") if write else ("GET", "/repos/dev-org/alpha")
        )
        status, _body = trio.from_thread.run_sync(
            self.server.issuers.answer_github_request,
            method,
            target,
            f"token {password}",
            trio_token=self.server.trio_token,
        )
        return 200 if status == 200 else (401 if status == 401 else 403)


@pytest.fixture
def app_git_server(dirs: Dirs) -> Iterator[AppGitServer]:
    """A bare repository `alpha` (one commit) that accepts pushes, behind :class:`AppGitHandler`."""
    bare = bare_repo(dirs, "alpha", "served to a GitHub App token\n")
    subprocess.run(
        [GIT or "git", "-C", str(bare), "config", "http.receivepack", "true"],
        check=True,
        capture_output=True,
    )
    server = AppGitServer(bare.parent, "unused", "unused")
    server.RequestHandlerClass = AppGitHandler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


async def _git(h: Harness, session: Any, dirs: Dirs, bucket: str, *args: str) -> Any:
    """Run git as the sandbox would: the helper asks the session's socket for *bucket*'s token."""
    helper = (
        f"credential.helper=!{sys.executable} -m credproxy git-credential "
        f"--provider gh --bucket {bucket}"
    )
    env = dict(os.environ, **git_env(dirs), CREDPROXY_SOCKET=str(session.socket_path))
    return await trio.run_process(
        [GIT or "git", "-c", helper, "-c", "user.name=t", "-c", "user.email=t@t", *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@needs_git
async def test_git_clone_and_push_with_a_github_app_token_per_bucket(
    start_daemon: StartDaemon,
    dirs: Dirs,
    tmp_path: Path,
    app_git_server: AppGitServer,
    no_secrets_in_logs: list[dict[str, Any]],
) -> None:
    """The read-only bucket clones but cannot push; the push bucket pushes; the App's key never leaves the host."""
    h = await _github_daemon(start_daemon, tmp_path)
    assert h.issuers is not None
    app_git_server.issuers = h.issuers
    app_git_server.trio_token = trio.lowlevel.current_trio_token()
    url = f"{app_git_server.url}/alpha.git"
    reader = await h.session("gh:readonly")
    pusher = await h.session("gh:push")

    clone = dirs.root / "clone"
    cloned = await _git(h, reader, dirs, "readonly", "clone", "-q", url, str(clone))
    assert cloned.returncode == 0, cloned.stderr
    assert (clone / "README").read_text() == "served to a GitHub App token\n"

    (clone / "CHANGE").write_text("from the sandbox\n")
    await _git(h, reader, dirs, "readonly", "-C", str(clone), "add", "CHANGE")
    await _git(h, reader, dirs, "readonly", "-C", str(clone), "commit", "-qm", "change")
    refused = await _git(h, reader, dirs, "readonly", "-C", str(clone), "push", "-q", url, "main")
    assert refused.returncode != 0
    assert b"403" in refused.stderr

    pushed = await _git(h, pusher, dirs, "push", "-C", str(clone), "push", "-q", url, "main")
    assert pushed.returncode == 0, pushed.stderr
    assert ("POST", "/alpha.git/git-receive-pack", 200) in app_git_server.seen
    assert h.issuers.mint_count == 2  # one token per bucket, each minted once

    said = b"".join(r.stdout + r.stderr for r in (cloned, refused, pushed)).decode() + repr(
        no_secrets_in_logs
    )
    assert all(line not in said for line in _pem_lines(RSA_KEY))
