"""The sans-IO connection engine: rate limit, deadlines, reply encoding, shared requests.

:class:`~credproxy.core.connection.Connection` is driven here with bytes and
plain numbers for ``now``; what is asserted is what a peer would see (the
bytes it is sent) and what a driver would do (the deadline it sleeps until,
the reason it closes).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from credproxy.core.config import Limits
from credproxy.core.connection import GENERIC_ERROR, NEED_DATA, Connection, Request, Send
from credproxy.core.protocol import ServerConnection, encode
from credproxy.errors import (
    ConfigError,
    CredproxyError,
    NotFound,
    ProtocolError,
    RateLimited,
    StoreError,
)

CANARY = "CANARY-secret"
HANDSHAKE = encode({"v": 1, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 2}})


def request(rid: str, op: str = "get_token") -> bytes:
    return encode({"v": 2, "id": rid, "op": op, "payload": {"provider": "dev"}})


def unframe(data: bytes) -> list[dict[str, Any]]:
    """The JSON objects in bytes the connection produced, checking every length prefix."""
    objs = []
    while data:
        size = int.from_bytes(data[:4], "big")
        body, data = data[4 : 4 + size], data[4 + size :]
        assert len(body) == size, "truncated frame"
        objs.append(json.loads(body))
    return objs


def one(data: bytes) -> dict[str, Any]:
    (obj,) = unframe(data)
    assert isinstance(obj, dict)
    return obj


def opened(limits: Limits, now: float = 0.0) -> Connection:
    """A connection whose handshake completed at *now*."""
    conn = Connection(limits, now)
    conn.receive_data(HANDSHAKE)
    event = conn.next_event(now)
    assert isinstance(event, Send)
    assert one(event.data)["ok"] is True
    assert conn.next_event(now) is NEED_DATA
    return conn


def events(conn: Connection, data: bytes, now: float) -> list[Request | Send]:
    """Feed *data* and collect every event up to NEED_DATA, then note the read."""
    conn.receive_data(data)
    out: list[Request | Send] = []
    while (event := conn.next_event(now)) is not NEED_DATA:
        assert isinstance(event, Request | Send)
        out.append(event)
    conn.after_read(now)
    return out


# -- rate limit ------------------------------------------------------------------------------


def test_a_request_over_the_rate_is_answered_rate_limited_and_never_handed_out() -> None:
    """Past the burst, a request gets RATE_LIMITED with retryAfter and is not a Request event."""
    conn = opened(Limits(requests_per_second=0.5, request_burst=2))
    got = events(conn, request("r1") + request("r2") + request("r3"), now=0.0)
    assert [type(e) for e in got] == [Request, Request, Send]
    limited = got[2]
    assert isinstance(limited, Send)
    assert not limited.close
    assert one(limited.data) == {
        "id": "r3",
        "ok": False,
        "code": "RATE_LIMITED",
        "error": "too many requests on this connection; slow down",
        "retryAfter": 2,  # one request per 2 s sustained
    }
    assert conn.in_flight == 2  # the refused request holds no slot


def test_the_rate_limit_refills_over_time() -> None:
    """Two seconds later, at half a request per second, one more request gets through."""
    conn = opened(Limits(requests_per_second=0.5, request_burst=1))
    assert [type(e) for e in events(conn, request("r1") + request("r2"), 0.0)] == [Request, Send]
    assert [type(e) for e in events(conn, request("r3"), 1.0)] == [Send]
    assert [type(e) for e in events(conn, request("r4"), 3.0)] == [Request]


def test_a_zero_rate_disables_the_limit() -> None:
    """requests_per_second = 0 lets any number of requests through."""
    conn = opened(Limits(requests_per_second=0, request_burst=1, max_in_flight=1000))
    got = events(conn, b"".join(request(f"r{i}") for i in range(500)), 0.0)
    assert all(isinstance(e, Request) for e in got)
    assert len(got) == 500


def test_a_rate_limited_request_id_may_be_reused() -> None:
    """The refused id is not left in flight: sending it again is not a duplicate."""
    conn = opened(Limits(requests_per_second=1, request_burst=1))
    events(conn, request("r1") + request("r2"), 0.0)
    (again,) = events(conn, request("r2"), 1.0)
    assert isinstance(again, Request)
    assert again.id == "r2"


# -- body deadline ---------------------------------------------------------------------------


def test_a_header_without_its_body_arms_the_body_deadline() -> None:
    """Five seconds after a header arrived without its body, the connection must close."""
    conn = opened(Limits(idle_timeout=600))
    frame = request("r1")
    assert events(conn, frame[:10], now=100.0) == []
    assert conn.deadline() == 105.0
    assert conn.expired(104.9) is None
    assert conn.expired(105.0) == "frame body did not arrive within 5 s"


def test_stray_header_bytes_do_not_arm_the_body_deadline() -> None:
    """One to three bytes of a header are not a header yet: only the idle timeout applies."""
    conn = opened(Limits(idle_timeout=600), now=100.0)
    events(conn, request("r1")[:3], now=100.0)
    assert conn.deadline() == 700.0
    assert conn.expired(200.0) is None


def test_a_trickled_body_does_not_push_the_body_deadline() -> None:
    """Bytes of the body arriving one by one do not extend the 5 s from the header."""
    conn = opened(Limits(idle_timeout=600))
    frame = request("r1")
    events(conn, frame[:6], now=100.0)
    events(conn, frame[6:8], now=103.0)
    events(conn, frame[8:10], now=104.5)
    assert conn.deadline() == 105.0
    assert conn.expired(105.0) is not None


def test_a_completed_frame_disarms_the_body_deadline() -> None:
    """The rest of the body within 5 s gives a request and no body deadline."""
    conn = opened(Limits(idle_timeout=600))
    frame = request("r1")
    events(conn, frame[:10], now=100.0)
    (event,) = events(conn, frame[10:], now=104.0)
    assert isinstance(event, Request)
    assert conn.deadline() == math.inf  # in flight, and no partial frame
    assert conn.expired(1000.0) is None


def test_a_new_partial_frame_after_a_complete_one_arms_a_fresh_deadline() -> None:
    """A read that completes one frame and starts another times the new one from that read."""
    conn = opened(Limits(idle_timeout=600))
    events(conn, request("r1")[:10], now=100.0)
    second = request("r2")
    events(conn, request("r1")[10:] + second[:8], now=104.0)
    assert conn.deadline() == 109.0
    assert conn.expired(108.0) is None
    assert conn.expired(109.0) == "frame body did not arrive within 5 s"


# -- idle deadline ---------------------------------------------------------------------------


def test_an_unused_connection_idles_out() -> None:
    """With nothing sent at all, the connection closes idle_timeout after it opened."""
    conn = Connection(Limits(idle_timeout=7), 10.0)
    assert conn.deadline() == 17.0
    assert conn.expired(16.9) is None
    assert conn.expired(17.0) == "idle timeout"


def test_a_completed_frame_restarts_the_idle_clock() -> None:
    """The handshake at t=5 moves the idle deadline to t=12."""
    conn = opened(Limits(idle_timeout=7), now=5.0)
    assert conn.deadline() == 12.0


def test_no_idle_timeout_while_a_request_is_in_flight() -> None:
    """A slow request keeps the connection open however long it takes."""
    conn = opened(Limits(idle_timeout=7))
    events(conn, request("r1"), 1.0)
    assert conn.deadline() == math.inf
    assert conn.expired(10_000.0) is None


def test_the_idle_clock_restarts_when_the_last_request_is_answered() -> None:
    """Answering the only request in flight at t=100 gives an idle deadline of t=107."""
    conn = opened(Limits(idle_timeout=7))
    events(conn, request("r1") + request("r2"), 1.0)
    conn.answer("r1", b"{}", 50.0)
    assert conn.in_flight == 1
    assert conn.deadline() == math.inf
    assert conn.expired(60.0) is None
    reply = conn.fail("r2", NotFound("no token"), 100.0)
    assert one(reply)["code"] == "NOT_FOUND"
    assert conn.in_flight == 0
    assert conn.deadline() == 107.0
    assert conn.expired(106.9) is None
    assert conn.expired(107.0) == "idle timeout"


def test_the_body_deadline_applies_while_requests_are_in_flight() -> None:
    """A stalled frame closes the connection even while other requests are in flight."""
    conn = opened(Limits(idle_timeout=7))
    events(conn, request("r1") + request("r2")[:10], 1.0)
    assert conn.in_flight == 1
    assert conn.deadline() == 6.0
    assert conn.expired(6.0) == "frame body did not arrive within 5 s"


def test_the_body_deadline_is_reported_before_the_idle_timeout() -> None:
    """When both have passed, the reason given is the stalled body."""
    conn = Connection(Limits(idle_timeout=3), 0.0)
    events(conn, HANDSHAKE[:8], 0.0)
    assert conn.deadline() == 3.0
    assert conn.expired(3.0) == "idle timeout"
    assert conn.expired(5.0) == "frame body did not arrive within 5 s"


# -- replies ---------------------------------------------------------------------------------


def test_answer_encodes_the_data_and_frees_the_id() -> None:
    """An answer carries the id and the encoded data, and the id may be used again."""
    conn = opened(Limits())
    events(conn, request("r1"), 0.0)
    assert one(conn.answer("r1", b'{"access_token":"at"}', 1.0)) == {
        "id": "r1",
        "ok": True,
        "data": {"access_token": "at"},
    }
    (again,) = events(conn, request("r1"), 2.0)
    assert isinstance(again, Request)


@pytest.mark.parametrize(
    "exc", [CredproxyError(CANARY), StoreError(f"disk full at {CANARY}"), ConfigError(CANARY)]
)
def test_an_internal_error_never_sends_its_text(exc: CredproxyError) -> None:
    """INTERNAL_ERROR replies carry a generic message; the exception's text stays behind."""
    conn = opened(Limits())
    events(conn, request("r1"), 0.0)
    data = conn.fail("r1", exc, 1.0)
    assert b"CANARY" not in data
    assert one(data) == {"id": "r1", "ok": False, "code": "INTERNAL_ERROR", "error": GENERIC_ERROR}
    assert conn.in_flight == 0


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFound("no token for dev:default"), "NOT_FOUND"),
        (ProtocolError("bad"), "INVALID_REQUEST"),
    ],
)
def test_other_errors_are_sent_with_their_message(exc: CredproxyError, code: str) -> None:
    """Errors meant for the peer keep their code and message."""
    conn = opened(Limits())
    events(conn, request("r1"), 0.0)
    assert one(conn.fail("r1", exc, 1.0)) == {
        "id": "r1",
        "ok": False,
        "code": code,
        "error": str(exc),
    }


