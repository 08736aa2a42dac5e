"""Names and layouts: every tensor of an architecture matched to its torchvision key, and converted both ways.

The per-family facts (module names, flattened dense layers, auxiliary heads, renamed keys) come from the
spec's `flaxnets.torch_layout.TorchLayout`, declared beside the family; this module holds only the rules
every family shares: the leaf names and the transposes of convolution and dense kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxnets.convert.files import as_numpy, unwrap
from flaxnets.registry import ModelSpec, create_model, get_spec, list_models

__all__ = ["StateDictMismatchError", "supported_models", "supported_spec", "torch_shapes", "from_torch", "to_torch",
           "convert_from_torch", "traced_layout"]


class StateDictMismatchError(ValueError):
    """A state_dict (or flax variables) that does not fit the architecture; the message names the first bad key."""


# (flax collection, flax leaf) -> torch suffix, in torch's order within a module.
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_SUFFIX_ORDER = ("weight", "bias", "running_mean", "running_var")
_COUNTER = "num_batches_tracked"


# ------------------------------------------------------------------------------------------------------
# Layout changes, each a pair (torch -> flax, flax -> torch).


def _conv_to_flax(w):
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _conv_to_torch(k):
    return k.transpose(3, 2, 0, 1)  # HWIO -> OIHW


def _identity(x):
    return x


def _flattened_dense(grid: tuple[int, int], channels: int) -> tuple[Callable, Callable]:
    """A Linear after torch's NCHW flatten as a flax Dense after an NHWC flatten: permute the input rows."""
    h, w = grid

    def to_flax(weight):  # (out, C*H*W) in (c, h, w) order -> (H*W*C, out) in (h, w, c) order
        out = weight.shape[0]
        return weight.reshape(out, channels, h, w).transpose(2, 3, 1, 0).reshape(h * w * channels, out)

    def to_torch(kernel):
        out = kernel.shape[1]
        return kernel.reshape(h, w, channels, out).transpose(3, 2, 0, 1).reshape(out, channels * h * w)

    return to_flax, to_torch


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor: its torch key and its flax place, shapes on both sides, and the layout change."""

    torch_key: str
    collection: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    to_flax: Callable = dataclasses.field(compare=False)
    to_torch: Callable = dataclasses.field(compare=False)

    @property
    def flax_name(self) -> str:
        return "/".join((self.collection, *self.path))


@dataclasses.dataclass(frozen=True)
class TracedLayout:
    """Every tensor of one architecture at one configuration, in network order, and the model it was traced from."""

    model: nn.Module
    entries: tuple[_Entry, ...]
    counters: tuple[str, ...]  # torch-only num_batches_tracked keys, one per BatchNorm


# ------------------------------------------------------------------------------------------------------
# The spec, looked up once by each public entry point and passed down.


def supported_models() -> list[str]:
    """The registered architectures torchvision also has: the ones `from_torch` and `to_torch` convert."""
    return [name for name in list_models() if _convertible(get_spec(name))]


def _convertible(spec: ModelSpec) -> bool:
    return bool(spec.torchvision) and spec.torch_layout is not None and spec.torch_layout.module_name is not None


def supported_spec(arch: str) -> ModelSpec:
    """The spec of ``arch``, which must have a torchvision counterpart (`ValueError` naming those that do)."""
    spec = get_spec(arch)  # an unknown name raises UnknownModelError, with suggestions
    if not _convertible(spec):
        raise ValueError(
            f"{arch} has no torchvision counterpart to convert from or to; "
            f"the architectures that do are {', '.join(supported_models())}."
        )
    return spec


# Traced layouts by (name, num_classes, overrides): tracing a model takes up to a second, and a conversion
# often traces the same one twice (the checkpoint's and the target's). A plain dict, since a ModelSpec is
# not hashable and so cannot key functools.lru_cache.
_TRACED: OrderedDict[tuple, TracedLayout] = OrderedDict()
_TRACED_MAX = 64


def traced_layout(spec: ModelSpec, num_classes: int | None = None, **overrides: Any) -> TracedLayout:
    """The tensors of ``create_model(spec.name, num_classes=..., **overrides)``, matched to torchvision's keys."""
    num_classes = spec.num_classes if num_classes is None else num_classes
    key = (spec.name, num_classes, tuple(sorted(overrides.items())))
    if key in _TRACED:
        _TRACED.move_to_end(key)
        return _TRACED[key]
    layout = _trace(spec, num_classes, overrides)
    _TRACED[key] = layout
    if len(_TRACED) > _TRACED_MAX:
        _TRACED.popitem(last=False)
    return layout


