"""The package layout holds: no import cycle among phitune's modules, and the layers import one way
(client -> resources -> backends -> local -> runtime -> trainer; engines and estimate beside the trainer)."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import phitune

ROOT = Path(phitune.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package by dotted name: its file and whether it is a package's ``__init__``."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = ["phitune", *path.relative_to(ROOT).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The phitune modules an import statement names (``from a import b`` names ``a.b`` where that is a module)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    if node.level:
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    for alias in node.names:
        yield f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix


def _imports(module: str) -> set[str]:
    """The phitune modules ``module`` imports, at module level or inside functions; imports for type checking only
    (under ``if TYPE_CHECKING:``) are left out."""
    path, is_package = MODULES[module]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.update(name for name in _imported(module, is_package, child) if name in MODULES)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _package(module: str) -> str:
    """``phitune.trainer.loop`` -> ``trainer``; ``phitune.types`` -> ``types``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_import_graph_sees_the_package() -> None:
    assert {"phitune.trainer.loop", "phitune.runtime.attempt", "phitune.estimate.fit"} <= set(GRAPH)
    assert "phitune.trainer.loop" in GRAPH["phitune.runtime.attempt"]
    assert "phitune.estimate.memory" in GRAPH["phitune.trainer.loop"]  # a relative import of a sibling package


def test_no_module_imports_itself_through_others() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module)
    assert cycles == [], "\n".join(" -> ".join(cycle) for cycle in cycles)


FORBIDDEN = {
    # the training core: neither the processes that run it, nor the store, nor anything that serves or calls it
    "trainer": {"runtime", "local", "backends", "resources", "server", "_client", "engines", "cli", "export"},
    # beside the trainer: the serving engines and the estimate know no store, worker, backend or server
    "engines": {"runtime", "local", "backends", "resources", "server", "_client", "cli"},
    "estimate": {"trainer", "runtime", "local", "backends", "resources", "server", "_client", "engines", "cli"},
    # the trainer process's body reads and writes the job's records through a protocol, not the store
    "runtime": {"local", "backends", "resources", "server", "_client", "cli"},
    "local": {"backends", "resources", "server", "_client", "trainer", "engines", "cli"},
    "backends": {"server", "resources", "_client", "cli"},
    "resources": {"server", "_client", "cli"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if _package(module) == layer
        for target in targets
        if _package(target) in FORBIDDEN[layer]
    )
    assert wrong == []


def test_the_estimate_and_the_server_package_import_nothing_heavy() -> None:
    code = (
        "import sys, phitune.estimate, phitune.server, phitune.resources.finetune; "
        "heavy = {m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'peft', 'fastapi', 'starlette'}; "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
