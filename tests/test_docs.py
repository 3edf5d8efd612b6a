"""The docs stay true to the tree: docs/design.md's module table names every module."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "credproxy"


def test_design_module_table_lists_every_module() -> None:
    """Every module under credproxy/ (but __init__.py) has a row in docs/design.md section 1.1, under its folder."""
    text = (ROOT / "docs" / "design.md").read_text()
    listed: set[tuple[str, str]] = set()
    for layer, modules in re.findall(r"^\| ([a-z—]+) \| ([^|]+) \|", text, flags=re.MULTILINE):
        for name in re.findall(r"`([A-Za-z_]+\.py)`", modules):
            listed.add(("" if layer == "—" else layer, name))
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py"
        and (str(path.parent.relative_to(PACKAGE)).replace(".", ""), path.name) not in listed
    ]
    assert missing == [], f"not in docs/design.md's module table: {missing}"


def test_nothing_in_the_repository_points_at_notes_that_are_not_in_it() -> None:
    """No file points at the design notes kept outside the repository (their file names, requirement ids): a reader could not follow it."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    # (The names are written as character classes so that this file names none.)
    pattern = re.compile(
        r"PRODUCT[.]md|reference[/]providers|python[-]stack[.]md|\bR16[.]\d|seeds[/]|seed 00\d"
    )
    found = [
        f"{name}:{n}"
        for name in files
        if name.endswith((".py", ".md", ".toml", ".service", ".socket"))
        for n, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
