"""Every flaxnets architecture as a Flax NNX module: ``flaxnets.nnx.create_model(name, rngs=nnx.Rngs(0))``.

`Model` holds one linen architecture and its variables as NNX state: parameters as `nnx.Param`, BatchNorm
statistics as `nnx.BatchStat`, under the linen names (``model.params["layer1_0"]["conv1"]["kernel"]``).
Calling it runs the linen module's ``apply``, so it computes exactly what the linen model computes for
the same weights, and every weight the linen models load (torchvision's, converted; `save_pretrained`
folders) loads into it. Mode is NNX's: ``model.train()`` and ``model.eval()`` (or `nnx.view`) set
``use_running_average`` and ``deterministic``, which are one ``train`` flag for these models; a new model
is in training mode, as NNX's own layers are. ``nnx.jit``, ``nnx.grad``, ``nnx.value_and_grad``,
``nnx.vmap`` (an ensemble of seeds: `create_model` under ``nnx.split_rngs`` and ``nnx.vmap``) and
``nnx.remat`` work on it.

Why a bridge and not a second, native NNX copy of each family: both were measured on the same ResNet-18
train step (``python -m benchmarks.nnx``; benchmarks/RESULTS.md, "Flax NNX: bridge or native"). Steps ran
equally fast within the spread of a shared machine; compiling took the bridge 1.4-2.4x as long as the
native copy (22.5 against 14.4 s), a one-time cost. A native copy would duplicate every architecture,
about 2,000 lines, and the torchvision conversion tables keyed to the linen names, and two copies can
drift apart; the bridge is this one class and computes exactly what the linen models compute.
`flax.nnx.bridge.ToNNX` does the same job in general, but it keeps every mutable collection a call returns
in the module's state, where GoogLeNet's and Inception v3's auxiliary logits piled up (a new state shape,
so a new compilation, on every training step). Here they never enter the state: `Model.forward_aux`
returns them.

Needs only flax (``flax.nnx`` ships with it): no extra to install.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from flaxnets import features
from flaxnets.convert import pretrained_overrides
from flaxnets.models.googlenet import collect_aux_logits
from flaxnets.pretrained import from_pretrained as linen_from_pretrained
from flaxnets.pretrained import read_config, save_pretrained
from flaxnets.registry import create_model as create_linen_model
from flaxnets.registry import get_spec

__all__ = ["Model", "create_model", "from_pretrained"]

_STATE = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


def _is_variable(leaf: Any) -> bool:
    return isinstance(leaf, nnx.Variable)


class Model(nnx.Module):
    """A flaxnets linen architecture ``module`` with its ``variables`` as NNX state.

    Args:
      module: a module from `flaxnets.create_model` (any of its options, ``features_only`` included).
      variables: its ``params`` and ``batch_stats`` (other collections are not kept).
      rngs: where dropout's keys come from in training mode (the ``dropout`` stream, else ``default``);
        None for a model that is only evaluated, or has no dropout.
      arch: the registry name, with ``options`` the `create_model` keywords and ``input_shape`` the
        ``(H, W, C)`` of its images (None: the architecture's own), for `save_pretrained`.

    ``model(images)`` returns what ``module.apply(variables, images, train)`` returns, ``train`` being the
    NNX mode; in training mode the BatchNorm statistics are updated in place.
    """

    def __init__(self, module: nn.Module, variables: Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                 arch: str | None = None, options: Mapping[str, Any] | None = None,
                 input_shape: tuple[int, int, int] | None = None):
        self.module = module
        self.arch = arch
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.options = tuple(sorted((options or {}).items()))  # static, so hashable
        for collection, kind in _STATE.items():
            setattr(self, collection, nnx.data(jax.tree.map(kind, dict(variables.get(collection, {})))))
        # Dropout's stream, else the default one; an Rngs of parameters alone gives a model with no dropout keys
        # (dropout in training mode then says it needs them).
        has_stream = rngs is not None and ("dropout" in rngs or "default" in rngs)
        self.rngs = rngs["dropout"].fork() if has_stream else nnx.data(None)
        self.use_running_average = False
        self.deterministic = False

    def set_view(self, deterministic: bool | None = None, use_running_average: bool | None = None) -> None:
        """How `nnx.view` sets the mode (``nnx.view(model, deterministic=True, use_running_average=True)``, or
        on a module holding this one): dropout's and BatchNorm's flags, which must end up alike."""
        if deterministic is not None:
            self.deterministic = deterministic
        if use_running_average is not None:
            self.use_running_average = use_running_average

    @property
    def training(self) -> bool:
        """Whether the model runs in training mode (`nnx.Module.train`) or evaluation mode (`eval`)."""
        if self.use_running_average != self.deterministic:
            raise ValueError("flaxnets models take one train flag for BatchNorm and dropout together: set "
                             "use_running_average and deterministic alike (model.train() or model.eval()).")
        return not self.use_running_average

    @property
    def variables(self) -> dict[str, Any]:
        """The linen variables (``params``, ``batch_stats``) as plain arrays, e.g. for `flaxnets.export`."""
        return {collection: jax.tree.map(lambda v: v.get_value(), getattr(self, collection), is_leaf=_is_variable)
                for collection in _STATE}

    def _apply(self, x: jnp.ndarray, collections: tuple[str, ...] = (), method: Any = None, **kwargs: Any) -> Any:
        train = self.training
        mutable = (["batch_stats"] if train else []) + list(collections)
        rngs = {"dropout": self.rngs()} if train and self.rngs is not None else {}
        out = (method or nn.Module.apply)(self.module, self.variables, x, train, mutable=mutable or False, rngs=rngs,
                                          **kwargs)
        if not mutable:
            return out, {}
        out, updates = out
        if "batch_stats" in updates:
            jax.tree.map(lambda var, new: var.set_value(new), self.batch_stats, dict(updates["batch_stats"]),
                         is_leaf=_is_variable)
        return out, updates

    def __call__(self, x: jnp.ndarray) -> Any:
        return self._apply(x)[0]

    def forward_aux(self, x: jnp.ndarray) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
        """``(logits, auxiliary logits)``: GoogLeNet's two heads or Inception v3's one in training mode (an
        empty list otherwise, and for every other architecture). Nothing of them is kept in the state."""
        logits, updates = self._apply(x, ("aux_logits",))
        return logits, collect_aux_logits(updates)

    def forward_intermediates(self, x: jnp.ndarray, indices: Any = None) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
        """``(logits, feature maps)`` of one call (`flaxnets.features.forward_intermediates`)."""
        def method(module, variables, x, train, **kwargs):
            return features.forward_intermediates(module, variables, x, train, indices=indices, **kwargs)

        return self._apply(x, method=method)[0]

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Any:
        """`flaxnets.save_pretrained` of this model's architecture, options and current variables."""
        if self.arch is None:
            raise ValueError("this model was built from a module, not by flaxnets.nnx.create_model: use "
                             "flaxnets.save_pretrained(directory, arch, model.variables, **options).")
        return save_pretrained(directory, self.arch, self.variables, input_shape=self.input_shape, overwrite=overwrite,
                               **dict(self.options))


def _initial_variables(module: nn.Module, key: jax.Array, shape: tuple[int, ...]) -> dict:
    # Jitted: an eager init of VGG or ResNet-152 takes tens of seconds on a CPU, XLA's compiled one seconds.
    images = jnp.zeros(shape, jnp.float32)
    variables = jax.jit(functools.partial(module.init, train=False))({"params": key, "dropout": key}, images)
    return {collection: variables[collection] for collection in _STATE if collection in variables}


def create_model(name: str, /, *, rngs: nnx.Rngs | None = None, pretrained: Any = None,
                 input_shape: tuple[int, ...] | None = None, **options: Any) -> Model:
    """The architecture ``name`` as an NNX `Model`.

    Args:
      name: a registered architecture (`flaxnets.list_models`).
      rngs: the parameters' initialisation (``params`` stream, else ``default``) and dropout's keys.
        Defaults to ``nnx.Rngs(0)``.
      pretrained: weights instead of an initialisation: ``True`` (torchvision's best) or a published set's
        name (``"IMAGENET1K_V1"``), or a file, URL or state_dict of torchvision weights; see `from_pretrained`.
      input_shape: the ``(H, W, C)`` of one image the variables are made for, as `save_pretrained` and
        `flaxnets.export.export` take it (a leading batch axis, ``(N, H, W, C)``, is accepted and ignored); by
        default the architecture's own. Only VGG without its adaptive pool (``pool_size=None``) has
        variables that depend on it; with ``pretrained``, ``C`` other than 3 adapts the weights' first
        convolution, as ``in_channels`` does.
      **options: `flaxnets.create_model` keywords (``num_classes``, ``dtype``, ``remat``, ``features_only``...).
    """
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if input_shape is not None:
        if len(input_shape) not in (3, 4):
            raise ValueError(f"input_shape is one image's (H, W, C), or (N, H, W, C); got {tuple(input_shape)!r}.")
        input_shape = tuple(input_shape[-3:])
    if pretrained is not None and pretrained is not False:
        if input_shape is None:
            return from_pretrained(name, None if pretrained is True else pretrained, rngs=rngs, **options)
        # The weights' first convolution made for the images' channels; the shape recorded for save_pretrained.
        model = from_pretrained(name, None if pretrained is True else pretrained, rngs=rngs,
                                **{"in_channels": input_shape[-1], **options})
        model.input_shape = input_shape
        return model
    spec = get_spec(name)
    module = create_linen_model(name, **options)
    shape = input_shape or (spec.input_size, spec.input_size, spec.in_channels)
    variables = _initial_variables(module, rngs.params(), (1, *shape))
    return Model(module, variables, rngs=rngs, arch=name, options=options, input_shape=input_shape)


def from_pretrained(source: str | os.PathLike, weights: Any = None, *, rngs: nnx.Rngs | None = None,
                    **options: Any) -> Model:
    """`flaxnets.from_pretrained` as an NNX `Model`: a folder `save_pretrained` wrote, or an architecture's
    name with torchvision's weights (``weights``: a published set's name, by default the best, or a file,
    URL or state_dict). ``num_classes`` other than the weights' gives a new class layer, initialised from
    ``rngs``, and ``in_channels`` a first convolution for that many image channels; other ``options`` are
    `flaxnets.create_model` keywords."""
    rngs = nnx.Rngs(0) if rngs is None else rngs
    num_classes, in_channels = options.pop("num_classes", None), options.pop("in_channels", None)
    module, variables = linen_from_pretrained(source, weights, num_classes=num_classes, in_channels=in_channels,
                                              rng=rngs.params(), **options)
    shape = None
    if os.path.isdir(os.fspath(source)):
        config = read_config(source)
        arch, kept, shape = config["architecture"], {**config.get("options", {}), **options}, config["input_shape"]
    else:
        arch, kept = os.fspath(source), {**pretrained_overrides(os.fspath(source)), **options}
        if in_channels is not None:  # what save_pretrained records and checks the variables against
            size = get_spec(arch).input_size
            shape = (size, size, in_channels)
    if not kept.get("features_only"):
        kept["num_classes"] = module.num_classes
    return Model(module, variables, rngs=rngs, arch=arch, options=kept, input_shape=shape)
