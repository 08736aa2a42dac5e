"""Step ``throughput``: every architecture torchvision also has, train and inference, bfloat16 and float32,
batch 256, with compile time, images/s, TFLOP/s, MFU against the measured ceiling and the data sheet, and
device memory; the most important rows first, what the time left no room for listed as skipped."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any, Sequence

from benchmarks.gpu.runner import Record, measured_ceiling, say

__all__ = ["Sizes", "REAL", "DRY", "LIMIT_S", "DRY_LIMIT_S", "PRIORITY", "run", "throughput_order", "measure_row"]

# The torchvision architectures in the order the table measures them when time is short.
PRIORITY = ("resnet50", "resnet18", "resnet101", "resnet152", "resnet34", "vgg16", "vgg16_bn", "googlenet",
            "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg19", "vgg19_bn")


@dataclasses.dataclass(frozen=True)
class Sizes:
    archs: tuple[str, ...] | None  # None: every torchvision architecture, in `PRIORITY`'s order
    batch: int
    small_batch: int  # when the batch does not fit in device memory
    repeats: int
    steps: int  # steps per timed repeat


REAL = Sizes(archs=None, batch=256, small_batch=128, repeats=5, steps=5)
DRY = Sizes(archs=("lenet5_bn",), batch=2, small_batch=1, repeats=2, steps=1)
LIMIT_S, DRY_LIMIT_S = 300, 120  # 14 s a row on the H200 (2026-11-30); GoogLeNet's compiles for over 60 s


def throughput_order(archs: Sequence[str]) -> list[tuple[str, str, str]]:
    """(arch, mode, dtype) rows, the most important first: all four of the first architecture, then every
    other one's bfloat16 training, bfloat16 inference, float32 training, float32 inference."""
    first, rest = archs[0], list(archs[1:])
    combos = (("train", "bfloat16"), ("infer", "bfloat16"), ("train", "float32"), ("infer", "float32"))
    return [(first, mode, dtype) for mode, dtype in combos] + [
        (arch, mode, dtype) for mode, dtype in combos for arch in rest]


def _torchvision_archs() -> list[str]:
    import flaxnets

    names = [n for n in flaxnets.list_models() if flaxnets.get_spec(n).torchvision]
    ranked = [n for n in PRIORITY if n in names]
    return ranked + sorted(set(names) - set(ranked))


def measure_row(arch: str, mode: str, dtype: str, batch: int, sizes: Sizes, ceiling: float | None,
                retry_smaller: bool = True, **options: Any) -> dict[str, Any]:
    """`benchmarks.throughput.throughput_row`, plus MFU against the measured ceiling and the process's
    peak device memory; with ``retry_smaller``, a batch that does not fit is retried at the sizes'
    smaller batch."""
    import jax

    from benchmarks.throughput import throughput_row
    from flaxnets.cli import error_phrase, out_of_memory

    try:
        row = throughput_row(arch, mode, batch, dtype=dtype, repeats=sizes.repeats, warmup=1,
                             steps=sizes.steps, log=say, **options)
    except Exception as error:  # noqa: BLE001 - any row may fail; the table goes on
        jax.clear_caches()
        if retry_smaller and out_of_memory(error) and batch > sizes.small_batch:
            say(f"{arch} {mode} {dtype}: batch {batch} does not fit; batch {sizes.small_batch}")
            row = measure_row(arch, mode, dtype, sizes.small_batch, sizes, ceiling, **options)
            row["note"] = f"batch {batch} did not fit in device memory"
            return row
        return {"arch": arch, "mode": mode, "dtype": dtype, "batch": batch,
                "error": error_phrase(error, limit=300)}
    row["mfu_measured_ceiling"] = round(row["tflops"] / ceiling, 4) if ceiling else None
    row["device_peak_bytes_so_far"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return row


def run(record: Record, sizes: Sizes, args: argparse.Namespace) -> tuple[bool, str]:
    """The table, row by row, until the budget would run out."""
    from train.tuning import enable_compilation_cache

    enable_compilation_cache()  # $JAX_COMPILATION_CACHE_DIR: ResNet-50's program is the tune step's
    ceiling = measured_ceiling(args.out)
    record.data["ceiling_tflops"] = ceiling
    rows = record.data["rows"] = []
    skipped = record.data["skipped"] = []
    last = 0.0
    for arch, mode, dtype in throughput_order(sizes.archs or _torchvision_archs()):
        # The last row's time stands for the next one's: a row is started only if that much is left.
        if record.remaining() < 1.25 * last:
            skipped.append({"arch": arch, "mode": mode, "dtype": dtype,
                            "reason": f"time: {record.remaining():.0f} s left, the last row took {last:.0f} s"})
            record.save()
            continue
        started = time.perf_counter()
        record.doing(f"{arch} {mode} {dtype}")
        rows.append(measure_row(arch, mode, dtype, sizes.batch, sizes, ceiling))
        last = time.perf_counter() - started
        rows[-1]["row_s"] = round(last, 1)
        record.save()
    measured = [r for r in rows if "error" not in r]
    if skipped:
        say("skipped for time: " + ", ".join(f"{s['arch']} {s['mode']} {s['dtype']}" for s in skipped))
    from benchmarks.common import markdown_table

    say(markdown_table(measured, (("arch", "arch"), ("mode", "mode"), ("dtype", "dtype"), ("batch", "batch"),
                                   ("images_per_s", "images/s"), ("compile_s", "compile s"), ("tflops", "TFLOP/s"),
                                   ("mfu_measured_ceiling", "MFU (measured)"), ("mfu", "MFU (data sheet)"),
                                   ("memory_bytes", "memory B"))))
    head = next((r for r in measured if (r["mode"], r["dtype"]) == ("train", "bfloat16")), None)
    headline = f"{len(measured)} rows measured, {len(rows) - len(measured)} failed, {len(skipped)} skipped for time"
    if head:
        headline += (f"; {head['arch']} bf16 train {head['images_per_s']:,.0f} images/s, MFU "
                     f"{head['mfu_measured_ceiling'] or 0:.0%} of measured")
    return bool(measured) and len(measured) == len(rows), headline
