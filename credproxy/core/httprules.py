"""The rules of the HTTP side of a session socket, sans I/O (the API proxy's decisions).

Theory of operation
-------------------

The API proxy (:mod:`credproxy.shell.proxy`) moves bytes; what it lets through
is decided here, from plain values, so that each rule can be tested alone:

*Who may use the session.* A session opened with a capability wants it on
HTTP as on frames: either in each request (``Proxy-Authorization: Bearer
<capability>``) or once per connection in the preamble ``credproxy forward``
sends (:func:`parse_preamble`). :func:`presented_capability` reads the header.

*What a forwarded request may look like.* ``credproxy forward`` listens on a
TCP port; a browser on the same machine can reach that port too (DNS
rebinding, a cross-site form post). So a connection that came through
``forward`` (its preamble names the port) is held to the standard defence of
local servers (:func:`forward_refusal`): ``Host`` must be the loopback address
and port it listens on, and no request may carry ``Origin`` or
``Sec-Fetch-Site: cross-site`` (browsers set them; the tools never do).

*Which headers reach the upstream* (:func:`upstream_headers`). From the
sandbox: everything but hop-by-hop headers, ``Host``, ``Expect``,
``Proxy-*``, known credential headers (:data:`CREDENTIAL_HEADERS`, plus a
configured list), and every header the provider's template sets: the host's
value replaces the sandbox's, one line upstream, unless the template asks for
the sandbox's value with ``{client}``.

*Which requests are WebSocket handshakes* (:func:`is_websocket_upgrade`,
RFC 6455 4.1): a ``GET`` with ``Upgrade: websocket`` and ``Connection:
Upgrade``. Its ``Upgrade`` and ``Connection`` are hop-by-hop like any other,
so the proxy sends :data:`WEBSOCKET_UPGRADE` of its own upstream, and relays
a ``101`` only when it switches to WebSocket (:func:`websocket_accepted`),
with the upstream's headers less the hop-by-hop ones and the same two again
(:func:`switch_headers`). The ``Sec-WebSocket-*`` headers pass unchanged both
ways: the key is the client's and the accept the upstream's, so the client
checks the upstream's answer itself, and frames are relayed as bytes.

*How slowly a body may come* (:class:`BodyPace`): ``body_timeout`` seconds
(20) of grace, then at least ``body_min_rate`` bytes a second (500) on
average (Apache's ``mod_reqtimeout`` defaults), counted only over the time
the proxy waits for the client (an upstream that reads slowly does not count
against it).
"""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from credproxy.core.protocol import capability_digest

__all__ = [
    "CREDENTIAL_HEADERS",
    "HOP_BY_HOP",
    "PREAMBLE",
    "WEBSOCKET_UPGRADE",
    "BodyPace",
    "Preamble",
    "capability_ok",
    "fill_client",
    "forward_refusal",
    "is_websocket_upgrade",
    "parse_preamble",
    "presented_capability",
    "switch_headers",
    "upstream_headers",
    "websocket_accepted",
]

Headers = Sequence[tuple[bytes, bytes]]

