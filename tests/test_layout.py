"""The package layout: imports flow one way, and only ``ratta.cli`` knows the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ratta

SRC = Path(ratta.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _imported_names(path: Path) -> set[str]:
    """Every ``ratta`` name a module imports, at the top, in functions or for type checking."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "ratta" or n.startswith("ratta.")}


def _owner(name: str) -> str:
    """The module that holds ``name`` (``ratta.db.store.Database`` -> ``ratta.db.store``)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


IMPORTS = {m: {_owner(n) for n in _imported_names(p)} - {m} for m, p in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back() -> None:
    """No cycle, lazy and type-checking imports included: ``ratta.db``'s store <- index <-
    writer, the stages <- the command line."""
    assert _cycle(IMPORTS) is None, " -> ".join(_cycle(IMPORTS) or [])


def test_the_database_modules_import_in_one_order() -> None:
    assert "ratta.db.index" not in IMPORTS["ratta.db.store"]
    assert "ratta.db.writer" not in IMPORTS["ratta.db.store"]
    assert "ratta.db.writer" not in IMPORTS["ratta.db.index"]


def test_the_engine_and_the_formats_import_no_stage() -> None:
    """Stages depend on the engine and the formats, never the other way (``ratta.devices``:
    device strings and pinned host buffers, below both)."""
    engine = {"ratta.config", "ratta.engine", "ratta.sinkhorn", "ratta.retrieval"}
    formats = {"ratta.atomic", "ratta.errors", "ratta.guard", "ratta.identity", "ratta.devices"}
    formats |= {m for m in MODULES if m.startswith("ratta.files")}
    for module in sorted(engine | formats):
        assert IMPORTS[module] <= engine | formats, module


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("ratta.cli")))
def test_only_the_cli_builds_parsers_and_nothing_imports_it(module: str) -> None:
    path = MODULES[module]
    assert not {m for m in IMPORTS[module] if m.startswith("ratta.cli")}, module
    assert "argparse" not in path.read_text(), f"{module} uses argparse"
