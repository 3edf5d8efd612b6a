"""Structured JSON logs on stderr, one object per line.

Two rules keep secrets out:

* Tracebacks are rendered **without locals** (structlog's default
  ``dict_tracebacks`` shows them, and a local named ``refresh_token`` would be
  printed verbatim) and **without exception messages**: a message is text a
  library built from its input (``int("<token>")`` puts the token in it), so
  only the exception's type and frames are logged.
* A last-chance processor replaces the value of any key that looks like it
  holds a secret (``token``, ``secret``, ``key`` values, ``authorization``,
  ``password``), whatever the caller passed. Callers log fingerprints
  (``fp=``), never values.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

import msgspec
import structlog

_SECRETISH = re.compile(
    r"(access_token|refresh_token|id_token|token$|secret|password|authorization|^value$|api_key)",
    re.IGNORECASE,
)
_SAFE_KEYS = frozenset({"event", "level", "timestamp", "fp", "token_type", "token_url"})


_secretish_memo: dict[str, bool] = {}
#: info_line's field names, and whether none of them is one _redact hides.
_safe_names: dict[tuple[str, ...], bool] = {}


def _is_secretish(key: str) -> bool:
    hit = _secretish_memo.get(key)
    if hit is None:
        hit = key not in _SAFE_KEYS and _SECRETISH.search(key) is not None
        if len(_secretish_memo) < 4096:
            _secretish_memo[key] = hit
    return hit


def _redact(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in event:
        if _is_secretish(key):
            event[key] = "[redacted]"
    return event


_log_encoder = msgspec.json.Encoder(enc_hook=repr)


def _serialize(obj: Any, **_kw: Any) -> bytes:
    return _log_encoder.encode(obj)


_ts_second = -1
_ts_prefix = ""


def _timestamp(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """TimeStamper(fmt="iso", utc=True)'s format, formatting the date once a second."""
    global _ts_second, _ts_prefix
    now = time.time()
    second = int(now)
    if second != _ts_second:
        _ts_second, _ts_prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    event["timestamp"] = f"{_ts_prefix}.{int((now - second) * 1e6):06d}Z"
    return event


_WITHHELD = "[message withheld: it may quote a secret]"


def _tracebacks_without_messages(exc_info: Any) -> list[dict[str, Any]]:
    """structlog's dict tracebacks, minus locals, exception messages and notes."""
    stacks: list[dict[str, Any]] = _traceback_dicts(exc_info)

    def scrub(stack: dict[str, Any]) -> None:
        if stack.get("exc_value"):
            stack["exc_value"] = _WITHHELD
        stack["exc_notes"] = []
        stack["syntax_error"] = None
        for inner in stack.get("exceptions") or ():
            for sub in inner:
                scrub(sub)

    for stack in stacks:
        scrub(stack)
    return stacks


_traceback_dicts = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)


_out: structlog.BytesLogger | None = None  # stderr, once configure() has run
_info = False  # info lines are written at the configured level
_captured: list[MutableMapping[str, Any]] | None = None  # the events of capture(), while it runs


def info_line(event: str, fields: dict[str, Any]) -> None:
    """Log *event* at info as ``get(...).info(event, **fields)`` would, in less time.

    For the lines written once per request (the relay's ``api_request``):
    the same JSON line, built without structlog's processor chain (about
    7 µs of it per call). Before :func:`configure`, it goes through structlog.
    """
    if _captured is not None:
        _captured.append({**fields, "event": event, "log_level": "info"})
    elif _out is None:
        structlog.get_logger().info(event, **fields)
    elif _info:
        line = _timestamp(None, "info", {**fields, "event": event, "level": "info"})
        names = tuple(fields)
        safe = _safe_names.get(names)
        if safe is None:
            safe = not any(_is_secretish(name) for name in names)
            if len(_safe_names) < 256:
                _safe_names[names] = safe
        _out.msg(_serialize(line if safe else _redact(None, "info", line)))


@contextlib.contextmanager
def capture() -> Iterator[list[MutableMapping[str, Any]]]:
    """``structlog.testing.capture_logs()``, :func:`info_line`'s events included."""
    global _captured
    with structlog.testing.capture_logs() as events:
        _captured = events
        try:
            yield events
        finally:
            _captured = None


def configure(level: str = "info") -> None:
    """Send JSON lines to stderr. Idempotent."""
    global _out, _info
    number = logging.getLevelNamesMapping()[level.upper()]
    _out, _info = structlog.BytesLogger(sys.stderr.buffer), number <= logging.INFO
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.ExceptionRenderer(_tracebacks_without_messages),
            _redact,
            structlog.processors.JSONRenderer(serializer=_serialize),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )


def get(name: str = "credproxy") -> Any:
    return structlog.get_logger(name)
