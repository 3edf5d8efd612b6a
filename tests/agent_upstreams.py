"""A fake Anthropic, OpenAI Responses and Gemini API over HTTPS on loopback, for the agent CLIs.

Usage: ``python agent_upstreams.py CERT_AND_KEY PORT_FILE LOG_FILE``

Run as a subprocess by ``test_agents.py``. It serves, on 127.0.0.1 and an
ephemeral port (written to PORT_FILE once it listens), what Claude Code, Codex
and Gemini CLI ask of their providers, every answer the fixed text
:data:`REPLY`:

- ``POST /v1/messages``: the Anthropic Messages API; with ``"stream": true``
  its server-sent events (``message_start`` ... ``message_stop``), else one
  JSON message. ``POST /v1/messages/count_tokens`` answers a count.
- ``POST /v1/responses``: the OpenAI Responses API's event stream
  (``response.created``, ``response.output_item.added``, text deltas,
  ``response.output_item.done``, ``response.completed``). A WebSocket
  handshake on ``GET /v1/responses`` is refused with ``426 Upgrade
  Required``: this fake speaks HTTP only, as a server without Responses
  WebSockets does.
- ``POST /v1beta/models/MODEL:streamGenerateContent?alt=sse``: Gemini's
  event stream of ``GenerateContentResponse`` chunks (the last with
  ``finishReason`` and ``usageMetadata``); ``:generateContent`` answers one
  JSON response, ``:countTokens`` a count.

Every other request gets a 404. No credential is checked: each request is
answered, and recorded as one JSON line in LOG_FILE (method, path with query,
headers with names lower-cased, the body's ``model`` and ``stream``, and
whether the body holds :data:`PROMPT`), so a test asserts on what reached the
upstream. Each event is its own chunk, written and flushed 20 ms apart, so a
client reading the stream gets it in pieces. Standard library only.
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPLY = "credproxy relayed this fixed reply 7f3a"
PROMPT = "Say the fixed reply credproxy-prompt-51c9"
USAGE_TOKENS = (12, 7)  # input, output


def _words() -> list[str]:
    words = REPLY.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _event(name: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def anthropic_message(model: str) -> dict[str, Any]:
    return {
        "id": "msg_fake_agents",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": REPLY}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": USAGE_TOKENS[0], "output_tokens": USAGE_TOKENS[1]},
    }


def anthropic_events(model: str) -> list[bytes]:
    def ev(name: str, data: dict[str, Any]) -> bytes:
        return _event(name, {"type": name, **data})

    start = {**anthropic_message(model), "content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": USAGE_TOKENS[0], "output_tokens": 1}
    events = [
        ev("message_start", {"message": start}),
        ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    events += [
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
        for w in _words()
    ]
    events += [
        ev("content_block_stop", {"index": 0}),
        ev(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": USAGE_TOKENS[1]},
            },
        ),
        ev("message_stop", {}),
    ]
    return events


def responses_events(model: str) -> list[bytes]:
    """The OpenAI Responses API's stream for one assistant message of :data:`REPLY`."""
    rid, mid = "resp_fake_agents", "msg_fake_agents"
    base = {
        "id": rid,
        "object": "response",
        "created_at": 1_700_000_000,
        "model": model,
        "status": "in_progress",
        "output": [],
    }
    item = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "status": "in_progress",
        "content": [],
    }
    part = {"type": "output_text", "text": "", "annotations": []}
    done_item = {**item, "status": "completed", "content": [{**part, "text": REPLY}]}
    usage = {
        "input_tokens": USAGE_TOKENS[0],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": USAGE_TOKENS[1],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": sum(USAGE_TOKENS),
    }
    seq = iter(range(1000))

    def ev(name: str, data: dict[str, Any]) -> bytes:
        return _event(name, {"type": name, "sequence_number": next(seq), **data})

    events = [
        ev("response.created", {"response": base}),
        ev("response.in_progress", {"response": base}),
        ev("response.output_item.added", {"output_index": 0, "item": item}),
        ev(
            "response.content_part.added",
            {"item_id": mid, "output_index": 0, "content_index": 0, "part": part},
        ),
    ]
    events += [
        ev(
            "response.output_text.delta",
            {"item_id": mid, "output_index": 0, "content_index": 0, "delta": w},
        )
        for w in _words()
    ]
    events += [
        ev(
            "response.output_text.done",
            {"item_id": mid, "output_index": 0, "content_index": 0, "text": REPLY},
        ),
        ev(
            "response.content_part.done",
            {
                "item_id": mid,
                "output_index": 0,
                "content_index": 0,
                "part": {**part, "text": REPLY},
            },
        ),
        ev("response.output_item.done", {"output_index": 0, "item": done_item}),
        ev(
            "response.completed",
            {"response": {**base, "status": "completed", "output": [done_item], "usage": usage}},
        ),
    ]
    return events


