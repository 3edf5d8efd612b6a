"""What is wrong with a session's grants, said on the host (sans I/O).

A sandbox is never told why a grant gives it nothing: a provider that is not
configured answers exactly as one that is not granted (no enumeration). The
host is told instead: ``credproxy run`` warns at once on its stderr, the
daemon logs it when the session opens, and ``credproxy status`` lists it. All
three call :func:`grant_problems` with what they know (the configured
providers, the stored logins, the stored API keys).

A login is stored per bucket, so the check is per bucket: ``dev:work`` is a
problem while only ``dev:default`` is logged in (a bare ``dev`` is one while no
bucket of it is).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import NamedTuple

from credproxy.core.config import SIGNING_GRANTS, Provider
from credproxy.core.grants import Grants
from credproxy.core.names import DEFAULT_BUCKET

__all__ = ["GrantProblem", "grant_problems"]


class GrantProblem(NamedTuple):
    """One grant that gives the session nothing, why, and the fix (never a secret)."""

    grant: str  # as the user wrote it: P, P:B, P:B1,B2, api:P, api:P:B, key:NAME
    cause: str  # not_configured, no_api_section, key_missing, unknown_bucket, no_login
    message: str
    fix: str

    def line(self) -> str:
        return f"grant {self.grant!r}: {self.message}; {self.fix}"


def grant_problems(
    grants: Grants,
    providers: Mapping[str, Provider],
    stored: Collection[tuple[str, str]],
    keys: Collection[str] | None,
    config_file: str,
) -> list[GrantProblem]:
    """The problems of *grants* (``*`` has none: it names nothing).

    Args:
        providers: the configured providers.
        stored: the stored logins, as ``(provider, bucket)`` pairs (a
            :class:`~credproxy.core.names.Key` is one).
        keys: the stored API keys' names (None: not known, not checked).
        config_file: the config file's path, for the fix.
    """
    pairs = {(p, b) for p, b in stored}
    with_login = {p for p, _ in pairs}
    found: list[GrantProblem] = []
    for spec in grants.specs():
        head, sep, tail = spec.partition(":")
        if spec == "*":
            continue
        if sep and head == "key":
            if keys is not None and tail not in keys:
                found.append(
                    GrantProblem(
                        spec,
                        "key_missing",
                        f"no API key {tail} is stored",
                        f"store it on the host: credproxy key set {tail} < FILE",
                    )
                )
            continue
        if sep and head == "api":
            tail, _, bucket = tail.partition(":")  # (api:PROVIDER:BUCKET)
            prov = providers.get(tail)
            if prov is None:
                found.append(
                    GrantProblem(
                        spec,
                        "not_configured",
                        f"provider {tail} is not configured",
                        f"add [providers.{tail}] and [providers.{tail}.api] (base_url, "
                        f"headers) to {config_file}, or fix the grant",
                    )
                )
            elif prov.api is None:
                found.append(
                    GrantProblem(
                        spec,
                        "no_api_section",
                        f"provider {tail} has no api section",
                        f"add [providers.{tail}.api] (base_url, headers) to {config_file}",
                    )
                )
            else:
                if bucket:
                    found.extend(_unknown_buckets(spec, tail, prov, bucket, config_file))
                found.extend(_logins_missing(spec, tail, prov, bucket, pairs, with_login))
            continue
        if head not in providers and head not in with_login:
            found.append(
                GrantProblem(
                    spec,
                    "not_configured",
                    f"provider {head} is not configured and has no stored login",
                    f"add [providers.{head}] to {config_file} (a preset is quickest: see "
                    "docs/providers.md), or fix the grant",
                )
            )
            continue
        prov = providers.get(head)
        if prov is not None and sep:
            found.extend(_unknown_buckets(spec, head, prov, tail, config_file))
        found.extend(_logins_missing(spec, head, prov, tail, pairs, with_login))
    return found


def _logins_missing(
    spec: str,
    name: str,
    prov: Provider | None,
    buckets: str,
    pairs: set[tuple[str, str]],
    with_login: set[str],
) -> list[GrantProblem]:
    """A ``no_login`` problem for each bucket of the grant that no login serves.

    *buckets* are those the grant names; a grant of the whole provider
    (``""``) has its configured ``buckets`` (its profile, as the serving core
    makes it), or else any bucket logged in will do. *prov* is None for a
    provider known only from the store (it was taken out of the config).
    """
    if prov is not None and (
        prov.grant in SIGNING_GRANTS or (prov.api is not None and not prov.api.uses_token())
    ):
        return []  # (minted, or served by API keys: no login)
    named = buckets.split(",") if buckets else list(prov.buckets) if prov is not None else []
    if not named:
        return [] if name in with_login else [_no_login(spec, name, None)]
    return [_no_login(spec, name, b) for b in named if (name, b) not in pairs]


def _no_login(spec: str, name: str, bucket: str | None) -> GrantProblem:
    """A login provider's grant (*bucket*: one bucket of it) that no stored login serves."""
    if bucket is None:
        return GrantProblem(
            spec,
            "no_login",
            f"provider {name} has no stored login",
            f"log in on the host: credproxy login {name}",
        )
    option = "" if bucket == DEFAULT_BUCKET else f" --bucket {bucket}"
    return GrantProblem(
        spec,
        "no_login",
        f"provider {name} has no stored login for bucket {bucket}",
        f"log in on the host: credproxy login {name}{option}",
    )


def _unknown_buckets(
    spec: str, name: str, prov: Provider, buckets: str, config_file: str
) -> list[GrantProblem]:
    """The buckets of *buckets* a signing provider does not mint (it mints those it names)."""
    if prov.grant not in SIGNING_GRANTS:
        return []
    unknown = [b for b in buckets.split(",") if not prov.mints(b)]
    if not unknown:
        return []
    named = ", ".join(sorted(prov.minted_buckets()))
    return [
        GrantProblem(
            spec,
            "unknown_bucket",
            f"provider {name} mints no bucket {', '.join(unknown)} (it mints: {named})",
            f"fix the grant, or name the bucket in [providers.{name}] "
            f"(buckets, or [providers.{name}.narrow.BUCKET]) in {config_file}",
        )
    ]
