"""Where credproxy keeps its files.

Defaults come from platformdirs; ``CREDPROXY_CONFIG``, ``CREDPROXY_STATE_DIR`` and
``CREDPROXY_RUNTIME_DIR`` override them (tests and packagers use these).
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "credproxy"


def config_file() -> Path:
    """The TOML configuration file (it need not exist)."""
    override = os.environ.get("CREDPROXY_CONFIG")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir(APP)) / "config.toml"


def state_dir() -> Path:
    """The token store: ``tokens/``, ``keys/`` and ``locks/`` live here."""
    override = os.environ.get("CREDPROXY_STATE_DIR")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_state_dir(APP))


def runtime_dir() -> Path:
    """Sockets: the control socket and one socket per sandbox session."""
    override = os.environ.get("CREDPROXY_RUNTIME_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / APP
    # Without XDG_RUNTIME_DIR (a container, CI, su) use the same per-uid
    # directory platformdirs falls back to, without its warning; the daemon
    # creates it 0700 and refuses one it does not own.
    return Path("/tmp") / f"runtime-{os.getuid()}" / APP  # noqa: S108


def control_socket() -> Path:
    """The host-only admin socket (sandboxes never see it)."""
    return runtime_dir() / "credproxy.sock"


def sessions_dir() -> Path:
    """Directory of the per-sandbox session sockets."""
    return runtime_dir() / "s"
