"""Step ``tune``: ResNet-50's bfloat16 train step built several ways (kernel sets, compiler settings, batch),
timed alike, towards 8,000 images/s on one H200; the best way at the base batch is what
`train.tuning.GPU_SETTINGS` should hold, and its kernel time is profiled by kind
(`benchmarks.step_variants.kernel_profile`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from benchmarks.gpu.runner import Record, measured_ceiling, say

__all__ = ["Sizes", "REAL", "DRY", "LIMIT_S", "DRY_LIMIT_S", "TARGET", "Variant", "VARIANTS", "run", "settings_line",
           "tune_row"]

TARGET = 8000.0  # images/s: MLPerf Training v4.0's 8xH200 ResNet-50 entry ran about 7,950 per GPU


@dataclasses.dataclass(frozen=True)
class Sizes:
    arch: str
    batch: int
    repeats: int
    steps: int  # steps per timed repeat
    variants: tuple[str, ...] | None  # names of `VARIANTS`; None: all of them
    profile: bool  # profile the fastest variant at the base batch


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to build the tuned train step. ``kernels`` names a kernel set of
    `benchmarks.step_variants.kernel_sets` ("default": the backend's own, `train.tuning.step_settings`);
    ``xla_flags`` are read when XLA starts, so a variant that has them runs in a process of its own;
    everything else is per executable, in one process."""

    name: str
    kernels: str = "default"
    batch_scale: float = 1.0
    compiler_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    matmul_precision: str | None = None
    donate: bool = True
    xla_flags: str = ""

    def fields(self) -> dict[str, Any]:
        """What the variant sets, for its result row."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}

    def settings(self):
        """The `train.tuning.StepSettings` it compiles the step with: the backend's, with this variant's
        compiler options and matmul precision added."""
        from train.tuning import step_settings

        base = step_settings()
        return dataclasses.replace(base, compiler_options={**base.compiler_options, **self.compiler_options},
                                   matmul_precision=self.matmul_precision or base.matmul_precision)


# In the order they are tried: the kernel sets first (what the last run pointed at), then settings.
VARIANTS = (
    Variant("defaults"),
    Variant("plain kernels", kernels="plain"),
    Variant("gpu max-pool only", kernels="gpu max-pool only"),
    Variant("gpu folded stem only", kernels="gpu folded stem only"),
    Variant("gpu, max-pool by phase", kernels="gpu, max-pool by phase"),
    Variant("gpu, 1x1 as products", kernels="gpu, 1x1 as products"),
    Variant("gpu, max-pool by phase, 1x1 as products", kernels="gpu, max-pool by phase, 1x1 as products"),
    Variant("batch x1.5", batch_scale=1.5),
    Variant("Triton for every matrix product", compiler_options={"xla_gpu_triton_gemm_any": True}),
    Variant("no CUDA graphs", xla_flags="--xla_gpu_enable_command_buffer="),
    Variant("autotune level 0", compiler_options={"xla_gpu_autotune_level": 0}),
)

# The backend's kernel set, then its max pooling read by stride phase (the third run found the strided
# taps' gradient loop slower than select-and-scatter), then that with the 1x1 convolutions as matrix products
# too (which XLA may fuse with BatchNorm's multiply-add and ReLU, and whose GEMM fusions it autotunes for
# longer), then the products alone. The plain kernels' figure is on record.
REAL = Sizes(arch="resnet50", batch=256, repeats=3, steps=10, profile=True,
             variants=("defaults", "gpu, max-pool by phase", "gpu, max-pool by phase, 1x1 as products",
                       "gpu, 1x1 as products"))
DRY = Sizes(arch="lenet5_bn", batch=2, repeats=2, steps=1, profile=True,
            variants=("defaults", "no CUDA graphs"))  # one here, one with XLA flags in its own process
LIMIT_S, DRY_LIMIT_S = 120, 150  # about 25 s a variant on the H200, compilation included


def tune_row(variant: Variant, sizes: Sizes, ceiling: float | None) -> dict[str, Any]:
    """One variant's `benchmarks.gpu.throughput.measure_row`."""
    from benchmarks.gpu.throughput import measure_row
    from benchmarks.step_variants import kernel_sets

    batch = max(1, round(sizes.batch * variant.batch_scale))
    ops = None if variant.kernels == "default" else kernel_sets()[variant.kernels]
    row = measure_row(sizes.arch, "train", "bfloat16", batch, sizes, ceiling, retry_smaller=False,
                      settings=variant.settings(), donate=variant.donate, ops=ops)
    return {"variant": variant.name, **variant.fields(), **row}


def settings_line(settings, kernels: str) -> str:
    """The `train.tuning.GPU_SETTINGS` line for the winner: ``settings`` (a `train.tuning.StepSettings`) with
    the kernel set ``kernels``. A candidate set of `benchmarks.step_variants.kernel_sets` (a part of
    `flaxnets.gpu`'s, or another formulation) is not a setting: it becomes `flaxnets.gpu.ops`' own first,
    and the line names "gpu" and says so."""
    named = kernels if kernels in ("plain", "gpu") else "gpu"
    return (f"GPU_SETTINGS = StepSettings(compiler_options={dict(settings.compiler_options)!r}, "
            f"matmul_precision={settings.matmul_precision!r}, kernels={named!r})"
            + ("" if named == kernels else f"  # once flaxnets.gpu.ops() is the '{kernels}' set"))