def test_a_rate_limited_error_carries_retry_after() -> None:
    """A handler that raises RateLimited has its retry_after sent as retryAfter."""
    conn = opened(Limits())
    events(conn, request("r1"), 0.0)
    reply = one(conn.fail("r1", RateLimited("refreshed 3 s ago", 27), 1.0))
    assert reply["code"] == "RATE_LIMITED"
    assert reply["retryAfter"] == 27


# -- requests sharing work -------------------------------------------------------------------


def test_twenty_requests_waiting_on_one_refresh_are_all_admitted() -> None:
    """llxprt's burst: 20 get_token of which 19 wait on the first one's refresh fit in 16."""
    conn = opened(Limits(max_in_flight=16))
    admitted = []
    for i in range(20):
        (event,) = events(conn, request(f"r{i}"), 0.0)
        assert isinstance(event, Request), one(event.data)
        admitted.append(event.id)
        if i > 0:
            conn.share(event.id)
    assert conn.in_flight == 20
    # Every one of them is answered, and each answer frees its id.
    for rid in admitted:
        assert one(conn.answer(rid, b"{}", 1.0))["id"] == rid
    assert conn.in_flight == 0


def test_seventeen_unshared_requests_exhaust_the_in_flight_limit() -> None:
    """Without sharing, the 17th request in flight is refused RESOURCE_EXHAUSTED."""
    conn = opened(Limits(max_in_flight=16))
    got = events(conn, b"".join(request(f"r{i}") for i in range(17)), 0.0)
    assert all(isinstance(e, Request) for e in got[:16])
    last = got[16]
    assert isinstance(last, Send)
    reply = one(last.data)
    assert reply["id"] == "r16"
    assert reply["code"] == "RESOURCE_EXHAUSTED"
    assert conn.in_flight == 16


