"""Torchvision weights for fine-tuning: a checkpoint converted into a model with a new class count, the
class layers (heads) named, masked and initialised afresh, and the fields pretrained weights need.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxnets import hub
from flaxnets.analysis import abstract_variables
from flaxnets.convert.files import load_state_dict
from flaxnets.convert.tensors import (StateDictMismatchError, convert_from_torch, fields_from_flax, supported_spec,
                                      traced_layout)
from flaxnets.registry import ModelSpec, get_spec

__all__ = ["head_paths", "head_mask", "pretrained_overrides", "load_pretrained", "initialise", "input_kernel"]

PathLike = str | os.PathLike


def head_paths(arch: str) -> tuple[tuple[str, ...], ...]:
    """The param sub-trees of ``arch``'s class layers: those whose shapes follow ``num_classes``.

    ``("fc",)`` for ResNet, ``("fc3",)`` for AlexNet and VGG, GoogLeNet's ``fc`` and its auxiliary heads'
    ``fc2``. `load_pretrained` re-initialises them when the class count changes; a trainer that freezes the
    backbone trains these only (see `head_mask`). Defined for every registered architecture.
    """
    return get_spec(arch).torch_layout.heads


def _under(path: tuple[str, ...], prefixes: tuple[tuple[str, ...], ...]) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in prefixes)


def head_mask(arch: str, params: Mapping[str, Any]) -> Any:
    """A pytree like ``params`` with True at the head's leaves (`head_paths`) and False elsewhere, for
    ``optax.masked`` / ``optax.multi_transform`` to train the head alone."""
    heads = head_paths(arch)
    return unflatten_dict({key: _under(key, heads) for key in flatten_dict(dict(params))})


def pretrained_overrides(arch: str) -> dict[str, Any]:
    """Model fields under which torchvision's own ImageNet weights reproduce its pretrained model:
    ``{"transform_input": True}`` for GoogLeNet and Inception v3 (torchvision's builders set it whenever
    weights are given), nothing for the others. Use as
    ``create_model(arch, num_classes=..., **pretrained_overrides(arch))``."""
    return dict(get_spec(arch).torch_layout.pretrained_overrides)


def load_pretrained(
    arch: str,
    path: PathLike | Mapping[str, Any],
    num_classes: int | None = None,
    *,
    in_channels: int | None = None,
    rng: int | jax.Array = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Variables for ``create_model(arch, num_classes=num_classes, **overrides)`` from torchvision weights.

    ``flaxnets.load_pretrained("resnet50", "IMAGENET1K_V2")`` downloads torchvision's published file once
    (into ``~/.cache/flaxnets``; see `flaxnets.hub`), checks its hash and converts it. Build the model
    with ``**pretrained_overrides(arch)`` to reproduce torchvision's pretrained GoogLeNet and Inception v3.

    Args:
      arch: a name from `supported_models`.
      path: a published weight set of ``arch`` (``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``, ``"DEFAULT"``:
        `flaxnets.hub.list_weights`), a URL (``https://``, ``file://``; downloaded into the same cache), a
        ``.pth``/``.pt``/``.bin``/``.safetensors``/``.npz`` file (see `load_state_dict`) or a state_dict.
      num_classes: the classes of the new task; by default the checkpoint's. When it differs, the class
        layers (`head_paths`) are freshly initialised as ``create_model`` initialises them, for fine-tuning.
      in_channels: the channels of the new task's images (1 for MNIST-like data), by default the
        checkpoint's (3). The convolutions that read the images get kernels for that many channels
        (`input_kernel`), as timm's ``in_chans`` does: summed over the colours for one channel, so a grey
        image gives the response the colour network gives to its RGB copy.
      rng: seed or key for whatever is initialised afresh: a new head, and GoogLeNet's auxiliary heads
        when the checkpoint lacks them and the model has them.
      **overrides: model fields of the target model (e.g. ``aux_logits=False``; see `pretrained_overrides`).

    Raises:
      StateDictMismatchError: the checkpoint does not fit ``arch``.
      WeightsFileError: the weights cannot be found, downloaded or read (one sentence).
    """
    if in_channels is not None:
        if not isinstance(in_channels, numbers.Integral) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}.")
        in_channels = int(in_channels)
    state_dict = load_state_dict(hub.resolve(arch, path)) if isinstance(path, (str, os.PathLike)) else path
    spec = supported_spec(arch)
    weight_fields = {k: v for k, v in overrides.items() if k != "aux_logits"}
    converted = convert_from_torch(spec, state_dict, None, weight_fields)
    ckpt_classes = fields_from_flax(spec, converted["params"])["num_classes"]
    num_classes = ckpt_classes if num_classes is None else num_classes
    target = traced_layout(spec, num_classes, **overrides)

    # Reuse every tensor of the checkpoint the target has, but a head whose class count changed; initialise
    # that head, and sub-trees torchvision's checkpoints may lack (GoogLeNet's auxiliary heads), afresh.
    replaced = spec.torch_layout.heads if num_classes != ckpt_classes else ()
    have = flatten_dict(converted)
    names = [(e.collection, *e.path) for e in target.entries]
    fresh = [name for name in names if name not in have or _under(name[1:], replaced)]
    for name in fresh:
        if not _under(name[1:], replaced + spec.torch_layout.untrained):
            raise StateDictMismatchError(
                f"The state_dict does not fit {arch} with {overrides}: it has nothing for {'/'.join(name)}."
            )
    initial = initialise(target.model, spec, rng, fresh) if fresh else {}
    variables = unflatten_dict({name: initial[name] if name in initial else have[name] for name in names})
    if in_channels in (None, spec.in_channels):  # the layout was traced at the architecture's own channels
        return variables
    return _for_input_channels(variables, target.model, spec, in_channels)