def _trace(spec: ModelSpec, num_classes: int, overrides: Mapping[str, Any]) -> TracedLayout:
    family = spec.torch_layout
    model = create_model(spec.name, num_classes=num_classes, **overrides)
    # Trace `init` without allocating anything, recording the order in which modules are entered: that
    # is the order of the network (and, but for GoogLeNet's auxiliary heads, of torchvision's state_dict).
    order: dict[tuple[str, ...], int] = {}

    def record(next_fun, args, kwargs, context):
        order.setdefault(tuple(context.module.path), len(order))
        return next_fun(*args, **kwargs)

    images = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(record):
        shapes = jax.eval_shape(functools.partial(model.init, train=False), rngs, images)

    leaves = [
        (collection, key, value.shape)
        for collection in ("params", "batch_stats")
        for key, value in flatten_dict(dict(shapes.get(collection, {}))).items()
    ]
    modules = sorted({key[:-1] for _, key, _ in leaves}, key=lambda path: order.get(path, len(order)))
    names = {module: family.module_name(model, module) for module in modules}

    entries = []
    for collection, key, shape in leaves:
        module, leaf = key[:-1], key[-1]
        to_flax, to_torch, torch_shape = _identity, _identity, shape
        if leaf == "kernel" and len(shape) == 4:
            to_flax, to_torch, torch_shape = _conv_to_flax, _conv_to_torch, (shape[3], shape[2], shape[0], shape[1])
        elif leaf == "kernel" and module in family.flattened:
            grid = family.flattened[module](model)
            to_flax, to_torch = _flattened_dense(grid, shape[0] // (grid[0] * grid[1]))
            torch_shape = shape[::-1]
        elif leaf == "kernel":
            to_flax, to_torch, torch_shape = np.transpose, np.transpose, shape[::-1]
        torch_key = f"{names[module]}.{_LEAVES[collection, leaf]}"
        entries.append(_Entry(torch_key, collection, key, tuple(shape), tuple(torch_shape), to_flax, to_torch))
    entries.sort(key=lambda e: (modules.index(e.path[:-1]), _SUFFIX_ORDER.index(e.torch_key.rsplit(".", 1)[1])))
    batch_norms = {e.path[:-1] for e in entries if e.collection == "batch_stats"}
    counters = tuple(f"{names[module]}.{_COUNTER}" for module in modules if module in batch_norms)
    return TracedLayout(model, tuple(entries), counters)


def torch_shapes(arch: str, *, num_classes: int | None = None, **overrides: Any) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the torchvision ``state_dict`` that fits ``create_model(arch, ...)``.

    Parameters and running statistics only; torchvision also stores a scalar ``num_batches_tracked`` per
    BatchNorm. Nothing is allocated.
    """
    layout = traced_layout(supported_spec(arch), num_classes, **overrides)
    return {e.torch_key: e.torch_shape for e in layout.entries}


# ------------------------------------------------------------------------------------------------------
# Checking: one sentence naming the first key that does not fit.


def _mismatch(subject: str, arch: str, expected: dict[str, tuple], given: dict[str, tuple], optional=()) -> None:
    """Raise `StateDictMismatchError` unless ``given`` has exactly the ``expected`` keys and shapes.

    The first problem in network order is named (a missing key or a wrong shape), else the first unexpected
    key in ``given``'s order; counts of each kind of problem follow.
    """
    missing = {k for k in expected if k not in given}
    wrong = {k for k in expected if k in given and tuple(given[k]) != tuple(expected[k])}
    unexpected = [k for k in given if k not in expected and k not in optional]
    if not (missing or wrong or unexpected):
        return
    first = next((k for k in expected if k in missing or k in wrong), None)
    if first is None:
        problem = f"key {unexpected[0]!r} is unexpected"
    elif first in missing:
        problem = f"key {first!r} is missing"
    else:
        problem = f"{first!r} has shape {tuple(given[first])} where {arch} has {tuple(expected[first])}"
    counts = f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} with the wrong shape"
    raise StateDictMismatchError(f"{subject} {arch}: {problem} ({counts}).")


# ------------------------------------------------------------------------------------------------------
# torch -> flax


def _current_names(spec: ModelSpec, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the keys of older torchvision releases under their current names."""
    for pattern, replacement in spec.torch_layout.renamed_keys:
        state_dict = {re.sub(pattern, replacement, key): value for key, value in state_dict.items()}
    return state_dict


def _fields_from_torch(spec: ModelSpec, keys: list[str]) -> dict[str, Any]:
    """Model fields a state_dict implies beyond num_classes: whether it holds the auxiliary heads."""
    heads = spec.torch_layout.aux_heads
    if heads:
        return {"aux_logits": any(key.startswith(tuple(f"{head}." for head in heads)) for key in keys)}
    return {}


def _head_torch_key(spec: ModelSpec) -> str:
    """The torch key of the class layer's weight, e.g. ``fc.weight``, whose rows are the classes."""
    head = spec.torch_layout.heads[0]
    return spec.torch_layout.module_name(create_model(spec.name, num_classes=1), head) + ".weight"


def from_torch(
    arch: str, state_dict: Mapping[str, Any], *, num_classes: int | None = None, **overrides: Any
) -> dict[str, Any]:
    """Convert a torchvision ``state_dict`` of ``arch`` to flax variables ``{"params", "batch_stats"}``.

    Args:
      arch: a name from `supported_models` (``"resnet50"``, ``"vgg16_bn"``...).
      state_dict: ``torchvision.models.<arch>().state_dict()`` or the same mapping loaded from a file
        (torch tensors or numpy arrays; see `load_state_dict`).
      num_classes: by default read from the class layer's weight.
      **overrides: model fields, as for `flaxnets.create_model`. For GoogLeNet and Inception v3,
        ``aux_logits`` defaults to whether the state_dict has the auxiliary heads.

    Returns:
      Variables (float32 jax arrays) for ``create_model(arch, num_classes=num_classes, **overrides)``.
      ``apply`` with them gives torchvision's logits on the same images in NHWC layout.

    Raises:
      StateDictMismatchError: a key is missing, unexpected or of the wrong shape (the first one is named).
    """
    return convert_from_torch(supported_spec(arch), state_dict, num_classes, overrides)


def convert_from_torch(spec: ModelSpec, state_dict: Mapping[str, Any], num_classes: int | None,
                       overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`from_torch` for a spec already looked up (and known to be supported)."""
    state_dict = _current_names(spec, unwrap(state_dict))
    if num_classes is None:
        head = state_dict.get(_head_torch_key(spec))
        # The first axis of torch's Linear and Conv2d weights alike: SqueezeNet's class layer is a convolution.
        num_classes = int(head.shape[0]) if head is not None and len(head.shape) in (2, 4) else None
    overrides = {**_fields_from_torch(spec, list(state_dict)), **overrides}
    layout = traced_layout(spec, num_classes, **overrides)
    expected = {e.torch_key: e.torch_shape for e in layout.entries}
    given = {key: tuple(np.shape(value)) for key, value in state_dict.items()}
    _mismatch("The state_dict does not fit", spec.name, expected, given, optional=layout.counters)
    flat = {}
    for entry in layout.entries:
        weight = as_numpy(state_dict[entry.torch_key]).astype(np.float32, copy=False)
        if not np.isfinite(weight).all():  # a diverged or damaged file: every output would be NaN
            bad = int(weight.size - np.isfinite(weight).sum())
            raise StateDictMismatchError(f"The state_dict's {entry.torch_key} holds {bad:,} value(s) that are not "
                                         "finite (NaN or infinite): these weights cannot be used.")
        # A copy: the result must not alias the torch tensors (torch updates running statistics in place).
        flat[(entry.collection, *entry.path)] = jnp.array(entry.to_flax(weight), copy=True)
    return unflatten_dict(flat)


# ------------------------------------------------------------------------------------------------------
# flax -> torch


def fields_from_flax(spec: ModelSpec, params: Mapping) -> dict[str, Any]:
    """Model fields flax params imply: ``num_classes`` (the class layer's width) and, for a family with
    auxiliary heads, ``aux_logits``."""
    fields = {}
    head = params
    for name in spec.torch_layout.heads[0]:
        head = head.get(name, {}) if isinstance(head, Mapping) else {}
    if isinstance(head, Mapping) and "kernel" in head:
        fields["num_classes"] = int(head["kernel"].shape[-1])
    if spec.torch_layout.aux_heads:
        fields["aux_logits"] = spec.torch_layout.aux_heads[0] in params
    return fields


def to_torch(arch: str, variables: Mapping[str, Any], *, return_numpy: bool = False, **overrides: Any) -> dict:
    """Convert flaxnets variables of ``arch`` to a torchvision ``state_dict``, the inverse of `from_torch`.

    ``variables`` are those of ``create_model(arch, ...)`` (``num_classes`` and GoogLeNet's or Inception v3's
    ``aux_logits`` are read from them; other collections than params and batch_stats are ignored). The result loads
    with ``torchvision.models.<arch>(num_classes=...).load_state_dict(sd)`` (strict) and holds torch
    tensors, or numpy arrays with ``return_numpy=True`` (no torch needed). BatchNorm's
    ``num_batches_tracked``, which flax does not keep, is 0. ``to_torch(from_torch(sd))`` equals ``sd`` exactly.

    Raises:
      StateDictMismatchError: the variables do not fit ``arch`` (the first bad flax path is named).
    """
    spec = supported_spec(arch)
    params = variables.get("params", {})
    layout = traced_layout(spec, **{**fields_from_flax(spec, params), **overrides})
    flat = {
        "/".join(key): value
        for collection in ("params", "batch_stats")
        for key, value in flatten_dict({collection: dict(variables.get(collection, {}))}).items()
    }
    _mismatch(
        "The variables do not fit",
        arch,
        {e.flax_name: e.shape for e in layout.entries},
        {name: tuple(np.shape(value)) for name, value in flat.items()},
    )
    state_dict = {}
    for entry in layout.entries:
        array = entry.to_torch(np.asarray(flat[entry.flax_name], dtype=np.float32))
        state_dict[entry.torch_key] = np.require(array, requirements=("C", "W"))  # torch wants writable memory
        if entry.torch_key.endswith(".running_var"):  # torch keeps the counter after the running variance
            state_dict[entry.torch_key.removesuffix("running_var") + _COUNTER] = np.zeros((), np.int64)
    if return_numpy:
        return state_dict
    import torch  # noqa: PLC0415 - torch is optional; only this path needs it

    return {key: torch.from_numpy(value) for key, value in state_dict.items()}