def test_a_shared_request_is_released_when_answered() -> None:
    """Answering a shared request frees its id without leaving a spare slot behind."""
    conn = opened(Limits(max_in_flight=2))
    events(conn, request("r1") + request("r2"), 0.0)
    conn.share("r2")
    (r3,) = events(conn, request("r3"), 0.0)
    assert isinstance(r3, Request)  # r2 does not count: r1 and r3 fill the two slots
    conn.answer("r2", b"{}", 1.0)
    assert conn.in_flight == 2
    (refused,) = events(conn, request("r4"), 1.0)
    assert isinstance(refused, Send)
    assert one(refused.data)["code"] == "RESOURCE_EXHAUSTED"
    conn.answer("r1", b"{}", 2.0)
    (r4,) = events(conn, request("r4"), 2.0)
    assert isinstance(r4, Request)
    # And the answered shared id may be used again.
    conn.answer("r3", b"{}", 3.0)
    (r2,) = events(conn, request("r2"), 3.0)
    assert isinstance(r2, Request)


def test_a_shared_request_id_is_still_taken_until_answered() -> None:
    """A request waiting on another's work keeps its id: the same id again is a duplicate."""
    conn = opened(Limits())
    events(conn, request("r1") + request("r2"), 0.0)
    conn.share("r2")
    (dup,) = events(conn, request("r2"), 0.0)
    assert isinstance(dup, Send)
    assert one(dup.data)["error"] == "Duplicate request id"


