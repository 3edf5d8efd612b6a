"""What a stored token is: the JSON ``import`` and ``login`` accept, normalised."""

from __future__ import annotations

from typing import Any

from credproxy.core.policy import expiry_value
from credproxy.errors import InvalidToken


def normalize_token(raw: Any, now: float) -> dict[str, Any]:
    """Validate token JSON (as given to ``import``) and return what is stored.

    ``expires_in`` (seconds from *now*) is turned into ``expiry`` (epoch
    seconds); unknown fields are kept. Both must be finite, non-negative
    numbers when given (``"soon"``, NaN, infinity or ``true`` are refused).

    Raises:
        InvalidToken: with a message naming the field at fault.
    """
    if not isinstance(raw, dict):
        raise InvalidToken("token must be a JSON object")
    token = dict(raw)
    at = token.get("access_token")
    if not isinstance(at, str) or not at:
        raise InvalidToken("token needs a non-empty string 'access_token'")
    rt = token.get("refresh_token")
    if rt is not None and not isinstance(rt, str):
        raise InvalidToken("'refresh_token' must be a string")
    if rt == "":
        del token["refresh_token"]
    # A null expires_in counts as absent; a null expiry is refused (once
    # stored, an invalid expiry makes the token count as expired).
    expires_in = token.pop("expires_in", None)
    seconds = None if expires_in is None else expiry_value(expires_in)
    if expires_in is not None and seconds is None:
        raise InvalidToken("'expires_in' must be a finite, non-negative number of seconds")
    if "expiry" in token:
        expiry = expiry_value(token["expiry"])
        if expiry is None:
            raise InvalidToken(
                "'expiry' must be a finite, non-negative number of seconds since the epoch"
            )
        if expiry > 1e11:
            raise InvalidToken("'expiry' looks like milliseconds; give epoch seconds")
    elif seconds is not None:
        if now + seconds > 1e11:
            raise InvalidToken("'expires_in' is too large; give seconds from now")
        token["expiry"] = int(now + seconds)
    tt = token.setdefault("token_type", "Bearer")
    if not isinstance(tt, str):
        raise InvalidToken("'token_type' must be a string")
    return token
