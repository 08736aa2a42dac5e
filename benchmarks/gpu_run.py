"""The GPU run: everything the project claims for GPUs, measured in one short run of `benchmarks/gpu_run.sh`.

    bash benchmarks/gpu_run.sh --out DIR [--data-dir data/fashion_mnist] [--dry-run]

The shell script runs each step below as its own process, under its own time limit (`limits`), so one
failure or hang loses only that step; each writes ``DIR/STEP.json`` (rewritten after every result, so a
step stopped at its limit still leaves what it measured) and ``DIR/STEP.log``, and `summary` prints the
table of all of them last (also ``DIR/summary.md``). A step is also a command of its own:
``python -m benchmarks.gpu_run STEP --out DIR [--dry-run] [--budget S] [--data-dir PATH]``.

* ``environment``: device, versions (CUDA and driver where JAX reports them) and two measured ceilings,
  a bfloat16 matrix product (TFLOP/s) and a read-and-write of a large array (GB/s);
* ``correctness`` (1): the trainer's train step on the device in float32 and bfloat16 against float64 on
  the CPU, for ResNet-18, GoogLeNet and the paper's AlexNet (LRN); converted torchvision weights against
  torchvision on the same device (`benchmarks.gpu_checks`);
* ``throughput`` (2): every architecture torchvision also has, train and inference, bfloat16 and float32,
  batch 256, with compile time, images/s, TFLOP/s, MFU against the measured ceiling and the data sheet,
  and device memory; the most important rows first, what the time left no room for listed as skipped;
* ``tune`` (3): ResNet-50's bfloat16 train step under several compiler settings and batches, towards
  8,000 images/s; the best setting is what `train.tuning.GPU_SETTINGS` should hold;
* ``accuracy`` (4): ``python -m train`` with resnet18_cifar on the original Fashion-MNIST files to at
  least 94.9% test top-1, and the README's LeNet-5 run on the digits (for the CPU/GPU comparison);
* ``parallel`` (5): shard_map and pmap against plain jit after a few steps; Grain's images/s when it is
  installed.

They run in the order of `STEPS`, not of the numbers (those of issue 18). ``--dry-run`` runs every
step on the CPU at toy sizes (`DRY`), through the same code, in a minute or two; tests/test_gpu_run.py
runs it. `REAL` holds the sizes of the run on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["Plan", "REAL", "DRY", "STEPS", "Record", "Variant", "VARIANTS", "throughput_order", "main"]

# The order they run in: the steps of fixed length first, the two that fill their time last, so that
# what the others leave over goes to them (gpu_run.sh hands a step's unused seconds to the next).
STEPS = ("environment", "correctness", "parallel", "accuracy", "throughput", "tune")
GRACE_S = 15  # of each step's limit, kept back from its own budget to write its results and exit
ACCURACY_TARGET = 0.949  # ResNet-18 in the Fashion-MNIST benchmark table (zalandoresearch/fashion-mnist)
TUNE_TARGET = 8000.0  # images/s: MLPerf Training v4.0's 8xH200 ResNet-50 entry ran about 7,900 per GPU
# The torchvision architectures in the order the throughput table measures them when time is short.
THROUGHPUT_PRIORITY = ("resnet50", "resnet18", "resnet101", "resnet152", "resnet34", "vgg16", "vgg16_bn",
                       "googlenet", "alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg19", "vgg19_bn")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of every step, and each step's time limit in seconds (the shell script's ``timeout``)."""

    limits: dict[str, int]
    matmul_side: int  # the square bfloat16 product of the ceiling
    copy_mib: int  # the array read and written for the bandwidth ceiling
    ceiling_repeats: int
    correctness: tuple[tuple[str, int], ...]  # (architecture, input side) against float64
    correctness_batch: int
    checks: tuple[str, ...] | None  # names of `benchmarks.gpu_checks.CHECKS`; None: all of them
    parity: tuple[str, ...]  # torchvision architectures converted and compared
    parity_side: int
    parity_batch: int
    throughput_archs: tuple[str, ...] | None  # None: every torchvision architecture
    throughput_batch: int
    throughput_small_batch: int  # when the batch does not fit in device memory
    repeats: int
    steps: int  # steps per timed repeat
    tune_arch: str
    tune_batch: int
    tune_variants: tuple[str, ...] | None  # names of `VARIANTS`; None: all of them
    accuracy: tuple[str, ...]  # python -m train arguments of the accuracy run (without --data-dir, --workdir)
    accuracy_needs_files: bool  # whether it reads --data-dir's Fashion-MNIST files
    digits: tuple[str, ...]  # the README's LeNet-5 run
    parallel_arch: str
    parallel_batch: int
    parallel_steps: int
    grain: tuple[str, ...]  # python -m benchmarks.input_pipeline arguments


