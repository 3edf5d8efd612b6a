"""The public import path of the blocking client: ``from credproxy.client import Client``.

The code lives in :mod:`credproxy.inner.client` with the rest of the inner side
(standard library only); this module only keeps the import path the README shows.
"""

from credproxy.inner.client import Client, socket_from_env

__all__ = ["Client", "socket_from_env"]
