"""``python -m flaxnets [PATTERN]``: the table of architectures; ``python -m flaxnets summary NAME``: one layer by layer."""

from __future__ import annotations

import argparse
import sys

from flaxnets.analysis import abstract_variables, count_params, min_input_size, summary
from flaxnets.registry import UnknownModelError, get_spec, list_models


def model_table(pattern: str = "*") -> str:
    """One line per architecture: parameters at its usual class count, input size, smallest input, paper."""
    header = f"{'name':<17}{'params':>14}  {'classes':>7}  {'input':>9}  {'min':>4}  {'torchvision':>11}  description"
    lines = [header, "-" * len(header)]
    for name in list_models(pattern):
        spec = get_spec(name)
        params = count_params(abstract_variables(name)["params"])
        side = f"{spec.input_size}x{spec.input_size}x{spec.in_channels}"
        check = ""
        if spec.params is not None:
            reference = count_params(abstract_variables(name, **spec.reference_overrides)["params"])
            check = "= ref" if reference == spec.params else "!= ref"
        lines.append(
            f"{name:<17}{params:>14,}  {spec.num_classes:>7}  {side:>9}  {min_input_size(name):>4}  {check:>11}  "
            f"{spec.description}"
        )
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
        print("\n'= ref': the parameter count equals torchvision's (GoogLeNet's without its auxiliary heads, "
              "as torchvision counts it); blank: torchvision has no such architecture.")
        return 0
    except UnknownModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
