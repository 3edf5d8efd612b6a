"""A fake OpenAI / Anthropic API over HTTPS on loopback, run as a subprocess by end-to-end tests.

Usage: ``python https_upstream.py CERT KEY PORT_FILE LOG_FILE``

It serves, on 127.0.0.1 and an ephemeral port (written to PORT_FILE once it
listens):

- ``POST /v1/chat/completions``: an OpenAI chat completion, or with
  ``"stream": true`` its server-sent events (chunks, then ``data: [DONE]``);
- ``POST /v1/messages``: an Anthropic message, or with ``"stream": true`` its
  event stream (``message_start`` ... ``message_stop``);
- ``POST /v1/slow``: an event stream of one ``data: tick`` every 0.1 s for up to
  60 s (a long answer a client may walk away from).

A non-streaming answer is gzip-compressed when the request's
``Accept-Encoding`` names gzip, as the real APIs do. Any other path gets a 404.
No credential is checked: every request is answered, and recorded as one JSON
line in LOG_FILE (method, path, headers with names lower-cased, and the request
body's ``stream`` and ``model``), so a test can assert on what reached the
upstream. Standard library only.
"""

from __future__ import annotations

import gzip
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

OPENAI_TEXT = "Hello from the fake OpenAI upstream"
ANTHROPIC_TEXT = "Hello from the fake Anthropic upstream"


def _openai(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": OPENAI_TEXT},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
    }


def _openai_events(model: str) -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        body = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    words = OPENAI_TEXT.split(" ")
    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": w if i == 0 else " " + w}, None) for i, w in enumerate(words)]
    events += [chunk({}, "stop"), b"data: [DONE]\n\n"]
    return events


def _anthropic(model: str) -> dict[str, Any]:
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": ANTHROPIC_TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 6},
    }


def _anthropic_events(model: str) -> list[bytes]:
    def event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

    start = {**_anthropic(model), "content": [], "stop_reason": None}
    start["usage"] = {"input_tokens": 3, "output_tokens": 0}
    words = ANTHROPIC_TEXT.split(" ")
    events = [
        event("message_start", {"message": start}),
        event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    events += [
        event(
            "content_block_delta",
            {"index": 0, "delta": {"type": "text_delta", "text": w if i == 0 else " " + w}},
        )
        for i, w in enumerate(words)
    ]
    events += [
        event("content_block_stop", {"index": 0}),
        event(
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 6},
            },
        ),
        event("message_stop", {}),
    ]
    return events


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked streams
    log_file: Path
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the JSON log is the record

    def do_GET(self) -> None:
        self._record({})
        self._json(404, {"error": {"type": "not_found", "message": self.path}})

    def do_POST(self) -> None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            raw = self._read_chunked()
        else:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        self._record(body)
        model = str(body.get("model", "fake-model"))
        path = self.path.partition("?")[0]
        if path == "/v1/chat/completions":
            if body.get("stream"):
                self._sse(_openai_events(model))
            else:
                self._json(200, _openai(model))
        elif path == "/v1/slow":
            self._sse([b"data: tick\n\n"] * 600, pause=0.1)
        elif path == "/v1/messages":
            if body.get("stream"):
                self._sse(_anthropic_events(model))
            else:
                self._json(200, _anthropic(model))
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

    def _record(self, body: dict[str, Any]) -> None:
        line = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "stream": bool(body.get("stream")),
            "model": body.get("model"),
        }
        with self.lock, self.log_file.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        if "gzip" in self.headers.get("accept-encoding", ""):
            data = gzip.compress(data)  # as the real APIs do when asked
            self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[bytes], pause: float = 0.0) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for event in events:  # one chunk per event, flushed as it is written
                self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                self.wfile.flush()
                if pause:
                    time.sleep(pause)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:  # the proxy hung up (its client went away): nothing to finish
            self.close_connection = True


def main(argv: list[str]) -> int:
    cert, key, port_file, log_file = argv
    Handler.log_file = Path(log_file)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
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
