"""The import rules of docs/DESIGN.md ("What each package may import"), read from the source.

Every ``import`` counts, also one inside a function: a lazy import that closes a
circle is still a circle, only hidden from the first reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pilot", "yoda", "droid", "hpc")
# The entry points on top: they wire the roles together and may import anything.
TOP = {"pilot.cli", "pilot.ranks", "pilot.wholejobs", "pilot.onenode"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The project's modules that ``name`` imports (``from pkg import sub`` names ``pkg.sub``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{alias.name}" for alias in node.names} & MODULES.keys()
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(module)
    return {m for m in out if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _package(module: str) -> str:
    return module.partition(".")[0]


def test_the_graph_is_read() -> None:
    """A guard for the guard: the parser sees the imports it is meant to judge."""
    assert "yoda.master" in GRAPH["yoda.rank"]
    assert "hpc.transport" in GRAPH["droid.droid"]
    assert "pilot.data.transfer" in GRAPH["pilot.data.http"]


@pytest.mark.parametrize("lower", ["yoda", "droid"])
def test_hpc_imports_neither_yoda_nor_droid(lower: str) -> None:
    bad = sorted(
        f"{m} -> {i}"
        for m, imported in GRAPH.items()
        if _package(m) == "hpc"
        for i in imported
        if _package(i) == lower
    )
    assert not bad, f"hpc holds only what the ranks share; it may not import {lower}: {bad}"


def test_yoda_and_droid_do_not_import_each_other() -> None:
    bad = sorted(
        f"{m} -> {i}"
        for m, imported in GRAPH.items()
        for i in imported
        if {_package(m), _package(i)} == {"yoda", "droid"}
    )
    assert not bad, f"what yoda and droid share belongs in hpc: {bad}"


def test_only_the_top_imports_the_entry_points() -> None:
    """``hpc``, ``yoda`` and ``droid`` never import the modules that wire them together."""
    bad = sorted(f"{m} -> {i}" for m, imported in GRAPH.items() for i in imported & TOP)
    bad = [b for b in bad if b.split(" -> ")[0] not in TOP]
    assert not bad, f"imports of the top of the layering: {bad}"


def test_pilot_core_imports_no_mpi_side() -> None:
    """Below its entry points ``pilot`` imports none of ``yoda``, ``droid``, ``hpc``; a new
    entry point that wires them together goes into TOP here and in docs/DESIGN.md."""
    bad = sorted(
        f"{m} -> {i}"
        for m, imported in GRAPH.items()
        if _package(m) == "pilot" and m not in TOP
        for i in imported
        if _package(i) in ("yoda", "droid", "hpc")
    )
    assert not bad, f"pilot's core imports the MPI side: {bad}"


def test_no_two_module_circles() -> None:
    circles = sorted(
        f"{a} <-> {b}" for a, imported in GRAPH.items() for b in imported if a < b and a in GRAPH[b]
    )
    assert not circles, f"cut each by moving the shared piece below both: {circles}"
