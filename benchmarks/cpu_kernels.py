"""``python -m benchmarks.cpu_kernels --arch resnet18,alexnet,googlenet --batch 16``: what each part of
`flaxnets.cpu` buys in a train step on XLA's CPU backend.

Each architecture's train step (the trainer's own `train.step.train_step`, SGD with momentum, old state
donated, as in `benchmarks.vs_torch`) is compiled in four variants, then timed call by call in turn, so
that all four see the same machine load:

* ``plain``: the library's default layers, nothing from `flaxnets.cpu`;
* ``cpu``: `flaxnets.cpu.ops()` and `flaxnets.cpu.tie_gradients` (what ``python -m train`` runs on a CPU);
* ``no_stored``: ``ops(fences=False)``, without the stored-once fences of max pooling and convolution
  inputs, with the tie;
* ``no_tie``: ``ops()`` without `tie_gradients`.

Reported per variant: median and range of the step time and the speed of ``cpu`` relative to it
(``cpu_speedup`` above 1 means the full kernel set is that much faster). The fences are speed work
only: tests/test_cpu.py checks that every variant computes the same numbers. Run it on a quiet machine
after changing anything in `flaxnets.cpu` or upgrading jaxlib; results go to
DIR/cpu_kernels_<tag>.{json,csv} with ``--out DIR``, and the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any, Sequence

from benchmarks.common import (BenchmarkError, add_out_option, arch_names, check_batch, check_counts, environment,
                               markdown_table, run_cli, write_results)
from train.arguments import CommandParser

__all__ = ["VARIANTS", "compare_variants", "main"]

# variant name -> (ops(fences=...), tie_gradients); None means the plain layers
VARIANTS: dict[str, tuple[bool | None, bool]] = {
    "plain": (None, False),
    "cpu": (True, True),
    "no_stored": (False, True),
    "no_tie": (True, False),
}


def compare_variants(arch: str, batch: int, size: int | None, repeats: int, warmup: int = 1,
                     log=print) -> list[dict[str, Any]]:
    """Compile ``arch``'s train step in every variant, time them in turn; one row per variant."""
    import jax

    import flaxnets
    import flaxnets.cpu
    from benchmarks.common import build_step, measure

    steps = {}
    for name, (fences, tie) in VARIANTS.items():
        ops = flaxnets.layers.PLAIN if fences is None else flaxnets.cpu.ops(fences=fences)
        steps[name] = build_step(arch, "train", batch, size=size, ops=ops, tie_gradients=tie,
                                 kernels="plain" if fences is None else "cpu")
        log(f"{arch} {name}: compiled in {steps[name].compile_s:.1f} s")
    for _ in range(warmup):
        for step in steps.values():
            step.run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(repeats):
        for name, step in steps.items():
            times[name].append(measure(step.run, 1, warmup=0).times[0])
        log(f"  repeat {index + 1}/{repeats}: " + ", ".join(f"{n} {t[-1] * 1e3:.0f} ms" for n, t in times.items()))
    reference = statistics.median(times["cpu"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"arch": arch, "batch": batch, "size": steps[name].size, "variant": name, "repeats": repeats,
                     "ms": round(median * 1e3, 1), "ms_min": round(min(values) * 1e3, 1),
                     "ms_max": round(max(values) * 1e3, 1), "cpu_speedup": round(median / reference, 3),
                     "compile_s": round(steps[name].compile_s, 1)})
    jax.clear_caches()
    return rows


COLUMNS = (("arch", "arch"), ("batch", "batch"), ("size", "input"), ("variant", "variant"), ("ms", "ms/step"),
           ("ms_min", "min"), ("ms_max", "max"), ("cpu_speedup", "cpu is faster by"))


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m benchmarks.cpu_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18,alexnet,googlenet", help="architectures, comma-separated")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=None, help="input side (default: each architecture's own)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each variant, in turn")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tag", default="", help="suffix of the results files")
    add_out_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.cpu_kernels``."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        import flaxnets

        check_batch(args.batch)
        check_counts(args, positive=("repeats", "size"), non_negative=("warmup",))
        archs = arch_names(args.arch)
        for arch in archs:
            flaxnets.get_spec(arch)  # an unknown name fails before anything compiles
        if not flaxnets.cpu.is_cpu_backend():
            raise BenchmarkError("flaxnets.cpu is about XLA's CPU backend; run this with JAX_PLATFORMS=cpu.")
        rows = [row for arch in archs for row in compare_variants(arch, args.batch, args.size, args.repeats,
                                                                 args.warmup)]
        print(markdown_table(rows, COLUMNS))
        if args.out:
            conditions = {**environment(), "command": "python -m benchmarks.cpu_kernels "
                          + " ".join(sys.argv[1:] if argv is None else argv)}
            name = f"cpu_kernels_b{args.batch}" + (f"_{args.tag}" if args.tag else "")
            paths = write_results(name, rows, conditions, args.out)
            print(f"wrote {paths[0]} and {paths[1]}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
