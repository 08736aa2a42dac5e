"""``python -m flaxnets [PATTERN ...]``: the table of architectures; ``python -m flaxnets summary NAME``: one layer
by layer; ``python -m flaxnets export NAME --out FILE``: the model as StableHLO or ONNX (`flaxnets.export`).

``summary`` takes ``--input-size``, ``--channels``, ``--num-classes`` and ``--model-arg KEY=VALUE``
(repeatable) to look at the network an exercise asks for, e.g. ``summary nin --channels 1 --num-classes 10``,
and ``--batch N`` to add the memory a training step and a prediction need at N images (XLA's estimates
for the compiled programs on this backend; nothing is allocated).

``export`` takes the same options, the weights (``--pretrained [SET]`` for torchvision's, ``--weights``
for a folder `flaxnets.save_pretrained` wrote or a torchvision weights file; random ones otherwise), and
``--format stablehlo|onnx`` (by default the suffix of ``--out``). The file is written only if it computes
what the JAX model computes (``--tolerance``, relative to the largest output).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import jax

from flaxnets.analysis import step_memory, summary
from flaxnets.cli import (ModelRequestError, PlainParser, add_model_arguments, closed_pipe_status, error_phrase,
                          request_from_args, unwritable)
from flaxnets.layers import BatchTooSmallError
from flaxnets.registry import UnknownModelError, get_spec, list_models

# The largest activation --batch may ask for, in float32 bytes: no device holds a pebibyte, and XLA's compiler
# ends the process (no exception to report) on arrays whose byte counts approach 2**63.
MAX_ACTIVATION_BYTES = 2**50


def model_table(patterns: str | Sequence[str] = "*") -> str:
    """One line per architecture that any of ``patterns`` matches, by name, from the registry's data alone
    (nothing is traced, so it prints at once): parameters at its usual class count, input size, smallest
    input, torchvision's count, description."""
    patterns = [patterns] if isinstance(patterns, str) else patterns
    header = f"{'name':<17}{'params':>14}  {'classes':>7}  {'input':>9}  {'min':>4}  {'torchvision':>12}  description"
    lines = [header, "-" * len(header)]
    for name in sorted({name for pattern in patterns for name in list_models(pattern)}):
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
    table: list[str] = []  # printed once the batch is known to fit XLA's shapes
    rows = summary(request.name, shape, num_classes=request.classes, print_fn=table.append, **request.options)
    if args.batch is not None:
        largest = 4 * max([math.prod(shape[1:])] + [math.prod(row.output_shape[1:]) for row in rows])  # an image's
        if args.batch * largest > MAX_ACTIVATION_BYTES:
            raise ModelRequestError(f"--batch {args.batch} is too large: {request.name}'s largest activation would "
                                    f"take more than a pebibyte (2**50 bytes) in float32; give at most "
                                    f"{MAX_ACTIVATION_BYTES // largest:,}.")
        try:  # before the table: a training step the input cannot take is one sentence, not a table and a traceback
            memory = step_memory(request.name, shape, batch=args.batch, num_classes=request.classes, **request.options)
        except BatchTooSmallError:
            raise
        except ValueError as error:  # e.g. Inception v3's auxiliary head, which trains from 299 pixels
            raise ModelRequestError(f"--batch measures a training step, which {request.name} cannot take on "
                                    f"{request.side}x{request.side} input ({error_phrase(error)}).") from None
    print("\n".join(table))
    if args.batch is not None:
        print(memory.describe())


