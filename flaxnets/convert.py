"""Weights in and out: torchvision ``state_dict``s to flaxnets variables and back, with numerical parity.

Every architecture torchvision has (alexnet, vgg11..19 with and without BatchNorm, googlenet, inception_v3,
resnet18..152, resnext50_32x4d, resnext101_32x8d, wide_resnet50_2, wide_resnet101_2, densenet121..201) is
laid out in flaxnets with module names that mirror torchvision's ``state_dict`` keys, so a conversion is a
table of names plus four layout changes:

* convolution kernels: PyTorch ``(out, in, kh, kw)`` (OIHW) -> flax ``(kh, kw, in, out)`` (HWIO);
* dense kernels: ``torch.nn.Linear`` stores ``(out, in)`` and computes ``x @ W.T``; flax stores ``(in, out)``;
* the first dense layer of AlexNet, VGG and GoogLeNet's auxiliary heads: torchvision flattens ``(C, H, W)``
  feature maps, flaxnets ``(H, W, C)``; the rows of that layer are permuted, so the model stays NHWC;
* BatchNorm: ``weight``/``bias``/``running_mean``/``running_var`` -> params ``scale``/``bias`` and
  batch_stats ``mean``/``var``. ``num_batches_tracked`` is dropped on the way in (PyTorch only reads it when
  ``momentum=None``) and written as 0 on the way out.

Nothing else changes: `flaxnets.layers` pools, pads and normalises as PyTorch does (unbiased running
variance included), so converted weights give torchvision's outputs in both modes (tests/test_convert.py).

Two facts of torchvision's GoogLeNet and Inception v3 live outside their ``state_dict``. ``transform_input``
is a model field: torchvision's ImageNet weights were trained with it on (its ``googlenet()`` and
``inception_v3()`` builders set it whenever weights are given), so build with `pretrained_overrides`
(``transform_input=True``) to reproduce them. The auxiliary heads are in a checkpoint only if the torch
model had them; `from_torch` follows the checkpoint, and `load_pretrained` initialises GoogLeNet's afresh
when they are missing (torchvision's are untrained anyway: "the auxiliary heads in the pretrained googlenet
model are NOT pretrained", its builder warns). Inception v3's pretrained checkpoint has its trained head.

Files: ``.pth``/``.pt``/``.bin`` are read without torch (`flaxnets.pth`, which refuses any pickle that names
more than tensors) and written with it; ``.safetensors`` and ``.npz`` are read and written with numpy alone.
`load_pretrained` also takes the name of a published weight set (``"IMAGENET1K_V1"``) or a URL, downloaded
once into a cache and checked (`flaxnets.hub`). This module imports jax, flax and numpy only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxnets import hub
from flaxnets.models.vgg import layer_table
from flaxnets.pth import WeightsFileError, read_pth
from flaxnets.registry import create_model, get_spec, list_models

__all__ = [
    "StateDictMismatchError",
    "WeightsFileError",
    "from_torch",
    "to_torch",
    "load_pretrained",
    "load_state_dict",
    "save_state_dict",
    "head_paths",
    "head_mask",
    "pretrained_overrides",
    "supported_models",
    "torch_shapes",
]

PathLike = str | os.PathLike


class StateDictMismatchError(ValueError):
    """A state_dict (or flax variables) that does not fit the architecture; the message names the first bad key."""


# ------------------------------------------------------------------------------------------------------
# Names: flax module path -> torchvision module prefix, one rule per family.

# ResNet's projection shortcut is `downsample = Sequential(conv1x1, BatchNorm2d)` in torchvision.
_RENAMED_SEGMENTS = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def _dotted_names(model: nn.Module, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """ResNet and GoogLeNet: ``layer1_0/conv1`` -> ``layer1.0.conv1``, ``branch2_1/bn`` -> ``branch2.1.bn``."""
    def segment(name: str) -> str:
        return _RENAMED_SEGMENTS.get(name) or re.sub(r"_(\d+)$", r".\1", name)

    return {path: ".".join(map(segment, path)) for path in paths}


# torchvision's AlexNet: features = Conv(0) ReLU MaxPool Conv(3) ReLU MaxPool Conv(6) ReLU Conv(8) ReLU
# Conv(10) ReLU MaxPool; classifier = Dropout Linear(1) ReLU Dropout Linear(4) ReLU Linear(6).
_ALEXNET_NAMES = {
    "conv1": "features.0",
    "conv2": "features.3",
    "conv3": "features.6",
    "conv4": "features.8",
    "conv5": "features.10",
    "fc1": "classifier.1",
    "fc2": "classifier.4",
    "fc3": "classifier.6",
}


def _alexnet_names(model: nn.Module, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    return {path: _ALEXNET_NAMES[path[0]] for path in paths}


def _vgg_names(model: nn.Module, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """torchvision's ``make_layers``: ``features`` holds Conv, [BatchNorm], ReLU per number and MaxPool per "M";
    ``classifier`` is (Linear, ReLU, Dropout) per hidden layer, then the class layer."""
    table, index, conv = {}, 0, 0
    for layer in layer_table(model.config):
        if layer == "M":
            index += 1
            continue
        conv += 1
        table[f"conv{conv}"] = f"features.{index}"
        if model.batch_norm:
            table[f"bn{conv}"] = f"features.{index + 1}"
        index += 3 if model.batch_norm else 2
    for layer in range(len(model.hidden) + 1):
        table[f"fc{layer + 1}"] = f"classifier.{3 * layer}"
    return {path: table[path[0]] for path in paths}


def _same_names(model: nn.Module, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """Inception v3: the flax modules carry torchvision's names (``Mixed_6e/branch7x7_2/conv``)."""
    return {path: ".".join(path) for path in paths}


