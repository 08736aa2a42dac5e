"""``python -m benchmarks.peers --arch resnet50 --batch 256 --dtype bfloat16``: flaxnets beside what a user
would pick instead, on whatever device is present, in one process.

The peers, each training the same architecture on the same batch of synthetic images that live on the
device (forward, cross-entropy, backward, SGD with momentum):

* ``flaxnets``: the trainer's own step (`benchmarks.common.build_step`: `train.step.train_step`, uint8
  images normalised inside the step, the old state donated);
* ``flax``: the network written with stock `flax.linen` layers as Flax's ImageNet example writes it, and
  the step such a script writes (`benchmarks.plain_flax`);
* ``torch``: torchvision's model, ``channels_last``, under ``torch.autocast`` to bfloat16 when ``--dtype
  bfloat16``, eager;
* ``torch.compile``: the same model through ``torch.compile`` (default mode).

Every peer is timed alike: ``--warmup`` steps (for the torch peers the first one compiles, and its time
less a step's is reported as the compile time; the JAX peers are compiled ahead of time), then ``--repeats`` rounds of ``--steps`` steps dispatched back to back and waited for once
(`jax.block_until_ready`, `torch.cuda.synchronize`). The median round gives images/s, with the min-max
over rounds; the table ends with flaxnets' speed over each peer (above 1: flaxnets faster).
Without torch or torchvision the torch peers are skipped with the reason. ``--out DIR`` also writes the
rows and their conditions to ``DIR/peers_<arch>_b<batch>_<dtype>.json``; nothing is written otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from benchmarks.common import (BenchmarkError, add_out_option, arch_names, check_batch, check_counts, conditions_line,
                               environment, markdown_table, run_cli, write_whole)
from train.arguments import CommandParser

__all__ = ["PEERS", "Prepared", "prepare", "time_peer", "compare", "main"]

PEERS = ("flaxnets", "flax", "torch", "torch.compile")


@dataclasses.dataclass
class Prepared:
    """One peer's step, ready to run: ``step()`` dispatches one training step without waiting,
    ``sync()`` waits for every step dispatched so far."""

    step: Callable[[], None]
    sync: Callable[[], None]
    memory_bytes: int | None = None
    compile_s: float | None = None  # ahead of time; None: the first step compiles
    compiles: bool = True  # False: eager PyTorch, which has nothing to compile


def _flaxnets(arch: str, batch: int, size: int, dtype: str, **options: Any) -> Prepared:
    from benchmarks.common import build_step

    step = build_step(arch, "train", batch, size=size, dtype=dtype, **options)
    state: dict[str, Any] = {}

    def dispatch():
        out = step.compiled(*step.args)
        step.args[0] = out[0]
        state["last"] = out

    def sync():
        import jax

        jax.block_until_ready(state.get("last"))

    return Prepared(dispatch, sync, step.memory_bytes(), step.lower_s + step.compile_s)


def _flax(arch: str, batch: int, size: int, dtype: str) -> Prepared:
    import jax
    import jax.numpy as jnp
    import optax

    import flaxnets
    from benchmarks.common import parse_dtype
    from benchmarks.plain_flax import plain_model, plain_train_step
    from flaxnets.analysis import compiled_memory_bytes

    spec = flaxnets.get_spec(arch)
    classes = spec.num_classes
    try:
        model = plain_model(arch, classes, parse_dtype(dtype))
    except KeyError as error:
        raise _Skip(error.args[0]) from None
    key = jax.random.key(0)
    images = jax.random.normal(key, (batch, size, size, spec.in_channels), jnp.float32).astype(parse_dtype(dtype))
    labels = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, classes)
    variables = jax.jit(lambda k: model.init(k, images[:1], train=False))(jax.random.fold_in(key, 2))
    tx = optax.sgd(1e-3, momentum=0.9)
    params = variables["params"]
    holder = {"state": (params, variables.get("batch_stats", {}), tx.init(params), jax.random.fold_in(key, 3))}
    start = time.perf_counter()
    compiled = plain_train_step(model, tx).lower(holder["state"], images, labels).compile()
    compile_s = time.perf_counter() - start

    def dispatch():
        holder["state"], holder["loss"] = compiled(holder["state"], images, labels)

    return Prepared(dispatch, lambda: jax.block_until_ready(holder.get("loss")), compiled_memory_bytes(compiled),
                    compile_s)


def _torch(arch: str, batch: int, size: int, dtype: str, compiled: bool) -> Prepared:
    import flaxnets
    from benchmarks.vs_torch import _torch_model, load_torch

    torch, torchvision, reason = load_torch()
    if reason:
        raise _Skip(reason)
    try:
        model = _torch_model(torchvision, arch, torch)
    except BenchmarkError as error:  # an architecture torchvision does not have
        raise _Skip(str(error)) from None
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = model.to(device, memory_format=torch.channels_last).train()
    network = torch.compile(model) if compiled else model
    spec = flaxnets.get_spec(arch)
    x = torch.randn(batch, spec.in_channels, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = dtype == "bfloat16"

    def dispatch():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(network(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prepared = Prepared(dispatch, sync, compiles=compiled)
    prepared.torch = torch  # type: ignore[attr-defined]  # its peak memory is read after the timing
    return prepared


class _Skip(Exception):
    """A peer that cannot run here (torch missing); the message says why."""


def prepare(peer: str, arch: str, batch: int, size: int, dtype: str, **options: Any) -> Prepared:
    """Build ``peer``'s model and step for ``arch`` (the torch peers compile on their first step; flaxnets
    and plain Flax are compiled ahead of time, to read their memory analysis). ``options`` go to
    flaxnets' `benchmarks.common.build_step` (e.g. ``ops``)."""
    if peer == "flaxnets":
        return _flaxnets(arch, batch, size, dtype, **options)
    if peer == "flax":
        return _flax(arch, batch, size, dtype)
    if peer in ("torch", "torch.compile"):
        return _torch(arch, batch, size, dtype, compiled=peer == "torch.compile")
    raise BenchmarkError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}.")


