"""The package structure is a contract: imports point one way between dualenc's packages, no
module of dualenc/, tfrecords_tools/ or bench/ takes part in an import cycle (counting imports
inside functions too), and no module imports another module's private (``_``) names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("dualenc", "tfrecords_tools", "bench")

# What each dualenc package may import (besides itself). Anything unlisted is a layering error.
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "losses": {"core"},
    "models": {"core", "data", "losses"},
    "distribute": {"core", "models"},
    "export": {"core", "data", "models"},
    "retrieval": {"core", "data", "export"},
    "training": {"core", "data", "losses", "models", "distribute", "export", "retrieval"},
    "beam": {"core", "data", "export", "retrieval"},
    "api": {"core", "data", "export", "retrieval"},
    "service": {"core", "data", "export", "retrieval", "api"},
    "launch": {"distribute"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for tree in TREES for p in (ROOT / tree).rglob("*.py")}


def _imports(path: Path, name: str, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in `path`, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, []) if sub in known else (base, [alias.name]))
    return [(target, names) for target, names in found if target.split(".")[0] in TREES]


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, list[str]]]]]:
    known = _modules()
    raw = {name: _imports(path, name, known) for name, path in known.items()}
    graph = {name: {target for target, _ in edges if target in known and target != name} for name, edges in raw.items()}
    return graph, raw


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "dualenc" and len(parts) > 1 else None


def test_dualenc_packages_import_one_way():
    graph, _ = _graph()
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in graph.items()
        for target in targets
        if _package(source) and _package(target) and _package(source) != _package(target)
        and _package(target) not in ALLOWED[_package(source)]
    )
    assert not wrong, "\n".join(wrong)


def test_every_dualenc_module_is_in_a_known_package():
    graph, _ = _graph()
    assert {_package(m) for m in graph if _package(m)} <= set(ALLOWED)


def test_no_import_cycles():
    graph, _ = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, cycles


@pytest.mark.parametrize("tree", [*TREES, "tests"])
def test_no_private_name_imported_across_modules(tree):
    known = _modules()
    crossing = []
    for path in (ROOT / tree).rglob("*.py"):
        for target, names in _imports(path, _module_name(path), known):
            crossing += [f"{_module_name(path)}: {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("tree", TREES)
def test_every_folder_of_modules_is_a_package(tree):
    """`packages = find:` installs only folders with an ``__init__.py`` (one left out of git
    leaves a fresh clone's install without it)."""
    folders = {path.parent for path in (ROOT / tree).rglob("*.py") if "__pycache__" not in path.parts}
    assert sorted(str(folder.relative_to(ROOT)) for folder in folders if not (folder / "__init__.py").is_file()) == []