def _densenet_names(model: nn.Module, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """torchvision's DenseNet keeps all but its class layer in one ``features`` Sequential."""
    return {path: ".".join(path if path[0] == "classifier" else ("features", *path)) for path in paths}


_NAMES: dict[str, Callable[[nn.Module, list], dict]] = {
    "alexnet": _alexnet_names,
    "vgg": _vgg_names,
    "googlenet": _dotted_names,
    "inception": _same_names,
    "resnet": _dotted_names,
    "densenet": _densenet_names,
}

# Dense layers that follow a flatten of (C, H, W) maps in torchvision, and the (H, W) grid they flatten:
# AlexNet's avgpool pools to 6x6, VGG's to `pool_size` (7x7), GoogLeNet's auxiliary heads to 4x4.
_FLATTENED: dict[str, dict[tuple[str, ...], Callable[[nn.Module], tuple[int, int]]]] = {
    "alexnet": {("fc1",): lambda model: (6, 6)},
    "vgg": {("fc1",): lambda model: tuple(model.pool_size)},
    "googlenet": {("aux1", "fc1"): lambda model: (4, 4), ("aux2", "fc1"): lambda model: (4, 4)},
}

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

# The class layers of each family: the params whose shapes follow num_classes (tests check this table).
_HEADS: dict[str, tuple[tuple[str, ...], ...]] = {
    "alexnet": (("fc3",),),
    "vgg": (("fc3",),),
    "googlenet": (("fc",), ("aux1", "fc2"), ("aux2", "fc2")),
    "inception": (("fc",), ("AuxLogits", "fc")),
    "resnet": (("fc",),),
    "densenet": (("classifier",),),
    "lenet": (("fc3",),),
    "nin": (("block4",),),  # every layer of NiN's last mlpconv block has num_classes channels
}

# Sub-trees a checkpoint may lack that `load_pretrained` then initialises afresh (see the module docstring).
_UNTRAINED: dict[str, tuple[tuple[str, ...], ...]] = {"googlenet": (("aux1",), ("aux2",))}

# The auxiliary heads of each family that has them (the model field ``aux_logits`` says whether they exist).
_AUX_HEADS: dict[str, tuple[str, ...]] = {"googlenet": ("aux1", "aux2"), "inception": ("AuxLogits",)}

# Model fields under which torchvision's own ImageNet weights reproduce torchvision's pretrained model.
_PRETRAINED_OVERRIDES: dict[str, dict[str, Any]] = {"googlenet": {"transform_input": True},
                                                    "inception_v3": {"transform_input": True}}


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
class _Layout:
    """Every tensor of one architecture at one configuration, in network order."""

    arch: str
    model: nn.Module
    entries: tuple[_Entry, ...]
    counters: tuple[str, ...]  # torch-only num_batches_tracked keys, one per BatchNorm


def supported_models() -> list[str]:
    """The registered architectures torchvision also has: the ones `from_torch` and `to_torch` convert."""
    return [name for name in list_models() if get_spec(name).torchvision]


def _check_supported(arch: str) -> str:
    family = get_spec(arch).family  # an unknown name raises UnknownModelError, with suggestions
    if arch not in supported_models() or family not in _NAMES:
        raise ValueError(
            f"{arch} has no torchvision counterpart to convert from or to; "
            f"the architectures that do are {', '.join(supported_models())}."
        )
    return family


def _layout(arch: str, num_classes: int | None = None, **overrides: Any) -> _Layout:
    spec = get_spec(arch)
    num_classes = spec.num_classes if num_classes is None else num_classes
    return _cached_layout(arch, num_classes, tuple(sorted(overrides.items())))


@functools.lru_cache(maxsize=64)
def _cached_layout(arch: str, num_classes: int, overrides: tuple) -> _Layout:
    family = _check_supported(arch)
    spec = get_spec(arch)
    model = create_model(arch, num_classes=num_classes, **dict(overrides))
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
    names = _NAMES[family](model, modules)
    flattened = _FLATTENED.get(family, {})

    entries = []
    for collection, key, shape in leaves:
        module, leaf = key[:-1], key[-1]
        to_flax, to_torch, torch_shape = _identity, _identity, shape
        if leaf == "kernel" and len(shape) == 4:
            to_flax, to_torch, torch_shape = _conv_to_flax, _conv_to_torch, (shape[3], shape[2], shape[0], shape[1])
        elif leaf == "kernel" and module in flattened:
            grid = flattened[module](model)
            to_flax, to_torch = _flattened_dense(grid, shape[0] // (grid[0] * grid[1]))
            torch_shape = shape[::-1]
        elif leaf == "kernel":
            to_flax, to_torch, torch_shape = np.transpose, np.transpose, shape[::-1]
        torch_key = f"{names[module]}.{_LEAVES[collection, leaf]}"
        entries.append(_Entry(torch_key, collection, key, tuple(shape), tuple(torch_shape), to_flax, to_torch))
    entries.sort(key=lambda e: (modules.index(e.path[:-1]), _SUFFIX_ORDER.index(e.torch_key.rsplit(".", 1)[1])))
    batch_norms = {e.path[:-1] for e in entries if e.collection == "batch_stats"}
    counters = tuple(f"{names[module]}.{_COUNTER}" for module in modules if module in batch_norms)
    return _Layout(arch, model, tuple(entries), counters)


def torch_shapes(arch: str, *, num_classes: int | None = None, **overrides: Any) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the torchvision ``state_dict`` that fits ``create_model(arch, ...)``.

    Parameters and running statistics only; torchvision also stores a scalar ``num_batches_tracked`` per
    BatchNorm. Nothing is allocated.
    """
    return {e.torch_key: e.torch_shape for e in _layout(arch, num_classes, **overrides).entries}


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


def _as_numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device or dtype) or array-like as a numpy array, without importing torch."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
            return value.numpy()
        return value.float().numpy()  # numpy has no bfloat16; float16 is promoted the same way
    return np.asarray(value)


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The tensors of a state_dict, also when saved as ``{"model": ...}`` or ``{"state_dict": ...}`` (the
    torchvision reference scripts' checkpoints) or from ``nn.DataParallel`` (keys prefixed ``module.``)."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), Mapping):
            state_dict = state_dict[wrapper]
            break
    state_dict = dict(state_dict)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


# torchvision's published DenseNet files were saved when a dense layer's ``norm1`` was called ``norm.1``
# (PyTorch has since forbidden dots in module names); torchvision renames these keys when it loads the
# files, and so does `from_torch`: ``...denselayer1.norm.1.weight`` -> ``...denselayer1.norm1.weight``.
_OLD_DENSE_LAYER = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")


def _current_names(arch: str, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the keys of older torchvision releases under their current names."""
    if get_spec(arch).family != "densenet":
        return state_dict
    return {_OLD_DENSE_LAYER.sub(r"\1\2", key): value for key, value in state_dict.items()}


def _fields_from_torch(arch: str, keys: list[str]) -> dict[str, Any]:
    """Model fields a state_dict implies beyond num_classes: whether GoogLeNet or Inception v3 has auxiliary heads."""
    heads = _AUX_HEADS.get(get_spec(arch).family)
    if heads:
        return {"aux_logits": any(key.startswith(tuple(f"{head}." for head in heads)) for key in keys)}
    return {}


def _head_torch_key(arch: str) -> str:
    """The torch key of the class layer's weight, e.g. ``fc.weight``, whose rows are the classes."""
    family, head = get_spec(arch).family, _HEADS[get_spec(arch).family][0]
    return _NAMES[family](create_model(arch, num_classes=1), [head])[head] + ".weight"


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
    _check_supported(arch)
    state_dict = _current_names(arch, _unwrap(state_dict))
    if num_classes is None:
        head = state_dict.get(_head_torch_key(arch))
        num_classes = int(head.shape[0]) if head is not None and len(head.shape) == 2 else None
    overrides = {**_fields_from_torch(arch, list(state_dict)), **overrides}
    layout = _layout(arch, num_classes, **overrides)
    expected = {e.torch_key: e.torch_shape for e in layout.entries}
    given = {key: tuple(np.shape(value)) for key, value in state_dict.items()}
    _mismatch("The state_dict does not fit", arch, expected, given, optional=layout.counters)
    flat = {}
    for entry in layout.entries:
        weight = _as_numpy(state_dict[entry.torch_key]).astype(np.float32, copy=False)
        # A copy: the result must not alias the torch tensors (torch updates running statistics in place).
        flat[(entry.collection, *entry.path)] = jnp.array(entry.to_flax(weight), copy=True)
    return unflatten_dict(flat)


# ------------------------------------------------------------------------------------------------------
# flax -> torch


def _fields_from_flax(arch: str, params: Mapping) -> dict[str, Any]:
    family = get_spec(arch).family
    fields = {}
    head = params
    for name in _HEADS[family][0]:
        head = head.get(name, {}) if isinstance(head, Mapping) else {}
    if isinstance(head, Mapping) and "kernel" in head:
        fields["num_classes"] = int(head["kernel"].shape[-1])
    if family in _AUX_HEADS:
        fields["aux_logits"] = _AUX_HEADS[family][0] in params
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
    params = variables.get("params", {})
    layout = _layout(arch, **{**_fields_from_flax(arch, params), **overrides})
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


# ------------------------------------------------------------------------------------------------------
# Files


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # else NumPy would say it holds "pickled data", which is wrong
        raise WeightsFileError(f"{path} is not an .npz archive (a zip of NumPy arrays).")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as error:
        raise WeightsFileError(f"{path} is a damaged .npz archive ({error}).") from None


# The safetensors format (github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header
# length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
# then the raw little-endian data, offsets counted from the end of the header.
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_SAFETENSORS_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    size = int(data[:8].view("<u8")[0]) if data.size >= 8 else -1
    if not 0 < size <= data.size - 8:
        raise WeightsFileError(f"{path} is not a safetensors file (its header length does not fit its size).")
    try:
        header = json.loads(bytes(data[8 : 8 + size]))
        header.pop("__metadata__", None)
        start = 8 + size
        arrays = {}
        for name, info in header.items():
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise WeightsFileError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which flaxnets does not "
                                       "read.")
            begin, end = info["data_offsets"]
            if not 0 <= begin <= end <= data.size - start:
                raise WeightsFileError(f"{path} is truncated: tensor {name!r} lies beyond its end.")
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            arrays[name] = np.array(data[start + begin : start + end].view(dtype).reshape(info["shape"]))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, WeightsFileError):
            raise
        raise WeightsFileError(f"{path} is not a safetensors file (its header is not the format's JSON).") from None
    return arrays


