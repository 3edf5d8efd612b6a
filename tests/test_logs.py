"""The real log pipeline: JSON lines, secrets redacted, tracebacks without locals."""

from __future__ import annotations

import json
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
