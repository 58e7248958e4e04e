"""The package's shape: no import circles, small modules, and the torch line respected.

These guard the structure the README's Development section describes: a module that grows past
what one reader holds in mind, or two modules that import each other at load time, is a design
problem found here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vit_explain"
#: The most lines a module may have (the README's rule of thumb, with a little slack).
MAX_LINES = 360
#: Subpackages that must never import torch, at load time or inside a function.
TORCH_FREE = ("runtime", "methods", "graph", "outputs", "atomic", "discovery", "metadata", "errors", "serve")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _load_time_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Package modules imported when ``module`` is imported: top-level statements only, not
    function bodies (lazy imports) nor ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody)

    visit(tree.body)
    # Importing a.b.c first runs a/__init__ and a/b/__init__: those are load-time imports too,
    # except the importer's own ancestors (already being initialised when it runs).
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    for name in list(found):
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(2, len(parts)))
    return {name for name in found if name in known and name != module and name not in ancestors}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                strongconnect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in graph:
        if node not in index:
            strongconnect(node)
    return result


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {name: _load_time_imports(name, path, known) for name, path in modules.items()}
    # A package's __init__ importing its own submodules is how packages re-export; a submodule
    # importing its parent package's name is the circle that matters, so parents are kept.
    return {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}


def test_the_import_graph_finder_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_itself_back_through_others():
    assert _cycles(_import_graph()) == []


def test_no_module_is_longer_than_a_reader_can_hold():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_torch_free_parts_never_import_torch_even_lazily():
    offenders = []
    for name, path in _modules().items():
        part = name.split(".")[1] if "." in name else ""
        if part not in TORCH_FREE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in ("torch", "timm", "torchvision")]
    assert offenders == []
