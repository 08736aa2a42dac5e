"""``python -m benchmarks.vs_torch --arch resnet18 --batch 32 --size 224``: flaxnets against PyTorch.

The same architecture, weights and batch run in torchvision (eager PyTorch on the CPU) and in flaxnets
(one jitted XLA executable), in one process, alternating call by call, so that both see the same machine
load; the figure is the ratio of their medians (``speed = torch time / flaxnets time``, above 1 when
flaxnets is faster), with the median and range of the ratios of each repeat's back-to-back pair
(``speed_pairs_*``), which shows how far the machine's own drift moves it. A train step is forward,
cross-entropy, backward and SGD with momentum on both sides (flaxnets runs the trainer's own
`train.step.train_step`, old state donated, which also normalises the uint8 batch, augmentation off;
PyTorch gets the batch already normalised); inference is
``model.eval()`` under ``torch.inference_mode()`` against a jitted ``apply(train=False)``.

The weights are torchvision's random initialisation converted with `flaxnets.convert.from_torch`, and
the inference logits of the two are compared on the benchmark batch, so a speed-up that changed the
maths would show as an error above float32 rounding (``rel_err``, relative to the largest logit).
Without torch or torchvision the command says so and exits 0.

Measured results and their conditions: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import (BenchmarkError, add_kernels_option, add_out_option, arch_names, check_batch,
                               check_counts, conditions_line, environment, kernels_argument, run_cli, write_results)
from train.arguments import CommandParser

__all__ = ["load_torch", "compare", "main"]

DEFAULT_ARCHS = ("resnet18", "resnet50", "vgg11", "alexnet", "googlenet")
# torchvision builder arguments that give the model flaxnets' reference fields describe.
# Without their auxiliary classifiers on both sides: flaxnets' benchmark step trains the main head only (its
# auxiliary logits go unused and XLA drops them), and Inception v3's head needs 299-pixel inputs to train.
TORCHVISION_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": True},
                      "inception_v3": {"aux_logits": False, "init_weights": True}}


def load_torch() -> tuple[Any, Any, str | None]:
    """``(torch, torchvision, None)``, or ``(.., .., reason)`` when either is unavailable.

    torchvision's registry build needs two operator schemas defined before import on CPU-only torch; the
    test suite's helper (tests/reference.py) does exactly that, so it is reused rather than repeated.
    """
    helper = Path(__file__).resolve().parent.parent / "tests" / "reference.py"
    try:
        spec = importlib.util.spec_from_file_location("_flaxnets_torch_reference", helper)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module._load()
    except (ImportError, OSError) as error:
        try:
            import torch
            import torchvision
        except ImportError:
            return None, None, f"torch/torchvision are not importable here ({error})"
        return torch, torchvision, None


def _torch_model(torchvision: Any, arch: str, torch: Any):
    import flaxnets

    spec = flaxnets.get_spec(arch)
    if spec.torchvision is None:
        raise BenchmarkError(f"torchvision has no {arch}; compare one of: "
                             f"{', '.join(n for n in flaxnets.list_models() if flaxnets.get_spec(n).torchvision)}.")
    torch.manual_seed(0)
    builder = getattr(torchvision.models, spec.torchvision)
    return builder(weights=None, num_classes=spec.num_classes, **TORCHVISION_KWARGS.get(arch, {}))


def compare(arch: str, mode: str, batch: int, size: int, repeats: int, warmup: int = 1,
            compiler_options: dict[str, Any] | None = None, log=print,
            kernels: str | None = None) -> dict[str, Any]:
    """Time ``arch``'s ``mode`` step in PyTorch and flaxnets, alternating; return one result row.

    ``kernels`` as for `benchmarks.common.build_step` (`None`: the backend's kernel set)."""
    import jax
    import numpy as np

    from benchmarks.common import Timing, build_step, measure
    from flaxnets.cli import ModelRequest
    from flaxnets.convert import from_torch

    torch, torchvision, reason = load_torch()
    if reason:
        raise RuntimeError(reason)
    tmodel = _torch_model(torchvision, arch, torch)
    variables = from_torch(arch, tmodel.state_dict())  # GoogLeNet: no auxiliary heads, as the checkpoint
    request = ModelRequest(arch, {"aux_logits": False} if "aux_logits" in TORCHVISION_KWARGS.get(arch, {}) else {})
    step = build_step(request, mode, batch, size=size, variables=variables, compiler_options=compiler_options,
                      kernels=kernels)
    log(f"{arch} {mode}: flaxnets compiled in {step.compile_s:.1f} s (lowering {step.lower_s:.1f} s)")

    images_u8 = np.asarray(step.args[1]["image"] if mode == "train" else step.args[1])
    x = torch.from_numpy(((images_u8.astype(np.float32) / 255.0 - 0.45) / 0.225).transpose(0, 3, 1, 2).copy())
    rel_err = None
    if mode == "infer":
        tmodel.eval()
        with torch.inference_mode():
            expected = tmodel(x).numpy()
        got = np.asarray(step.compiled(*step.args))
        rel_err = float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-30))

        def torch_call():
            with torch.inference_mode():
                tmodel(x)
    else:
        tmodel.train()
        labels = torch.from_numpy(np.asarray(step.args[1]["label"]).astype(np.int64))
        optimizer = torch.optim.SGD(tmodel.parameters(), lr=1e-3, momentum=0.9)

        def torch_call():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(tmodel(x), labels)
            loss.backward()
            optimizer.step()

    for _ in range(warmup):
        torch_call()
        step.run()
    torch_times, flax_times = [], []
    for index in range(repeats):
        torch_times.append(measure(torch_call, 1, warmup=0).times[0])
        flax_times.append(measure(step.run, 1, warmup=0).times[0])
        log(f"  repeat {index + 1}/{repeats}: torch {torch_times[-1] * 1e3:.0f} ms, "
            f"flaxnets {flax_times[-1] * 1e3:.0f} ms")
    t, f = Timing(tuple(torch_times)), Timing(tuple(flax_times))
    # Each repeat's two calls ran back to back, so their ratio is paired against the machine's drift.
    pairs = sorted(a / b for a, b in zip(torch_times, flax_times))
    row = {
        "arch": arch, "mode": mode, "batch": batch, "size": size, "repeats": repeats,
        "kernels": step.kernels,
        "torch_ms": round(t.median * 1e3, 1), "torch_min_ms": round(t.min * 1e3, 1),
        "torch_max_ms": round(t.max * 1e3, 1),
        "flax_ms": round(f.median * 1e3, 1), "flax_min_ms": round(f.min * 1e3, 1), "flax_max_ms": round(f.max * 1e3, 1),
        "speed": round(t.median / f.median, 3),
        "speed_pairs_median": round(float(np.median(pairs)), 3),
        "speed_pairs_min": round(pairs[0], 3), "speed_pairs_max": round(pairs[-1], 3),
        "flax_compile_s": round(step.compile_s, 1),
        "rel_err": rel_err,
        "torch_threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),  # other processes share the CPU: state how many
        "compiler_options": ",".join(f"{k}={v}" for k, v in (compiler_options or {}).items()),
    }
    log(f"{arch} {mode}: torch {t.describe()}, flaxnets {f.describe()}: speed {row['speed']:.2f}x PyTorch "
        f"(repeat by repeat {row['speed_pairs_min']:.2f}-{row['speed_pairs_max']:.2f}x)"
        + (f", logits rel. error {rel_err:.1e}" if rel_err is not None else ""))
    jax.clear_caches()
    return row


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--xla-option takes NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    parsed: Any = {"true": True, "false": False}.get(value.lower(), value)
    if isinstance(parsed, str):
        try:
            parsed = int(value)
        except ValueError:
            pass
    return name, parsed


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m benchmarks.vs_torch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18",
                        help=f"architecture(s), comma-separated, or 'all' for {', '.join(DEFAULT_ARCHS)}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each framework (alternating)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--xla-option", type=_option, action="append", default=[], metavar="NAME=VALUE",
                        help="an XLA debug option for the flaxnets executable only (repeatable)")
    add_kernels_option(parser)
    parser.add_argument("--tag", default="", help="suffix of the results files")
    add_out_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.vs_torch``."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        import flaxnets

        archs = list(DEFAULT_ARCHS) if args.arch == "all" else arch_names(args.arch)
        for arch in archs:
            if flaxnets.get_spec(arch).torchvision is None:
                _torch_model(None, arch, None)  # raises the user error
        check_batch(args.batch)
        check_counts(args, positive=("repeats", "size"), non_negative=("warmup",))
        torch, _, reason = load_torch()
        if reason:
            print(f"skipped: {reason}")
            return 0
        modes = ("train", "infer") if args.mode == "both" else (args.mode,)
        options = dict(args.xla_option)
        rows = [compare(arch, mode, args.batch, args.size, args.repeats, args.warmup, options or None,
                        kernels=kernels_argument(args.kernels))
                for arch in archs for mode in modes]
        conditions = {**environment(), "torch": torch.__version__, "command": "python -m benchmarks.vs_torch "
                      + " ".join(sys.argv[1:] if argv is None else argv)}
        print(f"{'arch':<10} {'mode':<6} {'torch ms':>10} {'flax ms':>10} {'speed':>7} {'by repeat':>12}")
        for r in rows:
            print(f"{r['arch']:<10} {r['mode']:<6} {r['torch_ms']:>10.0f} {r['flax_ms']:>10.0f} {r['speed']:>6.2f}x "
                  f"{r['speed_pairs_min']:>6.2f}-{r['speed_pairs_max']:.2f}x")
        print(conditions_line(conditions))
        if args.out:
            name = f"vs_torch_b{args.batch}_s{args.size}" + (f"_{args.tag}" if args.tag else "")
            paths = write_results(name, rows, conditions, args.out)
            print(f"wrote {paths[0]} and {paths[1]}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