def input_kernel(kernel: Any, channels: int) -> jax.Array:
    """A convolution kernel ``(kh, kw, c, out)`` made for ``c``-channel images, for ``channels``-channel ones.

    One channel: the sum over the ``c`` (the usual way to reuse ImageNet weights on grey images: a grey
    image then gets the response its colour copy had). More: the ``c`` input kernels repeated in turn up to
    ``channels`` and scaled by ``c / channels``, so that the response to ``channels`` copies of one image
    is unchanged where ``channels`` is a multiple of ``c`` (timm's ``adapt_input_conv`` does the same).
    """
    kernel = jnp.asarray(kernel)
    given = kernel.shape[2]
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeated = jnp.tile(kernel, (1, 1, -(-channels // given), 1))[:, :, :channels]
    return repeated * (given / channels)


def _for_input_channels(variables: dict, model: nn.Module, spec: ModelSpec, channels: int) -> dict:
    """``variables`` with the kernels that read ``channels``-channel images (those whose input width the
    image channels decide) made by `input_kernel`."""
    shapes = flatten_dict(dict(abstract_variables(model, (1, spec.input_size, spec.input_size, channels))["params"]))
    params = flatten_dict(dict(variables["params"]))
    for key, abstract in shapes.items():
        given, shape = params[key].shape, abstract.shape
        if len(shape) == 4 and given != shape and given[:2] + given[3:] == shape[:2] + shape[3:]:
            params[key] = input_kernel(params[key], shape[2])
    return {**variables, "params": unflatten_dict(params)}


def initialise(model: nn.Module, spec: ModelSpec, rng: int | jax.Array, names: list[tuple[str, ...]]) -> dict:
    """The leaves ``names`` of ``model.init`` (``rng`` a seed or a key), as ``create_model`` initialises them,
    at ``spec``'s input size.

    Jitted and returning only those leaves, so that XLA prunes the forward pass and every other initialiser:
    a new head of VGG-16 or ResNet-152 takes seconds, where a full eager ``init`` takes tens of them on a CPU.
    """
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    images = jnp.zeros((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)

    def selected(key):
        variables = model.init({"params": key, "dropout": key}, images, train=False)
        flat = flatten_dict({c: dict(variables[c]) for c in ("params", "batch_stats") if c in variables})
        return {name: flat[name] for name in names}

    return jax.jit(selected)(key)