def run(record: Record, sizes: Sizes, args: argparse.Namespace) -> tuple[bool, str]:
    """Every variant of `VARIANTS` timed the same way, while the budget lasts; the best one reported with
    the `train.tuning.GPU_SETTINGS` line it calls for."""
    from train.tuning import enable_compilation_cache

    enable_compilation_cache()
    ceiling = measured_ceiling(args.out)
    rows = record.data["rows"] = []
    skipped = record.data["skipped"] = []
    last = 0.0
    for variant in [v for v in VARIANTS if sizes.variants is None or v.name in sizes.variants]:
        if record.remaining() < 1.25 * last:
            skipped.append(variant.name)
            record.save()
            continue
        started = time.perf_counter()
        record.doing(variant.name)
        if variant.xla_flags:
            rows.append(_in_child(variant, args, record.remaining()))
        else:
            try:
                rows.append(tune_row(variant, sizes, ceiling))
            except Exception as error:  # noqa: BLE001 - an option this XLA does not know fails one variant
                rows.append({"variant": variant.name, **variant.fields(),
                             "error": f"{type(error).__name__}: {str(error).strip()[:300]}"})
        last = time.perf_counter() - started
        say(f"{variant.name}: " + (f"{rows[-1]['images_per_s']:,.0f} images/s at batch {rows[-1]['batch']}"
                                   if "images_per_s" in rows[-1] else rows[-1].get("error", "failed")))
        record.save()
    measured = [r for r in rows if "images_per_s" in r]
    if not measured:
        return False, "no variant ran"
    best = max(measured, key=lambda r: r["images_per_s"])
    same_batch = [r for r in measured if r["batch_scale"] == 1.0]
    best_setting = max(same_batch, key=lambda r: r["images_per_s"]) if same_batch else best
    record.data["best"] = best["variant"]
    record.data["best_at_base_batch"] = best_setting["variant"]
    settings = next(v for v in VARIANTS if v.name == best_setting["variant"]).settings()
    kernels = settings.kernels if best_setting["kernels"] == "default" else best_setting["kernels"]
    record.data["gpu_settings_line"] = settings_line(settings, kernels)
    say(f"best: {best['variant']} ({best['images_per_s']:,.0f} images/s at batch {best['batch']}); best at batch "
        f"{best_setting['batch']}: {best_setting['variant']}\nfor train/tuning.py: {record.data['gpu_settings_line']}")
    if skipped:
        say(f"skipped for time: {', '.join(skipped)}")
    if sizes.profile and record.remaining() > 2 * last and not best_setting["xla_flags"]:
        record.doing(f"profiling {best_setting['variant']}")
        record.data["profile"] = _profile(next(v for v in VARIANTS if v.name == best_setting["variant"]), sizes)
        record.save()
    ok = args.dry_run or best["images_per_s"] >= TARGET
    return ok, (f"best {best['variant']}: {best['images_per_s']:,.0f} images/s at batch {best['batch']} "
                f"(target {TARGET:,.0f}); {len(measured)} variants, {len(skipped)} skipped")


def _profile(variant: Variant, sizes: Sizes) -> dict[str, Any]:
    """Device time by kind of kernel over three steps of ``variant`` (empty on a CPU, which has no device
    kernels); a failure is the result's ``error``."""
    from benchmarks.common import build_step
    from benchmarks.step_variants import kernel_profile, kernel_sets

    try:
        ops = None if variant.kernels == "default" else kernel_sets()[variant.kernels]
        step = build_step(sizes.arch, "train", sizes.batch, dtype="bfloat16", settings=variant.settings(), ops=ops)
        step.run(3)
        profile = kernel_profile(step.run)
    except Exception as error:  # noqa: BLE001 - a profile is extra
        return {"variant": variant.name, "error": f"{type(error).__name__}: {error}"}
    say(f"{variant.name}: {profile['kernels_per_step']:.0f} kernels a step; ms a step by kind: "
        + ", ".join(f"{k} {v:.2f}" for k, v in profile["ms_per_step_by_kind"].items()))
    for kernel in profile["top"][:15]:
        say(f"  {kernel['ms_per_step']:8.3f} ms x{kernel['calls_per_step']:.0f}  {kernel['name'][:110]}")
    return {"variant": variant.name, **profile}


def _in_child(variant: Variant, args: argparse.Namespace, remaining: float) -> dict[str, Any]:
    """A variant with start-up flags, in a fresh process whose ``XLA_FLAGS`` carry them."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {variant.xla_flags}".strip()}
    command = [sys.executable, "-m", "benchmarks.gpu", "tune-variant", "--name", variant.name, "--out",
               str(args.out)] + (["--dry-run"] if args.dry_run else [])
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(remaining, 5))
    except subprocess.TimeoutExpired:
        return {"variant": variant.name, **variant.fields(), "error": "ran out of the step's time"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
    if done.returncode or not lines:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        return {"variant": variant.name, **variant.fields(), "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1][4:])
