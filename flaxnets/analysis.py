"""Looking inside a network without running it: parameter counts, per-layer shapes, smallest input, and
the memory a training step and a prediction need.

Everything here traces with `jax.eval_shape` or compiles from abstract shapes, so VGG-19's 144M
parameters are never allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets.input_size import smallest_input
from flaxnets.registry import create_model, get_spec

__all__ = ["LayerRow", "StepMemory", "abstract_variables", "compiled_memory_bytes", "count_params", "min_input_size",
           "step_memory", "summary"]


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct` (e.g. ``variables["params"]``)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if isinstance(tree, (str, nn.Module)) or not all(hasattr(leaf, "shape") for leaf in leaves):
        raise TypeError("count_params counts the arrays of a variables tree (variables['params']); an "
                        "architecture's count is flaxnets.model_info(name)['default_params'].")
    return sum(math.prod(leaf.shape) for leaf in leaves)


def _resolve(model: str | nn.Module, input_shape, num_classes: int | None, overrides: dict) -> tuple[nn.Module, tuple]:
    if isinstance(model, str):
        spec = get_spec(model)
        if overrides.get("features_only"):  # the maps of the model without its class layer: no class count
            module = create_model(model, num_classes=num_classes, **overrides)
        else:
            module = create_model(model, num_classes=spec.num_classes if num_classes is None else num_classes,
                                  **overrides)
        default = (1, spec.input_size, spec.input_size, spec.in_channels)
    else:
        if overrides:
            raise ValueError("overrides apply to a registry name, not to a module you built yourself.")
        module, default = model, None
    if input_shape is None:
        if default is None:
            raise ValueError("input_shape is required for a module (e.g. (1, 224, 224, 3)).")
        input_shape = default
    input_shape = tuple(input_shape)
    if len(input_shape) == 3:
        input_shape = (1, *input_shape)
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be (N, H, W, C) or (H, W, C), got {input_shape}.")
    return module, input_shape


def abstract_variables(
    model: str | nn.Module, input_shape: tuple[int, ...] | None = None, *, num_classes: int | None = None, **overrides
) -> dict:
    """The variables ``model.init`` would create, as `jax.ShapeDtypeStruct` leaves (nothing allocated).

    ``model`` is a registry name (built with ``num_classes``, by default the architecture's usual count, and
    ``overrides``; ``input_shape`` defaults to its native size) or a module. Initialised with ``train=False``.
    """
    module, input_shape = _resolve(model, input_shape, num_classes, overrides)
    images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(functools.partial(module.init, train=False), rngs, images)


def min_input_size(model: str | nn.Module, in_channels: int | None = None, *, train: bool = False) -> int:
    """The smallest square side the architecture accepts, in inference or (``train``) in training: for a
    registry name as recorded in its spec (`ModelSpec.min_input_size`, `ModelSpec.min_train_input_size`),
    else found by tracing the module's shapes.

    One pixel less fails: a window no longer fits or some activation becomes empty. The side does not
    depend on the channels; ``in_channels`` (3 by default for a module) is what the search traces with.
    """
    if isinstance(model, str):
        spec = get_spec(model)
        recorded = (spec.min_train_input_size or spec.min_input_size) if train else spec.min_input_size
        if recorded is not None:  # recorded (tests/test_models.py checks that it is tight)
            return recorded
        module = create_model(model, num_classes=10)
        in_channels = spec.in_channels if in_channels is None else in_channels
    else:
        module = model
        in_channels = 3 if in_channels is None else in_channels
    return smallest_input(module, in_channels, train)


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One leaf layer of a network as `summary` reports it."""

    path: str  # e.g. "layer1_0/conv1"
    kind: str  # the module's class name
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int  # trainable parameters
    state: int  # non-trainable variables (BatchNorm statistics)
    module: nn.Module = dataclasses.field(repr=False, compare=False)


def _shape(value: Any) -> tuple[int, ...]:
    leaves = jax.tree_util.tree_leaves(value)
    return tuple(leaves[0].shape) if leaves and hasattr(leaves[0], "shape") else ()


