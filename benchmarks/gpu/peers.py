"""Step ``peers``: flaxnets beside what a user would pick instead (`benchmarks.peers`: a plain Flax model,
torchvision eager and under ``torch.compile``), architecture by architecture, in one process, with
flaxnets' speed over each; the goal is 1.15x both on ResNet-50 and ahead on the others."""

from __future__ import annotations

import argparse
import dataclasses
import time

from benchmarks.gpu.runner import Record, say

__all__ = ["Sizes", "REAL", "DRY", "LIMIT_S", "DRY_LIMIT_S", "GOAL", "run"]

GOAL = 1.15  # flaxnets' speed over torch.compile and over the plain Flax model on ResNet-50


@dataclasses.dataclass(frozen=True)
class Sizes:
    archs: tuple[str, ...]  # in order; the first is held to `GOAL`
    peers: tuple[str, ...]  # names of `benchmarks.peers.PEERS`, in the order they run for each architecture
    batch: int
    steps: int
    repeats: int
    warmup: int


# ResNet-50's four, which the goal is stated for (ResNet-18, VGG-16 and GoogLeNet: python -m benchmarks.peers
# --arch resnet18,vgg16,googlenet, about 4 minutes on one H200, most of it torch.compile and XLA autotuning).
REAL = Sizes(archs=("resnet50",), peers=("flaxnets", "flax", "torch", "torch.compile"), batch=256, steps=10, repeats=3,
             warmup=3)
DRY = Sizes(archs=("lenet5",), peers=("flaxnets", "flax", "torch"), batch=4, steps=1, repeats=2, warmup=1)
LIMIT_S, DRY_LIMIT_S = 100, 120  # ResNet-50's four took 130 s on the H200 (2026-12-04), torch.compile 60 of them


def run(record: Record, sizes: Sizes, args: argparse.Namespace) -> tuple[bool, str]:
    """Each architecture's peers while the budget lasts (a peer is started only if the longest one so far
    would still fit)."""
    import flaxnets
    from benchmarks.peers import compare
    from train.tuning import enable_compilation_cache

    enable_compilation_cache()  # flaxnets' ResNet-50 step is the tune step's "defaults": a cache hit

    rows = record.data["rows"] = []
    skipped = record.data["skipped"] = []
    longest = 0.0
    for arch in sizes.archs:
        size = flaxnets.get_spec(arch).input_size
        for peer in sizes.peers:
            if record.remaining() < 1.25 * longest:
                skipped.append(f"{arch} {peer}")
                continue
            record.doing(f"{arch} {peer}")
            started = time.perf_counter()
            try:
                rows += compare(arch, [peer], sizes.batch, size, "bfloat16", sizes.steps, sizes.repeats,
                                sizes.warmup, log=say)
            except Exception as error:  # noqa: BLE001 - one peer's failure is a row, not the end of the step
                rows.append({"peer": peer, "arch": arch, "error": f"{type(error).__name__}: {str(error)[:300]}"})
                say(f"{arch} {peer}: {rows[-1]['error']}")
            longest = max(longest, time.perf_counter() - started)
            record.save()
    ratios = {}
    for arch in sizes.archs:
        ours = next((r["images_per_s"] for r in rows if r["arch"] == arch and r["peer"] == "flaxnets"
                     and "images_per_s" in r), None)
        for row in rows:
            if row["arch"] == arch and ours and "images_per_s" in row:
                row["speed"] = round(ours / row["images_per_s"], 3)
                ratios[f"{arch} vs {row['peer']}"] = row["speed"]
    record.data["speeds"] = ratios
    from benchmarks.common import markdown_table
    from benchmarks.peers import COLUMNS

    say(markdown_table([r for r in rows if "images_per_s" in r], COLUMNS))
    if skipped:
        say(f"skipped for time: {', '.join(skipped)}")
    head = sizes.archs[0]
    against = [ratios.get(f"{head} vs {p}") for p in sizes.peers if p != "flaxnets"]
    goal_met = all(r is not None and r >= GOAL for r in against if r is not None) and any(against)
    failed = [r for r in rows if "error" in r]
    ok = not failed and (args.dry_run or goal_met)
    return ok, (", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if not k.endswith("flaxnets"))
                + f" (goal {GOAL}x on {head}); {len(failed)} failed, {len(skipped)} skipped for time")
