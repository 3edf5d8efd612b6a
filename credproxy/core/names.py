"""Names and keys: the vocabulary every other module shares.

A provider, bucket or API-key name matches ``^[A-Za-z0-9._@-]{1,64}$`` and is
neither ``.`` nor ``..`` (names become path components of the store). A token
is addressed by a :class:`Key`, a (provider, bucket) pair; an absent bucket is
``"default"`` everywhere: on the wire, on the command line and in the store.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, TypeGuard

from credproxy.errors import InvalidName

DEFAULT_BUCKET = "default"
NAME_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
NAME_RULE = "1-64 of A-Z a-z 0-9 . _ @ - (not . or ..)"


class Key(NamedTuple):
    """One stored token: a provider and one of its buckets."""

    provider: str
    bucket: str = DEFAULT_BUCKET

    def __str__(self) -> str:
        return f"{self.provider}:{self.bucket}"


def is_name(value: object) -> TypeGuard[str]:
    """A valid provider, bucket or key name (the whole string)."""
    return (
        isinstance(value, str) and NAME_RE.fullmatch(value) is not None and value not in (".", "..")
    )


def check_name(kind: str, name: str) -> str:
    """*name* itself, or :class:`InvalidName` naming *kind* and the rule."""
    if not is_name(name):
        raise InvalidName(f"{kind} name {name!r} must be {NAME_RULE}")
    return name


def name_field(payload: dict[str, Any], field: str, *, default: str | None = None) -> str:
    """A validated name from a request payload.

    Raises:
        InvalidName: missing (with no default), not a string, or not a name.
    """
    value = payload.get(field)
    if value is None:
        if default is None:
            raise InvalidName(f"missing '{field}'")
        return default
    if not is_name(value):
        raise InvalidName(f"'{field}' must be a name of {NAME_RULE}")
    return value


def key_field(payload: dict[str, Any]) -> Key:
    """The :class:`Key` a request names with ``provider`` and an optional ``bucket``."""
    return Key(
        name_field(payload, "provider"), name_field(payload, "bucket", default=DEFAULT_BUCKET)
    )
