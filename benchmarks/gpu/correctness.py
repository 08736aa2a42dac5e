"""Step ``correctness``: the trainer's train step on the device in float32 and bfloat16 against float64 on
the CPU (`benchmarks.gpu.checks.step_against_float64`), and torchvision's weights converted and run on the
device against torchvision (`benchmarks.gpu.checks.convert_parity`)."""

from __future__ import annotations

import argparse
import dataclasses
import time

from benchmarks.gpu.runner import Record, say

__all__ = ["Sizes", "REAL", "DRY", "LIMIT_S", "DRY_LIMIT_S", "run"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    steps: tuple[tuple[str, int], ...]  # (architecture, input side) against float64
    batch: int
    checks: tuple[str, ...] | None  # names of `benchmarks.gpu.checks.CHECKS`; None: all of them
    parity: tuple[str, ...]  # torchvision architectures converted and compared
    parity_side: int
    parity_batch: int


# ResNet-18 stands for BatchNorm and the GPU kernel set (stem, max-pool): the paper's AlexNet (LRN) passed on
# 2026-11-30 and nothing it runs has changed since. GoogLeNet's step is left out: its programs compile for
# 15-18 s each on the H200 (RESULTS.md, "GPU"); its converted weights are still compared.
REAL = Sizes(steps=(("resnet18", 64),), batch=8, checks=("float32", "bfloat16"),
             parity=("resnet18", "googlenet"), parity_side=224, parity_batch=4)
# float32 at JAX's default precision is float32 itself on a CPU: no third compilation for it.
DRY = Sizes(steps=(("lenet5_bn", 28),), batch=4, checks=("float32", "bfloat16"),
            parity=("resnet18",), parity_side=32, parity_batch=2)
LIMIT_S, DRY_LIMIT_S = 70, 120


def run(record: Record, sizes: Sizes, args: argparse.Namespace) -> tuple[bool, str]:
    """The train step against float64, and torchvision's weights converted, on the device."""
    import jax

    jax.config.update("jax_enable_x64", True)  # before any computation: it also decides the dropout masks
    from benchmarks.gpu.checks import CHECKS, convert_parity, step_against_float64

    # First, while this process has not started JAX's backend (which takes 75% of the device's memory),
    # PyTorch's process: on the GPU when it has one, unless this is the CPU's dry run.
    torch_device = "cpu" if args.dry_run else "auto"
    record.doing(f"converting {', '.join(sizes.parity)} against torchvision")
    parity = record.data["parity"] = convert_parity(sizes.parity, sizes.parity_side, sizes.parity_batch, torch_device,
                                                    timeout=max(record.remaining(), 10))
    for row in parity:
        say(f"convert {row['arch']}: " + (f"logits {row['logits_error']:.1e} of the largest (<= {row['tolerance']:.0e})"
                                          if "logits_error" in row else row["error"]))
    rows = record.data["steps"] = []
    skipped = record.data["skipped"] = []
    last = 0.0
    for arch, side in sizes.steps:
        if record.remaining() < 1.25 * last:
            skipped.append(arch)
            continue
        started = time.perf_counter()
        record.doing(f"{arch} against float64")
        for row in step_against_float64(arch, side, sizes.batch, sizes.checks or tuple(CHECKS)):
            rows.append(row)
            limits = row["tolerances"]
            gradients = (f"{row['grads_error']:.1e} (<= {limits['grads']:.0e})" if "grads" in limits else
                         f"cosine {row['grads_cosine']:.3f} (>= {limits['grads_cosine']}; norm {row['grads_error']:.1e})")
            statistics_ = ("-" if row["batch_stats_error"] is None else
                           f"{row['batch_stats_error']:.1e} (<= {limits['batch_stats']:.0e})")
            say(f"{arch} {row['check']}: loss {row['loss_error']:.1e} (<= {limits['loss']:.0e}), gradients "
                f"{gradients}, BatchNorm statistics {statistics_}: {'ok' if row['ok'] else 'OUTSIDE'}")
        last = time.perf_counter() - started
        say(f"  ({last:.0f} s)")
        record.save()
    checks = rows + parity
    passed = sum(row["ok"] for row in checks)
    headline = f"{passed}/{len(checks)} checks within tolerance"
    if skipped:
        headline += f"; no time for {', '.join(skipped)}"
    exact = [r for r in rows if r["check"] == "float32"]
    if exact:
        worst = max(exact, key=lambda r: r["grads_error"])
        headline += f"; float32 gradients within {worst['grads_error']:.1e} of float64 ({worst['arch']})"
    return passed == len(checks) and not skipped, headline