def time_peer(prepared: Prepared, batch: int, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    """Warm up (the first step's time is the compile time), then time ``repeats`` rounds of ``steps``."""
    start = time.perf_counter()
    prepared.step()
    prepared.sync()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        prepared.step()
    prepared.sync()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            prepared.step()
        prepared.sync()
        rounds.append((time.perf_counter() - start) / steps)
    median = statistics.median(rounds)
    torch = getattr(prepared, "torch", None)
    memory = prepared.memory_bytes
    if torch is not None and torch.cuda.is_available():
        memory = int(torch.cuda.max_memory_allocated())
    compile_s = prepared.compile_s if prepared.compile_s is not None else max(first - median, 0.0)
    return {"images_per_s": round(batch / median, 1), "images_per_s_min": round(batch / max(rounds), 1),
            "images_per_s_max": round(batch / min(rounds), 1), "ms_per_step": round(median * 1e3, 3),
            "compile_s": round(compile_s, 2) if prepared.compiles else None, "memory_mib": round(memory / 2**20) if memory else None}


def compare(arch: str, peers: Sequence[str], batch: int, size: int, dtype: str, steps: int, repeats: int,
            warmup: int, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per peer, in the order given, plus ``speed`` (flaxnets' images/s over the peer's) where
    flaxnets was measured."""
    rows = []
    for peer in peers:
        try:
            prepared = prepare(peer, arch, batch, size, dtype)
        except _Skip as reason:
            log(f"{peer}: skipped ({reason})")
            rows.append({"peer": peer, "arch": arch, "skipped": str(reason)})
            continue
        row = {"peer": peer, "arch": arch, "batch": batch, "size": size, "dtype": dtype,
               **time_peer(prepared, batch, steps, repeats, warmup)}
        log(f"{peer}: {row['images_per_s']:,.0f} images/s ({row['ms_per_step']:.1f} ms/step, range "
            f"{row['images_per_s_min']:,.0f}-{row['images_per_s_max']:,.0f})"
            + (f", compiled in {row['compile_s']:.1f} s" if row["compile_s"] is not None else ""))
        rows.append(row)
        del prepared
        _release()
    ours = next((r["images_per_s"] for r in rows if r["peer"] == "flaxnets" and "images_per_s" in r), None)
    for row in rows:
        if ours and "images_per_s" in row:
            row["speed"] = round(ours / row["images_per_s"], 3)
    return rows


def _release() -> None:
    """Give back what a finished peer held, so the next one starts from the same free memory."""
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


COLUMNS = (("arch", "arch"), ("peer", "peer"), ("images_per_s", "images/s"), ("images_per_s_min", "min"),
           ("images_per_s_max", "max"), ("ms_per_step", "ms/step"), ("compile_s", "compile s"),
           ("memory_mib", "memory MiB"), ("speed", "flaxnets speed"))


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", help="architecture(s), comma-separated")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=None, help="input side (default: the architecture's own)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    add_out_option(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.peers``."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        import flaxnets

        peers = arch_names(args.peers, "--peers")
        for peer in peers:
            if peer not in PEERS:
                raise BenchmarkError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}.")
        check_batch(args.batch)
        check_counts(args, positive=("steps", "repeats", "warmup"))
        archs = arch_names(args.arch)
        for arch in archs:
            flaxnets.get_spec(arch)  # an unknown name fails before anything compiles
        # JAX takes most of a GPU's memory at start unless told not to; the torch peers need their share.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        rows = []
        for arch in archs:
            size = args.size or flaxnets.get_spec(arch).input_size
            rows += compare(arch, peers, args.batch, size, args.dtype, args.steps, args.repeats, args.warmup)
        torch = sys.modules.get("torch")
        conditions = {**environment(), "torch": getattr(torch, "__version__", None),
                      "command": "python -m benchmarks.peers " + " ".join(sys.argv[1:] if argv is None else argv)}
        print(markdown_table([r for r in rows if "images_per_s" in r], COLUMNS))
        print(conditions_line(conditions))
        if args.out:
            path = write_whole(args.out, f"peers_{'_'.join(archs)}_b{args.batch}_{args.dtype}.json",
                               json.dumps({"conditions": conditions, "rows": rows}, indent=1, default=str) + "\n")
            print(f"wrote {path}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
