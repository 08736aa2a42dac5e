"""The layout as a newcomer reads it: no import cycles among the project's modules, and the commands are
leaves that nothing imports (imports inside functions count: they run too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flaxnets", "train", "benchmarks")
COMMANDS = ("train.__main__", "train.evaluate", "train.predict", "train.plots", "train.data.__main__",
            "train.recipes.__main__", "flaxnets.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports, anywhere in its body."""
    modules = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _parents(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ importing its own submodules (to re-export them) is not a cycle of design.
    edges = {name: {t for t in targets if not (name in _parents(t))} for name, targets in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_commands_are_leaves():
    graph = import_graph()
    for command in COMMANDS:
        importers = sorted(name for name, targets in graph.items() if command in targets)
        assert not importers, f"{command} is a command, yet {', '.join(importers)} import(s) it"


def test_the_library_imports_nothing_of_the_trainer_or_the_benchmarks():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("flaxnets"):
            assert not {t for t in targets if t.startswith(("train", "benchmarks"))}, name


def test_the_models_never_import_the_cpu_kernels():
    """The CPU kernels are the caller's choice (``create_model(name, ops=flaxnets.cpu.ops())``): the
    architectures, their layers and the registry never reach for them."""
    graph = import_graph()
    models = [name for name in graph if name.startswith("flaxnets.models")] + ["flaxnets.layers", "flaxnets.registry"]
    for name in models:
        assert not {t for t in graph[name] if t == "flaxnets.cpu" or t.startswith("flaxnets.cpu.")}, name


def test_import_flaxnets_imports_neither_optax_nor_the_optional_parts():
    script = ("import flaxnets, sys; loaded = [m for m in ('optax', 'flaxnets.cpu', 'flaxnets.nnx', 'flaxnets.export', "
              "'flax.nnx', 'onnx', 'jax2onnx') if m in sys.modules]; print(loaded); assert not loaded")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
