"""The house rules of the package, checked on its source: the plugin core (the top-level modules,
``teachers/``, ``verl_fence/``) never imports a tool (every other subpackage), there is no import circle,
and only the fence imports verl in the core."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ta_opd_verl"
CORE_SUBPACKAGES = ("teachers", "verl_fence")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_core(module: str) -> bool:
    """The package itself, its top-level modules, and the core subpackages."""
    parts = module.split(".")
    return len(parts) == 1 or parts[1] in CORE_SUBPACKAGES or (PACKAGE / f"{parts[1]}.py").is_file()


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement of ``path``, at any depth (function-level ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _internal_edges(module: str) -> set[str]:
    edges = set()
    for name in _imports(MODULES[module]):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module and name != "ta_opd_verl" and not module.startswith(name + "."):
            edges.add(name)
    return edges


def test_the_core_never_imports_a_tool():
    offending = {
        module: sorted(edge for edge in _internal_edges(module) if not _is_core(edge))
        for module in MODULES
        if _is_core(module)
    }
    assert {module: tools for module, tools in offending.items() if tools} == {}


def test_there_is_no_import_circle():
    graph = {module: _internal_edges(module) for module in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for edge in sorted(graph[module]):
            assert state.get(edge) != "open", f"import circle: {' -> '.join([*path, module, edge])}"
            if edge not in state:
                visit(edge, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_only_the_fence_imports_verl_in_the_core():
    touching = {
        module
        for module in MODULES
        if _is_core(module)
        and not module.startswith("ta_opd_verl.verl_fence")
        and any(name == "verl" or name.startswith("verl.") for name in _imports(MODULES[module]))
    }
    assert touching == set()
