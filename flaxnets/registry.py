"""The explicit table of architectures: a name resolves to a constructor and its facts, nothing else.

Names are registered once (a second registration of a name is an error) and are only ever looked up
here, never through ``getattr`` on a module, so helpers and test doubles never pose as architectures.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import numbers
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from flaxnets import features
from flaxnets.layers import Ops
from flaxnets.torch_layout import TorchLayout

__all__ = ["ModelSpec", "UnknownModelError", "UnknownOptionError", "register", "get_spec", "list_models", "model_info",
           "create_model", "feature_info", "model_options", "parse_model_arg", "field_value"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of one architecture.

    Attributes:
      name: registry name, e.g. ``"resnet50"``.
      build: constructor taking ``num_classes``, ``dtype``, ``bn_axis_name`` and the model's own fields.
      family: ``"resnet"``, ``"vgg"``...
      paper: the publication the architecture comes from.
      input_size: the square input side the architecture was designed for.
      in_channels: channels of its usual input (1 for MNIST-like data, 3 for colour).
      num_classes: classes of the dataset it is usually trained on (1000 for ImageNet, 10 for CIFAR-10).
      torchvision: the matching ``torchvision.models`` builder, where one exists.
      params: torchvision's parameter count at 1000 classes, where torchvision has the model.
      gflops: torchvision's published GFLOPS (multiply-accumulates, in billions) at 224x224.
      top1: torchvision's published ImageNet top-1 of its first weights (IMAGENET1K_V1), not of a later set.
      description: one line for tables and ``--help``.
      reference_overrides: model fields under which ``params`` holds (e.g. GoogLeNet without its
        auxiliary heads, as torchvision counts its pretrained weights).
      min_input_size: the smallest square input side the default build accepts, as data (the tracing
        search of `flaxnets.input_size` finds it again in tests/test_models.py).
      min_train_input_size: the same in training mode (a batch of 2), where it is larger (Inception v3's
        auxiliary head); None where training takes what inference takes.
      default_params: parameters of the default build at ``num_classes`` classes, as data (checked by
        tests/test_models.py against `jax.eval_shape`), so tables print without tracing any model.
      aux_loss_weight: the weight of each auxiliary head's loss in training, for architectures that sow
        auxiliary logits (0 for the others).
      torch_layout: where its variables sit in torchvision's ``state_dict`` and which are its class layers,
        declared beside the family (`flaxnets.torch_layout`); every architecture flaxnets registers has one (a
        user's own factory, registered by the trainer, has none).
    """

    name: str
    build: Callable[..., nn.Module]
    family: str
    paper: str
    input_size: int
    in_channels: int = 3
    num_classes: int = 1000
    torchvision: str | None = None
    params: int | None = None
    gflops: float | None = None
    top1: float | None = None
    description: str = ""
    reference_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    min_input_size: int | None = None
    min_train_input_size: int | None = None
    default_params: int | None = None
    aux_loss_weight: float = 0.0
    torch_layout: TorchLayout | None = None

    @property
    def num_features(self) -> int | None:
        """Width of the pooled features the architecture returns with ``num_classes=0`` (its defaults)."""
        return self.build(num_classes=self.num_classes).num_features

    def info(self) -> dict[str, Any]:
        """The spec as a plain dict (without the constructor), for printing and JSON."""
        out = dataclasses.asdict(self)
        del out["build"], out["torch_layout"]
        out["num_features"] = self.num_features
        return out


class UnknownModelError(ValueError):
    """An architecture name the registry does not hold; the message suggests close names."""


class UnknownOptionError(ValueError):
    """A model option (`create_model` keyword) the architecture does not have; the message lists them."""


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry; a name can be registered only once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    """The spec registered as ``name``; an unknown name raises `UnknownModelError` with suggestions."""
    try:
        return _REGISTRY[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(str(name).lower(), list(_REGISTRY), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}.{hint} Known models: {', '.join(sorted(_REGISTRY))}."
    ) from None


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern`` (``"resnet*"``, ``"vgg*_bn"``), sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> dict[str, Any]:
    """Paper, default input size and channels, and torchvision's reference numbers for ``name``."""
    return get_spec(name).info()


