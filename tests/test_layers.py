"""The package's layers import only downward (import-linter's `layers` contract in pyproject.toml, the order
ARCHITECTURE.md draws), and no module imports itself back through others (no import cycle, also inside a layer)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "compresscli"


def test_layers_import_only_downward():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(REPO / "pyproject.toml")) == 0


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules `path` imports (absolute or relative, at the top or inside functions)."""
    name = _module(path)
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = base.split(".")
            target = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]) if node.level else node.module
            target = (target or "").rstrip(".")
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle():
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, set(paths)) for m, p in paths.items()}
    graph.pop("compresscli")  # the public API imports from every layer and nothing imports it back
    cycles = []
    for start in graph:  # a module that reaches itself again through its imports
        seen, stack = set(), list(graph[start])
        while stack:
            module = stack.pop()
            if module == start:
                cycles.append(start)
                break
            if module not in seen and module in graph:
                seen.add(module)
                stack.extend(graph[module])
    assert cycles == []
