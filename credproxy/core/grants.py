"""What a sandbox session may read.

A grant is ``PROVIDER`` (every bucket of it), ``PROVIDER:BUCKET``,
``PROVIDER:B1,B2,...`` (those buckets, and that order as the session's profile
for ``get_token`` without a bucket), ``key:NAME`` (one API key), ``api:PROVIDER``
(the provider's API through the HTTP proxy only: the token is used on the host
and never served to the sandbox) or ``*`` (everything). The prefixes ``key:``
and ``api:`` always mean an API key and an API, so providers literally named
``key`` or ``api`` can only be granted whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from credproxy.core.names import NAME_RULE, is_name
from credproxy.errors import UsageError


@dataclass(frozen=True)
class Grants:
    everything: bool = False
    providers: frozenset[str] = field(default_factory=frozenset)
    buckets: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    keys: frozenset[str] = field(default_factory=frozenset)
    # provider -> ordered buckets, from PROVIDER:B1,B2 grants
    profiles: tuple[tuple[str, tuple[str, ...]], ...] = ()
    apis: frozenset[str] = field(default_factory=frozenset)  # api:PROVIDER grants
    # api:PROVIDER:BUCKET grants: one bucket's API, without its token
    api_buckets: frozenset[tuple[str, str]] = field(default_factory=frozenset)

    @classmethod
    def parse(cls, specs: list[str]) -> Grants:
        """Parse grant strings.

        Raises:
            UsageError: naming the grant that is malformed.
        """
        everything = False
        providers: set[str] = set()
        buckets: set[tuple[str, str]] = set()
        keys: set[str] = set()
        profiles: dict[str, tuple[str, ...]] = {}
        apis: set[str] = set()
        api_buckets: set[tuple[str, str]] = set()
        for spec in specs:
            if not isinstance(spec, str):
                raise UsageError("grants must be strings")
            if spec == "*":
                everything = True
                continue
            head, sep, tail = spec.partition(":")
            if sep and head not in ("key", "api") and "," in tail:
                order = tuple(tail.split(","))
                if (
                    not is_name(head)
                    or not all(is_name(b) for b in order)
                    or (len(set(order)) != len(order) or head in profiles)
                ):
                    raise UsageError(
                        f"grant {spec!r} must be PROVIDER:B1,B2,... with distinct bucket "
                        f"names of {NAME_RULE}, once per provider"
                    )
                profiles[head] = order
                buckets.update((head, b) for b in order)
                continue
            if head == "api" and ":" in tail:
                provider, _, bucket = tail.partition(":")
                if not is_name(provider) or not is_name(bucket):
                    raise UsageError(
                        f"grant {spec!r} must be api:PROVIDER:BUCKET (names are {NAME_RULE})"
                    )
                api_buckets.add((provider, bucket))
                continue
            names = [head, tail] if sep else [head]
            if not all(is_name(n) for n in names):
                raise UsageError(
                    f"grant {spec!r} must be PROVIDER, PROVIDER:BUCKET, key:NAME, "
                    f"api:PROVIDER, api:PROVIDER:BUCKET or '*' (names are {NAME_RULE})"
                )
            if not sep:
                providers.add(head)
            elif head == "key":
                keys.add(tail)
            elif head == "api":
                apis.add(tail)
            else:
                buckets.add((head, tail))
        return cls(
            everything,
            frozenset(providers),
            frozenset(buckets),
            frozenset(keys),
            tuple(sorted(profiles.items())),
            frozenset(apis),
            frozenset(api_buckets),
        )

    def api_allowed(self, provider: str, bucket: str | None = None) -> bool:
        """True if an ``api:`` grant (or ``*``) lets the session use *provider*'s API.

        ``api:PROVIDER`` gives every bucket's; ``api:PROVIDER:BUCKET`` one
        bucket's (with *bucket* None: whether any). The proxy also accepts a
        grant of the token itself; these are the grants that give the API
        without the token.
        """
        if self.everything or provider in self.apis:
            return True
        if bucket is None:
            return any(p == provider for p, _ in self.api_buckets)
        return (provider, bucket) in self.api_buckets

    def profile(self, provider: str) -> tuple[str, ...] | None:
        """The bucket order a ``PROVIDER:B1,B2`` grant gave *provider*, if any."""
        for name, order in self.profiles:
            if name == provider:
                return order
        return None

    def token_allowed(self, provider: str, bucket: str) -> bool:
        return self.everything or provider in self.providers or (provider, bucket) in self.buckets

    def provider_visible(self, provider: str) -> bool:
        """True if at least one bucket of *provider* may be granted."""
        return (
            self.everything
            or provider in self.providers
            or any(p == provider for p, _ in self.buckets)
        )

    def key_allowed(self, name: str) -> bool:
        return self.everything or name in self.keys

    def specs(self) -> list[str]:
        out = ["*"] if self.everything else []
        out += sorted(self.providers)
        in_profiles = {(p, b) for p, order in self.profiles for b in order}
        out += sorted(f"{p}:{b}" for p, b in self.buckets if (p, b) not in in_profiles)
        out += [f"{p}:{','.join(order)}" for p, order in self.profiles]
        out += sorted(f"key:{k}" for k in self.keys)
        out += sorted(f"api:{a}" for a in self.apis)
        out += sorted(f"api:{p}:{b}" for p, b in self.api_buckets)
        return out
