"""What every step of the GPU run shares: its record, its time limit, running it, and the summary table.

``python -m benchmarks.gpu STEP --out DIR [--dry-run] [--budget S] [--data-dir PATH]`` runs one step (a
module of this package with ``run``, ``REAL``, ``DRY`` and ``LIMIT_S``/``DRY_LIMIT_S``) into
``DIR/STEP.json``; ``limits`` prints each step's time limit, ``summary`` the table of their results.
`benchmarks/gpu_run.sh` runs the steps one process each, under ``timeout``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from train.arguments import CommandParser

__all__ = ["STEPS", "GRACE_S", "Record", "step_module", "sizes", "limit", "run_step", "summary", "say", "main"]

# The order they run in: the checks first, then the speed claims, then the longer measurements, the table
# that fills its time last, so that what the others leave over goes to it (gpu_run.sh hands a step's
# unused seconds to the next).
STEPS = ("environment", "correctness", "parallel", "tune", "peers", "accuracy", "pipeline", "throughput")
GRACE_S = 15  # of each step's limit, kept back from its own budget to write its results and exit


def step_module(step: str) -> ModuleType:
    """The module of ``step`` (imports no JAX: the steps import it inside ``run``)."""
    if step not in STEPS:
        raise KeyError(f"no GPU-run step {step!r}; the steps are {', '.join(STEPS)}")
    return importlib.import_module(f"benchmarks.gpu.{step}")


def sizes(step: str, dry: bool) -> Any:
    """The sizes ``step`` runs at: its module's ``DRY`` (toy sizes, on a CPU) or ``REAL`` (one H200)."""
    module = step_module(step)
    return module.DRY if dry else module.REAL


def limit(step: str, dry: bool) -> int:
    """``step``'s time limit in seconds (the shell script's ``timeout``)."""
    module = step_module(step)
    return module.DRY_LIMIT_S if dry else module.LIMIT_S


class Record:
    """One step's results, kept in ``DIR/STEP.json`` and rewritten (atomically) at every `save`."""

    def __init__(self, out: Path, step: str, dry: bool, budget: float):
        self.path = Path(out) / f"{step}.json"
        self.started = time.perf_counter()
        self.deadline = self.started + budget
        self.data: dict[str, Any] = {"step": step, "status": "running", "ok": False, "dry_run": dry,
                                     "budget_s": round(budget), "started": _now(), "headline": ""}
        self.save()

    def remaining(self) -> float:
        """Seconds left of the step's budget."""
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.data["wall_s"] = round(time.perf_counter() - self.started, 1)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)

    def doing(self, what: str) -> None:
        """Saves what the step starts now: if the time limit kills the process, the summary names it."""
        self.data["doing"] = what
        self.save()

    def finish(self, ok: bool, headline: str) -> None:
        self.data.pop("doing", None)
        self.data.update(status="ok" if ok else "failed", ok=ok, headline=headline)
        self.save()


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def say(message: str) -> None:
    """Print at once: the step's log is read while the step runs."""
    print(message, flush=True)


def measured_ceiling(out: Path) -> float | None:
    """The bfloat16 matrix ceiling (TFLOP/s) that the environment step measured, if it ran into ``out``."""
    try:
        return json.loads((Path(out) / "environment.json").read_text())["ceilings"]["matmul_tflops_best"]
    except (OSError, KeyError, ValueError):
        return None


def run_step(step: str, args: argparse.Namespace) -> int:
    """Run ``step`` into ``DIR/STEP.json``; an exception fails the step (its traceback goes to the log)."""
    budget = args.budget if args.budget is not None else limit(step, args.dry_run) - GRACE_S
    record = Record(Path(args.out), step, args.dry_run, budget)
    try:
        ok, headline = step_module(step).run(record, sizes(step, args.dry_run), args)
    except Exception as error:  # noqa: BLE001 - one step's failure is a result, not the end of the run
        traceback.print_exc()
        record.data["error"] = f"{type(error).__name__}: {error}"
        from flaxnets.cli import error_phrase

        ok, headline = False, error_phrase(error)
    record.finish(ok, headline)
    say(f"{step}: {'ok' if ok else 'FAILED'}: {headline}")
    return 0 if ok else 1


