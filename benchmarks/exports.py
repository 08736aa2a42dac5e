"""``python -m benchmarks.exports --format onnx --arch lenet5_bn:28,resnet18_cifar:8``: export each
architecture (random weights, ``NAME:SIDE``, the side defaulting to the architecture's own) with
`flaxnets.export` and print how long it took and how closely the file agreed with the JAX model.

The table of families and formats in docs/research.md rests on this sweep (figures in benchmarks/RESULTS.md);
tests/test_export.py repeats one small member per family at every run. Files go to a temporary folder
and are deleted.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import flaxnets
from benchmarks.common import BenchmarkError, arch_names
from flaxnets.export import ExportError, export
from train.arguments import CommandParser


def parse_archs(text: str) -> list[tuple[str, int | None]]:
    """``--arch``'s ``NAME[:SIDE]`` items as ``(name, side or None)``, every one checked before anything is
    exported: a known name, and a side of whole pixels no smaller than the architecture's minimum input."""
    items = []
    for item in arch_names(text):
        name, colon, side = item.partition(":")
        flaxnets.get_spec(name)  # an unknown name is refused with the registry's suggestions
        if not colon:
            items.append((name, None))
            continue
        smallest = flaxnets.min_input_size(name)
        if not re.fullmatch(r"[0-9]+", side) or int(side) < smallest:
            raise BenchmarkError(f"--arch {item!r}: SIDE must be a whole number of pixels of at least {smallest}, "
                                 f"{name}'s minimum input.")
        items.append((name, int(side)))
    return items


def export_one(name: str, side: int | None, fmt: str, folder: str) -> str:
    """One table row: the architecture exported at ``side`` pixels, its time, size and agreement."""
    spec = flaxnets.get_spec(name)
    side = side or spec.input_size
    model = flaxnets.create_model(name)
    shape = (side, side, spec.in_channels)
    variables = jax.jit(lambda key: model.init(key, jnp.zeros((1, *shape)), train=False))(jax.random.key(0))
    start = time.perf_counter()
    report = export(model, variables, f"{folder}/{name}.{fmt}", input_shape=shape)
    seconds = time.perf_counter() - start
    relative = report.max_error / report.scale if report.scale else 0.0
    return f"| {name} | {side}x{side}x{spec.in_channels} | {fmt} | {seconds:.1f} | {report.bytes / 2**20:.1f} | {relative:.1e} |"


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m benchmarks.exports", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, help="comma-separated NAME or NAME:SIDE")
    parser.add_argument("--format", choices=("stablehlo", "onnx"), default="stablehlo")
    args = parser.parse_args(argv)
    try:
        items = parse_archs(args.arch)
    except (BenchmarkError, flaxnets.UnknownModelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("| arch | input | format | export + check (s) | MiB | max error / largest output |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for name, side in items:
            try:
                print(export_one(name, side, args.format, folder), flush=True)
            except (ExportError, ValueError) as error:
                print(f"error: {name}: {error}", file=sys.stderr)
                return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
