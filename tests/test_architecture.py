"""The layer rule of docs/architecture.md, checked: import-linter's contract and no import cycle between modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "femurseg"


def test_layers_contract_is_kept(monkeypatch):
    """The contract in pyproject.toml ([tool.importlinter]): each package imports only those below it."""
    cli = pytest.importorskip("importlinter.cli", reason="import-linter is not installed (pip install -e '.[test]')")
    monkeypatch.chdir(ROOT)
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (import cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    """No two modules of femurseg import each other, directly or through others (function-level
    imports included: grimp reads every import statement)."""
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter")
    g = grimp.build_graph("femurseg", cache_dir=None)
    # a package's __init__ is its own node; importing a submodule does not import the parent's body here
    graph = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    assert _strongly_connected(graph) == []


def test_tarjan_finds_a_cycle():
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _strongly_connected({"a": {"b"}, "b": set()}) == []


def test_docstrings_cite_no_tracker_numbers():
    """Docstrings and comments speak of the code: no "issue 8" / "GitHub issue 3"."""
    pat = re.compile(r"\b(GitHub )?issue #?\d+", re.IGNORECASE)
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in SRC.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pat.search(line)]
    assert hits == []


def test_modules_stay_readable():
    """No module over 600 lines unless its docstring says why (``Length:``)."""
    long = []
    for p in SRC.rglob("*.py"):
        text = p.read_text()
        if text.count("\n") > 600 and "Length:" not in text[:6000]:
            long.append(f"{p.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert long == []