#: The first bytes of the line ``credproxy forward`` sends before the tool's own.
PREAMBLE = b"CREDPROXY/1"
MAX_PREAMBLE = 256  # bytes, line end included

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Never taken from the sandbox: credentials of its own (the host's replace them),
#: and the headers that pick which account or project of the credential pays.
CREDENTIAL_HEADERS = frozenset(
    {
        b"authorization",
        b"proxy-authorization",
        b"x-api-key",
        b"api-key",
        b"x-goog-api-key",
        b"cookie",
        b"openai-organization",
        b"openai-project",
        b"x-goog-user-project",
    }
)
# Also dropped: what the daemon sets itself. (Content-Length is kept: h11 has
# checked it, and an upstream may insist on it.)
_DAEMON_SETS = frozenset({b"host", b"expect"})
CLIENT_FIELD = "{client}"
_HEX = frozenset(b"0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Preamble:
    """What ``credproxy forward`` says of a connection before relaying it."""

    forward_port: int | None = None
    capability: str | None = None


def parse_preamble(line: bytes) -> Preamble:
    """Parse ``CREDPROXY/1 forward=PORT[ capability=HEX]`` (without the line end).

    Raises:
        ValueError: not that shape (the message says what is wrong).
    """
    words = line.split(b" ")
    if words[0] != PREAMBLE:
        raise ValueError("unknown preamble version (this daemon speaks CREDPROXY/1)")
    fields: dict[bytes, bytes] = {}
    for word in words[1:]:
        name, eq, value = word.partition(b"=")
        if not eq or name in fields or name not in (b"forward", b"capability"):
            raise ValueError("malformed preamble field")
        fields[name] = value
    port = fields.get(b"forward")
    if port is not None and not (port.isdigit() and 0 < int(port) <= 65535 and len(port) <= 5):
        raise ValueError("the preamble's forward port is not a port number")
    cap = fields.get(b"capability")
    if cap is not None and not (len(cap) == 64 and _HEX.issuperset(cap)):
        raise ValueError("the preamble's capability is not 64 lowercase hex characters")
    return Preamble(
        forward_port=None if port is None else int(port),
        capability=None if cap is None else cap.decode("ascii"),
    )


def presented_capability(headers: Headers) -> str | None:
    """The capability a request presents in ``Proxy-Authorization: Bearer <token>``, if any."""
    for name, value in headers:
        if name.lower() == b"proxy-authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip().decode("latin-1")
    return None


def capability_ok(presented: str | None, digest: bytes) -> bool:
    """Whether *presented* is the token whose SHA-256 is *digest* (constant time)."""
    if presented is None:
        return False
    return hmac.compare_digest(capability_digest(presented), digest)


def forward_refusal(headers: Headers, port: int) -> str | None:
    """Why a request that came through ``credproxy forward`` on *port* is refused, or None."""
    allowed = {f"{host}:{port}".encode() for host in ("127.0.0.1", "localhost", "[::1]")}
    hosts = [value.strip().lower() for name, value in headers if name.lower() == b"host"]
    if len(hosts) != 1 or hosts[0] not in allowed:
        return (
            f"Host must be 127.0.0.1:{port}, localhost:{port} or [::1]:{port} "
            "(credproxy forward refuses other names: DNS rebinding)"
        )
    for name, value in headers:
        name = name.lower()
        if name == b"origin":
            return "a request with an Origin header is refused (a browser's cross-site request)"
        if name == b"sec-fetch-site" and value.strip().lower() == b"cross-site":
            return "a request with Sec-Fetch-Site: cross-site is refused"
    return None


def fill_client(template_value: str, client_values: Sequence[str]) -> str:
    """*template_value* (already filled) with ``{client}`` replaced by the client's values.

    The values of a list header are joined with ``", "``; empty items (no
    client value) are dropped, so ``"a,{client}"`` without one is ``"a"``.
    """
    if CLIENT_FIELD not in template_value:
        return template_value
    filled = template_value.replace(CLIENT_FIELD, ", ".join(client_values))
    return ", ".join(item.strip() for item in filled.split(",") if item.strip())


#: What the sandbox sends that never goes upstream as it came (and any ``proxy-`` header).
_NEVER_SENT = HOP_BY_HOP | _DAEMON_SETS | CREDENTIAL_HEADERS


@functools.lru_cache(maxsize=16)
def _never_sent(strip: tuple[str, ...]) -> frozenset[bytes]:
    """:data:`_NEVER_SENT` and the configured ``strip_headers``."""
    return _NEVER_SENT | {name.lower().encode("latin-1") for name in strip}


def upstream_headers(
    client: Headers,
    template: Mapping[str, str],
    strip: Iterable[str] = (),
) -> list[tuple[bytes, bytes]]:
    """The headers sent upstream, as bytes: the sandbox's allowed ones, then the template's.

    *template* maps header names to values already filled in from the token,
    with ``{client}`` left in place. A header the template sets replaces every
    copy the sandbox sent (case-insensitively); its ``{client}`` becomes the
    sandbox's values. A header whose value comes out empty is not sent. The
    sandbox's bytes go on as they came (h11 or llhttp checked them; a value may hold
    bytes 0x80-0xFF), the template's values as UTF-8.
    """
    dropped = _never_sent(tuple(strip)) if strip else _NEVER_SENT
    templated = {name.lower().encode("latin-1"): name for name in template}
    kept: list[tuple[bytes, bytes]] = []
    wanted: dict[bytes, list[str]] = {}
    for pair in client:
        name = pair[0].lower()
        if name in dropped or name.startswith(b"proxy-"):
            continue
        if name in templated:
            wanted.setdefault(name, []).append(pair[1].decode("latin-1").strip())
            continue
        kept.append(pair)  # (a pair of bytes: kept as it is)
    for lower, header in templated.items():
        value = fill_client(template[header], wanted.get(lower, []))
        if value:
            kept.append((header.encode("latin-1"), value.encode("utf-8")))
    return kept


#: The hop-by-hop headers of a WebSocket handshake, set by the proxy on each hop.
WEBSOCKET_UPGRADE: tuple[tuple[bytes, bytes], ...] = (
    (b"connection", b"Upgrade"),
    (b"upgrade", b"websocket"),
)


def _tokens(headers: Headers, wanted: bytes) -> set[bytes]:
    """The comma-separated tokens of every *wanted* header, lower-cased."""
    return {
        item.strip().lower()
        for name, value in headers
        if name.lower() == wanted
        for item in value.split(b",")
    }


def is_websocket_upgrade(method: str, headers: Headers) -> bool:
    """Whether a request is a WebSocket opening handshake (``GET``, ``Upgrade: websocket``)."""
    return (
        method == "GET"
        and b"websocket" in _tokens(headers, b"upgrade")
        and b"upgrade" in _tokens(headers, b"connection")
    )


def websocket_accepted(headers: Headers) -> bool:
    """Whether the headers of an upstream's ``101`` switch to WebSocket (and nothing else)."""
    return _tokens(headers, b"upgrade") == {b"websocket"}


def switch_headers(upstream: Headers) -> list[tuple[bytes, bytes]]:
    """The headers of the ``101`` the client gets: the upstream's, hop-by-hop ones replaced."""
    kept = [(bytes(n), bytes(v)) for n, v in upstream if n.lower() not in HOP_BY_HOP]
    return [*kept, *WEBSOCKET_UPGRADE]


class BodyPace:
    """How long the proxy may still wait for the next bytes of a request body.

    The client has *grace* seconds, plus one second for every *min_rate*
    bytes it has sent, counted over the time spent waiting on it. A body sent
    one byte every few seconds runs out of allowance within about *grace*
    seconds, however steadily it trickles.
    """

    __slots__ = ("grace", "min_rate", "received", "waited")

    def __init__(self, grace: float = 20.0, min_rate: float = 500.0) -> None:
        self.grace = grace
        self.min_rate = min_rate
        self.waited = 0.0
        self.received = 0

    def allowance(self) -> float:
        """Seconds the next wait for the client may last (0: it is too slow)."""
        return max(0.0, self.grace + self.received / self.min_rate - self.waited)

    def record(self, waited: float, received: int) -> None:
        """The proxy waited *waited* seconds and got *received* bytes."""
        self.waited += max(0.0, waited)
        self.received += received


def error_answer(
    whole: bool,
    status: int,
    message: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    *,
    close: bool = False,
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and JSON body of an answer of the proxy's own (a refusal, an error).

    The connection closes after it when asked, when the request was not read
    *whole*, for a 5xx, and for 400 and 408.
    """
    body = b'{"error":{"type":"credproxy","message":' + _json_string(message) + b"}}"
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    if close or not whole or status >= 500 or status in (400, 408):
        headers.append((b"connection", b"close"))
    return headers, body


def _json_string(text: str) -> bytes:
    return json.dumps(text).encode()


def refusal(status: int, message: str, extra: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """A whole answer of the proxy's own that closes the connection (for a peer never served)."""
    headers, body = error_answer(False, status, message, list(extra))
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return b"HTTP/1.1 %d \r\n%s\r\n%s" % (status, lines, body)
