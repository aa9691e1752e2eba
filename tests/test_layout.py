"""The package's imports run one way: no module reaches itself through the imports it executes.

Every `import` and `from ... import` of a qguard_stream module counts, at module level or inside a
function, except those under `if TYPE_CHECKING:` (annotations only; never executed). `from pkg
import name` counts as an import of `pkg.name` when that is a module, else of `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import qguard_stream

PACKAGE_ROOT = Path(qguard_stream.__file__).resolve().parent
KERNELS_ROOT = PACKAGE_ROOT.parent / "kernels"  # installed as qguard_stream.kernels


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for the package and its kernels."""
    files = {}
    for root, prefix in ((PACKAGE_ROOT, "qguard_stream"), (KERNELS_ROOT, "qguard_stream.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def executed_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in executed_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.level == 0 and node.module is not None:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files
                           else node.module for alias in node.names]
            else:
                raise AssertionError(f"{path}: relative import; use absolute qguard_stream paths")
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    files = module_files()
    assert "qguard_stream.stream" in files and "qguard_stream.kernels.guard_head" in files
    cycle = find_cycle(import_graph(files))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(("graph", "cyclic"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
])
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], cyclic: bool) -> None:
    assert (find_cycle(graph) is not None) == cyclic


def test_imports_under_type_checking_are_not_counted() -> None:
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\n"
                     "def f():\n    import y\n")
    names = [node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
             for node in executed_imports(tree)]
    assert names == ["typing", "y"]
