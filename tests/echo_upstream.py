"""A plain-HTTP fake API on loopback that answers every POST with what it received.

For the end-to-end tests of sandboxes (a podman container, a remote host over
`ssh -R`): what reached the upstream (path, headers lower-cased, body) is kept
in ``seen``; :func:`configure_dev_api` gives the daemon a provider ``dev``
whose API is it, with a stored login.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from conftest import Dirs, cli


class _Echo(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        got = {
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode(),
        }
        self.seen.append(got)
        answer = json.dumps({"echo": got["body"], "path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def echo_upstream() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """The fake API on an ephemeral loopback port: (port, what it received)."""
    seen: list[dict[str, Any]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Echo,), {"seen": seen}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def configure_dev_api(dirs: Dirs, port: int, access_token: str, refresh_token: str) -> None:
    """Provider ``dev`` with the fake API at *port* and a stored login (never refreshed here)."""
    dirs.config.write_text(
        "[providers.dev]\n"
        'token_url = "http://127.0.0.1:9/token"\n'
        'client_id = "dev-client"\n'
        "[providers.dev.api]\n"
        f'base_url = "http://127.0.0.1:{port}"\n'
        'headers = { Authorization = "Bearer {access_token}" }\n'
    )
    token = {"access_token": access_token, "refresh_token": refresh_token, "expires_in": 3600}
    proc = cli(dirs, "import", "dev", input=json.dumps(token))
    assert proc.returncode == 0, proc.stderr
