"""``python -m flaxnets [PATTERN]``: the table of architectures; ``python -m flaxnets summary NAME``: one layer by layer."""

from __future__ import annotations

import argparse
import sys

from flaxnets.analysis import summary
from flaxnets.registry import UnknownModelError, get_spec, list_models


def model_table(pattern: str = "*") -> str:
    """One line per architecture, from the registry's data alone (nothing is traced, so it prints at once):
    parameters at its usual class count, input size, smallest input, torchvision's count, description."""
    header = f"{'name':<17}{'params':>14}  {'classes':>7}  {'input':>9}  {'min':>4}  {'torchvision':>12}  description"
    lines = [header, "-" * len(header)]
    for name in list_models(pattern):
        spec = get_spec(name)
        side = f"{spec.input_size}x{spec.input_size}x{spec.in_channels}"
        params = f"{spec.default_params:,}" if spec.default_params is not None else "?"
        smallest = spec.min_input_size if spec.min_input_size is not None else "?"
        reference = f"{spec.params:,}" if spec.params is not None else ""
        lines.append(f"{name:<17}{params:>14}  {spec.num_classes:>7}  {side:>9}  {smallest:>4}  {reference:>12}  "
                     f"{spec.description}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flaxnets", description=__doc__)
    parser.add_argument("words", nargs="*", help="a glob over names (default '*'), or 'summary NAME'")
    args = parser.parse_args(argv)
    try:
        if args.words[:1] == ["summary"]:
            if len(args.words) != 2:
                parser.error("usage: python -m flaxnets summary NAME")
            summary(args.words[1])
            return 0
        pattern = args.words[0] if args.words else "*"
        if not list_models(pattern):
            print(f"no architecture matches {pattern!r}; try 'python -m flaxnets' for the list.", file=sys.stderr)
            return 2
        print(model_table(pattern))
        print("\nparams: the default build at its usual class count; min: the smallest square input it takes; "
              "torchvision: the count torchvision publishes at 1000 classes (GoogLeNet's without its auxiliary "
              "heads). tests/test_models.py checks every number against the traced model.")
        return 0
    except UnknownModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
