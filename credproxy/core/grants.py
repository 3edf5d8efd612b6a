"""What a sandbox session may read.

A grant is ``PROVIDER`` (every bucket of it), ``PROVIDER:BUCKET``, ``key:NAME``
(one API key) or ``*`` (everything). The prefix ``key:`` always means an API
key, so a provider literally named ``key`` can only be granted whole.
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
        for spec in specs:
            if not isinstance(spec, str):
                raise UsageError("grants must be strings")
            if spec == "*":
                everything = True
                continue
            head, sep, tail = spec.partition(":")
            names = [head, tail] if sep else [head]
            if not all(is_name(n) for n in names):
                raise UsageError(
                    f"grant {spec!r} must be PROVIDER, PROVIDER:BUCKET, key:NAME or '*' "
                    f"(names are {NAME_RULE})"
                )
            if not sep:
                providers.add(head)
            elif head == "key":
                keys.add(tail)
            else:
                buckets.add((head, tail))
        return cls(everything, frozenset(providers), frozenset(buckets), frozenset(keys))

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
        out += sorted(f"{p}:{b}" for p, b in self.buckets)
        out += sorted(f"key:{k}" for k in self.keys)
        return out
