"""``python -m flaxnets [PATTERN]``: the table of architectures; ``python -m flaxnets summary NAME``: one layer by layer.

``summary`` takes ``--input-size``, ``--channels``, ``--num-classes`` and ``--model-arg KEY=VALUE``
(repeatable) to look at the network an exercise asks for, e.g. ``summary nin --channels 1 --num-classes 10``,
and ``--batch N`` to add the memory a training step and a prediction need at N images (XLA's estimates
for the compiled programs on this backend; nothing is allocated).
"""

from __future__ import annotations

import argparse
import sys

from flaxnets.analysis import step_memory, summary
from flaxnets.cli import ModelRequestError, add_model_arguments, request_from_args
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


def print_summary(name: str, args: argparse.Namespace) -> None:
    """The layer table of the network the arguments ask for and, with ``--batch``, its memory."""
    request = request_from_args(name, args).checked()
    shape = request.input_shape()
    summary(request.name, shape, num_classes=request.classes, **request.options)
    if args.batch is not None:
        memory = step_memory(request.name, shape, batch=args.batch, num_classes=request.classes, **request.options)
        print(memory.describe())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flaxnets", description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="a glob over names (default '*'), or 'summary NAME'")
    parser.add_argument("--batch", type=int, default=None,
                        help="with summary: also print the memory a training step and a prediction need at this batch")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if args.words[:1] == ["summary"]:
            if len(args.words) != 2:
                parser.error("usage: python -m flaxnets summary NAME")
            if args.batch is not None and args.batch < 1:
                raise ModelRequestError(f"--batch must be a positive integer, got {args.batch}.")
            print_summary(args.words[1], args)
            return 0
        if any(value not in (None, []) for value in (args.batch, args.model_args, args.input_size, args.channels,
                                                      args.num_classes)):
            raise ModelRequestError("--batch, --model-arg, --input-size, --channels and --num-classes apply to "
                                    "'python -m flaxnets summary NAME'.")
        pattern = args.words[0] if args.words else "*"
        if not list_models(pattern):
            print(f"no architecture matches {pattern!r}; try 'python -m flaxnets' for the list.", file=sys.stderr)
            return 2
        print(model_table(pattern))
        print("\nparams: the default build at its usual class count; min: the smallest square input it takes; "
              "torchvision: the count torchvision publishes at 1000 classes (GoogLeNet's without its auxiliary "
              "heads). tests/test_models.py checks every number against the traced model.")
        return 0
    except (UnknownModelError, ModelRequestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
