"""The wire protocol, sans I/O: bytes in, events and bytes out.

Theory of operation
-------------------

A connection carries frames: a 4-byte unsigned big-endian length, then that many
bytes of UTF-8 JSON holding one object. This is llxprt-code's credential-proxy
framing, kept byte for byte so that its inner client works against us.

:class:`FrameReader` only splits the stream. :class:`ServerConnection` is the
per-connection state machine on top of it::

    AWAIT_HANDSHAKE --(valid handshake)--> OPEN --(fatal error)--> CLOSED
          |
          +--(bad version / capability)--> CLOSED (after one error reply)

The first frame is always the handshake, whatever its ``op`` (llxprt's client
sends no ``id`` there and treats the first reply as the handshake reply). Once
OPEN, every frame is a request ``{"v", "id", "op", "payload"}``; the state
machine checks the envelope, duplicate ids and the in-flight cap, and hands
well-formed requests to the caller as :class:`Request` events. The caller
answers each with :meth:`ServerConnection.reply_ok` / :meth:`reply_error`,
which also enforce the 64 KiB response limit for v1 peers.

What closes a connection without a reply (llxprt does the same, and a peer
that sends these is not speaking the protocol): an oversized length, invalid
UTF-8 or JSON, a frame that is not a JSON object. What gets an error reply and
keeps the connection: a bad envelope (missing or mistyped ``id``/``op``/
``payload``), a duplicate in-flight id, more than ``max_in_flight`` requests.

Nothing here touches a socket or a clock; the shell feeds bytes and writes the
bytes it is given. The one timing rule of the protocol, "a body must arrive
within 5 s of its header", is exposed as :attr:`FrameReader.awaiting_body` for
the shell to enforce.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgspec

from credproxy.errors import ProtocolError

MAX_FRAME = 65_536  # largest payload we accept (and the v1 response limit)
BODY_DEADLINE = 5.0  # seconds for a body to follow its header
MIN_VERSION, MAX_VERSION = 1, 2
MAX_ID_LENGTH = 128

HEADER_SIZE = 4  # a frame's length prefix (big-endian)
unpack_header = struct.Struct(">I").unpack_from
_pack_header = struct.Struct(">I").pack
_OK = b',"ok":true,"data":'
_OK_SIZE = len(b'{"id":') + len(_OK) + len(b"}")  # a reply's body less the id and the data
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class FrameTooLarge(ProtocolError):
    """A frame header announced more than :data:`MAX_FRAME` bytes."""


class MalformedFrame(ProtocolError):
    """A frame body is not a UTF-8 JSON object."""


def frame(payload: bytes) -> bytes:
    """Prefix *payload* with its 4-byte big-endian length."""
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def encode(obj: Any) -> bytes:
    """Encode *obj* as JSON and frame it."""
    return frame(_encoder.encode(obj))


class FrameReader:
    """Split a byte stream into frame payloads.

    ``feed(data)`` stores bytes; ``next_frame()`` returns the next complete
    payload or ``None`` if more bytes are needed. A header announcing more than
    ``max_frame`` bytes raises :class:`FrameTooLarge` as soon as the header is
    complete, before any of the body is buffered.

    Bytes fed while nothing else waits (a read of whole frames, the usual
    case) are kept as they came and cut in place; only what is left of a
    frame that is not complete yet goes to the buffer, where the next reads
    join it.

    Its state is public to be read (never changed) by its connection's hot
    path: ``data`` and ``buf`` are both empty when nothing is buffered, and
    ``need`` is the body length while a header waits for its body (else None).
    """

    __slots__ = ("_max", "_pos", "buf", "data", "need")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buf = bytearray()
        self.data = b""  # bytes fed while the buffer was empty, parsed from _pos on
        self._pos = 0
        self._max = max_frame
        self.need: int | None = None  # body length once the header is read

    def feed(self, data: bytes) -> None:
        if self.data:
            self._spill()
        if self.buf or self.need is not None:
            self.buf += data
        elif data:
            self.data = bytes(data)
            self._pos = 0

    def next_frame(self) -> bytes | None:
        data = self.data
        if data:
            pos = self._pos
            if len(data) - pos >= HEADER_SIZE:
                need: int = unpack_header(data, pos)[0]  # (_length, inline: the usual case)
                if need > self._max:
                    self._length(data, pos)  # raises
                end = pos + HEADER_SIZE + need
                if end <= len(data):
                    if end == len(data):
                        self.data, self._pos = b"", 0
                    else:
                        self._pos = end
                    return data[pos + HEADER_SIZE : end]
            self._spill()  # the rest is part of a frame: buffer it until it is whole
        buf = self.buf
        if self.need is None:
            if len(buf) < HEADER_SIZE:
                return None
            self.need = self._length(buf, 0)
            del buf[:HEADER_SIZE]
        need = self.need
        if len(buf) < need:
            return None
        payload = bytes(buf[:need])
        del buf[:need]
        self.need = None
        return payload

    def _length(self, data: bytes | bytearray, pos: int) -> int:
        """The body length the header at *pos* announces (raises if over the limit)."""
        need: int = unpack_header(data, pos)[0]
        if need > self._max:
            raise FrameTooLarge(f"frame of {need} bytes exceeds the {self._max}-byte limit")
        return need

    def _spill(self) -> None:
        self.buf += memoryview(self.data)[self._pos :]
        self.data = b""
        self._pos = 0

    @property
    def awaiting_body(self) -> bool:
        """True while a header has been read and its body is incomplete.

        The body deadline runs only in this state: one to three stray bytes of
        a header never arm it (llxprt's rule).
        """
        return self.need is not None

    @property
    def buffered(self) -> int:
        return len(self.buf) + len(self.data) - self._pos

    @property
    def has_frame(self) -> bool:
        """True if :meth:`next_frame` would give a frame (or raise on a header over the limit)."""
        data, pos = self.data, self._pos
        if data:
            left = len(data) - pos
            return left >= HEADER_SIZE and left - HEADER_SIZE >= unpack_header(data, pos)[0]
        buf = self.buf
        if self.need is not None:
            return len(buf) >= self.need
        return len(buf) >= HEADER_SIZE and len(buf) - HEADER_SIZE >= unpack_header(buf, 0)[0]


def decode_object(payload: bytes) -> dict[str, Any]:
    """Decode one frame payload, which must be a JSON object."""
    try:
        obj = _decoder.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        # RecursionError: JSON nested deeper than the decoder allows.
        raise MalformedFrame("frame is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise MalformedFrame("frame is not a JSON object")
    return obj


# --- events ---------------------------------------------------------------


class Request(msgspec.Struct, frozen=True, gc=False):
    """A well-formed request the caller must answer exactly once.

    A struct rather than a dataclass: a well-typed request frame is decoded
    straight into one (see :meth:`ServerConnection.request`).
    """

    id: str
    op: str
    payload: dict[str, Any] = msgspec.field(default_factory=dict)


_request_decoder = msgspec.json.Decoder(Request)


class _Envelope(msgspec.Struct, gc=False):
    """A request frame's fields as they came (checked by :meth:`ServerConnection.request`).

    Decoding into it gives what ``dict.get`` on the decoded object would (a
    missing field is None, a repeated one keeps its last value, others are
    ignored) without building the dict.
    """

    id: Any = None
    op: Any = None
    payload: Any = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)


def _envelope(payload: bytes) -> _Envelope:
    """A request frame's envelope; what :func:`decode_object` refuses raises the same here.

    The decoder skips the fields it does not keep without checking that their
    strings are UTF-8: a frame with any byte over 0x7f goes through
    :func:`decode_object`, which checks the whole frame.
    """
    if payload.isascii():
        try:
            return _envelope_decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError):
            pass  # not a JSON object: decode_object raises what such a frame gets
    obj = decode_object(payload)
    return _Envelope(obj.get("id"), obj.get("op"), obj.get("payload"))


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write now; ``close`` means close the connection after writing."""

    data: bytes
    close: bool = False


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Event = Request | Send | _NeedData

AWAIT_HANDSHAKE, OPEN, CLOSED = "AWAIT_HANDSHAKE", "OPEN", "CLOSED"


def handshake_error(code: str, message: str) -> bytes:
    """A handshake-shaped refusal, for peers refused before they speak."""
    return encode({"v": 1, "op": "handshake", "ok": False, "code": code, "error": message})


def negotiate(frame_obj: dict[str, Any]) -> int | None:
    """The protocol version both sides support, or ``None``.

    Accepts ``payload.minVersion``/``maxVersion`` (integers, min <= max) and
    picks the highest common version; otherwise a bare numeric ``v`` within
    range is taken as is (what llxprt's v1 client sends).
    """
    payload = frame_obj.get("payload")
    if isinstance(payload, dict):
        lo, hi = payload.get("minVersion"), payload.get("maxVersion")
        if _is_int(lo) and _is_int(hi) and lo <= hi:
            if hi < MIN_VERSION or lo > MAX_VERSION:
                return None
            return min(MAX_VERSION, hi)
    v = frame_obj.get("v")
    if _is_int(v) and MIN_VERSION <= v <= MAX_VERSION:
        return v
    return None


def _is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool)