# The GPU run on one H200: pip 30 + 40 + 90 + 30 + 155 + 110 + 100 = 555 s (9 min 15 s) at most. A step
# that ends early hands its unused seconds to the next (gpu_run.sh); the last two use all they get.
REAL = Plan(
    # Seconds measured on the H200 on 2026-11-30 (benchmarks/RESULTS.md): environment 6, correctness over
    # 120 (GoogLeNet compiles for about 15 s a program there), parallel 12, accuracy 75, throughput 14 a row.
    limits={"environment": 40, "correctness": 150, "parallel": 30, "accuracy": 115, "throughput": 70, "tune": 120},
    matmul_side=8192, copy_mib=2048, ceiling_repeats=10,
    correctness=(("resnet18", 64), ("alexnet_paper", 67), ("googlenet", 64)), correctness_batch=8, checks=None,
    parity=("resnet18", "googlenet", "vgg11_bn"), parity_side=224, parity_batch=4,
    throughput_archs=None, throughput_batch=256, throughput_small_batch=128,
    repeats=5, steps=5,
    tune_arch="resnet50", tune_batch=256, tune_variants=None,
    # A CIFAR-style recipe scaled to batch 512 (bfloat16, Nesterov SGD, cosine with 2 warm-up epochs,
    # label smoothing 0.1; the trainer adds random crops with 2-pixel padding and flips), chosen to pass
    # 94.9% in 30 epochs (its H200 result is in benchmarks/RESULTS.md). Checkpoints only at the end, so
    # that the wall time is training's.
    accuracy=("--arch", "resnet18_cifar", "--dataset", "fashion_mnist", "--epochs", "30", "--batch-size", "512",
              "--lr", "0.2", "--optimizer", "nesterov", "--schedule", "cosine", "--warmup-epochs", "2",
              "--weight-decay", "5e-4", "--label-smoothing", "0.1", "--dtype", "bfloat16",
              "--checkpoint-every-epochs", "30", "--no-plots"),
    accuracy_needs_files=True,
    digits=("--arch", "lenet5_relu", "--dataset", "digits", "--epochs", "30", "--image-size", "28"),
    parallel_arch="lenet5_bn", parallel_batch=64, parallel_steps=4,
    # One worker count and no resized copy: the step's 30 s. benchmarks/gpu_pipeline.sh measures the pipeline.
    grain=("--images", "1200", "--workers", "16", "--batches", "32", "--repeats", "1", "--copy-side", "0"),
)
# The dry run on a CPU: every step, tiny.
DRY = Plan(
    limits={"environment": 60, "correctness": 120, "parallel": 120, "accuracy": 120, "throughput": 120, "tune": 120},
    matmul_side=256, copy_mib=16, ceiling_repeats=3,
    # float32 at JAX's default precision is float32 itself on a CPU: no third compilation for it.
    correctness=(("lenet5_bn", 28), ("alexnet_small", 32)), correctness_batch=4, checks=("float32", "bfloat16"),
    parity=("resnet18",), parity_side=32, parity_batch=2,
    throughput_archs=("lenet5_bn",), throughput_batch=2, throughput_small_batch=1,
    repeats=2, steps=1,
    tune_arch="lenet5_bn", tune_batch=2,
    tune_variants=("defaults", "batch x2", "no CUDA graphs"),  # one of each kind
    accuracy=("--arch", "lenet5_bn", "--dataset", "digits", "--epochs", "1", "--batch-size", "64",
              "--warmup-epochs", "0", "--image-size", "12", "--no-plots"),
    accuracy_needs_files=False,
    digits=("--arch", "lenet5_relu", "--dataset", "digits", "--epochs", "1", "--image-size", "12",
            "--warmup-epochs", "0", "--no-plots"),
    parallel_arch="lenet5_bn", parallel_batch=16, parallel_steps=2,
    grain=("--images", "24", "--workers", "0", "--batches", "2", "--skip", "1", "--repeats", "1", "--batch", "4",
           "--side", "32", "--copy-side", "0"),
)


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