def export_main(argv: list[str]) -> int:
    """``python -m flaxnets export NAME --out FILE [...]``."""
    from flaxnets.export import FORMATS, TOLERANCE, ExportError, export
    from flaxnets.pretrained import from_pretrained, read_config
    from flaxnets.pth import WeightsFileError

    parser = PlainParser(prog="python -m flaxnets export",
                         description="Write an architecture as StableHLO or ONNX, checked against JAX.")
    parser.add_argument("name", help="a registered architecture (python -m flaxnets lists them)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", nargs="?", const="DEFAULT", default=None, metavar="SET",
                         help="torchvision's published weights (SET: e.g. IMAGENET1K_V1; default: its best)")
    weights.add_argument("--weights", default=None, metavar="PATH",
                         help="a folder flaxnets.save_pretrained wrote, or a torchvision .pth/.safetensors/.npz file")
    parser.add_argument("--format", choices=sorted(set(FORMATS.values())), default=None,
                        help="default: from the suffix of --out (.stablehlo or .onnx)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write (never overwritten)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"allowed difference from the JAX model, relative to its largest output (default {TOLERANCE:g})")
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    try:
        # What can be refused before building anything is refused first.
        if not (math.isfinite(args.tolerance) and args.tolerance > 0):  # nan would pass every check
            raise ExportError(f"--tolerance must be a finite number above 0, got {args.tolerance:g}.")
        if Path(args.out).exists():
            raise ExportError(f"{args.out} already exists; choose another name (nothing is overwritten).")
        if args.format is None and Path(args.out).suffix not in FORMATS:
            raise ExportError(f"cannot tell the format of {args.out}: name it .stablehlo or .onnx, or pass --format.")
        problem = unwritable(Path(args.out).parent)
        if problem:
            raise ExportError(f"cannot write {args.out}: {problem}.")
        request = request_from_args(args.name, args).checked()
        if args.weights and Path(args.weights).is_dir():
            saved = read_config(args.weights)["architecture"]
            if saved != args.name:
                raise ExportError(f"{args.weights} holds {saved} weights, not {args.name}'s.")
            model, variables = from_pretrained(args.weights, num_classes=request.num_classes, **request.options)
        elif args.weights and not get_spec(args.name).torchvision:
            # Only a torchvision architecture's weights file can be converted; say so about the file named.
            reason = ("there is no such file or folder" if not os.path.lexists(args.weights) else
                      f"{args.name} has no torchvision counterpart whose weights files could be converted")
            raise ExportError(f"cannot read the weights {args.weights}: {reason}; pass the folder "
                              f"flaxnets.save_pretrained wrote for {args.name}.")
        elif args.pretrained or args.weights:
            model, variables = from_pretrained(args.name, args.pretrained or args.weights,
                                               num_classes=request.num_classes, **request.options)
        else:  # random weights: a check of the export path itself
            model = request.build()
            images = jax.numpy.zeros(request.input_shape())
            variables = jax.jit(lambda key: model.init(key, images, train=False))(jax.random.key(0))
        report = export(model, variables, args.out, format=args.format, input_shape=request.input_shape()[1:],
                        tolerance=args.tolerance)
    except (UnknownModelError, ModelRequestError, ExportError, WeightsFileError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m flaxnets``."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a reader gone fails here, not in the interpreter's last flush, past any except
        return status
    except BrokenPipeError:  # the reader left (``| head -1``): stop without a word
        return closed_pipe_status()


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    parser = PlainParser(prog="python -m flaxnets", description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="globs over names (default '*'; every name any matches is listed), "
                                                 "'summary NAME', or 'export NAME' (python -m flaxnets export --help)")
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
        patterns = args.words or ["*"]
        for pattern in patterns:  # a pattern that matches nothing is most likely a typo: said, not skipped
            if not list_models(pattern):
                raise ModelRequestError(f"no architecture matches {pattern!r}; try 'python -m flaxnets' for the list.")
        print(model_table(patterns))
        print("\nparams: the default build at its usual class count; min: the smallest square input it takes; "
              "torchvision: the count torchvision publishes at 1000 classes (GoogLeNet's without its auxiliary "
              "heads). tests/test_models.py checks every number against the traced model.")
        return 0
    except (UnknownModelError, ModelRequestError, BatchTooSmallError) as error:  # the last: summary --batch 1
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