def create_model(
    name: str,
    /,
    *,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    bn_axis_name: str | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build the architecture registered as ``name``.

    Args:
      name: a name from `list_models` (positional only, so ``name=`` reaches the module).
      num_classes: width of the returned logits, by default the architecture's own (1000 for the ImageNet
        models, 10 for the CIFAR and MNIST ones: `ModelSpec.num_classes`); 0 builds the model without its
        class layer, which returns its pooled features ``(N, module.num_features)`` instead (timm's convention).
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision).
      param_dtype: dtype of the parameters and BatchNorm statistics (raised to at least float32 for the
        statistics); ``jnp.float64`` under ``jax_enable_x64`` gives a float64 model end to end.
      bn_axis_name: the device axis over which BatchNorm averages its statistics under
        ``shard_map``/``pmap``; ``None`` under plain ``jit``. Models without BatchNorm accept and ignore it.
      features_only: build `flaxnets.features.FeatureNet` instead: the model without its class layer,
        returning the feature maps of its stages as a list (timm's ``features_only``); its
        ``feature_info`` names each map's channels and reduction.
      out_indices: with ``features_only``, which feature points to return (by default all of them;
        negative indices count from the last).
      **overrides: fields of the model's module (e.g. ``zero_init_residual=True``, ``aux_logits=False``,
        ``remat=True``, ``name="backbone"``). ``ops`` is the kernel set its convolutions, dense layers and max pooling are
        built from: `flaxnets.layers.PLAIN` (plain JAX, for every transformation and backend) unless the
        caller passes another, such as ``ops=flaxnets.cpu.ops()`` for XLA's CPU backend.

    Returns:
      An unbound ``flax.linen`` module; ``module.apply(variables, images_nhwc, train)`` gives logits of
      shape ``(N, num_classes)`` in ``promote_types(dtype, float32)``.
    """
    spec = get_spec(name)
    if features_only:
        return _feature_model(name, num_classes, dtype=dtype, param_dtype=param_dtype, bn_axis_name=bn_axis_name,
                              out_indices=out_indices, **overrides)
    if out_indices is not None:
        raise ValueError("out_indices chooses feature maps: it applies with features_only=True.")
    num_classes = spec.num_classes if num_classes is None else num_classes
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, (bool, np.bool_)) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer (0 for the model without its class "
                         f"layer), got {num_classes!r}.")
    num_classes = int(num_classes)  # labels.max() + 1 is a NumPy integer: a module field must be hashable and plain
    try:
        module = spec.build(num_classes=num_classes, dtype=dtype, param_dtype=param_dtype, bn_axis_name=bn_axis_name,
                            **overrides)
    except TypeError as err:
        fields = model_options(name)
        unknown = sorted(set(overrides) - set(fields) - {"parent"})  # parent: Flax's own, passed by feature models
        if not unknown:
            raise
        close = difflib.get_close_matches(unknown[0], fields, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownOptionError(
            f"{name} has no option {', '.join(map(repr, unknown))};{hint} its options are {', '.join(fields)}."
        ) from err
    if spec.family != "user":
        _check_values(name, module, overrides)
    return module


# Fields that are probabilities of dropping (a unit, a path), and so in [0, 1): 1 would drop everything.
_DROP_RATES = ("dropout", "drop_rate", "drop_path_rate", "aux_dropout")


def _check_values(name: str, module: nn.Module, given: dict[str, Any]) -> None:
    """A `ValueError` for an option given a value of the wrong kind: a flag that is not true or false, a
    drop rate outside [0, 1), a BatchNorm momentum outside [0, 1]. (The modules compare or multiply these
    while tracing, where a string or ``2.0`` would build a model that is silently wrong.)"""
    for field in dataclasses.fields(module):
        if field.name not in given:
            continue
        value = given[field.name]
        if field.type in (bool, "bool") and not isinstance(value, bool):
            raise ValueError(f"{name}'s option {field.name} is true or false, got {value!r}.")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if field.name in _DROP_RATES and not (number and 0 <= value < 1):
            raise ValueError(f"{name}'s option {field.name} is a probability of dropping, at least 0 and below 1, "
                             f"got {value!r}.")
        if field.name == "bn_momentum" and not (number and 0 <= value <= 1):
            raise ValueError(f"{name}'s option bn_momentum is between 0 and 1, got {value!r}.")
        if field.name == "ops" and not isinstance(value, Ops):
            raise ValueError(f"{name}'s option ops is a kernel set (flaxnets.layers.Ops), such as "
                             f"flaxnets.cpu.ops() or flaxnets.gpu.ops(), got {value!r}.")


def _feature_model(arch: str, /, num_classes: int | None, *, out_indices: Sequence[int] | None, **fields: Any
                   ) -> nn.Module:
    """`create_model`'s ``features_only=True``: a `FeatureNet` over the headless model."""
    if num_classes not in (None, 0):
        raise ValueError("features_only=True builds the model without its class layer: leave num_classes out.")
    module_name = fields.pop("name", None)
    # parent=None: built inside another module's compact method, the model is FeatureNet's, not that module's.
    backbone = create_model(arch, num_classes=0, parent=None, **fields)
    info = feature_info(arch, **{k: v for k, v in fields.items() if k not in ("dtype", "param_dtype", "bn_axis_name")})
    indices = features.resolve_indices(len(info), out_indices, arch)
    return features.FeatureNet(backbone, indices, tuple(info[i] for i in indices), name=module_name)


def feature_info(name: str, /, **options: Any) -> tuple[features.FeatureInfo, ...]:
    """The feature points of ``create_model(name, **options)`` in network order: each one's index, name,
    channels and reduction (traced at the architecture's own input size; nothing is computed)."""
    spec = get_spec(name)
    options = {key: value for key, value in options.items() if key not in ("features_only", "out_indices", "num_classes")}
    model = create_model(name, num_classes=0, **{**options, "parent": None})  # unbound, even inside a module
    info = features.feature_points(model, spec.input_size, spec.in_channels)
    if not info:
        raise ValueError(f"{name} marks no feature points.")
    return info


def model_options(name: str) -> list[str]:
    """The fields ``create_model(name, ...)`` accepts as keyword arguments (the module's dataclass fields)."""
    module = get_spec(name).build(num_classes=get_spec(name).num_classes)
    return sorted(f.name for f in dataclasses.fields(module) if f.init and f.name != "parent")


def parse_model_arg(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` (a command line's ``--model-arg``) as ``(key, value)``: VALUE read as JSON when it is
    JSON (``0.3``, ``true``, ``[64, 128]``, ``null``), else kept as a string (``relu``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not key.strip().isidentifier():
        raise ValueError(f"--model-arg takes KEY=VALUE with KEY a model option, e.g. dropout=0.3; got {text!r}.")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), field_value(parsed)


def field_value(value: Any) -> Any:
    """A JSON value as a module field: lists become tuples, at every depth (module fields must be hashable)."""
    return tuple(field_value(v) for v in value) if isinstance(value, list) else value
