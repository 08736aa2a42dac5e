"""``python -m benchmarks.throughput --arch resnet50 --batch 256 --dtype bfloat16 [--mode train|infer] [--devices N]``

Images per second and milliseconds per step of a train step or of inference, on synthetic data that lives
on the device (the input pipeline is not in the figure). Compilation is timed apart from the steps; after
``--warmup`` calls, each of ``--repeats`` timed calls runs ``--steps`` steps and waits for the result
(``block_until_ready``); the median and the min-max over repeats are reported.

Also reported: peak device memory from the compiled executable's memory analysis (arguments, outputs and
temporaries), the process's peak RSS (the memory actually touched on a CPU), achieved TFLOP/s and MFU.
Model FLOPs are the analytic count of `benchmarks.costs` (torchvision's convention, 2 FLOPs per MAC):
forward for inference, three times forward for a train step (the backward pass costs two forwards); XLA's
own count of the compiled step, which skips padding taps and adds the elementwise work, is in the JSON.
MFU divides the achieved rate by the device's peak from `benchmarks.common.PEAK_TFLOPS` (``--peak-tflops``
overrides it; a CPU has no entry, so its MFU is left empty unless given).

``--all`` (instead of ``--arch``) runs every registered architecture at the input size and class count it is
meant for. ``--model-arg KEY=VALUE`` (repeatable) passes an option to every architecture measured, e.g.
``--arch lenet5 --model-arg batch_norm=true``.
Results with ``--out DIR``: DIR/throughput_<tag>.{json,csv}; the tables in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import TYPE_CHECKING, Any, Sequence

from benchmarks.common import (BenchmarkError, add_kernels_option, add_out_option, arch_names, as_request, check_batch,
                               check_counts, conditions_line, environment, kernels_argument, markdown_table, measure,
                               mfu, peak_rss_bytes, peak_tflops, reset_peak_rss, run_cli, write_results)
from train.arguments import CommandParser

if TYPE_CHECKING:
    from flaxnets.cli import ModelRequest

__all__ = ["model_flops", "throughput_row", "main"]


def model_flops(arch: str | ModelRequest, mode: str, batch: int, size: int | None = None) -> float:
    """Analytic FLOPs of one step: ``2 * MACs * batch`` for inference, three times that for training."""
    import jax.numpy as jnp

    from benchmarks.common import model_for
    from benchmarks.costs import layer_costs, totals

    request = as_request(arch, size)
    macs = totals(layer_costs(model_for(request, jnp.float32), request.input_shape()))["macs"]
    return 2.0 * macs * batch * (3 if mode == "train" else 1)


def throughput_row(arch: str | ModelRequest, mode: str, batch: int, *, size: int | None = None, dtype: str = "float32",
                   devices: int = 1, repeats: int = 5, warmup: int = 2, steps: int = 1,
                   peak: float | None = None, kernels: str | None = None, settings: Any = None,
                   donate: bool = True, ops: Any = None, log=print) -> dict[str, Any]:
    """Compile and time one configuration; return its result row (every number with its conditions).
    ``arch`` (a name or a `ModelRequest`), ``kernels``, ``settings``, ``donate`` and ``ops`` as for
    `benchmarks.common.build_step`."""
    import jax

    from benchmarks.common import build_step

    request = as_request(arch, size)
    own_peak = reset_peak_rss()
    step = build_step(request, mode, batch, dtype=dtype, devices=devices, kernels=kernels,
                      settings=settings, donate=donate, ops=ops)
    log(f"{request.describe()}, {mode} batch {batch} {dtype}: compiled in {step.compile_s:.1f} s "
        f"(lowering {step.lower_s:.1f} s)")

    timing = measure(lambda: step.run(steps), repeats, warmup)
    per_step = [t / steps for t in timing.times]
    median = statistics.median(per_step)
    flops = model_flops(request, mode, batch)
    device = jax.devices()[0]
    peak = peak if peak is not None else peak_tflops(device.device_kind, dtype)
    cost = step.cost()
    row = {
        "arch": step.arch, "model_args": dict(request.options), "mode": mode, "batch": batch, "size": step.size,
        "dtype": dtype, "devices": devices,
        "device": device.device_kind, "kernels": step.kernels,
        "repeats": repeats, "steps_per_repeat": steps, "warmup": warmup,
        "ms_per_step": round(median * 1e3, 3), "ms_min": round(min(per_step) * 1e3, 3),
        "ms_max": round(max(per_step) * 1e3, 3),
        "images_per_s": round(batch / median, 2), "images_per_s_min": round(batch / max(per_step), 2),
        "images_per_s_max": round(batch / min(per_step), 2),
        "compile_s": round(step.compile_s, 2), "lower_s": round(step.lower_s, 2),
        "memory_bytes": step.memory_bytes(), "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_of": "this row" if own_peak else "the process so far",
        "model_gflops_per_step": _figures(flops / 1e9),
        "xla_gflops_per_step": _figures(cost["flops"] / 1e9) if "flops" in cost else None,
        "tflops": _figures(flops / median / 1e12),
        "peak_tflops": peak,
        "load_average": round(os.getloadavg()[0], 2),
        "mfu": (lambda u: _figures(u) if u is not None else None)(mfu(flops, median, peak, devices)),
    }
    log(f"  {row['ms_per_step']:.1f} ms/step (min {row['ms_min']:.1f}, max {row['ms_max']:.1f}, n={repeats}), "
        f"{row['images_per_s']:.1f} images/s, {row['tflops']:.3f} TFLOP/s"
        + (f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else "")
        + (f", memory {row['memory_bytes'] / 2**20:,.0f} MiB" if row["memory_bytes"] else ""))
    jax.clear_caches()
    return row


def _figures(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant figures, so that a small model's FLOPs and rates keep theirs."""
    return float(f"{value:.{digits}g}")


