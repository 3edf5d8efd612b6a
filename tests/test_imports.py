"""The package's import graph: no circles, and the layers' rules (docs/design.md section 1.1).

Every import statement counts, wherever it is: at the top, under
``if TYPE_CHECKING:`` (a circle a type checker must untangle is still a
circle a reader must), and inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import credproxy

ROOT = Path(credproxy.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """The credproxy modules *name* imports (a package's ``__init__`` only if it is a module)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in MODULES and m != name and m != "credproxy"}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _in(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _cycle() -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(GRAPH, WHITE)
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        color[name] = GREY
        stack.append(name)
        for dep in sorted(GRAPH[name]):
            if color[dep] == GREY:
                return [*stack[stack.index(dep) :], dep]
            if color[dep] == WHITE and (found := visit(dep)) is not None:
                return found
        stack.pop()
        color[name] = BLACK
        return None

    for name in sorted(GRAPH):
        if color[name] == WHITE and (found := visit(name)) is not None:
            return found
    return None


def test_the_walk_sees_the_imports_it_should() -> None:
    # A check of the walker itself: a module-level, a TYPE_CHECKING and a
    # function-level import, each known to be there.
    assert "credproxy.core.servecore" in GRAPH["credproxy.shell.servingloop"]
    assert "credproxy.shell.tokens" in GRAPH["credproxy.shell.sessions"]  # TYPE_CHECKING
    assert "credproxy.shell.http" in GRAPH["credproxy.shell.daemon"]  # inside main()
    assert len(GRAPH) > 50


def test_no_import_circles() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_core_imports_nothing_of_the_shell_the_inner_side_or_the_development_idp() -> None:
    bad = {
        (name, dep)
        for name, deps in GRAPH.items()
        if _in(name, "credproxy.core")
        for dep in deps
        if not _in(dep, "credproxy.core", "credproxy.errors")
    }
    assert bad == set()


def test_the_inner_side_imports_only_itself_and_the_errors() -> None:
    bad = {
        (name, dep)
        for name, deps in GRAPH.items()
        if _in(name, "credproxy.inner")
        for dep in deps
        if not _in(dep, "credproxy.inner", "credproxy.errors")
    }
    assert bad == set()


def test_the_daemon_and_the_development_idp_stay_apart() -> None:
    bad = {
        (name, dep)
        for name, deps in GRAPH.items()
        for dep in deps
        if _in(name, "credproxy.devidp") != _in(dep, "credproxy.devidp")
        and dep != "credproxy.errors"
    }
    assert bad == set()
