"""``python -m benchmarks.profile --arch alexnet [--batch N] [--compiled]``: where a network's cost lies, layer by layer.

``--input-size``, ``--channels``, ``--num-classes`` and ``--model-arg KEY=VALUE`` (repeatable) profile the
network as an exercise asks for it, e.g. ``--arch nin --channels 1 --num-classes 10`` for d2l's NiN on
Fashion-MNIST.

For every leaf layer: output shape, parameters, MACs, activation bytes (its output, for the batch), each
as a share of the network's total, and arithmetic intensity (FLOPs per byte of weights and activations
moved once). Then the totals by kind of layer, which answer the classic questions about AlexNet, VGG and
NiN: the dense layers hold most of the weights (AlexNet: 96%), the convolutions do most of the computation
(AlexNet: 92%), and NiN, which has no dense layers, has a fraction of the weights at similar cost.

Memory for prediction and for training, estimated from the table (float32 weights):

* prediction: the weights plus the largest input-and-output pair of any one layer, since a layer's input
  can be freed once its output exists;
* training: the weights three times (parameters, gradients, the SGD momentum) plus every layer's output
  and the input, all kept for the backward pass (activations computed inside a layer's call, such as a
  ReLU applied between modules, are not listed and make the real figure somewhat larger).

``--compiled`` adds XLA's own figures from the memory analysis of the compiled train step and inference
(this compiles both, seconds to minutes on a CPU). Results with ``--out DIR``: DIR/profile_<arch>.{json,csv}, the
name followed by what differs from the defaults (``profile_nin_c1_k10``).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING, Any, Sequence

from benchmarks.common import (add_out_option, as_request, check_batch, environment, run_cli,
                               write_results)
from train.arguments import CommandParser

if TYPE_CHECKING:
    from flaxnets.cli import ModelRequest

__all__ = ["profile_rows", "memory_estimate", "main"]


def profile_rows(arch: str | ModelRequest, batch: int = 1, size: int | None = None,
                 dtype_bytes: int = 4) -> list[dict[str, Any]]:
    """The per-layer table of ``arch`` (a name or a `ModelRequest`) at ``batch`` images of side ``size``
    (default: the request's, else native), as dicts."""
    import jax.numpy as jnp

    from benchmarks.common import model_for
    from benchmarks.costs import layer_costs, totals

    request = as_request(arch, size)
    model = model_for(request, jnp.float32)
    costs = layer_costs(model, request.input_shape(batch), dtype_bytes=dtype_bytes)
    total = totals(costs)

    def share(value: int, whole: int) -> float:
        return round(100.0 * value / whole, 2) if whole else 0.0

    rows = []
    for c in costs:
        intensity = c.arithmetic_intensity
        rows.append({
            "layer": c.path, "kind": c.kind, "output_shape": "x".join(map(str, c.output_shape)),
            "params": c.params, "params_pct": share(c.params, total["params"]),
            "macs": c.macs, "macs_pct": share(c.macs, total["macs"]),
            "activation_bytes": c.activation_bytes, "activation_pct": share(c.activation_bytes, total["activation_bytes"]),
            "flops_per_byte": round(intensity, 1) if intensity is not None else None,
            "input_bytes": math.prod(c.input_shape) * dtype_bytes,
        })
    return rows


def by_kind(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Totals and shares of parameters, MACs and activation bytes per kind of layer, largest MACs first."""
    kinds: dict[str, dict[str, Any]] = {}
    for r in rows:
        k = kinds.setdefault(r["kind"], {"kind": r["kind"], "layers": 0, "params": 0, "params_pct": 0.0, "macs": 0,
                                         "macs_pct": 0.0, "activation_bytes": 0, "activation_pct": 0.0})
        k["layers"] += 1
        for key in ("params", "params_pct", "macs", "macs_pct", "activation_bytes", "activation_pct"):
            k[key] += r[key]
    out = sorted(kinds.values(), key=lambda k: (-k["macs"], -k["params"]))
    for share, total in (("params_pct", "params"), ("macs_pct", "macs"), ("activation_pct", "activation_bytes")):
        whole = sum(k[total] for k in out)
        for k in out:  # from the sums, not from the rounded per-layer shares
            k[share] = round(100.0 * k[total] / whole, 2) if whole else 0.0
    return out


def memory_estimate(rows: Sequence[dict[str, Any]], state: int = 0, optimizer_slots: int = 1) -> dict[str, int]:
    """Bytes for prediction and for training (see the module docstring), from the per-layer table."""
    weights = sum(r["params"] for r in rows) * 4
    peak_pair = max((r["input_bytes"] + r["activation_bytes"] for r in rows), default=0)
    kept = sum(r["activation_bytes"] for r in rows) + (rows[0]["input_bytes"] if rows else 0)
    return {
        "weight_bytes": weights + state * 4,
        "predict_bytes": weights + state * 4 + peak_pair,
        "train_bytes": weights * (2 + optimizer_slots) + state * 4 + kept,
        "train_activation_bytes": kept,
    }


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def _print_table(request: ModelRequest, rows: Sequence[dict[str, Any]], batch: int) -> None:
    width = max(len(r["layer"]) for r in rows) + 2
    print(f"{request.describe()}; batch {batch}; shares are of the network's total")
    print(f"{'layer':<{width}}{'kind':<18}{'output':<18}{'params':>13}{'%':>7}{'MACs':>16}{'%':>7}"
          f"{'act. bytes':>14}{'%':>7}{'FLOP/B':>9}")
    for r in rows:
        fpb = "-" if r["flops_per_byte"] is None else f"{r['flops_per_byte']:.1f}"
        print(f"{r['layer']:<{width}}{r['kind']:<18}{r['output_shape']:<18}{r['params']:>13,}{r['params_pct']:>7.1f}"
              f"{r['macs']:>16,}{r['macs_pct']:>7.1f}{r['activation_bytes']:>14,}{r['activation_pct']:>7.1f}{fpb:>9}")
    print(f"{'total':<{width}}{'':<18}{'':<18}{sum(r['params'] for r in rows):>13,}{100:>7.1f}"
          f"{sum(r['macs'] for r in rows):>16,}{100:>7.1f}{sum(r['activation_bytes'] for r in rows):>14,}{100:>7.1f}")


def build_parser() -> argparse.ArgumentParser:
    from flaxnets.cli import add_model_arguments

    parser = CommandParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="alexnet")
    parser.add_argument("--batch", type=int, default=1, help="images per batch (activations scale with it)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="activation dtype")
    parser.add_argument("--compiled", action="store_true",
                        help="also compile the train step and inference and report XLA's memory analysis")
    add_out_option(parser)
    add_model_arguments(parser, size_flags=("--input-size", "--size"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.profile``."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        import jax.numpy as jnp

        from benchmarks.common import model_for
        from flaxnets.analysis import abstract_variables, count_params
        from flaxnets.cli import request_from_args

        check_batch(args.batch)
        request = request_from_args(args.arch, args).checked()
        size = request.side
        dtype_bytes = 2 if args.dtype == "bfloat16" else 4
        rows = profile_rows(request, args.batch, dtype_bytes=dtype_bytes)
        _print_table(request, rows, args.batch)
        kinds = by_kind(rows)
        print("\nby kind of layer:")
        for k in kinds:
            print(f"  {k['kind']:<18} {k['layers']:>4} layers  params {k['params_pct']:6.2f}%  "
                  f"MACs {k['macs_pct']:6.2f}%  activation bytes {k['activation_pct']:6.2f}%")
        model = model_for(request, jnp.float32)
        state = count_params(abstract_variables(model, request.input_shape()).get("batch_stats", {}))
        memory = memory_estimate(rows, state)
        print(f"\nmemory at batch {args.batch}: weights {_mib(memory['weight_bytes'])}; prediction about "
              f"{_mib(memory['predict_bytes'])}; training (SGD with momentum) about {_mib(memory['train_bytes'])}, "
              f"of which {_mib(memory['train_activation_bytes'])} are activations kept for the backward pass")
        if args.compiled:
            from benchmarks.common import build_step

            for mode in ("infer", "train"):
                step = build_step(request, mode, args.batch, dtype=args.dtype)
                memory[f"xla_{mode}_bytes"] = step.memory_bytes()
                print(f"XLA's memory analysis, {mode}: {_mib(memory[f'xla_{mode}_bytes'])} "
                      f"(compiled in {step.compile_s:.1f} s)")
        if args.out:
            conditions = {**environment(), "arch": args.arch, "batch": args.batch, "size": size,
                          "channels": request.in_channels, "num_classes": request.classes,
                          "model_args": dict(request.options), "dtype": args.dtype, **memory,
                          "command": "python -m benchmarks.profile " + " ".join(sys.argv[1:] if argv is None else argv)}
            paths = write_results(f"profile_{args.arch}{request.tag()}", rows, conditions, args.out)
            print(f"wrote {paths[0]} and {paths[1]}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
