"""Structured JSON logs on stderr, one object per line.

Two rules keep secrets out:

* Tracebacks are rendered **without locals** (structlog's default
  ``dict_tracebacks`` shows them, and a local named ``refresh_token`` would be
  printed verbatim).
* A last-chance processor replaces the value of any key that looks like it
  holds a secret (``token``, ``secret``, ``key`` values, ``authorization``,
  ``password``), whatever the caller passed. Callers log fingerprints
  (``fp=``), never values.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import msgspec
import structlog

_SECRETISH = re.compile(
    r"(access_token|refresh_token|id_token|token$|secret|password|authorization|^value$|api_key)",
    re.IGNORECASE,
)
_SAFE_KEYS = frozenset({"event", "level", "timestamp", "fp", "token_type", "token_url"})


def _redact(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in event:
        if key not in _SAFE_KEYS and _SECRETISH.search(key):
            event[key] = "[redacted]"
    return event


def _serialize(obj: Any, **_kw: Any) -> bytes:
    return msgspec.json.encode(obj, enc_hook=repr)


def configure(level: str = "info") -> None:
    """Send JSON lines to stderr. Idempotent."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            _redact,
            structlog.processors.JSONRenderer(serializer=_serialize),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.BytesLoggerFactory(sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )


def get(name: str = "credproxy") -> Any:
    return structlog.get_logger(name)
