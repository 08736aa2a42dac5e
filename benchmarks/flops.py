"""``python -m benchmarks.flops [--arch PATTERN]``: parameters and forward multiply-accumulates per architecture.

``--input-size``, ``--channels``, ``--num-classes`` and ``--model-arg KEY=VALUE`` (repeatable) count each
matching architecture as an exercise asks for it instead (``--arch nin --channels 1 --num-classes 10``: d2l's
NiN on Fashion-MNIST); the torchvision columns then compare with figures for another network and are left
empty.

For one image at each architecture's native input size, side by side (the forward pass of inference, which
runs no auxiliary classifier: GoogLeNet's and Inception v3's are left out, as torchvision counts them; the
parameters are those of torchvision's reference count, which has Inception v3's head and not GoogLeNet's):

* ``gmacs``: the analytic count of convolutions and dense layers (`benchmarks.costs`), torchvision's
  convention; compared with torchvision's published GFLOPS (`flaxnets.registry.ModelSpec.gflops`, which are
  MACs), it must agree within 1%;
* ``xla_gmacs``: XLA's cost analysis of the lowered forward pass, ``flops / 2``. It differs from the
  analytic count for two reasons, both reported: XLA skips the taps that fall on padding
  (``padding_gmacs``), and it also counts normalisation, activations, pooling and bias additions
  (``elementwise_gflops``). ``xla_gmacs + padding_gmacs`` is what XLA would report without the first.

Nothing is compiled: the forward pass is traced with abstract shapes and lowered, which takes well under a
second per architecture. Results with ``--out DIR``: DIR/flops.{json,csv} for every architecture; a subset is
named after its pattern (``--arch 'resnet*'``: ``flops_resnet``) and a variant after what differs from the
defaults (``flops_c1_k10``); and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from typing import TYPE_CHECKING, Any, Sequence

from benchmarks.common import BenchmarkError, add_out_option, as_request, environment, markdown_table, run_cli, write_results
from train.arguments import CommandParser

if TYPE_CHECKING:
    from flaxnets.cli import ModelRequest

__all__ = ["xla_forward_flops", "flops_row", "main"]


def xla_forward_flops(model: Any, input_shape: tuple[int, ...], variables: Any) -> float:
    """XLA's ``flops`` for ``model.apply(variables, x, train=False)`` on ``input_shape``, from the lowering."""
    import jax
    import jax.numpy as jnp

    images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, images)
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis["flops"])


def _percent(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(100.0 * (value - reference) / reference, 2)


def flops_row(arch: str | ModelRequest) -> dict[str, Any]:
    """One architecture's parameters and the three counts of its forward MACs, with the deviations.

    ``arch`` is a registry name (counted as torchvision counts it) or a `ModelRequest`; torchvision's
    figures are compared only for a request that keeps every default."""
    import jax.numpy as jnp

    from benchmarks.common import model_for
    from benchmarks.costs import layer_costs, totals
    from flaxnets.analysis import abstract_variables, count_params

    request = as_request(arch)
    spec = request.spec
    model = model_for(request, jnp.float32)
    inference = model.clone(aux_logits=False) if hasattr(model, "aux_logits") else model
    shape = request.input_shape()
    variables = abstract_variables(inference, shape)  # traced once: DenseNet-201's trace takes seconds
    params = count_params((variables if inference is model else abstract_variables(model, shape))["params"])
    total = totals(layer_costs(inference, shape))
    flops = xla_forward_flops(inference, shape, variables)
    gmacs, valid = total["macs"] / 1e9, total["macs_valid"] / 1e9
    xla_gmacs = flops / 2e9
    elementwise = (flops - 2 * total["macs_valid"] - total["bias_adds"]) / 1e9
    # torchvision's figures are for the network as registered, not for an exercise's variant of it
    tv_params, tv_gflops = (spec.params, spec.gflops) if request.is_default else (None, None)
    return {
        "arch": request.name,
        "input": "x".join(map(str, shape[1:])),
        "classes": request.classes,
        "model_args": dict(request.options),
        "params": params,
        "torchvision_params": tv_params,
        "gmacs": round(gmacs, 4),
        "torchvision_gflops": tv_gflops,
        "gmacs_vs_torchvision_pct": _percent(gmacs, tv_gflops),
        "xla_gmacs": round(xla_gmacs, 4),
        "xla_vs_torchvision_pct": _percent(xla_gmacs, tv_gflops),
        "padding_gmacs": round(gmacs - valid, 4),
        "bias_gflops": round(total["bias_adds"] / 1e9, 5),
        "elementwise_gflops": round(elementwise, 4),
        "xla_plus_padding_vs_torchvision_pct": _percent(xla_gmacs + gmacs - valid, tv_gflops),
    }


def build_parser() -> argparse.ArgumentParser:
    from flaxnets.cli import add_model_arguments

    parser = CommandParser(prog="python -m benchmarks.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="*", help="registry pattern, e.g. 'resnet*' (default: every architecture)")
    add_out_option(parser)
    add_model_arguments(parser)
    return parser


COLUMNS = (("arch", "arch"), ("input", "input"), ("params", "params"), ("gmacs", "GMACs (analytic)"),
           ("torchvision_gflops", "torchvision GFLOPS"), ("gmacs_vs_torchvision_pct", "analytic vs tv %"),
           ("xla_gmacs", "XLA GMACs"), ("xla_vs_torchvision_pct", "XLA vs tv %"),
           ("padding_gmacs", "padding GMACs"), ("elementwise_gflops", "elementwise GFLOPs"),
           ("xla_plus_padding_vs_torchvision_pct", "XLA + padding vs tv %"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.flops``."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        import flaxnets
        from flaxnets.cli import request_from_args

        archs = flaxnets.list_models(args.arch)
        if not archs:
            raise BenchmarkError(f"no architecture matches {args.arch!r}; see python -m flaxnets for the list.")
        requests = [request_from_args(arch, args).checked() for arch in archs]  # every refusal before any count
        rows = [flops_row(request) for request in requests]
        print(markdown_table(rows, COLUMNS))
        checked = [r for r in rows if r["torchvision_gflops"]]
        if checked:
            worst = max(checked, key=lambda r: abs(r["gmacs_vs_torchvision_pct"]))
            worst_xla = max(checked, key=lambda r: abs(r["xla_vs_torchvision_pct"]))
            print(f"\nanalytic vs torchvision: largest deviation {worst['gmacs_vs_torchvision_pct']:+.2f}% "
                  f"({worst['arch']}); XLA vs torchvision: largest {worst_xla['xla_vs_torchvision_pct']:+.2f}% "
                  f"({worst_xla['arch']}), of which padding taps explain "
                  f"{-100 * worst_xla['padding_gmacs'] / worst_xla['torchvision_gflops']:+.2f} points")
        if args.out:
            conditions = {**environment(), "command": "python -m benchmarks.flops "
                          + " ".join(sys.argv[1:] if argv is None else argv)}
            # A subset of the architectures goes to a file of its own: the table of every one stays whole.
            subset = "" if args.arch == "*" else "_" + (re.sub(r"[^A-Za-z0-9]+", "-", args.arch).strip("-") or "subset")
            paths = write_results(f"flops{subset}{requests[0].tag()}", rows, conditions, args.out)
            print(f"wrote {paths[0]} and {paths[1]}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
