"""What ``credproxy token --format F`` prints: one served token, shaped for one tool.

Each format is a pure function of the served token (the JSON the socket
answered, without ``refresh_token``) and, for docker, of what the tool wrote
on stdin; it returns the text to print or raises :class:`FormatError`. The
shapes are those the tools' credential hooks read (docs/integrations.md):

- ``raw``: the access token (Claude Code ``apiKeyHelper``, Codex ``auth.command``).
- ``json``: the served JSON, keys sorted.
- ``header``: ``Authorization: Bearer <token>`` (curl ``-H``).
- ``env``: ``export CREDPROXY_ACCESS_TOKEN='<token>'`` and friends, for ``eval``.
- ``kubectl``: an ExecCredential, ``client.authentication.k8s.io/v1`` or the
  ``v1beta1`` kubectl asks for.
- ``aws-process``: the ``credential_process`` answer; the served token must
  carry ``AccessKeyId`` and ``SecretAccessKey`` fields (and ``SessionToken``
  for temporary credentials).
- ``docker``: a docker credential helper's ``get`` answer.

Standard library only, and nothing slow to import: this runs inside sandboxes
on every API call of the tools there.
"""

from __future__ import annotations

import json
import time

from credproxy.errors import CredproxyError

# `typing` costs ~5 ms of `credproxy token`'s start-up; annotations are strings here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

KUBE_API_VERSION = "client.authentication.k8s.io/v1"
KUBE_API_VERSIONS = (KUBE_API_VERSION, "client.authentication.k8s.io/v1beta1")
AWS_FIELDS = ("AccessKeyId", "SecretAccessKey")  # (SessionToken: temporary credentials only)
DOCKER_USERNAME = "oauth2accesstoken"  # the registry convention for an OAuth access token
ENV_PREFIX = "CREDPROXY_"


class FormatError(CredproxyError):
    """The served token lacks what the requested format needs; names fields, never values."""


def access_token(token: dict[str, Any]) -> str:
    """The token's ``access_token``.

    Raises:
        FormatError: the served token has none (or it is not a string).
    """
    at = token.get("access_token")
    if not isinstance(at, str) or not at:
        raise FormatError("the served token has no access_token")
    return at


def expiry(token: dict[str, Any]) -> int | None:
    """The token's ``expiry`` as whole Unix seconds, or None when it has none.

    Rounded down: a tool that believes the token lives a fraction of a second
    less than it does asks again a little early, never late.
    """
    value = token.get("expiry")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def rfc3339(epoch: int) -> str:
    """``2027-01-15T08:00:00Z``: what kubectl and the AWS SDKs parse."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def token_type(token: dict[str, Any]) -> str:
    """The authorization scheme: the token's ``token_type``, ``Bearer`` when absent.

    RFC 6750 makes the scheme case-insensitive and many identity providers
    send ``bearer``; it is written ``Bearer``, the spelling every server accepts.
    """
    kind = token.get("token_type")
    if not isinstance(kind, str) or not kind.strip() or kind.lower() == "bearer":
        return "Bearer"
    if any(c.isspace() for c in kind) or not kind.isprintable():
        raise FormatError("the served token_type is not a single word")
    return kind


def shell_quote(value: str) -> str:
    """*value* in single quotes for a POSIX shell (what ``shlex.quote`` does, without ``re``)."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


# --- the formats ----------------------------------------------------------------


def format_raw(token: dict[str, Any], stdin: str) -> str:
    return access_token(token)


def format_json(token: dict[str, Any], stdin: str) -> str:
    return json.dumps(token, sort_keys=True)


def format_header(token: dict[str, Any], stdin: str) -> str:
    at = access_token(token)
    if any(c in at for c in "\r\n"):
        raise FormatError("the served access_token contains a line break")
    return f"Authorization: {token_type(token)} {at}"


