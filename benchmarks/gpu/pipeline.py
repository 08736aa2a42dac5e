"""Step ``pipeline``: how fast the host feeds the device. On a GPU host, `benchmarks/gpu_pipeline.sh`:
`benchmarks.input_pipeline` on original-size JPEGs and on their resized copy beside a plain decoding loop,
`benchmarks.stream_train` (ResNet-50's step fed by the stream against the same step on a resident batch)
and a short streamed ``python -m train``; Grain and array_record come from the wheels in ``.whl/`` when
they are not installed. The dry run times a toy `benchmarks.input_pipeline` only."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.gpu.runner import Record, say

__all__ = ["Sizes", "REAL", "DRY", "LIMIT_S", "DRY_LIMIT_S", "TARGETS", "run"]

# images/s from original-size JPEGs and from the copy at shorter side 256 on 16 cores; the streamed step's
# share of the resident one.
TARGETS = {"originals": 5000.0, "copy": 10000.0, "streamed_of_synthetic": 0.9}


@dataclasses.dataclass(frozen=True)
class Sizes:
    script: bool  # benchmarks/gpu_pipeline.sh (which brings its own sizes and limits), else `arguments`
    arguments: tuple[str, ...] = ()  # gpu_pipeline.sh's options, or python -m benchmarks.input_pipeline's


# benchmarks.stream_train is the steady end-to-end figure; the short python -m train run is left out.
REAL = Sizes(script=True, arguments=("--no-train",))
DRY = Sizes(script=False, arguments=("--images", "24", "--workers", "1", "--batches", "2", "--repeats", "1",
                                     "--batch", "4", "--side", "32", "--copy-side", "0"))
LIMIT_S, DRY_LIMIT_S = 130, 120  # gpu_pipeline.sh's own limits add up to 115 s without the train run


def run(record: Record, sizes: Sizes, args: argparse.Namespace) -> tuple[bool, str]:
    """The script (or the toy benchmark) in a child process; its JSON is the step's result."""
    out = Path(args.out) / "pipeline"
    out.mkdir(parents=True, exist_ok=True)
    if sizes.script:
        command = ["bash", "benchmarks/gpu_pipeline.sh", str(out), *sizes.arguments]
        result = out / "summary.json"
    else:
        if importlib.util.find_spec("grain") is None:
            return False, "grain is not installed here"
        result = out / "input_pipeline.json"
        command = [sys.executable, "-m", "benchmarks.input_pipeline", *sizes.arguments, "--json", str(result)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max(record.remaining(), 5))
    except subprocess.TimeoutExpired:
        return False, "ran out of the step's time"
    say(done.stdout.strip())
    if done.returncode or not result.exists():
        record.data["error"] = (done.stderr or done.stdout).strip()[-500:]
        return False, f"exit {done.returncode}: " + (record.data["error"].splitlines() or [""])[-1]
    data = record.data["pipeline"] = json.loads(result.read_text())
    if not sizes.script:
        return True, ", ".join(f"{r['workers']} workers {r['images_per_sec']:,.0f}/s" for r in data["rows"])
    rates = {row["data"]: row["images_per_sec"] for row in (data.get("input_pipeline") or {}).get("rows", [])}
    share = (data.get("stream_train") or {}).get("streamed_of_synthetic")
    record.data["targets"] = TARGETS
    met = (rates.get("originals", 0) >= TARGETS["originals"] and rates.get("copy", 0) >= TARGETS["copy"]
           and (share or 0) >= TARGETS["streamed_of_synthetic"])
    return met, data.get("headline", "nothing measured")