def _unfinished(data: dict[str, Any]) -> str:
    """What a step that was stopped before its end had done, and what it was doing."""
    done = [row for row in data.get("rows", data.get("steps", [])) if "error" not in row]
    parts = [f"stopped during {data['doing']}" if data.get("doing") else "stopped"]
    if done:
        parts.append(f"{len(done)} {'rows' if 'rows' in data else 'checks'} saved before")
    return "; ".join(parts)


def summary(out: Path, codes: dict[str, int], dry: bool, steps: Sequence[str] = STEPS) -> str:
    """The table of ``steps`` (also written to ``DIR/summary.md``): status, time against its limit, result."""
    lines = [f"GPU run {'(dry run, CPU) ' if dry else ''}in {out}", "",
             "| step | status | seconds (limit) | result |", "| --- | --- | --- | --- |"]
    for step in steps:
        try:
            data = json.loads((Path(out) / f"{step}.json").read_text())
        except (OSError, ValueError):
            data = {}
        status = data.get("status", "missing")
        code = codes.get(step)
        headline = str(data.get("headline") or data.get("error") or "")
        if status == "running":  # the process never finished its record
            status = "timeout" if code in (124, 137) else f"crashed (exit {code})"
            headline = _unfinished(data)
        headline = headline.replace("|", "/")
        lines.append(f"| {step} | {status} | {data.get('wall_s', '-')} ({limit(step, dry)}) | {headline} |")
    text = "\n".join(lines) + "\n"
    (Path(out) / "summary.md").write_text(text)
    return text


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for step in STEPS:
        p = commands.add_parser(step, help=(step_module(step).__doc__ or "").split("\n")[0])
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
        p.add_argument("--budget", type=float, default=None, help="seconds this step may plan for")
        p.add_argument("--data-dir", default="data/fashion_mnist", help="Fashion-MNIST's four IDX .gz files")
    p = commands.add_parser("limits", help="each step's time limit in seconds, one 'STEP SECONDS' per line")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps, in the run's order")
    p = commands.add_parser("summary", help="the table of the steps' results")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--steps", default=",".join(STEPS))
    p.add_argument("--codes", nargs="*", default=[], metavar="STEP=EXIT", help="each step's exit status")
    p = commands.add_parser("torch-reference", help=argparse.SUPPRESS)  # checks.convert_parity's child process
    p.add_argument("--folder", required=True)
    p.add_argument("--archs", required=True)
    p.add_argument("--side", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--device", required=True)
    p = commands.add_parser("tune-variant", help=argparse.SUPPRESS)  # a tune variant with start-up flags
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true")
    return parser


def _chosen(text: str) -> list[str]:
    """The steps named in ``text`` (comma-separated), in the run's order; an unknown one is an error."""
    names = [s for s in text.split(",") if s]
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise SystemExit(f"error: unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}.")
    return [s for s in STEPS if s in names]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.gpu``."""
    args = _parser().parse_args(argv)
    if args.command == "limits":
        for step in _chosen(args.steps):
            print(step, limit(step, args.dry_run))
        return 0
    if args.command == "summary":
        codes = dict(item.split("=", 1) for item in args.codes)
        print(summary(args.out, {k: int(v) for k, v in codes.items()}, args.dry_run, _chosen(args.steps)), end="")
        return 0
    if args.command == "torch-reference":  # PyTorch alone: no JAX in this process
        from benchmarks.gpu.checks import torch_reference

        torch_reference(args.archs.split(","), args.side, args.batch, args.folder, args.device)
        return 0
    # A step, or a tune variant in its own process: set what JAX reads when it starts.
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
        if args.command == "parallel":  # two CPU devices, so that the drivers split the batch
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    if args.command in ("tune", "tune-variant", "peers"):
        # JAX takes 75% of the device's memory when it starts; a variant's own process, or PyTorch beside
        # JAX, must find room: each takes what it needs.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from flaxnets.cpu import cpu_backend_ahead, prefer_eigen

    if cpu_backend_ahead():
        prefer_eigen()  # on a CPU, the library setting the trainer and the benchmarks use
    if args.command == "tune-variant":
        tune = step_module("tune")
        variant = next(v for v in tune.VARIANTS if v.name == args.name)
        row = tune.tune_row(variant, sizes("tune", args.dry_run), measured_ceiling(args.out))
        print("ROW " + json.dumps(row, default=str), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    return run_step(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
