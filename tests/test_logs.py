"""The real log pipeline: JSON lines, secrets redacted, tracebacks without locals."""

from __future__ import annotations

import json
import re
import subprocess
import sys

SCRIPT = r"""
import sys
from credproxy.shell import logs
logs.configure()
log = logs.get("t")

def refresh(refresh_token):
    client_secret = "CS-CANARY-tb"
    raise RuntimeError("upstream exploded")

try:
    refresh("RT-CANARY-tb")
except RuntimeError:
    log.exception("refresh_crashed", provider="dev")
log.info("oops", refresh_token="RT-CANARY-kw", api_key="KEY-CANARY-kw", fp="0123456789ab")
"""


def test_tracebacks_have_no_locals_and_secret_fields_are_redacted() -> None:
    """A logged exception shows its frames but not their locals, and secret-named fields are replaced, in the JSON lines credproxy writes."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=30, check=True
    )
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    crash, oops = lines
    assert crash["event"] == "refresh_crashed" and crash["level"] == "error"
    frames = crash["exception"][0]["frames"]
    assert any(f["name"] == "refresh" for f in frames)
    assert all("locals" not in f or not f["locals"] for f in frames)
    assert oops["refresh_token"] == "[redacted]" and oops["api_key"] == "[redacted]"
    assert oops["fp"] == "0123456789ab"
    assert "CANARY" not in proc.stderr


MESSAGE_SCRIPT = r"""
from credproxy.shell import logs
logs.configure()
log = logs.get("t")
try:
    try:
        int("RT-CANARY-msg")  # a library quoting its input in the message
    except ValueError as exc:
        raise KeyError("AT-CANARY-msg") from exc
except KeyError:
    log.exception("request_failed")
"""


def test_exception_messages_never_reach_the_log() -> None:
    """A logged exception (and its cause) keeps its type and frames, but not its message, which may quote a secret."""
    proc = subprocess.run(
        [sys.executable, "-c", MESSAGE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    (line,) = [json.loads(x) for x in proc.stderr.splitlines()]
    assert [e["exc_type"] for e in line["exception"]] == ["KeyError", "ValueError"]
    assert all(e["frames"] for e in line["exception"])
    assert "CANARY" not in proc.stderr


LINE_SCRIPT = r"""
import sys
from credproxy.shell import logs
logs.configure(sys.argv[1])
fields = {"session": "s-1", "provider": "dev", "bucket": None, "method": "GET",
          "path": "/v1/models?x=1", "status": 200, "bytes": 12, "ms": 0.4,
          "refresh_token": "RT-CANARY-line"}
logs.get("credproxy.proxy").info("api_request", **fields)
logs.info_line("api_request", fields)
"""


def test_the_fast_info_line_is_the_pipelines_line() -> None:
    """The line written for each relayed request without structlog's chain is the line the chain writes: same keys in the same order, the same redaction; and neither is written below the configured level."""
    out = []
    for level in ("info", "warning"):
        proc = subprocess.run(
            [sys.executable, "-c", LINE_SCRIPT, level],
            capture_output=True,
            timeout=30,
            check=True,
        )
        out.append(proc.stderr.splitlines())
    chain, fast = (json.loads(line) for line in out[0])
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
    assert stamp.fullmatch(chain.pop("timestamp")) and stamp.fullmatch(fast.pop("timestamp"))
    assert list(chain.items()) == list(fast.items())
    assert fast["event"] == "api_request" and fast["level"] == "info"
    assert fast["refresh_token"] == "[redacted]"
    assert b"CANARY" not in b"".join(out[0])
    assert out[1] == []
