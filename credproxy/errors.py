"""Exceptions, named by what happened.

Every credproxy error carries the wire code a sandbox sees (``code``) and the
exit status the command line uses (``exit_code``), so one exception type
answers a socket request and ends a CLI command consistently.

Messages are written for the person who has to act on them and never carry a
secret: no token, refresh token, client secret or API key is ever formatted
into one. Upstream response bodies are not quoted either, because a broken
identity provider may echo the refresh token back.

Standard library only: the inner-side client imports this module.
"""

from __future__ import annotations

# Exit codes of every command: the table in docs/cli.md, which tests/test_errors.py
# reads and compares with these, so the two cannot drift apart.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_CANNOT_EXECUTE = 126  # credproxy run: CMD exists but cannot be run
EXIT_COMMAND_NOT_FOUND = 127  # credproxy run: CMD does not exist
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class CredproxyError(Exception):
    """Base class. ``str(err)`` is one line that says what to do."""

    code = "INTERNAL_ERROR"
    exit_code = EXIT_FAILURE


class UsageError(CredproxyError):
    """The command line or a request was malformed."""

    code = "INVALID_REQUEST"
    exit_code = EXIT_USAGE


class InvalidName(UsageError):
    """A provider, bucket or key name does not match ``^[A-Za-z0-9._@-]{1,64}$``."""


class InvalidToken(UsageError):
    """Token JSON given to ``import`` (or returned upstream) is not a usable token."""


class ConfigError(CredproxyError):
    """The configuration file is unreadable or invalid; names file, line and field."""

    exit_code = EXIT_USAGE


class NotFound(CredproxyError):
    """The token or key is missing, or the caller is not granted it (indistinguishable)."""

    code = "NOT_FOUND"
    exit_code = EXIT_NOT_FOUND


class Forbidden(CredproxyError):
    """The operation exists but is not available on this socket."""

    code = "FORBIDDEN"
    exit_code = EXIT_REFUSED


class Unauthorized(CredproxyError):
    """The peer or its capability token was refused."""

    code = "UNAUTHORIZED"
    exit_code = EXIT_REFUSED


class RateLimited(CredproxyError):
    """Too many requests; ``retry_after`` says how many seconds to wait."""

    code = "RATE_LIMITED"
    exit_code = EXIT_REFUSED

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AllBucketsExhausted(CredproxyError):
    """No bucket of the profile could serve; ``reasons`` maps each bucket to why.

    ``retry_after`` is the soonest a quota-exhausted bucket is served again
    (seconds), when one is.
    """

    code = "ALL_BUCKETS_EXHAUSTED"
    exit_code = EXIT_REFUSED

    def __init__(
        self, message: str, reasons: dict[str, str], retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.reasons = reasons
        self.retry_after = retry_after


class ResourceExhausted(CredproxyError):
    """A connection or session limit was reached."""

    code = "RESOURCE_EXHAUSTED"
    exit_code = EXIT_REFUSED


class StoreError(CredproxyError):
    """The token store could not be read or written (permissions, disk full, corruption)."""


class UpstreamError(CredproxyError):
    """The identity provider did not give us a token."""

    code = "REFRESH_FAILED"


class RefreshFailed(UpstreamError):
    """A transient refresh failure (network, timeout, 5xx, malformed answer): retried."""


class RotatedUnusable(RefreshFailed):
    """A 200 whose token is unusable but which rotated the refresh token: keep the new one.

    The old refresh token is spent upstream; the next refresh must present
    :attr:`refresh_token` (a secret: never in the message).
    """

    def __init__(self, message: str, refresh_token: str) -> None:
        super().__init__(message)
        self.refresh_token = refresh_token


class ReauthRequired(UpstreamError):
    """The refresh token was rejected (invalid_grant, invalid_client, 401): not retried.

    The user has to log in again and ``credproxy import`` a new token.
    """

    code = "REAUTH_REQUIRED"
    exit_code = EXIT_REFUSED


class DaemonUnavailable(CredproxyError):
    """No daemon answers on the socket."""


class ProtocolError(CredproxyError):
    """A peer broke the wire protocol; the connection is closed."""

    code = "INVALID_REQUEST"


# Wire code -> exception class, for clients that turn error frames back into
# exceptions (credproxy.inner.client, the CLI).
BY_CODE: dict[str, type[CredproxyError]] = {
    "INVALID_REQUEST": UsageError,
    "NOT_FOUND": NotFound,
    "FORBIDDEN": Forbidden,
    "UNAUTHORIZED": Unauthorized,
    "UNKNOWN_VERSION": Unauthorized,
    "RATE_LIMITED": RateLimited,
    "REAUTH_REQUIRED": ReauthRequired,
    "REFRESH_FAILED": RefreshFailed,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "ALL_BUCKETS_EXHAUSTED": CredproxyError,
    "RESPONSE_TOO_LARGE": CredproxyError,
    "INTERNAL_ERROR": CredproxyError,
}
