"""Checkpoints where the crash tests stop or break the daemon on purpose.

``CREDPROXY_FAULT=NAME`` stops the process (``SIGSTOP``) at the checkpoint
``NAME``, so a test can ``SIGKILL`` it at exactly that point;
``CREDPROXY_FAULT=crash:NAME`` raises :class:`InjectedFault` there instead (a
bug, as the code would meet one); ``CREDPROXY_FAULT=hang:NAME`` blocks the
thread that reaches it, for good (a hung read, say), the others going on. The
command line reads the variable once (:func:`from_env`) and hands the hook to
what has checkpoints; everything else
gets :data:`NO_FAULTS`, which costs one call per checkpoint.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping

Faults = Callable[[str], None]


class InjectedFault(RuntimeError):
    """Raised at a checkpoint named by ``CREDPROXY_FAULT=crash:NAME`` (tests only)."""


def NO_FAULTS(name: str) -> None:
    """No checkpoint does anything."""


def from_env(environ: Mapping[str, str] = os.environ) -> Faults:
    """The hook ``CREDPROXY_FAULT`` asks for, or :data:`NO_FAULTS`."""
    spec = environ.get("CREDPROXY_FAULT")
    if not spec:
        return NO_FAULTS
    if spec.startswith("crash:"):
        target = spec[6:]

        def crash(name: str) -> None:
            if name == target:
                raise InjectedFault(f"fault injected at {name}")

        return crash
    if spec.startswith("hang:"):
        stuck = spec[5:]

        def hang(name: str) -> None:
            while name == stuck:
                time.sleep(3600)

        return hang

    def stop(name: str) -> None:
        if name == spec:
            os.kill(os.getpid(), signal.SIGSTOP)

    return stop
