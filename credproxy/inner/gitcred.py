"""``credproxy git-credential``: a git credential helper that serves credproxy tokens.

git runs a helper as ``HELPER ACTION`` with ``key=value`` lines on stdin, ended
by a blank line or end of input (gitcredentials(7), git-credential(1)). For
``get`` this helper asks the session socket for ``--provider``'s token and
answers::

    username=x-access-token
    password=<access token>
    password_expiry_utc=<the token's expiry, Unix seconds>

The username is ``--username`` if given, else the one git already has (from
the URL), else the token's ``username`` field, else ``x-access-token`` (the
name GitHub documents for token authentication; servers that want another
one, e.g. GitLab's ``oauth2``, get it from ``--username``).

With ``--bearer``, and a git that announced ``capability[]=authtype`` (git
2.46 and later), the answer is ``authtype=Bearer`` and ``credential=<token>``
instead, so git sends ``Authorization: Bearer``; an older git gets the
username and password above.

``store`` and ``erase`` (and any action git may add later) read their input
and do nothing: the daemon owns the token, and git has nothing to save. Which
hosts use which provider is git's own configuration
(``credential.https://HOST.helper``); see docs/integrations.md.

Standard library only, like ``credproxy token``.
"""

from __future__ import annotations

import sys

from credproxy.errors import EXIT_OK, EXIT_USAGE, CredproxyError
from credproxy.inner.client import Client, print_out
from credproxy.inner.formats import FormatError, access_token, expiry

# `typing` costs ~5 ms of start-up; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

USAGE = (
    "usage: credproxy git-credential --provider PROVIDER [--bucket BUCKET] "
    "[--username NAME] [--bearer] get|store|erase"
)
HELP = """\
A git credential helper: for `get`, print the access token of PROVIDER (from the
socket in $CREDPROXY_SOCKET) as the password. `store` and `erase` do nothing.
Configure it with
  git config --global credential.https://HOST.helper '!credproxy git-credential --provider P'
See docs/integrations.md."""
DEFAULT_USERNAME = "x-access-token"
INPUT_LIMIT = 64 * 1024  # git sends a few short lines


def parse_request(text: str) -> dict[str, list[str]]:
    """git's ``key=value`` lines, up to the first blank line; repeated keys kept in order."""
    attrs: dict[str, list[str]] = {}
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        if not line:
            break
        key, sep, value = line.partition("=")
        if sep:
            attrs.setdefault(key, []).append(value)
    return attrs


def answer(
    token: dict[str, Any],
    request: dict[str, list[str]],
    *,
    username: str | None = None,
    bearer: bool = False,
) -> str:
    """The helper's reply to ``get`` for *token*: ``key=value`` lines, each ending in a newline.

    Raises:
        FormatError: the token has no access token, or a value holds a line
            break or NUL (git would read it as another attribute).
    """
    at = access_token(token)
    lines: list[tuple[str, str]] = []
    if bearer and "authtype" in request.get("capability[]", []):
        lines += [("capability[]", "authtype"), ("authtype", "Bearer"), ("credential", at)]
        lines.append(("ephemeral", "1"))
    else:
        given = request.get("username", [""])[-1]
        field = token.get("username")
        name = username or given or (field if isinstance(field, str) else "") or DEFAULT_USERNAME
        lines += [("username", name), ("password", at)]
    exp = expiry(token)
    if exp is not None:
        lines.append(("password_expiry_utc", str(exp)))
    for key, value in lines:
        if any(c in value for c in "\n\r\0"):
            raise FormatError(f"the {key} to give git contains a line break or NUL")
    return "".join(f"{key}={value}\n" for key, value in lines)


def main(argv: list[str]) -> int:
    """``credproxy git-credential [options] ACTION``; the exit status git sees."""
    provider = bucket = username = action = None
    bearer = False
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            print(USAGE)
            print(HELP)
            return EXIT_OK
        if arg == "--bearer":
            bearer = True
        elif arg.split("=", 1)[0] in ("--provider", "--bucket", "--username"):
            name = arg.split("=", 1)[0]
            value = arg.partition("=")[2] if "=" in arg else next(args, None)
            if not value:
                return _usage(f"{name} needs a value")
            if name == "--provider":
                provider = value
            elif name == "--bucket":
                bucket = value
            else:
                username = value
        elif arg.startswith("-"):
            return _usage(f"unknown option {arg}")
        elif action is None:
            action = arg
        else:
            return _usage(f"unexpected argument {arg!r}")
    if action is None:
        return _usage("the action (get, store or erase) is required")
    if provider is None and action == "get":
        return _usage("--provider is required")
    request = parse_request(sys.stdin.read(INPUT_LIMIT) if sys.stdin else "")
    if action != "get" or provider is None:
        return EXIT_OK  # store, erase, and actions git may add later: nothing to do
    try:
        with Client() as client:
            token = client.get_token(provider, bucket)
        out = answer(token, request, username=username, bearer=bearer)
    except CredproxyError as exc:
        print(f"credproxy git-credential: {exc}", file=sys.stderr)
        return exc.exit_code
    return print_out(out.removesuffix("\n"))


def _usage(message: str) -> int:
    print(f"credproxy git-credential: {message} ({USAGE})", file=sys.stderr)
    return EXIT_USAGE