def trace_layers(
    model: str | nn.Module, input_shape: tuple[int, ...] | None = None, *, num_classes: int | None = None, **overrides
) -> tuple[list[LayerRow], dict, tuple[int, ...]]:
    """Leaf layers in execution order, the abstract variables, and the input shape used."""
    module, input_shape = _resolve(model, input_shape, num_classes, overrides)
    calls: list[tuple[tuple[str, ...], nn.Module, tuple, tuple]] = []

    def record(next_fun: Callable, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            calls.append((tuple(context.module.path), context.module, _shape(args), _shape(out)))
        return out

    with nn.intercept_methods(record):
        variables = abstract_variables(module, input_shape)
    paths = {path for path, *_ in calls}
    rows = []
    for path, mod, shape_in, shape_out in calls:
        if any(other[: len(path)] == path and other != path for other in paths):
            continue  # a container (a residual block, an Inception module): its leaves are listed
        def subtree(collection):
            node = variables.get(collection, {})
            for name in path:
                node = node.get(name, {}) if isinstance(node, dict) else {}
            return node
        rows.append(LayerRow("/".join(path), type(mod).__name__, shape_in, shape_out,
                             count_params(subtree("params")), count_params(subtree("batch_stats")), mod))
    return rows, variables, input_shape


def summary(
    model: str | nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    num_classes: int | None = None,
    print_fn: Callable[[str], Any] | None = print,
    **overrides,
) -> list[LayerRow]:
    """Print each leaf layer's output shape and parameter count, then the totals; return the rows.

    ``model`` is a registry name (``input_shape`` defaults to its native ``(1, size, size, channels)``)
    or a module with an explicit ``input_shape``. Pass ``print_fn=None`` to only get the rows.
    """
    rows, variables, input_shape = trace_layers(model, input_shape, num_classes=num_classes, **overrides)
    if print_fn is not None:
        name = model if isinstance(model, str) else type(model).__name__
        width = max([len(r.path) for r in rows] + [5]) + 2
        lines = [f"{name}: input {input_shape}", f"{'layer':<{width}}{'type':<20}{'output shape':<22}{'params':>14}"]
        for r in rows:
            lines.append(f"{r.path:<{width}}{r.kind:<20}{str(r.output_shape):<22}{r.params:>14,}")
        params, state = count_params(variables.get("params", {})), count_params(variables.get("batch_stats", {}))
        lines.append(f"total parameters: {params:,} ({params * 4 / 2**20:.1f} MiB in float32)")
        if state:
            lines.append(f"BatchNorm statistics (not trained): {state:,}")
        print_fn("\n".join(lines))
    return rows


def compiled_memory_bytes(compiled: jax.stages.Compiled) -> int | None:
    """The device memory a compiled program needs by XLA's own memory analysis: its arguments, outputs and
    temporaries, less the outputs that reuse donated arguments; ``None`` where the backend gives none."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """What `step_memory` found: bytes of a training step and of a prediction at ``batch`` images, by
    XLA's memory analysis and by a floor worked out from the shapes alone."""

    batch: int
    input_shape: tuple[int, ...]  # of one batch, NHWC
    train_bytes: int | None
    predict_bytes: int | None
    backend: str  # e.g. "cpu", "gpu (NVIDIA H100 80GB HBM3)"
    train_floor_bytes: int = 0
    predict_floor_bytes: int = 0

    @property
    def train_estimate(self) -> int:
        """The larger of XLA's figure and the floor: what a training step needs at least."""
        return max(self.train_bytes or 0, self.train_floor_bytes)

    @property
    def predict_estimate(self) -> int:
        """The larger of XLA's figure and the floor: what a prediction needs at least."""
        return max(self.predict_bytes or 0, self.predict_floor_bytes)

    def describe(self) -> str:
        """The figures as text, saying what they are."""
        def line(xla: int | None, floor: int) -> str:
            said = "not reported by this backend" if xla is None else f"{xla / 2**20:,.1f} MiB"
            if xla is not None and xla >= floor:
                return f"{said} (the shapes alone need {floor / 2**20:,.1f})"
            return f"at least {floor / 2**20:,.1f} MiB from the shapes (XLA's analysis: {said}, too low)"

        text = (f"memory at batch {self.batch}, input {self.input_shape}, compiled for this backend ({self.backend}):\n"
                f"  training step (SGD with momentum, state donated, as python -m train): "
                f"{line(self.train_bytes, self.train_floor_bytes)}\n"
                f"  prediction: {line(self.predict_bytes, self.predict_floor_bytes)}\n"
                f"  (XLA's analysis: arguments + outputs + temporaries - donated buffers; the shapes: the\n"
                f"  state (parameters, and in training gradients and momentum), the batch and the largest\n"
                f"  layer's input and output; nothing was allocated)")
        return text


def _bytes(tree: Any) -> int:
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree)
               if hasattr(leaf, "shape"))