def _write_safetensors(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
    arrays = {name: a.astype(a.dtype.newbyteorder("<"), order="C", copy=False) for name, a in state_dict.items()}
    header, offset = {}, 0
    for name, array in arrays.items():
        if array.dtype not in _SAFETENSORS_CODES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors does not store.")
        header[name] = {
            "dtype": _SAFETENSORS_CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the reference writer pads the header to 8 bytes with spaces
    with open(path, "wb") as file:
        file.write(len(text).to_bytes(8, "little"))
        file.write(text)
        for array in arrays.values():
            file.write(array.tobytes())


def _write_npz(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
    with open(path, "wb") as file:  # np.savez would append ".npz" to other names
        np.savez(file, **state_dict)


def _write_torch(state_dict: Mapping[str, np.ndarray], path: Path) -> None:
    import torch  # noqa: PLC0415

    torch.save({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()}, path)


_READERS = {".pth": read_pth, ".pt": read_pth, ".bin": read_pth, ".safetensors": _read_safetensors,
            ".npz": _read_npz}
_WRITERS = {".pth": _write_torch, ".pt": _write_torch, ".bin": _write_torch, ".safetensors": _write_safetensors,
            ".npz": _write_npz}


def _suffix(path: Path, table: dict) -> str:
    if path.suffix not in table:
        raise WeightsFileError(f"{path} has none of the suffixes flaxnets reads and writes ({', '.join(table)}).")
    return path.suffix


def load_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """Read a state_dict as numpy arrays, by suffix: ``.pth``/``.pt``/``.bin`` (``torch.save``'s zip or legacy
    format, read without torch by `flaxnets.pth.read_pth`), ``.safetensors`` or ``.npz``.

    A checkpoint that wraps the state_dict (``{"model": state_dict, ...}``, as torchvision's reference
    scripts save it, or ``{"state_dict": ...}``) and ``module.`` prefixes (``nn.DataParallel``) are unwrapped.
    A pickle naming anything but tensors, storages and OrderedDict is refused (a checkpoint that also holds
    ``argparse`` arguments, say): load such a file yourself with ``torch.load`` and pass its state_dict.
    """
    path = Path(path)
    reader = _READERS[_suffix(path, _READERS)]
    if not path.is_file():
        raise WeightsFileError(f"{path} is not a file.")
    loaded = reader(path)
    if not isinstance(loaded, Mapping):
        raise WeightsFileError(f"{path} holds a {type(loaded).__name__}, not a state_dict (names to tensors).")
    state_dict = {}
    for key, value in _unwrap(loaded).items():
        array = _as_numpy(value)
        # Weights are real numbers (bfloat16 included): text, objects or complex numbers would fail (or lose a
        # part) in conversion.
        real = array.dtype == np.bool_ or jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype,
                                                                                                     jnp.integer)
        if not isinstance(key, str) or not real:
            raise WeightsFileError(f"{path}: tensor {key!r} holds {array.dtype} values, not real numbers.")
        state_dict[key] = array
    return state_dict


def save_state_dict(state_dict: Mapping[str, Any], path: PathLike) -> None:
    """Write a state_dict (torch tensors or arrays, e.g. from `to_torch`) by suffix: ``.pth``/``.pt``/``.bin``
    (needs torch), ``.safetensors`` or ``.npz`` (numpy only)."""
    path = Path(path)
    writer = _WRITERS[_suffix(path, _WRITERS)]
    writer({key: _as_numpy(value) for key, value in state_dict.items()}, path)


# ------------------------------------------------------------------------------------------------------
# Fine-tuning


def head_paths(arch: str) -> tuple[tuple[str, ...], ...]:
    """The param sub-trees of ``arch``'s class layers: those whose shapes follow ``num_classes``.

    ``("fc",)`` for ResNet, ``("fc3",)`` for AlexNet and VGG, GoogLeNet's ``fc`` and its auxiliary heads'
    ``fc2``. `load_pretrained` re-initialises them when the class count changes; a trainer that freezes the
    backbone trains these only (see `head_mask`). Defined for every registered architecture.
    """
    return _HEADS[get_spec(arch).family]


def _under(path: tuple[str, ...], prefixes: tuple[tuple[str, ...], ...]) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in prefixes)


def head_mask(arch: str, params: Mapping[str, Any]) -> Any:
    """A pytree like ``params`` with True at the head's leaves (`head_paths`) and False elsewhere, for
    ``optax.masked`` / ``optax.multi_transform`` to train the head alone."""
    flat = flatten_dict(dict(params))
    return unflatten_dict({key: _under(key, head_paths(arch)) for key in flat})


def pretrained_overrides(arch: str) -> dict[str, Any]:
    """Model fields under which torchvision's own ImageNet weights reproduce its pretrained model:
    ``{"transform_input": True}`` for GoogLeNet and Inception v3 (torchvision's builders set it whenever
    weights are given), nothing for the others. Use as
    ``create_model(arch, num_classes=..., **pretrained_overrides(arch))``."""
    return dict(_PRETRAINED_OVERRIDES.get(arch, {}))


def load_pretrained(
    arch: str,
    path: PathLike | Mapping[str, Any],
    num_classes: int | None = None,
    *,
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
      rng: seed or key for whatever is initialised afresh: a new head, and GoogLeNet's auxiliary heads
        when the checkpoint lacks them and the model has them.
      **overrides: model fields of the target model (e.g. ``aux_logits=False``; see `pretrained_overrides`).

    Raises:
      StateDictMismatchError: the checkpoint does not fit ``arch``.
      WeightsFileError: the weights cannot be found, downloaded or read (one sentence).
    """
    state_dict = load_state_dict(hub.resolve(arch, path)) if isinstance(path, (str, os.PathLike)) else path
    weight_fields = {k: v for k, v in overrides.items() if k != "aux_logits"}
    converted = from_torch(arch, state_dict, **weight_fields)
    ckpt_classes = _fields_from_flax(arch, converted["params"])["num_classes"]
    num_classes = ckpt_classes if num_classes is None else num_classes
    target = _layout(arch, num_classes, **overrides)

    # Reuse every tensor of the checkpoint the target has, but a head whose class count changed; initialise
    # that head, and sub-trees torchvision's checkpoints may lack (GoogLeNet's auxiliary heads), afresh.
    family = get_spec(arch).family
    replaced = head_paths(arch) if num_classes != ckpt_classes else ()
    have = flatten_dict(converted)
    names = [(e.collection, *e.path) for e in target.entries]
    fresh = [name for name in names if name not in have or _under(name[1:], replaced)]
    for name in fresh:
        if not _under(name[1:], replaced + _UNTRAINED.get(family, ())):
            raise StateDictMismatchError(
                f"The state_dict does not fit {arch} with {overrides}: it has nothing for {'/'.join(name)}."
            )
    initial = _initialise(target.model, arch, rng, fresh) if fresh else {}
    return unflatten_dict({name: initial[name] if name in initial else have[name] for name in names})


def _initialise(model: nn.Module, arch: str, rng: int | jax.Array, names: list[tuple[str, ...]]) -> dict:
    """The leaves ``names`` of ``model.init`` (``rng`` a seed or a key), as ``create_model`` initialises them.

    Jitted and returning only those leaves, so that XLA prunes the forward pass and every other initialiser:
    a new head of VGG-16 or ResNet-152 takes seconds, where a full eager ``init`` takes tens of them on a CPU.
    """
    spec = get_spec(arch)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    images = jnp.zeros((1, spec.input_size, spec.input_size, spec.in_channels), jnp.float32)

    def selected(key):
        variables = model.init({"params": key, "dropout": key}, images, train=False)
        flat = flatten_dict({c: dict(variables[c]) for c in ("params", "batch_stats") if c in variables})
        return {name: flat[name] for name in names}

    return jax.jit(selected)(key)
