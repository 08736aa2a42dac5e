"""Step ``pipeline``: the streamed input pipeline's images/s on the host's cores (`benchmarks.input_pipeline`),
which needs Grain (carried as wheels to a machine without it)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu.runner import Record, say

__all__ = ["Sizes", "REAL", "DRY", "LIMIT_S", "DRY_LIMIT_S", "run"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    arguments: tuple[str, ...]  # python -m benchmarks.input_pipeline arguments


REAL = Sizes(arguments=("--images", "1200", "--workers", "0", "8", "16", "--batches", "10", "--repeats", "2"))
DRY = Sizes(arguments=("--images", "24", "--workers", "0", "--batches", "2", "--skip", "1", "--repeats", "1",
                       "--batch", "4", "--side", "32"))
LIMIT_S, DRY_LIMIT_S = 150, 120


def run(record: Record, sizes: Sizes, args: argparse.Namespace) -> tuple[bool, str]:
    """The benchmark in a child process; its JSON is the step's result."""
    if importlib.util.find_spec("grain") is None:
        record.data["skipped"] = "grain is not installed"
        return False, "grain is not installed here (carry its wheels)"
    json_path = Path(args.out) / "input_pipeline.json"
    command = [sys.executable, "-m", "benchmarks.input_pipeline", *sizes.arguments, "--json", str(json_path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(record.remaining(), 5))
    except subprocess.TimeoutExpired:
        return False, "ran out of the step's time"
    say(done.stdout.strip())
    if done.returncode or not json_path.exists():
        record.data["error"] = (done.stderr or done.stdout).strip()[-500:]
        return False, f"exit {done.returncode}: {record.data['error'].splitlines()[-1] if record.data['error'] else ''}"
    record.data["pipeline"] = json.loads(json_path.read_text())
    rates = ", ".join(f"{r['workers']} workers {r['images_per_sec']:,.0f}/s" for r in record.data["pipeline"]["rows"])
    return True, rates