def gemini_chunk(text: str, model: str, last: bool) -> dict[str, Any]:
    candidate: dict[str, Any] = {
        "content": {"role": "model", "parts": [{"text": text}]},
        "index": 0,
    }
    chunk: dict[str, Any] = {"candidates": [candidate], "modelVersion": model}
    if last:
        candidate["finishReason"] = "STOP"
        chunk["usageMetadata"] = {
            "promptTokenCount": USAGE_TOKENS[0],
            "candidatesTokenCount": USAGE_TOKENS[1],
            "totalTokenCount": sum(USAGE_TOKENS),
        }
    return chunk


def gemini_events(model: str) -> list[bytes]:
    words = _words()
    return [_event(None, gemini_chunk(w, model, i == len(words) - 1)) for i, w in enumerate(words)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked streams
    log_file: Path
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the JSON log is the record

    def do_GET(self) -> None:
        self._record({}, b"")
        path = self.path.partition("?")[0]
        if path == "/v1/responses" and "websocket" in self.headers.get("upgrade", "").lower():
            self._json(426, {"error": {"type": "upgrade_required", "message": "HTTP only"}})
        else:
            self._json(404, {"error": {"type": "not_found", "message": path}})

    def do_POST(self) -> None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            raw = self._read_chunked()
        else:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        self._record(body, raw)
        path = self.path.partition("?")[0]
        model = str(body.get("model", "fake-model"))
        if path == "/v1/messages":
            if body.get("stream"):
                self._sse(anthropic_events(model))
            else:
                self._json(200, anthropic_message(model))
        elif path == "/v1/messages/count_tokens":
            self._json(200, {"input_tokens": USAGE_TOKENS[0]})
        elif path == "/v1/responses":
            self._sse(responses_events(model))
        elif path.startswith("/v1beta/models/") and ":" in path:
            model, _, method = path.removeprefix("/v1beta/models/").partition(":")
            if method == "streamGenerateContent":
                self._sse(gemini_events(model))
            elif method == "generateContent":
                self._json(200, gemini_chunk(REPLY, model, last=True))
            elif method == "countTokens":
                self._json(200, {"totalTokens": USAGE_TOKENS[0]})
            else:
                self._json(404, {"error": {"code": 404, "message": path}})
        else:
            self._json(404, {"error": {"type": "not_found", "message": path}})

    def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(out)
            out += self.rfile.read(size)
            self.rfile.readline()

    def _record(self, body: dict[str, Any], raw: bytes) -> None:
        line = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "stream": body.get("stream"),
            "model": body.get("model"),
            "prompt": PROMPT.encode() in raw,
        }
        with self.lock, self.log_file.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for event in events:  # one chunk per event, flushed as it is written
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.wfile.flush()
                time.sleep(0.02)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the proxy hung up (its client went away): nothing to finish
            self.close_connection = True


def main(argv: list[str]) -> int:
    cert_and_key, port_file, log_file = argv
    Handler.log_file = Path(log_file)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_and_key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    tmp = Path(port_file + ".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.rename(port_file)  # the test sees the whole number or nothing
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
