"""The sans-IO wire protocol: frame splitting, the connection state machine, limits.

Everything here is bytes in, bytes out: no sockets, no clocks. The expected
bytes are llxprt-code's (see docs/protocol.md section 9, "Compatibility with llxprt-code").
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from credproxy.core.connection import TokenBucket
from credproxy.core.names import name_field
from credproxy.core.protocol import (
    CLOSED,
    MAX_FRAME,
    NEED_DATA,
    OPEN,
    FrameReader,
    FrameTooLarge,
    MalformedFrame,
    Request,
    Send,
    ServerConnection,
    capability_digest,
    decode_object,
    encode,
    frame,
)
from credproxy.errors import InvalidName, ProtocolError

CAPABILITY = "0123456789abcdef" * 4


# -- helpers ----------------------------------------------------------------------


def drain(reader: FrameReader) -> list[bytes]:
    """Every complete payload the reader holds right now."""
    out = []
    while (payload := reader.next_frame()) is not None:
        out.append(payload)
    return out


def unframe(data: bytes) -> list[dict[str, Any]]:
    """Split bytes the server produced into JSON objects, checking every length prefix."""
    objs = []
    while data:
        assert len(data) >= 4, "truncated header"
        size = int.from_bytes(data[:4], "big")
        body, data = data[4 : 4 + size], data[4 + size :]
        assert len(body) == size, "truncated body"
        obj = json.loads(body)
        assert isinstance(obj, dict)
        objs.append(obj)
    return objs


def one(data: bytes) -> dict[str, Any]:
    """The single frame in *data*."""
    (obj,) = unframe(data)
    return obj


def raw(obj: Any) -> bytes:
    """Frame *obj* as a client would (json.dumps, not our encoder)."""
    return frame(json.dumps(obj).encode())


def handshake_frame(lo: int = 1, hi: int = 2, **payload: Any) -> bytes:
    return raw(
        {"v": 1, "op": "handshake", "payload": {"minVersion": lo, "maxVersion": hi, **payload}}
    )


def feed(conn: ServerConnection, data: bytes) -> Any:
    """Feed *data* and return the one event it produces."""
    conn.receive_data(data)
    ev = conn.next_event()
    assert ev is not NEED_DATA
    return ev


def opened(lo: int = 1, hi: int = 2, **kwargs: Any) -> ServerConnection:
    """A connection past a successful handshake."""
    conn = ServerConnection(**kwargs)
    ev = feed(conn, handshake_frame(lo, hi))
    assert isinstance(ev, Send)
    assert one(ev.data)["ok"] is True
    assert conn.state == OPEN
    return conn


def request(conn: ServerConnection, rid: Any, op: Any = "get_token", **extra: Any) -> Any:
    obj: dict[str, Any] = {"v": 2, "op": op, "payload": {"provider": "p"}, **extra}
    if rid is not None:
        obj["id"] = rid
    return feed(conn, raw(obj))


# -- FrameReader ------------------------------------------------------------------


STREAM_PAYLOADS = [b'{"a":1}', b"{}", b"", b'{"op":"x","payload":{"k":[1,2,3]}}']
STREAM = b"".join(frame(p) for p in STREAM_PAYLOADS)


def test_frames_split_at_every_pair_of_byte_boundaries_reassemble() -> None:
    """Cutting a stream of frames into three pieces anywhere yields the same frames in order."""
    n = len(STREAM)
    for i in range(n + 1):
        for j in range(i, n + 1):
            reader = FrameReader()
            got: list[bytes] = []
            for piece in (STREAM[:i], STREAM[i:j], STREAM[j:]):
                reader.feed(piece)
                got += drain(reader)
            assert got == STREAM_PAYLOADS, (i, j)
            assert reader.buffered == 0


def test_byte_at_a_time_reassembles() -> None:
    """Feeding one byte at a time yields each frame exactly when its last byte arrives."""
    reader = FrameReader()
    got = []
    ends = set()
    offset = 0
    for p in STREAM_PAYLOADS:
        offset += 4 + len(p)
        ends.add(offset)
    for k in range(len(STREAM)):
        reader.feed(STREAM[k : k + 1])
        new = drain(reader)
        assert bool(new) == (k + 1 in ends), k
        got += new
    assert got == STREAM_PAYLOADS


def test_many_frames_in_one_chunk_come_out_in_order() -> None:
    """A thousand frames delivered in one chunk are all returned, in order."""
    payloads = [json.dumps({"n": i}).encode() for i in range(1000)]
    reader = FrameReader()
    reader.feed(b"".join(frame(p) for p in payloads))
    assert drain(reader) == payloads
    assert reader.buffered == 0


def test_frame_of_exactly_max_size_is_accepted() -> None:
    """A 65,536-byte payload (the limit itself) is accepted."""
    payload = b"x" * MAX_FRAME
    reader = FrameReader()
    reader.feed(frame(payload))
    assert drain(reader) == [payload]


def test_oversized_frame_is_refused_as_soon_as_its_header_arrives() -> None:
    """A header announcing 65,537 bytes raises FrameTooLarge before any body byte is sent."""
    reader = FrameReader()
    reader.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        reader.next_frame()


def test_oversized_header_is_refused_after_an_earlier_good_frame() -> None:
    """A good frame followed by an oversized header yields the good frame, then the error."""
    reader = FrameReader()
    reader.feed(frame(b"{}") + (2**32 - 1).to_bytes(4, "big"))
    assert reader.next_frame() == b"{}"
    with pytest.raises(FrameTooLarge):
        reader.next_frame()


def test_awaiting_body_arms_only_after_a_complete_header() -> None:
    """One to three stray header bytes never count as awaiting a body; four do, until the body ends."""
    data = frame(b'{"k":"v"}')
    reader = FrameReader()
    for k in range(3):
        reader.feed(data[k : k + 1])
        assert reader.next_frame() is None
        assert reader.awaiting_body is False, k
    reader.feed(data[3:4])
    assert reader.next_frame() is None
    assert reader.awaiting_body is True
    reader.feed(data[4:-1])
    assert reader.next_frame() is None
    assert reader.awaiting_body is True
    reader.feed(data[-1:])
    assert reader.next_frame() == b'{"k":"v"}'
    assert reader.awaiting_body is False


def test_empty_frame_never_awaits_a_body() -> None:
    """A zero-length frame is complete with its header and leaves nothing pending."""
    reader = FrameReader()
    reader.feed(frame(b""))
    assert reader.next_frame() == b""
    assert reader.awaiting_body is False


def _chunk(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return pieces


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=6,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


@settings(max_examples=100, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8), cuts=st.lists(st.integers(0, 10_000))
)
def test_valid_frames_round_trip_through_any_chunking(
    payloads: list[bytes], cuts: list[int]
) -> None:
    """Whatever the chunking, the reader returns exactly the payloads that were framed."""
    data = b"".join(frame(p) for p in payloads)
    reader = FrameReader()
    got: list[bytes] = []
    for piece in _chunk(data, cuts):
        reader.feed(piece)
        got += drain(reader)
    assert got == payloads
    assert reader.buffered == 0
    assert reader.awaiting_body is False


@settings(max_examples=60, deadline=None)
@given(objs=st.lists(json_objects, max_size=4), cuts=st.lists(st.integers(0, 10_000)))
def test_json_objects_round_trip_through_encode_and_any_chunking(
    objs: list[dict[str, Any]], cuts: list[int]
) -> None:
    """encode() then the reader and decode_object() give back equal objects."""
    data = b"".join(encode(o) for o in objs)
    reader = FrameReader()
    got: list[dict[str, Any]] = []
    for piece in _chunk(data, cuts):
        reader.feed(piece)
        got += [decode_object(p) for p in drain(reader)]
    assert got == objs


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_arbitrary_bytes_only_ever_raise_protocol_errors_from_the_reader(
    data: bytes, cuts: list[int]
) -> None:
    """Random bytes in random chunks give frames or a ProtocolError, nothing else."""
    reader = FrameReader(max_frame=512)
    try:
        for piece in _chunk(data, cuts):
            reader.feed(piece)
            drain(reader)
    except ProtocolError:
        pass


# Pieces of a byte stream a hostile or confused peer might send: mostly frames
# that parse (so the state machine gets past the handshake), some junk.
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, 3, 0, "1", None, True]),
        "id": st.one_of(
            st.sampled_from(["1", "2", "3", "4"]),
            st.text(max_size=4),
            st.integers(),
            st.none(),
            st.text(min_size=129, max_size=140),
        ),
        "op": st.one_of(st.sampled_from(["handshake", "get_token", ""]), st.integers()),
        "payload": st.one_of(
            json_objects,
            st.fixed_dictionaries(
                {},
                optional={
                    "minVersion": st.integers(-1, 4),
                    "maxVersion": st.integers(-1, 4),
                    "capabilityToken": st.sampled_from([CAPABILITY, "ab" * 32, 7]),
                },
            ),
            json_values,
        ),
    },
)
stream_starts = st.sampled_from(
    [b"", handshake_frame(), handshake_frame(1, 1), handshake_frame(capabilityToken=CAPABILITY)]
)
requests = st.builds(
    lambda rid, op, payload: raw({"v": 2, "id": rid, "op": op, "payload": payload}),
    st.sampled_from(["1", "2", "3", "4"]),
    st.sampled_from(["get_token", "handshake", "list_providers"]),
    st.dictionaries(
        st.sampled_from(["provider", "bucket", "name"]),
        st.one_of(st.text(max_size=5), st.integers()),
    ),
)
stream_pieces = st.one_of(
    requests,
    requests,
    requests,
    requests,
    envelopes.map(raw),
    st.one_of(json_values.map(lambda v: frame(json.dumps(v).encode())), st.binary(max_size=8)),
)


@settings(max_examples=150, deadline=None)
@given(
    start=stream_starts,
    pieces=st.lists(stream_pieces, max_size=15),
    cuts=st.lists(st.integers(0, 100_000), max_size=25),
    with_capability=st.booleans(),
    answer=st.booleans(),
)
def test_server_connection_survives_any_input_with_only_protocol_errors(
    start: bytes, pieces: list[bytes], cuts: list[int], with_capability: bool, answer: bool
) -> None:
    """Any byte stream in any chunking yields events or a ProtocolError, and every byte sent back is a valid frame."""
    conn = ServerConnection(
        capability=capability_digest(CAPABILITY) if with_capability else None, max_in_flight=3
    )
    out = bytearray()

    def run() -> None:
        for piece in _chunk(start + b"".join(pieces), cuts):
            conn.receive_data(piece)
            while (ev := conn.next_event()) is not NEED_DATA:
                if isinstance(ev, Send):
                    out.extend(ev.data)
                    if ev.close:
                        assert conn.state == CLOSED
                        return
                else:
                    event("request handed on")
                    assert isinstance(ev, Request)
                    assert conn.state == OPEN
                    if answer and ev.id != "4":
                        out.extend(conn.reply_ok(ev.id, {"echo": ev.payload}))

    try:
        run()
    except ProtocolError:
        assert conn.state == CLOSED
    for obj in unframe(bytes(out)):
        assert isinstance(obj.get("ok"), bool)
        event(f"reply {obj.get('code', 'ok')}")


def test_deeply_nested_json_is_a_protocol_error() -> None:
    """A small frame of valid but deeply nested JSON is refused as malformed, not a crash.

    (Regression: the decoder's RecursionError used to escape and take the daemon down.)
    """
    conn = opened()
    body = b'{"id":"x","op":"get_token","payload":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    assert len(body) < MAX_FRAME
    conn.receive_data(frame(body))
    with pytest.raises(ProtocolError):
        conn.next_event()


# -- ServerConnection: handshake ---------------------------------------------------------


def test_v1_only_client_negotiates_version_1() -> None:
    """A client offering 1..1 gets exactly llxprt's v1 handshake reply."""
    conn = ServerConnection()
    ev = feed(conn, handshake_frame(1, 1))
    assert ev == Send(frame(b'{"v":1,"op":"handshake","ok":true,"data":{"version":1}}'))
    assert (conn.state, conn.version) == (OPEN, 1)


@pytest.mark.parametrize(("lo", "hi"), [(1, 2), (2, 2), (1, 9), (2, 3)])
def test_v2_capable_client_negotiates_version_2(lo: int, hi: int) -> None:
    """A client whose range includes 2 gets version 2, the highest both support."""
    conn = ServerConnection()
    ev = feed(conn, handshake_frame(lo, hi))
    assert one(ev.data) == {"v": 2, "op": "handshake", "ok": True, "data": {"version": 2}}
    assert (ev.close, conn.version) == (False, 2)


@pytest.mark.parametrize(
    "hello",
    [
        {"v": 1, "op": "handshake", "payload": {"minVersion": 3, "maxVersion": 5}},
        {"v": 1, "op": "handshake", "payload": {"minVersion": 0, "maxVersion": 0}},
        {"op": "handshake", "payload": {"minVersion": 2, "maxVersion": 1}},
        {"v": 3, "op": "handshake"},
        {"v": 0, "op": "handshake"},
        {"v": "1", "op": "handshake"},
        {"v": True, "op": "handshake"},
        {"op": "handshake"},
    ],
    ids=["above", "below", "min>max", "v3", "v0", "v-string", "v-bool", "nothing"],
)
def test_unsupported_versions_are_refused_and_closed(hello: dict[str, Any]) -> None:
    """No common version gets llxprt's UNKNOWN_VERSION reply and closes the connection."""
    conn = ServerConnection()
    ev = feed(conn, raw(hello))
    assert ev.close is True
    assert one(ev.data) == {
        "v": 1,
        "op": "handshake",
        "ok": False,
        "code": "UNKNOWN_VERSION",
        "error": "Unsupported protocol version",
    }
    assert conn.state == CLOSED
    conn.receive_data(raw({"v": 1, "id": "1", "op": "get_token", "payload": {}}))
    with pytest.raises(ProtocolError):
        conn.next_event()


@pytest.mark.parametrize(("v", "version"), [(1, 1), (2, 2)])
def test_bare_v_is_accepted_as_the_version(v: int, version: int) -> None:
    """A handshake with only a numeric v (llxprt's v1 client style) gets that version."""
    conn = ServerConnection()
    ev = feed(conn, raw({"v": v, "op": "handshake"}))
    assert one(ev.data)["data"] == {"version": version}


def test_first_frame_is_the_handshake_whatever_its_op() -> None:
    """A first frame that looks like a request is answered as a handshake, not handed on."""
    conn = ServerConnection()
    ev = feed(conn, raw({"v": 1, "id": "r1", "op": "get_token", "payload": {"provider": "p"}}))
    assert isinstance(ev, Send)
    assert one(ev.data) == {"v": 1, "op": "handshake", "ok": True, "data": {"version": 1}}
    ev = request(conn, "r2")
    assert ev == Request("r2", "get_token", {"provider": "p"})


def test_a_second_handshake_is_just_an_id_less_request() -> None:
    """Once open, a handshake frame without id is an INVALID_REQUEST, and the connection stays open."""
    conn = opened()
    ev = feed(conn, handshake_frame())
    assert one(ev.data)["code"] == "INVALID_REQUEST"
    assert (ev.close, conn.state) == (False, OPEN)


def test_capability_required_and_missing_is_unauthorized() -> None:
    """A session with a capability refuses a handshake without one, with llxprt's reply, and closes."""
    conn = ServerConnection(capability=capability_digest(CAPABILITY))
    ev = feed(conn, handshake_frame())
    assert ev.close is True
    assert one(ev.data) == {
        "v": 1,
        "op": "handshake",
        "ok": False,
        "code": "UNAUTHORIZED",
        "error": "Invalid or missing capability token",
    }
    assert conn.state == CLOSED


@pytest.mark.parametrize("token", ["ab" * 32, CAPABILITY[:-1], CAPABILITY + "0", 12345, None])
def test_wrong_capability_is_unauthorized(token: Any) -> None:
    """A wrong, truncated, extended or non-string capability token is refused and closes."""
    conn = ServerConnection(capability=capability_digest(CAPABILITY))
    ev = feed(conn, handshake_frame(capabilityToken=token))
    assert (one(ev.data)["code"], ev.close, conn.state) == ("UNAUTHORIZED", True, CLOSED)


def test_right_capability_opens_the_connection() -> None:
    """The session's own capability token opens the connection at version 2."""
    conn = ServerConnection(capability=capability_digest(CAPABILITY))
    ev = feed(conn, handshake_frame(capabilityToken=CAPABILITY))
    assert one(ev.data) == {"v": 2, "op": "handshake", "ok": True, "data": {"version": 2}}
    assert conn.state == OPEN


def test_capability_offered_but_not_required_is_fine() -> None:
    """A client that sends a capability to a session that needs none is accepted."""
    conn = ServerConnection()
    ev = feed(conn, handshake_frame(capabilityToken=CAPABILITY))
    assert one(ev.data)["ok"] is True


def test_version_is_checked_before_the_capability() -> None:
    """An unsupported version is UNKNOWN_VERSION even when the capability is right."""
    conn = ServerConnection(capability=capability_digest(CAPABILITY))
    ev = feed(conn, handshake_frame(3, 4, capabilityToken=CAPABILITY))
    assert one(ev.data)["code"] == "UNKNOWN_VERSION"


# -- ServerConnection: requests ----------------------------------------------------------


def test_well_formed_request_becomes_a_request_event() -> None:
    """A request with id, op and payload is handed on as a Request; null or absent payload is {}."""
    conn = opened()
    assert request(conn, "a") == Request("a", "get_token", {"provider": "p"})
    assert feed(conn, raw({"id": "b", "op": "list_providers"})) == Request(
        "b", "list_providers", {}
    )
    assert feed(conn, raw({"id": "c", "op": "x", "payload": None})) == Request("c", "x", {})
    assert conn.in_flight == 3


@pytest.mark.parametrize(
    ("frame_obj", "echo"),
    [
        ({"op": "get_token", "payload": {}}, "unknown"),
        ({"id": None, "op": "get_token"}, "unknown"),
        ({"id": 7, "op": "get_token"}, "unknown"),
        ({"id": ["x"], "op": "get_token"}, "unknown"),
        ({"id": "", "op": "get_token"}, ""),
        ({"id": "L" * 129, "op": "get_token"}, "L" * 128),
    ],
    ids=["missing", "null", "number", "list", "empty", "too-long"],
)
def test_bad_id_is_invalid_request(frame_obj: dict[str, Any], echo: str) -> None:
    """A missing or non-string id gets INVALID_REQUEST with id "unknown" (llxprt), and the connection stays open."""
    conn = opened()
    ev = feed(conn, raw(frame_obj))
    reply = one(ev.data)
    assert (reply["id"], reply["ok"], reply["code"]) == (echo, False, "INVALID_REQUEST")
    assert (ev.close, conn.state, conn.in_flight) == (False, OPEN, 0)
    assert request(conn, "next") == Request("next", "get_token", {"provider": "p"})


@pytest.mark.parametrize("op", [None, 3, "", ["get_token"], {"op": "x"}])
def test_missing_or_non_string_op_is_invalid_request(op: Any) -> None:
    """A request whose op is missing or not a non-empty string gets INVALID_REQUEST with its id."""
    conn = opened()
    obj: dict[str, Any] = {"id": "r1", "payload": {}}
    if op is not None:
        obj["op"] = op
    reply = one(feed(conn, raw(obj)).data)
    assert (reply["id"], reply["code"]) == ("r1", "INVALID_REQUEST")
    assert conn.in_flight == 0


@pytest.mark.parametrize("payload", [[], ["provider"], "p", 3, True])
def test_non_object_payload_is_invalid_request(payload: Any) -> None:
    """A payload that is not a JSON object gets INVALID_REQUEST, and the id is not left in flight."""
    conn = opened()
    reply = one(feed(conn, raw({"id": "r1", "op": "get_token", "payload": payload})).data)
    assert reply == {
        "id": "r1",
        "ok": False,
        "code": "INVALID_REQUEST",
        "error": "'payload' must be a JSON object",
    }
    assert request(conn, "r1") == Request("r1", "get_token", {"provider": "p"})


def test_duplicate_in_flight_id_is_refused_and_reusable_after_the_reply() -> None:
    """An id already in flight gets "Duplicate request id"; once answered, it may be reused."""
    conn = opened()
    assert isinstance(request(conn, "same"), Request)
    dup = one(request(conn, "same").data)
    assert dup == {
        "id": "same",
        "ok": False,
        "code": "INVALID_REQUEST",
        "error": "Duplicate request id",
    }
    assert conn.in_flight == 1
    assert one(conn.reply_ok("same", {"n": 1})) == {"id": "same", "ok": True, "data": {"n": 1}}
    assert conn.in_flight == 0
    assert isinstance(request(conn, "same"), Request)


def test_seventeenth_request_in_flight_is_resource_exhausted() -> None:
    """Sixteen unanswered requests are accepted; the seventeenth is refused until one is answered."""
    conn = opened()
    for i in range(16):
        assert isinstance(request(conn, f"r{i}"), Request)
    refused = one(request(conn, "r16").data)
    assert (refused["id"], refused["ok"], refused["code"]) == ("r16", False, "RESOURCE_EXHAUSTED")
    assert conn.in_flight == 16
    conn.reply_error("r3", "NOT_FOUND", "no token")
    assert request(conn, "r16") == Request("r16", "get_token", {"provider": "p"})
    assert one(request(conn, "r17").data)["code"] == "RESOURCE_EXHAUSTED"


def test_error_reply_carries_retry_after_when_rate_limited() -> None:
    """reply_error with retry_after adds retryAfter (seconds) to the error frame."""
    conn = opened()
    request(conn, "r")
    assert one(conn.reply_error("r", "RATE_LIMITED", "slow down", retry_after=12)) == {
        "id": "r",
        "ok": False,
        "code": "RATE_LIMITED",
        "error": "slow down",
        "retryAfter": 12,
    }


def _data_of_body_size(body_size: int, rid: str = "r") -> dict[str, str]:
    """Response data whose reply body (without the 4-byte prefix) is exactly *body_size* bytes."""
    overhead = len(b'{"id":"' + rid.encode() + b'","ok":true,"data":{"k":""}}')
    return {"k": "x" * (body_size - overhead)}


def test_v1_peer_gets_response_too_large_beyond_64_kib() -> None:
    """A v1 peer gets a 65,536-byte reply intact, but RESPONSE_TOO_LARGE for one byte more."""
    conn = opened(1, 1)
    request(conn, "r")
    exact = conn.reply_ok("r", _data_of_body_size(MAX_FRAME))
    assert int.from_bytes(exact[:4], "big") == MAX_FRAME == len(exact) - 4
    assert one(exact)["ok"] is True
    request(conn, "r")
    too_big = one(conn.reply_ok("r", _data_of_body_size(MAX_FRAME + 1)))
    assert (too_big["id"], too_big["ok"], too_big["code"]) == ("r", False, "RESPONSE_TOO_LARGE")
    assert conn.in_flight == 0


def test_v2_peer_gets_large_responses() -> None:
    """A v2 peer receives a reply well over 64 KiB unchanged."""
    conn = opened(1, 2)
    request(conn, "r")
    data = _data_of_body_size(200_000)
    reply = conn.reply_ok("r", data)
    assert len(reply) == 4 + 200_000
    assert one(reply) == {"id": "r", "ok": True, "data": data}


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"id": "x", "op"', b"[1, 2]", b'"string"', b"null", b'{"k": "\xff"}', b""],
    ids=["garbage", "truncated", "array", "string", "null", "bad-utf8", "empty"],
)
@pytest.mark.parametrize("when", ["handshake", "open"])
def test_invalid_json_or_non_object_frame_is_a_protocol_error(body: bytes, when: str) -> None:
    """A frame that is not a UTF-8 JSON object raises MalformedFrame and closes the state machine."""
    conn = ServerConnection() if when == "handshake" else opened()
    conn.receive_data(frame(body))
    with pytest.raises(MalformedFrame):
        conn.next_event()
    assert conn.state == CLOSED
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_oversized_header_on_a_connection_is_a_protocol_error() -> None:
    """An oversized length closes the connection without a reply."""
    conn = opened()
    conn.receive_data((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        conn.next_event()
    assert conn.state == CLOSED


def test_connection_exposes_awaiting_body() -> None:
    """The connection reports a pending body only between a complete header and the body's end."""
    conn = opened()
    data = raw({"id": "a", "op": "x"})
    conn.receive_data(data[:2])
    assert conn.next_event() is NEED_DATA
    assert conn.awaiting_body is False
    conn.receive_data(data[2:6])
    assert conn.next_event() is NEED_DATA
    assert conn.awaiting_body is True
    conn.receive_data(data[6:])
    assert isinstance(conn.next_event(), Request)
    assert conn.awaiting_body is False


def test_pipelined_frames_in_one_chunk_are_all_processed() -> None:
    """A handshake and three requests in one chunk give the handshake reply then three events."""
    conn = ServerConnection()
    conn.receive_data(
        handshake_frame()
        + raw({"id": "1", "op": "a"})
        + raw({"id": "1", "op": "a"})
        + raw({"id": "2", "op": "b"})
    )
    events = []
    while (ev := conn.next_event()) is not NEED_DATA:
        events.append(ev)
    assert isinstance(events[0], Send)
    assert events[1] == Request("1", "a", {})
    assert one(events[2].data)["error"] == "Duplicate request id"
    assert events[3] == Request("2", "b", {})


# -- TokenBucket ----------------------------------------------------------------------


def test_token_bucket_allows_a_burst_then_paces_requests() -> None:
    """With rate 4/s and burst 3, three requests pass at once, the fourth waits 0.25 s."""
    bucket = TokenBucket(rate=4, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == 0.25
    assert bucket.take(100.125) == 0.125
    assert bucket.take(100.25) == 0.0
    assert bucket.take(100.25) == 0.25


def test_token_bucket_refused_requests_do_not_cost_anything() -> None:
    """Hammering while refused does not push the next allowed request further away."""
    bucket = TokenBucket(rate=2, burst=1, now=0.0)
    assert bucket.take(0.0) == 0.0
    for _ in range(100):
        assert bucket.take(0.25) == pytest.approx(0.25)
    assert bucket.take(0.5) == 0.0


def test_token_bucket_saves_up_no_more_than_the_burst() -> None:
    """After a long idle period only `burst` requests pass at once."""
    bucket = TokenBucket(rate=5, burst=4, now=0.0)
    results = [bucket.take(3600.0) for _ in range(6)]
    assert results[:4] == [0.0] * 4
    assert results[4] == pytest.approx(0.2)


def test_token_bucket_with_zero_rate_is_unlimited() -> None:
    """A rate of 0 disables the limit."""
    bucket = TokenBucket(rate=0, burst=1, now=0.0)
    assert all(bucket.take(0.0) == 0.0 for _ in range(10_000))


# -- name_field ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "default", "A.b_c@d-1", "x" * 64, "user@example.com"])
def test_name_field_accepts_valid_names(name: str) -> None:
    """Names of 1 to 64 characters from [A-Za-z0-9._@-] are returned as is."""
    assert name_field({"provider": name}, "provider") == name


def test_name_field_defaults_only_when_absent_or_null() -> None:
    """A missing or null field takes the default; without a default it is an error."""
    assert name_field({}, "bucket", default="default") == "default"
    assert name_field({"bucket": None}, "bucket", default="default") == "default"
    with pytest.raises(InvalidName, match="missing 'provider'"):
        name_field({}, "provider")


@pytest.mark.parametrize(
    "value",
    ["../x", "a/b", "", ".", "..", "x" * 65, "a b", "ü", "a\x00", 3, ["a"], {"a": 1}, True],
)
def test_name_field_rejects_invalid_names(value: Any) -> None:
    """Path separators, empty, too long, other characters and non-strings raise InvalidName."""
    with pytest.raises(InvalidName):
        name_field({"provider": value}, "provider", default="default")


def test_name_field_rejects_a_trailing_newline() -> None:
    """A name with a trailing newline does not match the name rule (re's "$" would allow it)."""
    with pytest.raises(InvalidName):
        name_field({"provider": "prov\n"}, "provider")
    with pytest.raises(InvalidName):
        name_field({"provider": "x" * 64 + "\n"}, "provider")
