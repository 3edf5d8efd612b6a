"""The bubblewrap sandbox the end-to-end tests run under `credproxy run`.

The whole file system read-only, fresh `/tmp` and `/run`, the test's state
and runtime directories hidden (refresh tokens, keys, the control socket),
the interpreter and the checkout readable (either may live under `/tmp`), the
session socket at `/run/credproxy.sock` (`credproxy run` fills in
`{socket}`), and every namespace unshared: the network is loopback only.
"""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import Dirs

REPO = str(Path(__file__).resolve().parents[1])
SOCKET = "/run/credproxy.sock"


def bwrap(dirs: Dirs, *cmd: str, options: tuple[str, ...] = ()) -> list[str]:
    """The argv of bwrap running *cmd*; *options* are more bwrap options (``--setenv``, ...)."""
    return [
        "bwrap",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        "--tmpfs", "/run",
        "--tmpfs", str(dirs.root),  # the state directory (refresh tokens) and the runtime
        "--ro-bind", sys.prefix, sys.prefix,  # the virtual environment may live under /tmp
        "--ro-bind", REPO, REPO,  # so may the checkout (the editable install)
        "--bind", "{socket}", SOCKET,
        "--setenv", "CREDPROXY_SOCKET", SOCKET,
        *options,
        "--unshare-all",  # the network too: loopback only
        "--die-with-parent",
        *cmd,
    ]  # fmt: skip
