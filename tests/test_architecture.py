"""ARCHITECTURE.md stays true: imports go one way between the package's layers (lazy ones inside functions
included), no module imports a layer above its own, and there is no import circle between modules."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "parallel_bridge"
LAYERS = ["errors", "parallel", "spec", "numerics", "adapters", "models", "checkpoint", "serving", "sync", "cli"]
"""Bottom to top: a module imports its own layer and the ones before it (ARCHITECTURE.md's table)."""
TOP = {"__init__", "__main__", "plugin", "testing"}
"""The package's entry points, which may import any layer."""


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the parallel_bridge modules it imports (at top level or inside functions)."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name, found = _module(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("parallel_bridge"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("parallel_bridge"))
        out[name] = found
    return {m: {i for i in found if i in out} for m, found in out.items()}


def _layer(module: str) -> int | None:
    part = module.split(".")[1] if "." in module else ""
    return None if part in TOP or module == "parallel_bridge" else LAYERS.index(part)


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{m} ({LAYERS[_layer(m)]}) imports {i} ({LAYERS[_layer(i)]})"
        for m, imported in _imports().items() if _layer(m) is not None
        for i in imported if _layer(i) is not None and _layer(i) > _layer(m)
    ]
    assert upward == []


def test_there_is_no_import_circle():
    graph = {m: {i for i in imported if i != m and not m.startswith(i + ".")} for m, imported in _imports().items()}
    circles = []

    def visit(node, path):
        for nxt in graph.get(node, ()):
            if nxt in path:
                circles.append(path[path.index(nxt):] + [nxt])
            elif len(path) < 12:
                visit(nxt, path + [nxt])

    for start in graph:
        visit(start, [start])
    assert circles == [], sorted({" -> ".join(c) for c in circles})[:5]


def test_every_package_folder_is_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS) - {"errors"}