def test_sharing_an_id_not_in_flight_changes_nothing() -> None:
    """Sharing an unknown or already answered id does not free a slot."""
    server = ServerConnection(max_in_flight=1)
    server.receive_data(HANDSHAKE + request("r1") + request("r2"))
    assert isinstance(server.next_event(), Send)
    assert isinstance(server.next_event(), Request)
    server.share("nope")
    refused = server.next_event()
    assert isinstance(refused, Send)
    assert one(refused.data)["code"] == "RESOURCE_EXHAUSTED"
    server.reply_ok("r1", {})
    server.share("r1")  # answered already
    server.receive_data(request("r3") + request("r4"))
    assert isinstance(server.next_event(), Request)
    assert isinstance(server.next_event(), Send)


def _drive(conn: Connection, reads: list[bytes], *, whole: bool) -> list[object]:
    """What a driver sees for *reads*, taking whole frames at once (``whole``) or not."""
    seen: list[object] = []
    for i, data in enumerate(reads):
        now = float(i)
        try:
            event = conn.take(data, now) if whole else None
            if event is None:
                if not whole:
                    conn.receive_data(data)
                while (event := conn.next_event(now)) is not NEED_DATA:
                    seen.append(event)
                conn.after_read(now)
            else:
                seen.append(event)
        except ProtocolError as exc:
            seen.append(type(exc))
            break
        seen.append((conn.deadline(), conn.in_flight, conn.buffered))
    return seen


_FRAMES = st.one_of(
    st.builds(request, st.text(min_size=0, max_size=3), st.sampled_from(["get_token", ""])),
    st.just(HANDSHAKE),
    st.binary(max_size=12).map(lambda b: len(b).to_bytes(4, "big") + b),  # not JSON
    st.just(b'\x00\x00\x00\x02{"'),  # a body that ends mid-object
    st.binary(max_size=6),  # stray bytes
)


@given(
    frames=st.lists(_FRAMES, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=4),
    rate=st.sampled_from([0.0, 1.0]),
)
def test_taking_a_whole_frame_is_the_same_as_buffering_it(
    frames: list[bytes], cuts: list[int], rate: float
) -> None:
    """The usual read's shortcut (a whole frame taken at once) gives a peer what splitting would.

    Whatever the reads (whole frames, frames cut anywhere, several in one read,
    garbage, the handshake again), the events, the errors, the deadline, the
    requests in flight and the bytes left buffered are the same either way.
    """
    stream = HANDSHAKE + b"".join(frames)
    points = sorted({min(c, len(stream)) for c in cuts})
    reads = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    frames_read = [HANDSHAKE, *frames] if not cuts else reads
    limits = Limits(requests_per_second=rate, request_burst=1)
    for chunks in (frames_read, reads):
        assert _drive(Connection(limits, 0.0), chunks, whole=True) == _drive(
            Connection(limits, 0.0), chunks, whole=False
        )