def capability_digest(token: str) -> bytes:
    """What a session keeps of its capability token: the SHA-256, never the token."""
    return hashlib.sha256(token.encode()).digest()


_CAPABILITY_RE = re.compile(r"^[0-9a-f]{64}$")


class ServerConnection:
    """The server side of one connection (see the module docstring).

    Args:
        capability: SHA-256 digest of the session's capability token, or
            ``None`` when the session does not require one.
        max_in_flight: requests a peer may have unanswered at once; more get
            ``RESOURCE_EXHAUSTED``.
    """

    def __init__(self, *, capability: bytes | None = None, max_in_flight: int = 16) -> None:
        self.state = AWAIT_HANDSHAKE
        self.version = 0
        self.reader = FrameReader()  # (read-only for others: it splits this connection's bytes)
        self._capability = capability
        self._max_in_flight = max_in_flight
        self.in_flight_ids: set[str] = set()  # (read-only for others: changed by the replies)
        self._shared: set[str] = set()  # in flight, but waiting on another request's work

    # -- input --

    def receive_data(self, data: bytes) -> None:
        """Store bytes from the peer; call :meth:`next_event` to process them."""
        self.reader.feed(data)

    @property
    def awaiting_body(self) -> bool:
        return self.reader.awaiting_body

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed."""
        return self.reader.buffered

    @property
    def in_flight(self) -> int:
        return len(self.in_flight_ids)

    def share(self, rid: str) -> None:
        """Request *rid* waits on the same work as an earlier request in flight.

        It stays in flight (its id is taken until it is answered) but no longer
        counts against ``max_in_flight``: llxprt's client sends a burst of
        ``get_token`` on one connection, and twenty of them waiting on one
        coalesced refresh cost what one does.
        """
        if rid in self.in_flight_ids:
            self._shared.add(rid)

    def next_event(self) -> Event:
        """The next event, or :data:`NEED_DATA`.

        Raises:
            ProtocolError: the peer broke framing; close without replying.
        """
        state = self.state
        if state == CLOSED:
            raise ProtocolError("connection is closed")
        try:
            payload = self.reader.next_frame()
            if payload is None:
                return NEED_DATA
            if state == OPEN:
                return self.request(payload)
            obj = decode_object(payload)
        except ProtocolError:
            self.state = CLOSED
            raise
        return self._handshake(obj)

    def _handshake(self, obj: dict[str, Any]) -> Send:
        version = negotiate(obj)
        if version is None:
            self.state = CLOSED
            return Send(handshake_error("UNKNOWN_VERSION", "Unsupported protocol version"), True)
        if self._capability is not None:
            payload = obj.get("payload")
            token = payload.get("capabilityToken") if isinstance(payload, dict) else None
            if not (
                isinstance(token, str)
                and _CAPABILITY_RE.match(token)
                and hmac.compare_digest(capability_digest(token), self._capability)
            ):
                self.state = CLOSED
                return Send(
                    handshake_error("UNAUTHORIZED", "Invalid or missing capability token"), True
                )
        self.state = OPEN
        self.version = version
        return Send(
            encode({"v": version, "op": "handshake", "ok": True, "data": {"version": version}})
        )

    def request(self, body: bytes) -> Request | Send:
        """The request in frame payload *body* of an open connection, or the error it gets.

        Raises:
            ProtocolError: the payload is not a JSON object.
        """
        # An id, an op and a payload object, decoded straight into a Request;
        # anything else takes the long way (see _envelope for bytes over 0x7f).
        req: Request | Send | None
        try:
            req = _request_decoder.decode(body) if body.isascii() else None
        except (msgspec.DecodeError, RecursionError):
            req = None
        if req is None or not 0 < len(req.id) <= MAX_ID_LENGTH or not req.op:
            try:
                envelope = _envelope(body)
            except ProtocolError:
                self.state = CLOSED
                raise
            req = self._checked(envelope)
            if isinstance(req, Send):
                return req
        rid = req.id
        in_flight = self.in_flight_ids
        if rid in in_flight:
            return Send(self._error(rid, "INVALID_REQUEST", "Duplicate request id"))
        if len(in_flight) - len(self._shared) >= self._max_in_flight:
            return Send(
                self._error(
                    rid,
                    "RESOURCE_EXHAUSTED",
                    f"more than {self._max_in_flight} requests in flight on this connection",
                )
            )
        in_flight.add(rid)
        return req

    def _checked(self, envelope: _Envelope) -> Request | Send:
        """The request in *envelope*, or the error its envelope gets."""
        rid, op, payload = envelope.id, envelope.op, envelope.payload
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_LENGTH:
            echo = rid if isinstance(rid, str) else "unknown"
            return Send(self._error(echo[:MAX_ID_LENGTH], "INVALID_REQUEST", _ID_PROBLEM))
        if not isinstance(op, str) or not op:
            return Send(self._error(rid, "INVALID_REQUEST", "missing or non-string 'op'"))
        if payload is None:
            payload = {}
        elif not isinstance(payload, dict):
            return Send(self._error(rid, "INVALID_REQUEST", "'payload' must be a JSON object"))
        return Request(rid, op, payload)

    # -- output --

    def reply_ok(self, rid: str, data: Any) -> bytes:
        """Answer request *rid* with ``data`` (any JSON-encodable object)."""
        return self.reply_ok_raw(rid, _encoder.encode(data))

    def reply_ok_raw(self, rid: str, data_json: bytes) -> bytes:
        """Answer request *rid* with an already-encoded JSON object (the hot path)."""
        self.in_flight_ids.discard(rid)
        if self._shared:
            self._shared.discard(rid)
        rid_json = _encoder.encode(rid)
        size = len(rid_json) + len(data_json) + _OK_SIZE
        if size > MAX_FRAME and self.version == 1:
            return self._error(rid, "RESPONSE_TOO_LARGE", "response exceeds 64 KiB for a v1 peer")
        return b"".join((_pack_header(size), b'{"id":', rid_json, _OK, data_json, b"}"))

    def reply_error(
        self,
        rid: str,
        code: str,
        message: str,
        retry_after: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        """Answer request *rid* with an error.

        ``retry_after`` in seconds (``RATE_LIMITED``, ``ALL_BUCKETS_EXHAUSTED``);
        ``extra`` adds fields such as ``bucketFailureReasons``.
        """
        self.in_flight_ids.discard(rid)
        self._shared.discard(rid)
        return self._error(rid, code, message, retry_after, extra)

    def _error(
        self,
        rid: str,
        code: str,
        message: str,
        retry_after: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bytes:
        obj: dict[str, Any] = {"id": rid, "ok": False, "code": code, "error": message}
        if retry_after is not None:
            obj["retryAfter"] = retry_after
        if extra:
            obj.update(extra)
        return encode(obj)


_ID_PROBLEM = f"missing or invalid 'id' (a string of 1 to {MAX_ID_LENGTH} characters)"
