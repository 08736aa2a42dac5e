"""``python -m benchmarks.nnx``: `flaxnets.nnx` (a linen model bridged into NNX) against the same network
written natively in NNX, and against the linen model under ``jax.jit``: train step time, compile time.

The network is ResNet-18 with the CIFAR stem (``resnet18_cifar``) at 32x32, batch 16, float32, SGD with
momentum; the native copy (`NativeResNet`, below) has the same layers, widths and strides, with NNX's own
``Conv``, ``BatchNorm`` and ``Linear`` (NNX's BatchNorm keeps the biased running variance where flaxnets
keeps PyTorch's unbiased one: the same work). Each variant's step is compiled once (timed: trace and
compile together, the first call) and then run ``--repeats`` times, the variants taking turns, so that
the load of a shared machine falls on all of them alike; the table gives the median and the spread. The
decision it informs, and the figures, are in benchmarks/RESULTS.md ("Flax NNX: bridge or native").
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import flaxnets
import flaxnets.nnx

from benchmarks.common import check_batch, check_counts, run_cli
from train.arguments import CommandParser


class NativeBlock(nnx.Module):
    """torchvision's BasicBlock in NNX: two 3x3 convolutions with BatchNorm, a projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        conv = lambda i, o, k, s: nnx.Conv(i, o, (k, k), strides=s, padding=((k // 2, k // 2),) * 2, use_bias=False,
                                           rngs=rngs)
        self.conv1, self.bn1 = conv(cin, cout, 3, stride), nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.conv2, self.bn2 = conv(cout, cout, 3, 1), nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
        self.project = stride != 1 or cin != cout
        if self.project:
            self.down_conv, self.down_bn = conv(cin, cout, 1, stride), nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)

    def __call__(self, x):
        y = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))
        return nnx.relu(y + (self.down_bn(self.down_conv(x)) if self.project else x))


class NativeResNet(nnx.Module):
    """ResNet-18 with the CIFAR stem (3x3 convolution, no max-pool), written in NNX."""

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 64, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(64, momentum=0.9, rngs=rngs)
        widths, blocks, cin = (64, 128, 256, 512), [], 64
        for stage, width in enumerate(widths):
            for index in range(2):
                blocks.append(NativeBlock(cin, width, 2 if stage and not index else 1, rngs=rngs))
                cin = width
        self.blocks = nnx.List(blocks)
        self.fc = nnx.Linear(512, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc(jnp.mean(x, axis=(1, 2)))


def _nnx_step(model):
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    return lambda images, labels: step(model, optimizer, images, labels)


def _linen_step():
    model = flaxnets.create_model("resnet18_cifar")
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
    tx = optax.sgd(0.1, momentum=0.9)
    state = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, True,
                                          mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    def run(images, labels):
        params, batch_stats, opt_state, loss = step(*state, images, labels)
        state[:] = [params, batch_stats, opt_state]
        return loss

    return run


VARIANTS = {
    "linen (jax.jit)": _linen_step,
    "flaxnets.nnx (bridge, nnx.jit)": lambda: _nnx_step(flaxnets.nnx.create_model("resnet18_cifar")),
    "native NNX (nnx.jit)": lambda: _nnx_step(NativeResNet(rngs=nnx.Rngs(0))),
}


def measure(batch: int, repeats: int, reverse: bool = False) -> list[dict]:
    """Per variant: compile seconds (first call) and the median and range of ``repeats`` steps; ``reverse``
    compiles them in the other order (the first compilation of a process also pays JAX's own warm-up)."""
    images = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    labels = jnp.arange(batch) % 10
    steps, rows = {}, {}
    for name, build in (reversed(VARIANTS.items()) if reverse else VARIANTS.items()):
        steps[name] = build()
        start = time.perf_counter()
        jax.block_until_ready(steps[name](images, labels))
        rows[name] = {"variant": name, "compile_s": time.perf_counter() - start, "times": []}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(images, labels))
            rows[name]["times"].append(time.perf_counter() - start)
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="python -m benchmarks.nnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--reverse", action="store_true", help="compile the variants in the opposite order")
    args = parser.parse_args(argv)

    def body() -> int:
        check_batch(args.batch)
        check_counts(args, positive=("repeats",))
        print(f"resnet18_cifar train step, 32x32, batch {args.batch}, float32, {jax.devices()[0].device_kind}, "
              f"jax {jax.__version__}")
        print("| variant | compile (s) | step median (ms) | step min-max (ms) |\n| --- | --- | --- | --- |")
        for row in measure(args.batch, args.repeats, args.reverse):
            times = [t * 1e3 for t in row["times"]]
            print(f"| {row['variant']} | {row['compile_s']:.1f} | {statistics.median(times):.0f} | "
                  f"{min(times):.0f}-{max(times):.0f} |")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
