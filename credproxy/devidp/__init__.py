"""A development identity provider: a strict OAuth token endpoint on loopback.

Not part of the daemon (the daemon's modules may not import it): it is the
upstream of the tests, the demo and the benchmarks. It behaves like the strict
IdPs credproxy exists for:

- access tokens are short-lived (``lifetime`` seconds, 60 by default);
- every refresh **rotates** the refresh token: the one just used stops being
  current and a new one is returned;
- presenting a refresh token that was already rotated away is treated as theft
  (RFC 6819 5.2.2.3, OAuth 2.0 Security BCP 4.14.2): the **whole token
  family** (every refresh and access token descending from the same login) is
  revoked, so the legitimate holder is logged out too. Two sandboxes racing
  to refresh the same token trigger exactly this, which is the bug credproxy
  prevents.

Four modules:

- :mod:`.idp`: :class:`DevIdP`, the state machine: it takes a request form and
  returns a status and a JSON object, and never does I/O (the clock is
  injected; no trio). Tests script failures with :meth:`DevIdP.fail_next`.
- :mod:`.issuers`: :class:`DevIssuers`, the issuers of the signing grants
  (JWT bearer, client credentials with a secret or ``private_key_jwt``, GitHub
  App installation tokens, signed JWTs at a resource server), which verify
  every JWT they get: signature, ``aud``, ``iss``, ``exp`` at most 5 minutes
  ahead, ``jti`` never reused. Sans-IO like :mod:`.idp`.
- :mod:`.server`: :func:`serve` puts them on a trio + h11 HTTP server
  (``POST /token``, ``GET /userinfo`` and the login endpoints below; with
  ``issuers=``, the signing grants' routes too).
- :mod:`.cli`: :func:`main` is ``python -m credproxy.devidp`` for the README
  demo, the end-to-end tests and the benchmarks.

It also logs people in, so ``credproxy login`` runs its real flows against it:

- ``POST /device_authorization`` starts a device flow (RFC 8628); the person
  (or a test) approves it with a plain ``GET /device?user_code=X&action=approve``
  (``deny``, ``expire`` and ``slow_down`` script the other outcomes), and the
  token endpoint answers the ``device_code`` grant accordingly. A poll that
  comes sooner than the interval answers ``slow_down``, as RFC 8628 allows.
- ``GET /authorize`` (authorization code + PKCE S256, RFC 7636) approves at
  once and redirects back to the loopback ``redirect_uri`` with ``code`` and
  ``state`` (``devidp_action=deny`` in the query redirects with
  ``access_denied``); the token endpoint checks the ``code_verifier`` against
  the challenge, so a following HTTP client plays the browser.

Nothing here prints or records a token: requests are kept with the refresh
token and client secret replaced by a short SHA-256 :func:`fingerprint`.
"""

from credproxy.devidp.cli import main
from credproxy.devidp.idp import DEVICE_ACTIONS, FAULT_KINDS, DevIdP, Fault, fingerprint
from credproxy.devidp.issuers import DevIssuers, public_key_fingerprint
from credproxy.devidp.server import serve

__all__ = [
    "DEVICE_ACTIONS",
    "FAULT_KINDS",
    "DevIdP",
    "DevIssuers",
    "Fault",
    "fingerprint",
    "main",
    "public_key_fingerprint",
    "serve",
]
