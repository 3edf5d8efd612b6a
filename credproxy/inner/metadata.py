"""The GCE metadata server of ``credproxy forward --metadata``. Standard library only.

Tools built on Google's client libraries (google-auth for Python, which the
Vertex AI SDK and gcloud use; google-auth-library for Node, which Gemini CLI
uses) look for credentials on the Compute Engine metadata server when nothing
else is configured, at the ``host:port`` in ``$GCE_METADATA_HOST``. This module
answers the paths they ask for, from one granted provider, fetched with
``get_token`` on the session socket for every request that needs it (the daemon
keeps it fresh; nothing is cached here). ``credproxy forward`` owns the port,
checks each connection's uid as for its relay, and hands each accepted
connection to :meth:`MetadataServer.serve`.

What is served (``/computeMetadata/v1/`` is ``V1``; ``SA`` is
``V1/instance/service-accounts/default/``, and the same under the served email
in place of ``default``, which google-auth asks for from its second refresh on):

- ``/``: ``computeMetadata/``, 200, to any request (google-auth's ``ping``
  sends the flavor header; Go's ``metadata.OnGCE`` does not; both want a 200
  with ``Metadata-Flavor: Google``).
- ``SA/token``: ``{"access_token", "expires_in", "token_type": "Bearer"}``;
  ``expires_in`` is the whole seconds to the token's ``expiry`` (none stored:
  3600). Requested ``scopes`` are ignored: the grant's token is served as is.
- ``SA/email``: ``--metadata-email``, else the token's ``email`` field, else
  the ``email`` claim of its ``id_token`` (read, not verified), else ``default``.
- ``SA/scopes``: ``--metadata-scopes``, else the token's ``scope`` field split
  at spaces, else none; one per line.
- ``SA/aliases``: ``default``.
- ``SA?recursive=true``: ``{"aliases": ["default"], "email": ..., "scopes": [...]}``.
- ``V1/project/project-id``: ``--metadata-project``, else the token's
  ``project_id`` field, else 404.
- ``V1/universe/universe-domain``: ``googleapis.com``.
- A directory (with or without its final ``/``) lists its entries, one per
  line, directories with a ``/``; with ``?recursive=true`` it is JSON, keys in
  camelCase as GCE writes them (``serviceAccounts``, ``projectId``), tokens left
  out. ``?alt=json`` gives a leaf as JSON.

Rules, as GCE has them: every request but ``/`` must carry
``Metadata-Flavor: Google`` (else 403); one carrying ``X-Forwarded-For`` is
refused (403); only ``GET`` and ``HEAD`` are answered (else 405); every answer
carries ``Metadata-Flavor: Google``. ``?wait_for_change`` is refused (400),
since nothing here ever changes on its own. Anything else is 404.

Errors of ``get_token``: ``NOT_FOUND`` (the provider is not granted to the
session, not configured, or has no stored login: the daemon gives them one
answer) is a 404 for the service account, as on a VM without one; any other
(the daemon unreachable, a login to redo, a refresh that failed, every bucket
held) is a 503 (which google-auth retries a few times). The body names the
daemon's reason; the first failure of each kind is also said once on stderr.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.server
import json
import time
import urllib.parse

from credproxy.errors import CredproxyError, NotFound
from credproxy.inner.client import Client

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

FLAVOR_HEADER = "Metadata-Flavor"
FLAVOR = "Google"
SERVER = "Metadata Server for VM"  # GCE's Server header
UNIVERSE = "googleapis.com"
DEFAULT_EXPIRES_IN = 3600  # seconds, for a token stored without an expiry
IDLE_TIMEOUT = 60.0  # seconds a kept-alive connection may wait for its next request
FETCH_TIMEOUT = 30.0  # seconds the daemon may take to answer get_token
MAX_BODY = 64 * 1024  # bytes of a request body read (and dropped); more closes the connection
TEXT = "application/text"  # what GCE sends for a text value
JSON = "application/json"
# Keys of a recursive answer as GCE writes them.
CAMEL = {
    "service-accounts": "serviceAccounts",
    "project-id": "projectId",
    "universe-domain": "universeDomain",
}


class Settings:
    """What ``--metadata`` and its companion options said (None: from the token)."""

    def __init__(
        self,
        grant: str,
        *,
        email: str | None = None,
        project: str | None = None,
        scopes: Sequence[str] | None = None,
    ) -> None:
        self.grant = grant
        provider, colon, bucket = grant.partition(":")
        self.provider = provider
        self.bucket = bucket if colon else None
        self.email = email
        self.project = project
        self.scopes = list(scopes) if scopes is not None else None


# --- the values (pure) -------------------------------------------------------------------


def token_answer(token: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The ``SA/token`` answer for a served *token* at Unix time *now*.

    Raises:
        CredproxyError: the token has no ``access_token``.
    """
    access = token.get("access_token")
    if not isinstance(access, str) or not access:
        raise CredproxyError("the served token has no access_token")
    expiry = token.get("expiry")
    if isinstance(expiry, (int, float)) and not isinstance(expiry, bool):
        expires_in = max(0, int(expiry - now))
    else:
        expires_in = DEFAULT_EXPIRES_IN
    return {"access_token": access, "expires_in": expires_in, "token_type": "Bearer"}