COLUMNS = (("arch", "arch"), ("mode", "mode"), ("batch", "batch"), ("size", "input"), ("dtype", "dtype"),
           ("images_per_s", "images/s"), ("ms_per_step", "ms/step"), ("ms_min", "min"), ("ms_max", "max"),
           ("compile_s", "compile s"), ("memory_bytes", "memory B"), ("tflops", "TFLOP/s"), ("mfu", "MFU (fraction)"))


def build_parser() -> argparse.ArgumentParser:
    from flaxnets.cli import add_model_arguments

    parser = CommandParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[1])
    parser.add_argument("--arch", default=None, help="architecture(s), comma-separated (default: resnet50)")
    parser.add_argument("--all", action="store_true", help="every registered architecture at its native size")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch (default 256 on an accelerator, 16 on a CPU)")
    parser.add_argument("--size", type=int, default=None, help="input side (default: each architecture's own)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--mode", choices=("train", "infer", "both"), default="train")
    parser.add_argument("--devices", type=int, default=1, help="data-parallel over the first N devices")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, per device")
    add_kernels_option(parser)
    add_model_arguments(parser, shape=False)
    parser.add_argument("--tag", default=None, help="results file suffix (default: from the arguments)")
    add_out_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.throughput``."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        check_counts(args, positive=("repeats", "steps", "devices"), non_negative=("warmup",))
        check_batch(args.batch)
        if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
            raise BenchmarkError(f"--peak-tflops must be a finite number above 0, got {args.peak_tflops}.")
        if args.all and args.arch is not None:  # one of them would be ignored
            raise BenchmarkError("--all measures every architecture: give it or --arch, not both.")
        import flaxnets
        from flaxnets.cli import request_from_args

        archs = flaxnets.list_models() if args.all else arch_names(args.arch or "resnet50")
        # An unknown name or option, or too small a --size, fails before anything compiles.
        requests = [as_request(request_from_args(arch, args), args.size).checked() for arch in archs]
        import jax

        batch = args.batch or (16 if jax.devices()[0].platform == "cpu" else 256)
        modes = ("train", "infer") if args.mode == "both" else (args.mode,)
        rows = [throughput_row(request, mode, batch, dtype=args.dtype, devices=args.devices,
                               repeats=args.repeats, warmup=args.warmup, steps=args.steps, peak=args.peak_tflops,
                               kernels=kernels_argument(args.kernels))
                for request in requests for mode in modes]
        conditions = {**environment(jax.devices()[:args.devices]), "command": "python -m benchmarks.throughput "
                      + " ".join(sys.argv[1:] if argv is None else argv)}
        print(markdown_table(rows, COLUMNS))
        print(conditions_line(conditions))
        if args.out:
            variant = request_from_args(archs[0], args).tag() if archs else ""  # the options, if any
            tag = args.tag or f"{'all' if args.all else '_'.join(archs)}{variant}_{args.mode}_b{batch}_{args.dtype}"
            paths = write_results(f"throughput_{tag}", rows, conditions, args.out)
            print(f"wrote {paths[0]} and {paths[1]}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