def format_env(token: dict[str, Any], stdin: str) -> str:
    """``export`` lines for ``eval "$(credproxy token P --format env)"``.

    ``CREDPROXY_ACCESS_TOKEN`` and ``CREDPROXY_TOKEN_TYPE`` always;
    ``CREDPROXY_TOKEN_EXPIRY`` (Unix seconds) when the token has an expiry.
    """
    lines = [
        f"export {ENV_PREFIX}ACCESS_TOKEN={shell_quote(access_token(token))}",
        f"export {ENV_PREFIX}TOKEN_TYPE={shell_quote(token_type(token))}",
    ]
    exp = expiry(token)
    if exp is not None:
        lines.append(f"export {ENV_PREFIX}TOKEN_EXPIRY={exp}")
    return "\n".join(lines)


def format_kubectl(token: dict[str, Any], stdin: str) -> str:
    """An ExecCredential; ``expirationTimestamp`` only when the token has an expiry.

    Without one, kubectl keeps the token for the life of its process. *stdin*
    is kubectl's ``KUBERNETES_EXEC_INFO`` (its request): the answer has the
    ``apiVersion`` it names (``v1beta1`` or ``v1``), else ``v1``.
    """
    status: dict[str, Any] = {"token": access_token(token)}
    exp = expiry(token)
    if exp is not None:
        status["expirationTimestamp"] = rfc3339(exp)
    version = KUBE_API_VERSION
    try:
        asked = json.loads(stdin).get("apiVersion") if stdin else None
    except (ValueError, AttributeError):
        asked = None
    if asked in KUBE_API_VERSIONS:
        version = asked
    return json.dumps(
        {"apiVersion": version, "kind": "ExecCredential", "status": status},
        sort_keys=True,
    )


def format_aws_process(token: dict[str, Any], stdin: str) -> str:
    """The ``credential_process`` answer from the token's AWS fields.

    ``Expiration`` is the token's own ``Expiration`` string if it has one,
    else its ``expiry`` in RFC 3339; without either it is left out, which the
    AWS SDKs read as credentials that never expire.

    ``SessionToken`` goes with them when the token has one (temporary
    credentials); long-term keys have none, which the AWS CLI and SDKs accept.

    Raises:
        FormatError: ``AccessKeyId`` or ``SecretAccessKey`` is missing (both
            are named).
    """
    missing = [f for f in AWS_FIELDS if not isinstance(token.get(f), str) or not token[f]]
    if missing:
        raise FormatError(
            f"--format aws-process needs a token with {', '.join(AWS_FIELDS)} fields; "
            f"this one has no {', '.join(missing)} (store them with `credproxy import`)"
        )
    out: dict[str, Any] = {"Version": 1, **{f: token[f] for f in AWS_FIELDS}}
    session = token.get("SessionToken")
    if isinstance(session, str) and session:
        out["SessionToken"] = session
    stated = token.get("Expiration")
    exp = expiry(token)
    if isinstance(stated, str) and stated:
        out["Expiration"] = stated
    elif exp is not None:
        out["Expiration"] = rfc3339(exp)
    return json.dumps(out, sort_keys=True)


def format_docker(token: dict[str, Any], stdin: str) -> str:
    """A docker credential helper's ``get`` answer for the server URL on stdin.

    ``Username`` is the token's ``username`` field if it has one, else
    ``oauth2accesstoken``; ``Secret`` is the access token.
    """
    server = stdin.strip()
    if not server:
        raise FormatError("--format docker reads the registry's server URL on stdin; got none")
    user = token.get("username")
    username = user if isinstance(user, str) and user else DOCKER_USERNAME
    return json.dumps({"ServerURL": server, "Username": username, "Secret": access_token(token)})


FORMATS: dict[str, Callable[[dict[str, Any], str], str]] = {
    "raw": format_raw,
    "json": format_json,
    "header": format_header,
    "env": format_env,
    "kubectl": format_kubectl,
    "aws-process": format_aws_process,
    "docker": format_docker,
}
