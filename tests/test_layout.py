"""The layout as a newcomer reads it: no import cycles among the project's modules, the commands are
leaves that nothing imports, and the run never imports the command side (imports inside functions count:
they run too).

Three kinds of module in `train` (and the library's one command):

- ``COMMANDS``, the modules a user runs (``python -m NAME``): leaves that nothing imports.
- ``COMMAND_SIDE``, what the commands share and nothing else uses: `train.exits`, the runner every command
  of the trainer and of the benchmarks hands its body to, which turns a user's error into one sentence and
  an exit code (imported by many commands, so not a leaf, yet a command line's concern only);
  `train.arguments`, the trainer's flags and the parsers every command builds on; and
  `train.lr_find`, the ``--lr-find`` mode of ``python -m train``, which prints and draws what the range
  test found (the test itself, its sweep, smoothing and suggestion, is `train.lr_range`, on the run side).
- Every other module of `train` is the run (loop, step, parallel, feed, data, checkpoint, config, run,
  inference, figures, ...): it imports neither of the above nor the benchmarks, so what trains a model
  never depends on what parses a command line. The error types a command reports live on the run side,
  beside what raises them (`train.config.ConfigError`, `train.data.DataError`,
  `train.checkpoint.CheckpointError`, `train.loop.TrainError`), where both sides can import them.

The benchmarks' scripts are commands too, but several reuse another's measurement (``benchmarks.peers``
times what ``benchmarks.vs_torch`` builds), so among themselves they are not held to the leaf rule.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flaxnets", "train", "benchmarks")
COMMANDS = ("train.__main__", "train.evaluate", "train.predict", "train.plots", "train.data.__main__",
            "train.recipes.__main__", "flaxnets.__main__")
COMMAND_SIDE = ("train.exits", "train.arguments", "train.lr_find")
# Run as a process of its own by the trainer (``python -m train.stderr_watch``), never by a user; the runner
# imports the sentence it ends with.
HELPER_PROCESSES = ("train.stderr_watch",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> dict[str, Path]:
    """The project's modules by dotted name, and their files."""
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports, anywhere in its body."""
    modules = module_files()
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


def test_every_module_run_as_a_program_is_a_named_command():
    """A new ``python -m`` entry point under train/ or flaxnets/ is named in COMMANDS, so the rules above hold it."""
    programs = sorted(name for name, path in module_files().items() if name.startswith(("train", "flaxnets"))
                      and 'if __name__ == "__main__"' in path.read_text())
    unnamed = [name for name in programs if name not in COMMANDS + HELPER_PROCESSES]
    assert not unnamed, f"{', '.join(unnamed)} run(s) as a program: add to COMMANDS (or HELPER_PROCESSES)"


def test_the_run_imports_no_command():
    """No module of the run imports a command, the command side or a benchmark."""
    graph = import_graph()
    command_side = set(COMMANDS + COMMAND_SIDE)
    run = sorted(name for name in graph if name.split(".")[0] == "train" and name not in command_side)
    assert {"train.loop", "train.step", "train.parallel", "train.data", "train.checkpoint", "train.config",
            "train.run", "train.lr_range"} <= set(run)
    for name in run:
        reached = sorted(t for t in graph[name] if t in command_side or t.startswith("benchmarks"))
        assert not reached, f"{name} is part of the run, yet imports {', '.join(reached)}"
    for name in COMMAND_SIDE:
        importers = sorted(n for n, targets in graph.items() if name in targets)
        assert importers and all(n in COMMANDS or n.startswith("benchmarks") for n in importers), (name, importers)


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


def test_derivatives_of_their_own_live_only_in_the_cpu_kernels():
    """The models are JAX's primitives composed, differentiated by JAX (tests/test_transforms.py compares
    forward and reverse mode on the layers written here and traces every mode through every architecture);
    a `jax.custom_vjp` or `custom_jvp` is a kernel set's, which the caller opts into."""
    own = [path.relative_to(ROOT).as_posix() for path in sorted((ROOT / "flaxnets").rglob("*.py"))
           if re.search(r"custom_[jv]jp\b", re.sub(r"#.*|\"\"\"[\s\S]*?\"\"\"", "", path.read_text()))]
    assert own and all(path.startswith("flaxnets/cpu/") for path in own), own


def test_import_flaxnets_imports_neither_optax_nor_the_optional_parts():
    """None of them loaded by ``import flaxnets``; each one an attribute of it all the same (loaded then)."""
    script = ("import flaxnets, sys; optional = [f'flaxnets.{m}' for m in flaxnets._ON_DEMAND]; "
              "loaded = [m for m in ['optax', 'flax.nnx', 'onnx', 'jax2onnx', *optional] if m in sys.modules]; "
              "print(loaded); assert not loaded and len(optional) == 8; "
              "assert all(getattr(flaxnets, m.split('.')[1]).__name__ == m for m in optional)")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_one_module_opens_orbax_checkpoints():
    """Training, evaluation, prediction and plots read checkpoints through `train.checkpoint.Checkpoints`
    (`train.inference.load_variables` included), so its screening of untrusted files and its policy for
    unreadable ones hold for every reader: no other module imports Orbax."""
    importers = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "orbax" or n.startswith("orbax.") for n in names):
                importers.append(name)
    assert sorted(set(importers)) == ["train.checkpoint"]


LONG_LINES = 400


def test_no_long_module_without_its_reason():
    """A module of the library, the trainer or the benchmarks over ``LONG_LINES`` lines is one cohesive
    table, and its docstring says so ("over 400 lines: ..."); anything else is split along its seams."""
    long = []
    for path in module_files().values():
        lines = path.read_text().count("\n")
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        name = path.relative_to(ROOT).as_posix()
        if lines > LONG_LINES and f"over {LONG_LINES} lines" not in docstring.lower():
            long.append(f"{name} ({lines} lines)")
    assert not long, "split, or say in the docstring why it is over 400 lines: " + ", ".join(long)
