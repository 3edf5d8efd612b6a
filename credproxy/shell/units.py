"""The systemd user units credproxy ships, ready to install for a given executable.

The unit files live in the source tree's ``systemd/`` directory, and the wheel
carries them as package data in ``credproxy/_units/`` (pyproject force-includes
them) because pip, pipx and uv put no data files on systemd's search path. The
shipped ``credproxy.service`` starts ``%h/.local/bin/credproxy``; installing
rewrites that to wherever this credproxy actually is, keeping the arguments.

``credproxy install-units`` and the Debian package both go through
``unit_texts()``, so there is one place that knows how ExecStart= is rewritten.
"""

from __future__ import annotations

import importlib.resources
import os
import tempfile
from pathlib import Path

__all__ = ["UNIT_NAMES", "install_units", "unit_texts"]

UNIT_NAMES = ("credproxy.socket", "credproxy.service")


def _unit_source(name: str) -> str:
    """Read a shipped unit file: the wheel's package data, else the source tree.

    Raises ``FileNotFoundError`` naming both places if neither has it (a broken
    install: a wheel built without the force-include, or a copied module).
    """
    packaged = importlib.resources.files("credproxy") / "_units" / name
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # An editable install or a source checkout: hatchling's force-include only
    # applies when building the wheel, so the units are still in systemd/.
    checkout = Path(__file__).resolve().parents[2] / "systemd" / name
    try:
        return checkout.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"unit file {name!r} not found in the package data ({packaged}) "
            f"nor in a source checkout ({checkout})"
        ) from None


def _quote_exec_path(executable: str) -> str:
    """Spell ``executable`` as the first word of a systemd ``ExecStart=`` line.

    systemd expands ``%`` specifiers and ``$`` variables in command lines and
    splits words on whitespace, so those are escaped, and a path containing
    whitespace, quotes or backslashes is double-quoted (systemd.service(5),
    "Command lines").
    """
    word = executable.replace("%", "%%").replace("$", "$$")
    if any(c.isspace() or c in "\"'\\" for c in word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _rewrite_exec_start(text: str, executable: str) -> str:
    """Replace the executable of every ``ExecStart=`` line, keeping its arguments.

    The shipped units spell the executable as one unquoted word, optionally after
    systemd's special prefixes (``-``, ``@``, ``:``, ``+``, ``!``); those are kept.
    """
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith("ExecStart="):
            value = line.removeprefix("ExecStart=").rstrip("\r\n")
            ending = line[len("ExecStart=") + len(value) :]
            stripped = value.lstrip("-@:+!")
            prefix = value[: len(value) - len(stripped)]
            _, sep, arguments = stripped.partition(" ")
            line = f"ExecStart={prefix}{_quote_exec_path(executable)}{sep}{arguments}{ending}"
        out.append(line)
    return "".join(out)


def unit_texts(executable: str) -> dict[str, str]:
    """Return ``{file name: contents}`` for the units, started by ``executable``.

    ``executable`` replaces the program in ``credproxy.service``'s ``ExecStart=``
    (``%h/.local/bin/credproxy serve --idle-exit 300`` becomes ``<executable> serve
    --idle-exit 300``); ``credproxy.socket`` is returned unchanged.

    Raises ``ValueError`` if ``executable`` is not an absolute path (the user
    manager's ``PATH`` is not the shell's, so a bare name would start whatever it
    finds there, or nothing) or contains a line break. Raises ``FileNotFoundError``
    if the shipped units cannot be found. Whether ``executable`` exists is not
    checked; ``systemd-analyze verify --user`` does that.
    """
    if not os.path.isabs(executable):
        raise ValueError(f"ExecStart= needs an absolute path, got {executable!r}")
    if "\n" in executable or "\r" in executable:
        raise ValueError(f"a unit file line cannot hold {executable!r}")
    return {name: _rewrite_exec_start(_unit_source(name), executable) for name in UNIT_NAMES}


def install_units(dest: Path, executable: str) -> list[Path]:
    """Write the units for ``executable`` into ``dest``; return the paths written.

    ``dest`` is typically ``~/.config/systemd/user`` and is created if missing.
    Existing files of the same name are replaced: that is how an upgrade or a move
    of the executable takes effect. Each file is written to a temporary file in
    ``dest`` and renamed over the old one, so a concurrent ``systemctl --user
    daemon-reload`` sees the old unit or the new one, never half of one. Files are
    mode 0644 whatever the umask: they hold no secrets, and systemd only reads them.

    Does not run ``systemctl``. Raises ``ValueError`` and ``FileNotFoundError`` as
    ``unit_texts()`` does, and ``OSError`` if ``dest`` cannot be created or written;
    a failed write leaves no temporary file behind.
    """
    texts = unit_texts(executable)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in texts.items():
        target = dest / name
        fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
        written.append(target)
    return written