def _say(message: str) -> None:
    print(message, flush=True)


def _wait(out: Any) -> Any:
    import jax

    return jax.block_until_ready(out)


# -- environment ----------------------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    """Installed versions, read from the package metadata (importing torch would cost seconds)."""
    import platform
    from importlib import metadata

    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "torch", "torchvision",
             "tensorflow-datasets", "grain")
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    for dist in metadata.distributions():  # JAX's CUDA plugin and the NVIDIA libraries it runs on
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("jax-cuda", "jax_cuda", "nvidia-cudnn", "nvidia-cublas", "nvidia-cuda-runtime")):
            versions[name] = dist.version
    return versions


def _driver_and_cuda(report: str) -> dict[str, str]:
    """The driver and CUDA versions from the nvidia-smi table in `jax.print_environment_info`'s report."""
    found = {}
    for line in report.splitlines():
        for key, label in (("driver", "Driver Version:"), ("cuda", "CUDA Version:")):
            if label in line:
                found[key] = line.split(label, 1)[1].split()[0]
    return found


def matmul_ceiling(side: int, repeats: int) -> dict[str, float]:
    """TFLOP/s of a bfloat16 ``side``³ matrix product (float32 accumulation), ten products per timed
    repeat: the median and the best repeat."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import measure

    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (side, side), jnp.bfloat16) for k in keys)
    product = jax.jit(jnp.matmul)
    calls = 10

    def call():
        for _ in range(calls):
            out = product(a, b)
        _wait(out)

    timing = measure(call, repeats, warmup=1)
    flops = 2.0 * side ** 3 * calls
    return {"matmul_side": side, "matmul_tflops_median": round(flops / timing.median / 1e12, 2),
            "matmul_tflops_best": round(flops / timing.min / 1e12, 2)}


def copy_ceiling(mib: int, repeats: int) -> dict[str, float]:
    """GB/s of device memory: an array of ``mib`` MiB read and written once (``x + 1`` in bfloat16, which
    does nothing else; JAX would hand back a plain copy's input unchanged), counted as twice its size."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import measure

    x = jnp.zeros((mib * 2 ** 20 // 2,), jnp.bfloat16)
    bump = jax.jit(lambda v: v + 1)
    calls = 10

    def call():
        for _ in range(calls):
            out = bump(x)
        _wait(out)

    timing = measure(call, repeats, warmup=1)
    moved = 2.0 * x.nbytes * calls
    return {"copy_mib": mib, "copy_gbs_median": round(moved / timing.median / 1e9, 1),
            "copy_gbs_best": round(moved / timing.min / 1e9, 1)}


def environment(record: Record, plan: Plan, args: argparse.Namespace) -> tuple[bool, str]:
    """Device, versions and the two ceilings."""
    import jax

    from benchmarks.common import environment as conditions

    record.data["conditions"] = conditions()
    record.data["versions"] = _versions()
    report = jax.print_environment_info(return_string=True)
    record.data["jax_report"] = report
    record.data.update(_driver_and_cuda(report))
    device = jax.devices()[0]
    record.data["memory_limit_bytes"] = (device.memory_stats() or {}).get("bytes_limit")
    _say(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} device(s); driver "
         f"{record.data.get('driver', '-')}, CUDA {record.data.get('cuda', '-')}")
    _say("versions: " + ", ".join(f"{k} {v}" for k, v in record.data["versions"].items() if v))
    record.save()
    record.data["ceilings"] = {**matmul_ceiling(plan.matmul_side, plan.ceiling_repeats),
                               **copy_ceiling(plan.copy_mib, plan.ceiling_repeats)}
    c = record.data["ceilings"]
    line = (f"{device.device_kind}: bf16 {plan.matmul_side}³ product {c['matmul_tflops_best']} TFLOP/s (median "
            f"{c['matmul_tflops_median']}), memory {c['copy_gbs_best']} GB/s (median {c['copy_gbs_median']})")
    _say(line)
    return True, line


def _ceiling(out: Path) -> float | None:
    """The measured bfloat16 ceiling (TFLOP/s) from the environment step, if it ran."""
    try:
        return json.loads((out / "environment.json").read_text())["ceilings"]["matmul_tflops_best"]
    except (OSError, KeyError, ValueError):
        return None


# -- 1. correctness -------------------------------------------------------------------------------------------
def correctness(record: Record, plan: Plan, args: argparse.Namespace) -> tuple[bool, str]:
    """The train step against float64, and torchvision's weights converted, on the device."""
    import jax

    jax.config.update("jax_enable_x64", True)  # before any computation: it also decides the dropout masks
    from benchmarks.gpu_checks import CHECKS, convert_parity, step_against_float64

    # First, while this process has not started JAX's backend (which takes 75% of the device's memory),
    # PyTorch's process: on the GPU when it has one, unless this is the CPU's dry run.
    torch_device = "cpu" if args.dry_run else "auto"
    record.doing(f"converting {', '.join(plan.parity)} against torchvision")
    parity = record.data["parity"] = convert_parity(plan.parity, plan.parity_side, plan.parity_batch, torch_device,
                                                    timeout=max(record.remaining(), 10))
    for row in parity:
        _say(f"convert {row['arch']}: " + (f"logits {row['logits_error']:.1e} of the largest (<= {row['tolerance']:.0e})"
                                           if "logits_error" in row else row["error"]))
    rows = record.data["steps"] = []
    skipped = record.data["skipped"] = []
    last = 0.0
    for arch, side in plan.correctness:
        if record.remaining() < 1.25 * last:
            skipped.append(arch)
            continue
        started = time.perf_counter()
        record.doing(f"{arch} against float64")
        for row in step_against_float64(arch, side, plan.correctness_batch, plan.checks or tuple(CHECKS)):
            rows.append(row)
            limits = row["tolerances"]
            gradients = (f"{row['grads_error']:.1e} (<= {limits['grads']:.0e})" if "grads" in limits else
                         f"cosine {row['grads_cosine']:.3f} (>= {limits['grads_cosine']}; norm {row['grads_error']:.1e})")
            statistics_ = ("-" if row["batch_stats_error"] is None else
                           f"{row['batch_stats_error']:.1e} (<= {limits['batch_stats']:.0e})")
            _say(f"{arch} {row['check']}: loss {row['loss_error']:.1e} (<= {limits['loss']:.0e}), gradients "
                 f"{gradients}, BatchNorm statistics {statistics_}: {'ok' if row['ok'] else 'OUTSIDE'}")
        last = time.perf_counter() - started
        _say(f"  ({last:.0f} s)")
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


# -- 2. throughput --------------------------------------------------------------------------------------------
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
    ranked = [n for n in THROUGHPUT_PRIORITY if n in names]
    return ranked + sorted(set(names) - set(ranked))


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _measure_row(arch: str, mode: str, dtype: str, batch: int, plan: Plan, ceiling: float | None,
                 retry_smaller: bool = True, **options: Any) -> dict[str, Any]:
    """`benchmarks.throughput.throughput_row`, plus MFU against the measured ceiling and the process's
    peak device memory; with ``retry_smaller``, a batch that does not fit is retried at the plan's
    smaller batch."""
    import jax

    from benchmarks.throughput import throughput_row

    try:
        row = throughput_row(arch, mode, batch, dtype=dtype, repeats=plan.repeats, warmup=1,
                             steps=plan.steps, log=_say, **options)
    except Exception as error:  # noqa: BLE001 - any row may fail; the table goes on
        jax.clear_caches()
        if retry_smaller and _out_of_memory(error) and batch > plan.throughput_small_batch:
            _say(f"{arch} {mode} {dtype}: batch {batch} does not fit; batch {plan.throughput_small_batch}")
            row = _measure_row(arch, mode, dtype, plan.throughput_small_batch, plan, ceiling, **options)
            row["note"] = f"batch {batch} did not fit in device memory"
            return row
        return {"arch": arch, "mode": mode, "dtype": dtype, "batch": batch,
                "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
    row["mfu_measured_ceiling"] = round(row["tflops"] / ceiling, 4) if ceiling else None
    row["device_peak_bytes_so_far"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return row


def throughput(record: Record, plan: Plan, args: argparse.Namespace) -> tuple[bool, str]:
    """The table, row by row, until the budget would run out."""
    from train.loop import enable_compilation_cache

    enable_compilation_cache()  # $JAX_COMPILATION_CACHE_DIR: the tune step reuses ResNet-50's program
    ceiling = _ceiling(args.out)
    record.data["ceiling_tflops"] = ceiling
    rows = record.data["rows"] = []
    skipped = record.data["skipped"] = []
    last = 0.0
    for arch, mode, dtype in throughput_order(plan.throughput_archs or _torchvision_archs()):
        # The last row's time stands for the next one's: a row is started only if that much is left.
        if record.remaining() < 1.25 * last:
            skipped.append({"arch": arch, "mode": mode, "dtype": dtype,
                            "reason": f"time: {record.remaining():.0f} s left, the last row took {last:.0f} s"})
            record.save()
            continue
        started = time.perf_counter()
        record.doing(f"{arch} {mode} {dtype}")
        rows.append(_measure_row(arch, mode, dtype, plan.throughput_batch, plan, ceiling))
        last = time.perf_counter() - started
        rows[-1]["row_s"] = round(last, 1)
        record.save()
    measured = [r for r in rows if "error" not in r]
    if skipped:
        _say("skipped for time: " + ", ".join(f"{s['arch']} {s['mode']} {s['dtype']}" for s in skipped))
    from benchmarks.common import markdown_table

    _say(markdown_table(measured, (("arch", "arch"), ("mode", "mode"), ("dtype", "dtype"), ("batch", "batch"),
                                   ("images_per_s", "images/s"), ("compile_s", "compile s"), ("tflops", "TFLOP/s"),
                                   ("mfu_measured_ceiling", "MFU (measured)"), ("mfu", "MFU (data sheet)"),
                                   ("memory_bytes", "memory B"))))
    head = next((r for r in measured if (r["mode"], r["dtype"]) == ("train", "bfloat16")), None)
    headline = f"{len(measured)} rows measured, {len(rows) - len(measured)} failed, {len(skipped)} skipped for time"
    if head:
        headline += (f"; {head['arch']} bf16 train {head['images_per_s']:,.0f} images/s, MFU "
                     f"{head['mfu_measured_ceiling'] or 0:.0%} of measured")
    return bool(measured) and len(measured) == len(rows), headline


# -- 3. tune --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to build the tuned train step. ``xla_flags`` are read when XLA starts, so a variant that
    has them runs in a process of its own; everything else is per executable, in one process."""

    name: str
    batch_scale: float = 1.0
    compiler_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    matmul_precision: str | None = None
    donate: bool = True
    xla_flags: str = ""

    def fields(self) -> dict[str, Any]:
        """What the variant sets, for its result row."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}

    def settings(self):
        """The `train.tuning.StepSettings` it compiles the step with."""
        from train.tuning import StepSettings

        return StepSettings(dict(self.compiler_options), self.matmul_precision)


# In the order they are tried: the likeliest gains first, what a variant costs second.
VARIANTS = (
    Variant("defaults"),
    Variant("batch x1.5", batch_scale=1.5),
    Variant("batch x2", batch_scale=2.0),
    Variant("latency-hiding scheduler", compiler_options={"xla_gpu_enable_latency_hiding_scheduler": True}),
    Variant("no CUDA graphs", xla_flags="--xla_gpu_enable_command_buffer="),
    Variant("matmul precision bfloat16", matmul_precision="bfloat16"),
    Variant("autotune level 0", compiler_options={"xla_gpu_autotune_level": 0}),
    Variant("no donation", donate=False),
)


def _tune_row(variant: Variant, plan: Plan, ceiling: float | None) -> dict[str, Any]:
    batch = max(1, round(plan.tune_batch * variant.batch_scale))
    row = _measure_row(plan.tune_arch, "train", "bfloat16", batch, plan, ceiling, retry_smaller=False,
                       settings=variant.settings(), donate=variant.donate)
    return {"variant": variant.name, **variant.fields(), **row}


def tune(record: Record, plan: Plan, args: argparse.Namespace) -> tuple[bool, str]:
    """Every variant of `VARIANTS` timed the same way, while the budget lasts; the best one reported with
    the `train.tuning.GPU_SETTINGS` line it calls for."""
    from train.loop import enable_compilation_cache

    enable_compilation_cache()  # the throughput step compiled the defaults' program already: a cache hit
    record.data["note"] = ("compile_s of a variant whose program the throughput step compiled (the defaults) "
                           "is a load from the compilation cache")
    ceiling = _ceiling(args.out)
    rows = record.data["rows"] = []
    skipped = record.data["skipped"] = []
    last = 0.0
    for variant in [v for v in VARIANTS if plan.tune_variants is None or v.name in plan.tune_variants]:
        if record.remaining() < 1.25 * last:
            skipped.append(variant.name)
            record.save()
            continue
        started = time.perf_counter()
        if variant.xla_flags:
            rows.append(_tune_in_child(variant, args, record.remaining()))
        else:
            rows.append(_tune_row(variant, plan, ceiling))
        last = time.perf_counter() - started
        _say(f"{variant.name}: " + (f"{rows[-1]['images_per_s']:,.0f} images/s at batch {rows[-1]['batch']}"
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
    record.data["gpu_settings_line"] = (
        f"GPU_SETTINGS = StepSettings(compiler_options={best_setting['compiler_options']!r}, "
        f"matmul_precision={best_setting['matmul_precision']!r})")
    _say(f"best: {best['variant']} ({best['images_per_s']:,.0f} images/s at batch {best['batch']}); best at batch "
         f"{best_setting['batch']}: {best_setting['variant']}\nfor train/tuning.py: {record.data['gpu_settings_line']}")
    if skipped:
        _say(f"skipped for time: {', '.join(skipped)}")
    ok = args.dry_run or best["images_per_s"] >= TUNE_TARGET
    return ok, (f"best {best['variant']}: {best['images_per_s']:,.0f} images/s at batch {best['batch']} "
                f"(target {TUNE_TARGET:,.0f}); {len(measured)} variants, {len(skipped)} skipped")


def _tune_in_child(variant: Variant, args: argparse.Namespace, remaining: float) -> dict[str, Any]:
    """A variant with start-up flags, in a fresh process whose ``XLA_FLAGS`` carry them."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {variant.xla_flags}".strip()}
    command = [sys.executable, "-m", "benchmarks.gpu_run", "tune-variant", "--name", variant.name, "--out",
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


# -- 4. accuracy ----------------------------------------------------------------------------------------------
def _train_run(name: str, train_args: Sequence[str], workdir: Path, timeout: float, cache: Path) -> dict[str, Any]:
    """``python -m train`` with ``train_args`` in a child process, its output echoed into this step's log;
    SIGTERM at ``timeout`` (the trainer then checkpoints and stops). Wall time and what metrics.jsonl says."""
    import threading

    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "train", *train_args, "--workdir", str(workdir)]
    _say("$ python " + " ".join(command[1:]))
    lines: list[str] = []
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def echo():
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    reader.join(timeout=5)
    wall = time.perf_counter() - started
    metrics = workdir / "metrics.jsonl"
    epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    epochs = [e for e in epochs if "test_top1" in e and "images_per_sec" in e]
    rates, times = [e["images_per_sec"] for e in epochs], [e["epoch_time_s"] for e in epochs]
    return {"name": name, "command": "python -m train " + " ".join(train_args), "rc": rc, "wall_s": round(wall, 1),
            "epochs": len(epochs), "test_top1": epochs[-1]["test_top1"] if epochs else None,
            "test_top1_per_epoch": [round(e["test_top1"], 4) for e in epochs],
            # The first epoch's figures include compilation; the median is over the others.
            "images_per_s_first_epoch": round(rates[0], 1) if rates else None,
            "images_per_s_median": round(statistics.median(rates[1:] or rates), 1) if rates else None,
            "epoch_s_median": round(statistics.median(times[1:] or times), 2) if times else None,
            "tail": "".join(lines[-3:]).strip()}


def accuracy(record: Record, plan: Plan, args: argparse.Namespace) -> tuple[bool, str]:
    """resnet18_cifar on Fashion-MNIST (digits in a dry run), then the README's LeNet-5 digits run."""
    import shutil

    folder = Path(args.out) / "accuracy"
    shutil.rmtree(folder, ignore_errors=True)  # a rerun into the same DIR must not resume the old runs
    folder.mkdir(parents=True)
    train_args = list(plan.accuracy)
    if plan.accuracy_needs_files:
        data_dir = Path(args.data_dir)
        if not (data_dir / "train-images-idx3-ubyte.gz").exists():
            return False, (f"{data_dir} lacks Fashion-MNIST's IDX files: copy the four .gz files there "
                           "(benchmarks/gpu_run.sh --help)")
        train_args += ["--data-dir", str(data_dir)]
    digits_reserve = 30 if not args.dry_run else 0  # seconds kept for the LeNet-5 run
    main_run = _train_run("fashion_mnist" if plan.accuracy_needs_files else "toy", train_args, folder / "main",
                          record.remaining() - digits_reserve, folder / "xla-cache-main")
    record.data["main"] = main_run
    record.save()
    # The README's command into an empty compilation cache, as its CPU figure was measured.
    digits = _train_run("digits", plan.digits, folder / "digits", max(record.remaining(), 10), folder / "xla-cache-digits")
    record.data["digits"] = digits
    record.data["digits"]["cpu_reference"] = ("98.06% in 48 s wall on 2 CPU cores, compilation included "
                                              "(benchmarks/RESULTS.md, 'Training accuracy')")
    top1 = main_run["test_top1"] or 0.0
    reached = top1 >= ACCURACY_TARGET
    ok = main_run["rc"] == 0 and digits["rc"] == 0 and (args.dry_run or reached)
    return ok, (f"{main_run['name']}: {top1:.2%} top-1 after {main_run['epochs']} epochs "
                f"({'target met' if reached else f'target {ACCURACY_TARGET:.1%}'}), {main_run['wall_s']:.0f} s wall, "
                f"{main_run['images_per_s_median'] or 0:,.0f} images/s; digits {digits['test_top1'] or 0:.2%} in "
                f"{digits['wall_s']:.0f} s")


# -- 5. parallel ----------------------------------------------------------------------------------------------
def parallel(record: Record, plan: Plan, args: argparse.Namespace) -> tuple[bool, str]:
    """The drivers against jit; the streamed pipeline's rate when Grain is installed."""
    import importlib.util

    from benchmarks.gpu_checks import drivers_against_jit

    rows = record.data["drivers"] = drivers_against_jit(plan.parallel_arch, plan.parallel_batch, plan.parallel_steps)
    for row in rows:
        _say(f"{row['driver']} on {row['devices']} device(s): parameters {row['params_error']:.1e}, statistics "
             f"{row['batch_stats_error']:.1e} from jit; {'ok' if row['ok'] else 'OUTSIDE'} the tolerance")
    record.save()
    if importlib.util.find_spec("grain") is None:
        record.data["grain"] = {"skipped": "grain is not installed"}
    elif record.remaining() < 10:
        record.data["grain"] = {"skipped": "no time left"}
    else:
        json_path = Path(args.out) / "input_pipeline.json"
        command = [sys.executable, "-m", "benchmarks.input_pipeline", *plan.grain, "--json", str(json_path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=record.remaining())
            _say(done.stdout.strip())
            record.data["grain"] = (json.loads(json_path.read_text()) if done.returncode == 0 and json_path.exists()
                                    else {"error": (done.stderr or done.stdout).strip()[-300:]})
        except subprocess.TimeoutExpired:
            record.data["grain"] = {"skipped": "ran out of the step's time"}
    ok = all(row["ok"] for row in rows)
    worst = max(row["worst_over_tolerance"] for row in rows)
    grain = record.data["grain"]
    rates = ", ".join(f"{r['workers']} workers {r['images_per_sec']:,.0f}/s" for r in grain.get("rows", []))
    return ok, (f"{' and '.join(r['driver'] for r in rows)} equal jit on {rows[0]['devices']} device(s) "
                f"(worst {worst:.2f} of the tolerance); Grain: {rates or next(iter(grain.values()))}")


# -- the run --------------------------------------------------------------------------------------------------
STEP_FUNCTIONS: dict[str, Callable[[Record, Plan, argparse.Namespace], tuple[bool, str]]] = {
    "environment": environment, "correctness": correctness, "throughput": throughput, "tune": tune,
    "accuracy": accuracy, "parallel": parallel}


def run_step(step: str, args: argparse.Namespace) -> int:
    """Run ``step`` into ``DIR/STEP.json``; an exception fails the step (its traceback goes to the log)."""
    plan = DRY if args.dry_run else REAL
    budget = args.budget if args.budget is not None else plan.limits[step] - GRACE_S
    record = Record(Path(args.out), step, args.dry_run, budget)
    try:
        ok, headline = STEP_FUNCTIONS[step](record, plan, args)
    except Exception as error:  # noqa: BLE001 - one step's failure is a result, not the end of the run
        traceback.print_exc()
        record.data["error"] = f"{type(error).__name__}: {error}"
        ok, headline = False, f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
    record.finish(ok, headline)
    _say(f"{step}: {'ok' if ok else 'FAILED'}: {headline}")
    return 0 if ok else 1


def _unfinished(data: dict[str, Any]) -> str:
    """What a step that was stopped before its end had done, and what it was doing."""
    done = [row for row in data.get("rows", data.get("steps", [])) if "error" not in row]
    parts = [f"stopped during {data['doing']}" if data.get("doing") else "stopped"]
    if done:
        parts.append(f"{len(done)} {'rows' if 'rows' in data else 'checks'} saved before")
    return "; ".join(parts)


def summary(out: Path, codes: dict[str, int], dry: bool) -> str:
    """The table of every step (also written to ``DIR/summary.md``): status, time against its limit, result."""
    plan = DRY if dry else REAL
    lines = [f"GPU run {'(dry run, CPU) ' if dry else ''}in {out}", "",
             "| step | status | seconds (limit) | result |", "| --- | --- | --- | --- |"]
    for step in STEPS:
        path = out / f"{step}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        status = data.get("status", "missing")
        code = codes.get(step)
        headline = str(data.get("headline") or data.get("error") or "")
        if status == "running":  # the process never finished its record
            status = "timeout" if code in (124, 137) else f"crashed (exit {code})"
            headline = _unfinished(data)
        headline = headline.replace("|", "/")
        lines.append(f"| {step} | {status} | {data.get('wall_s', '-')} ({plan.limits[step]}) | {headline} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_run", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for step in STEPS:
        p = commands.add_parser(step, help=STEP_FUNCTIONS[step].__doc__.split("\n")[0])
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
        p.add_argument("--budget", type=float, default=None, help="seconds this step may plan for")
        p.add_argument("--data-dir", default="data/fashion_mnist", help="Fashion-MNIST's four IDX .gz files")
    p = commands.add_parser("limits", help="each step's time limit in seconds, one 'STEP SECONDS' per line")
    p.add_argument("--dry-run", action="store_true")
    p = commands.add_parser("summary", help="the table of the steps' results")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--codes", nargs="*", default=[], metavar="STEP=EXIT", help="each step's exit status")
    p = commands.add_parser("torch-reference", help=argparse.SUPPRESS)  # convert_parity's child process
    p.add_argument("--folder", required=True)
    p.add_argument("--archs", required=True)
    p.add_argument("--side", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--device", required=True)
    p = commands.add_parser("tune-variant", help=argparse.SUPPRESS)  # a variant with start-up flags
    p.add_argument("--name", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.gpu_run``."""
    args = _parser().parse_args(argv)
    if args.command == "limits":
        for step, seconds in (DRY if args.dry_run else REAL).limits.items():
            print(step, seconds)
        return 0
    if args.command == "summary":
        codes = dict(item.split("=", 1) for item in args.codes)
        print(summary(args.out, {k: int(v) for k, v in codes.items()}, args.dry_run), end="")
        return 0
    if args.command == "torch-reference":  # PyTorch alone: no JAX in this process
        from benchmarks.gpu_checks import torch_reference

        torch_reference(args.archs.split(","), args.side, args.batch, args.folder, args.device)
        return 0
    # A step, or a tune variant in its own process: set what JAX reads when it starts.
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
        if args.command == "parallel":  # two CPU devices, so that the drivers split the batch
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    if args.command in ("tune", "tune-variant"):
        # JAX takes 75% of the device's memory when it starts; a variant's own process must find room
        # beside the tune step's, so both take 45% (63 GB on an H200).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    from flaxnets.cpu import prefer_eigen

    prefer_eigen()  # on a CPU, the library setting the trainer and the benchmarks use
    plan = DRY if args.dry_run else REAL
    if args.command == "tune-variant":
        variant = next(v for v in VARIANTS if v.name == args.name)
        print("ROW " + json.dumps(_tune_row(variant, plan, _ceiling(args.out)), default=str), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    return run_step(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