def account_email(settings: Settings, token: Mapping[str, Any]) -> str:
    """The served email: the option, the token's ``email``, its id_token's claim, ``default``."""
    if settings.email:
        return settings.email
    email = token.get("email")
    if isinstance(email, str) and _plain(email):
        return email
    claim = id_token_claims(token.get("id_token")).get("email")
    if isinstance(claim, str) and _plain(claim):
        return claim
    return "default"


def account_scopes(settings: Settings, token: Mapping[str, Any]) -> list[str]:
    """The served scopes: the option, else the token's ``scope`` (space-separated or a list)."""
    if settings.scopes is not None:
        return list(settings.scopes)
    scope = token.get("scope")
    if isinstance(scope, str):
        return scope.split()
    if isinstance(scope, list):
        return [s for s in scope if isinstance(s, str) and _plain(s)]
    return []


def id_token_claims(id_token: object) -> dict[str, Any]:
    """The claims of a JWT (its middle part), unverified; ``{}`` if it is not one."""
    if not isinstance(id_token, str) or id_token.count(".") != 2:
        return {}
    payload = id_token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _plain(value: str) -> bool:
    """Printable ASCII without spaces or ``/``: safe as a line and as a path segment."""
    return 0 < len(value) <= 256 and value.isascii() and value.isprintable() and " " not in value


# --- requests to answers (pure, given fetch) ---------------------------------------------