def _largest_layer_bytes(module: nn.Module, variables: Any, images: Any, scale: Callable) -> int:
    """The most bytes one module call holds at once in a prediction, its inputs and outputs together."""
    largest = 0

    def record(next_fun, args, kwargs, context):
        nonlocal largest
        out = next_fun(*args, **kwargs)
        largest = max(largest, _bytes((args, kwargs)) + _bytes(out))
        return out

    def predict(variables, images):
        with nn.intercept_methods(record):
            return module.apply(variables, scale(images), train=False)

    jax.eval_shape(predict, variables, images)
    return largest


def step_memory(
    model: str | nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    batch: int,
    num_classes: int | None = None,
    **overrides,
) -> StepMemory:
    """XLA's estimate of the device memory a training step and a prediction need at ``batch`` images.

    Both programs are compiled from abstract shapes for JAX's default backend and never run. The training
    step is the trainer's, built from flax and optax alone: uint8 images scaled inside the step, forward
    in training mode with BatchNorm statistics updated, softmax cross-entropy (auxiliary heads included),
    gradients, SGD with momentum 0.9, and the old parameters, statistics and momentum donated to the new
    ones. The prediction is ``apply(variables, images, train=False)`` on uint8 images. ``model``,
    ``input_shape`` (its batch dimension is replaced by ``batch``), ``num_classes`` and ``overrides`` are
    as for `summary`. The trainer's own step (its metrics, per-example random keys) differs by well under
    a percent (tests/test_exercises.py compares it with `benchmarks.common.build_step`). A ``batch`` that
    leaves a BatchNorm layer one value per channel cannot train: `flaxnets.layers.BatchTooSmallError`.
    """
    import optax  # only this estimate needs an optimizer: `import flaxnets` does not import optax

    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}.")
    module, input_shape = _resolve(model, input_shape, num_classes, overrides)
    variables = abstract_variables(module, input_shape)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(0.1, momentum=0.9)  # the rate does not change the program's memory
    state = (params, batch_stats, jax.eval_shape(tx.init, params))
    images = jax.ShapeDtypeStruct((batch, *input_shape[1:]), jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    rng = jax.eval_shape(jax.random.key, 0)

    def scale(pixels: jnp.ndarray) -> jnp.ndarray:
        return pixels.astype(jnp.float32) / 255.0

    def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

    def train(state, images, labels, rng):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            logits, mutated = module.apply({"params": params, "batch_stats": batch_stats}, scale(images), train=True,
                                           mutable=["batch_stats", "aux_logits"], rngs={"dropout": rng})
            loss = cross_entropy(logits, labels)
            for head in jax.tree_util.tree_leaves(mutated.get("aux_logits", {})):  # their weight costs no memory
                loss = loss + cross_entropy(head, labels)
            return loss, mutated.get("batch_stats", batch_stats)

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    def predict(variables, images):
        return module.apply(variables, scale(images), train=False)

    # XLA's CPU analysis can leave convolution buffers out entirely (two 224x224 convolutions at batch 8
    # report no temporaries), so a floor from the shapes backs its figures: what any program must hold at
    # once. Training: parameters, gradients, momentum, statistics, the batch and the largest layer's input
    # and output. (What the backward pass keeps is more, but how much XLA's fusions and rematerialisation
    # leave of it is XLA's to say: JAX's residuals overstate it.)
    largest = _largest_layer_bytes(module, variables, images, scale)
    train_floor = 3 * _bytes(params) + _bytes(batch_stats) + _bytes((images, labels)) + largest
    predict_floor = _bytes((variables, images)) + largest

    trained = jax.jit(train, donate_argnums=0).lower(state, images, labels, rng).compile()
    predicted = jax.jit(predict).lower(variables, images).compile()
    device = jax.devices()[0]
    backend = device.platform if device.platform == "cpu" else f"{device.platform} ({device.device_kind})"
    return StepMemory(batch, images.shape, compiled_memory_bytes(trained), compiled_memory_bytes(predicted), backend,
                      train_floor, predict_floor)