class _Token:
    """The token leaf: JSON of its own, and left out of recursive answers."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer


class _Lazy:
    """A directory whose entries need the token: built when a request reaches it."""

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self.build = build


class Answer:
    """An HTTP answer: status, content type, body (bytes), and a note for stderr (or None)."""

    def __init__(
        self, status: int, content_type: str, body: bytes, note: tuple[str, str] | None = None
    ) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body
        self.note = note


def _text(status: int, message: str) -> Answer:
    return Answer(status, "text/plain; charset=utf-8", (message + "\n").encode())


def answer(
    settings: Settings,
    fetch: Callable[[], Mapping[str, Any]],
    method: str,
    target: str,
    headers: Mapping[str, str],
    now: float,
    port: int | None = None,
) -> Answer:
    """The answer to one request; *fetch* serves the grant's token (or raises CredproxyError).

    *headers* holds the request's ``Metadata-Flavor``, ``X-Forwarded-For``,
    ``Host``, ``Origin`` and ``Sec-Fetch-Site`` (under those names) when it
    has them. With *port* (the port the server listens on), a request must
    name the server as its ``Host`` and come from no web page: a page that
    reached this port through DNS rebinding names its own host, and a browser
    says where a request comes from.
    """
    if method not in ("GET", "HEAD"):
        return _text(405, f"method {method} is not allowed; the metadata server answers GET")
    split = urllib.parse.urlsplit(target)
    query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
    if headers.get("X-Forwarded-For") is not None:
        return _text(403, "a request carrying X-Forwarded-For is refused")
    if split.path == "/":
        return Answer(200, TEXT, b"computeMetadata/\n")  # (the ping: nothing in it)
    if port is not None:
        host = headers.get("Host")
        if host not in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            return _text(403, f"a request for another host than 127.0.0.1:{port} is refused")
        if headers.get("Origin") is not None or headers.get("Sec-Fetch-Site") is not None:
            return _text(403, "a request from a web page is refused")
    if headers.get(FLAVOR_HEADER) != FLAVOR:
        return _text(403, f"missing required header: {FLAVOR_HEADER}: {FLAVOR}")
    if query.get("wait_for_change", [""])[-1].lower() == "true":
        return _text(400, "wait_for_change is not supported: these values change only on refresh")
    segments = [urllib.parse.unquote(s) for s in split.path.split("/")[1:]]
    if segments and segments[-1] == "":
        segments.pop()
    token: list[Mapping[str, Any]] = []

    def token_once() -> Mapping[str, Any]:
        if not token:
            token.append(fetch())
        return token[0]

    tree = _tree(settings, token_once, now)
    try:
        node: Any = tree
        for segment in segments:
            if isinstance(node, _Lazy):
                node = node.build()
            if not isinstance(node, dict) or segment not in node:
                return _text(404, f"not found: {split.path}")
            node = node[segment]
        if isinstance(node, _Lazy):
            node = node.build()
        recursive = query.get("recursive", [""])[-1].lower() == "true"
        alt_json = query.get("alt", [""])[-1] == "json"
        return _render(node, recursive=recursive, alt_json=alt_json)
    except NotFound as exc:
        message = f"no service account: {settings.grant}: {exc}"
        return Answer(404, "text/plain; charset=utf-8", (message + "\n").encode(), ("404", message))
    except CredproxyError as exc:
        message = f"the token of {settings.grant} cannot be served: {exc}"
        return Answer(503, "text/plain; charset=utf-8", (message + "\n").encode(), ("503", message))


def _tree(settings: Settings, fetch: Callable[[], Mapping[str, Any]], now: float) -> dict[str, Any]:
    def accounts() -> dict[str, Any]:
        token = fetch()
        email = account_email(settings, token)
        account = {
            "aliases": ["default"],
            "email": email,
            "scopes": account_scopes(settings, token),
            "token": _Token(token_answer(token, now)),
        }
        return {"default": account, email: account}

    def project() -> dict[str, Any]:
        project_id = settings.project
        if project_id is None:
            found = fetch().get("project_id")
            project_id = found if isinstance(found, str) and _plain(found) else None
        return {"project-id": project_id} if project_id else {}

    v1 = {
        "instance": {"service-accounts": _Lazy(accounts)},
        "project": _Lazy(project) if settings.project is None else project(),
        "universe": {"universe-domain": UNIVERSE},
    }
    return {"computeMetadata": {"v1": v1}}


def _render(node: Any, *, recursive: bool, alt_json: bool) -> Answer:
    if isinstance(node, _Token):
        return Answer(200, JSON, json.dumps(node.answer).encode())
    if isinstance(node, dict):
        if recursive:
            return Answer(200, JSON, json.dumps(_plain_json(node)).encode())
        lines = {f"{k}/" if isinstance(v, (dict, _Lazy)) else k for k, v in node.items()}
        return Answer(200, TEXT, "".join(f"{line}\n" for line in sorted(lines)).encode())
    if alt_json:
        return Answer(200, JSON, json.dumps(node).encode())
    if isinstance(node, list):
        return Answer(200, TEXT, "".join(f"{item}\n" for item in node).encode())
    return Answer(200, TEXT, str(node).encode())


def _plain_json(node: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, _Lazy):
            value = value.build()
        if isinstance(value, _Token):
            continue
        out[CAMEL.get(key, key)] = _plain_json(value) if isinstance(value, dict) else value
    return out


# --- the server --------------------------------------------------------------------------


class MetadataServer:
    """Answers metadata requests on connections ``credproxy forward`` accepted and checked.

    *note* is forward's once-per-kind stderr note (kind, message).
    """

    def __init__(
        self,
        settings: Settings,
        path: str,
        capability: str | None,
        note: Callable[[str, str], None],
    ) -> None:
        self.settings = settings
        self.path = path
        self.capability = capability
        self.note = note

    def fetch(self) -> dict[str, Any]:
        """The grant's token, from the daemon (one connection per request)."""
        with Client(self.path, capability=self.capability, timeout=FETCH_TIMEOUT) as client:
            return client.get_token(self.settings.provider, self.settings.bucket)

    def answer(
        self, method: str, target: str, headers: Mapping[str, str], port: int | None = None
    ) -> Answer:
        result = answer(self.settings, self.fetch, method, target, headers, time.time(), port)
        if result.note is not None:
            kind, message = result.note
            self.note(f"metadata-{kind}", f"metadata server: {message} (noted once)")
        return result

    def serve(self, conn: socket.socket) -> None:
        """Answer requests on *conn* until the client closes it, or idles; then close it."""
        with contextlib.suppress(OSError):
            _Handler(conn, conn.getpeername(), self)  # type: ignore[arg-type]  # see server
        with contextlib.suppress(OSError):
            conn.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; each request goes to :meth:`MetadataServer.answer`."""

    protocol_version = "HTTP/1.1"
    server_version = SERVER
    sys_version = ""
    timeout = IDLE_TIMEOUT
    server: MetadataServer  # type: ignore[assignment]  # ours, not a socketserver

    def version_string(self) -> str:
        return SERVER

    def do_GET(self) -> None:
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        self._respond(with_body=False)

    def _other(self) -> None:
        self._respond(with_body=True)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _other

    def _respond(self, *, with_body: bool) -> None:
        self._drop_body()
        names = (FLAVOR_HEADER, "X-Forwarded-For", "Host", "Origin", "Sec-Fetch-Site")
        seen = {name: self.headers.get(name) for name in names}
        headers = {name: value for name, value in seen.items() if value is not None}
        port = self.connection.getsockname()[1]
        result = self.server.answer(self.command, self.path, headers, port)
        self.send_response(result.status)
        self.send_header(FLAVOR_HEADER, FLAVOR)
        self.send_header("Content-Type", result.content_type)
        self.send_header("Content-Length", str(len(result.body)))
        if result.content_type == JSON:
            self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if with_body:
            self.wfile.write(result.body)

    def _drop_body(self) -> None:
        """Read a request body (none is wanted) so the next request starts where it should."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            return
        length = self.headers.get("Content-Length", "0").strip()
        if not (length.isascii() and length.isdigit() and int(length) <= MAX_BODY):
            self.close_connection = True
            return
        if int(length):
            self.rfile.read(int(length))

    def log_message(self, format: str, *args: Any) -> None:
        pass  # CMD's terminal is not ours; forward notes what matters itself
