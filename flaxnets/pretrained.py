"""A model and its weights in one call, both ways: `from_pretrained`, `save_pretrained`, `reset_classifier`.

`from_pretrained` returns the module and its variables together, so that the fields a weight set needs
(`flaxnets.pretrained_overrides`: GoogLeNet's and Inception v3's ``transform_input``) cannot be left out:

* ``from_pretrained("resnet50")`` takes torchvision's published weights (``weights="IMAGENET1K_V1"``, or a
  file, a URL or a state_dict: anything `flaxnets.load_pretrained` takes);
* ``from_pretrained("path/to/folder")`` reads what `save_pretrained` wrote.

`save_pretrained` writes the layout the Hugging Face Hub and timm use for a model: a folder holding
``model.safetensors`` (the variables, one tensor per leaf, named by its flax path: ``params/fc/kernel``,
``batch_stats/bn1/mean``) and ``config.json`` (the architecture, its options and class count). Such a
folder can be shared as it is (a Hub repository, a release asset) and read back with `from_pretrained`.

`reset_classifier` gives any variables a new class layer (`flaxnets.convert.head_paths`), freshly
initialised for another class count (0 removes it), keeping every other tensor: timm's method of the same
name, for the variables of any architecture, trained here or converted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxnets.analysis import abstract_variables
from flaxnets.convert import (StateDictMismatchError, head_paths, load_pretrained, load_state_dict, pretrained_overrides,
                              save_state_dict)
from flaxnets.convert.finetune import initialise
from flaxnets.pth import WeightsFileError
from flaxnets.registry import create_model, field_value, get_spec, list_models

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "Misfit", "class_count", "from_pretrained", "misfit", "read_config",
           "reset_classifier", "save_pretrained"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_FORMAT = "flaxnets"
_COLLECTIONS = ("params", "batch_stats")


def _flat(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    """The params and batch_stats leaves of ``variables`` by their flax path (other collections dropped)."""
    kept = {c: dict(variables[c]) for c in _COLLECTIONS if c in variables}
    return flatten_dict(kept)


def _json_option(key: str, value: Any) -> Any:
    """``value`` as JSON: dtypes by name, tuples as lists; anything else JSON cannot hold is refused."""
    if key in ("dtype", "param_dtype"):
        return jnp.dtype(value).name
    try:
        json.dumps(value)
    except TypeError:
        raise ValueError(f"option {key}={value!r} cannot be written to {CONFIG_FILE}: only JSON values (numbers, "
                         "strings, lists, true/false/null) and dtypes can.") from None
    return value


def save_pretrained(directory: str | os.PathLike, arch: str, variables: Mapping[str, Any], *,
                    model: nn.Module | None = None, input_shape: tuple[int, int, int] | None = None,
                    overwrite: bool = False, **options: Any) -> Path:
    """Write ``variables`` of ``create_model(arch, **options)`` as ``model.safetensors`` and ``config.json``.

    ``options`` are the `create_model` keywords the variables were made under (``num_classes`` included:
    it is read from the variables when left out). Their values must be JSON or dtypes; ``ops`` (a kernel
    set, not a property of the weights) is left out. ``model``, the module the variables belong to (as
    `create_model` or `from_pretrained` returned it), adds every field in which it differs from ``arch``'s
    own build: options that change no shape, such as the ``transform_input=True`` `from_pretrained` sets
    for torchvision's GoogLeNet and Inception v3 weights, cannot be read off the variables.
    ``input_shape`` is the ``(H, W, C)`` of the images the model takes, by default the architecture's own:
    the variables are checked against the model at that shape now (a grey-image model has one input
    channel), and the config records it. Arrays are written in their own dtype. Files already there are kept unless ``overwrite``; both files are written
    under temporary names and renamed into place, so an interrupted save leaves the folder as it was.
    Returns the folder.
    """
    spec = get_spec(arch)
    shape = tuple(input_shape) if input_shape is not None else (spec.input_size, spec.input_size, spec.in_channels)
    directory = Path(directory)
    targets = [directory / CONFIG_FILE, directory / WEIGHTS_FILE]
    existing = [path.name for path in targets if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{directory} already holds {' and '.join(existing)}; pass overwrite=True to replace "
                              "them, or choose another folder.")
    if model is not None:
        options = {**_own_fields(arch, model), **options}
    options = {key: value for key, value in options.items() if key not in ("ops", "name")}
    if "num_classes" not in options:
        options["num_classes"] = class_count(arch, variables)
    _check_fits(arch, create_model(arch, **options), variables, shape, saving=True)
    config = {"format": _FORMAT, "architecture": arch, "family": spec.family,
              "options": {key: _json_option(key, value) for key, value in sorted(options.items())},
              "input_shape": list(shape)}
    flat = {"/".join(key): np.asarray(value) for key, value in _flat(variables).items()}
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for target, write in ((targets[1], lambda p: save_state_dict(flat, p)),
                              (targets[0], lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))):
            handle, name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=target.suffix)
            os.close(handle)
            written.append(Path(name))
            write(Path(name))
        for temporary, target in zip(written, targets[::-1]):
            os.replace(temporary, target)
    finally:
        for temporary in written:
            temporary.unlink(missing_ok=True)
    return directory


def _own_fields(arch: str, model: nn.Module) -> dict[str, Any]:
    """The fields of ``model`` (``num_classes`` always) that differ from ``create_model(arch)``'s."""
    base = create_model(arch, num_classes=model.num_classes)
    if type(base) is not type(model):
        raise ValueError(f"model is a {type(model).__name__}, but {arch} builds a {type(base).__name__}.")
    fields = {f.name for f in dataclasses.fields(model) if f.init} - {"parent", "name", "ops"}
    return {"num_classes": model.num_classes,
            **{name: getattr(model, name) for name in sorted(fields) if getattr(model, name) != getattr(base, name)}}


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` `save_pretrained` wrote in ``directory``, checked."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsFileError(f"{directory} has no {CONFIG_FILE}: it is not a folder save_pretrained wrote.") from None
    except ValueError:
        raise WeightsFileError(f"{path} is not JSON.") from None
    if not isinstance(config, dict) or config.get("format") != _FORMAT or "architecture" not in config:
        raise WeightsFileError(f"{path} is not a flaxnets config (it names no flaxnets architecture).")
    get_spec(config["architecture"])  # an architecture this version does not know: UnknownModelError
    return config


def _load_folder(directory: Path, num_classes: int | None, rng: int | jax.Array, overrides: dict
                 ) -> tuple[nn.Module, dict]:
    config = read_config(directory)
    arch = config["architecture"]
    saved = {key: field_value(value) for key, value in config.get("options", {}).items()}
    flat = load_state_dict(directory / WEIGHTS_FILE)
    variables = unflatten_dict({tuple(key.split("/")): jnp.asarray(value) for key, value in flat.items()})
    options = {**saved, **overrides}
    if num_classes is not None and num_classes != saved.get("num_classes"):
        fields = {key: value for key, value in options.items() if key != "num_classes"}
        variables = reset_classifier(arch, variables, num_classes, rng=rng, **fields)
        options["num_classes"] = num_classes
    if options.get("features_only"):
        options.pop("num_classes", None)
    model = create_model(arch, **options)
    _check_fits(arch, model, variables, tuple(config["input_shape"]))
    return model, variables


def from_pretrained(source: str | os.PathLike, weights: Any = None, *, num_classes: int | None = None,
                    in_channels: int | None = None, rng: int | jax.Array = 0, **options: Any
                    ) -> tuple[nn.Module, dict]:
    """``(model, variables)``, ready for ``model.apply(variables, images, train=False)``.

    Args:
      source: a folder `save_pretrained` wrote, or a registered architecture's name.
      weights: with a name, its weights: a published set (``"IMAGENET1K_V1"``; by default ``"DEFAULT"``,
        torchvision's best), a URL, a ``.pth``/``.safetensors``/``.npz`` file or a state_dict (see
        `flaxnets.load_pretrained`). The model is built with `pretrained_overrides`, the fields those
        weights were trained under. Not used with a folder.
      num_classes: the class count of the model to return; when it differs from the weights', the class
        layer is new (`reset_classifier`), for fine-tuning.
      in_channels: with a name, the channels of the images the model will take (1 for grey images), by
        default the weights' 3: the first convolution's kernel is adapted (`flaxnets.load_pretrained`).
      rng: seed or key of whatever is initialised afresh.
      **options: `create_model` keywords (e.g. ``dtype=jnp.bfloat16``, ``remat=True``).

    Raises:
      WeightsFileError: the weights cannot be found, downloaded or read (one sentence).
      StateDictMismatchError: they do not fit the architecture.
    """
    text = os.fspath(source)
    if options.get("features_only"):  # the feature maps of the model without its class layer
        if num_classes not in (None, 0):
            raise ValueError("features_only=True builds the model without its class layer: leave num_classes out.")
        num_classes = 0
    if os.path.isdir(text):
        if weights is not None or in_channels is not None:
            raise ValueError(f"{text} is a folder of weights: weights= and in_channels= apply to an "
                             "architecture's name.")
        return _load_folder(Path(text), num_classes, rng, options)
    if text not in list_models() and (os.sep in text or os.path.lexists(text)):  # meant as a folder
        what = "is a file" if os.path.lexists(text) else "does not exist"
        raise FileNotFoundError(f"{text} {what}: from_pretrained reads a folder save_pretrained wrote (config.json "
                                "and model.safetensors), or takes an architecture's name.")
    spec = get_spec(text)
    if not spec.torchvision:
        raise WeightsFileError(f"{text} has no published weights and {text!r} is no folder: pass the folder "
                               "save_pretrained wrote, or one of the architectures with published weights.")
    options = {**pretrained_overrides(text), **options}
    weight_fields = {k: v for k, v in options.items() if k not in ("dtype", "param_dtype", "bn_axis_name", "ops",
                                                                   "remat", "name", "features_only", "out_indices")}
    variables = load_pretrained(text, "DEFAULT" if weights is None else weights, num_classes,
                                in_channels=in_channels, rng=rng, **weight_fields)
    if options.get("features_only"):
        return create_model(text, **options), variables
    return create_model(text, num_classes=class_count(text, variables), **options), variables


def class_count(arch: str, variables: Mapping[str, Any]) -> int:
    """The class count ``variables`` of ``arch`` were made for: the width of their class layer (0 without one)."""
    flat = _flat(variables)
    first = head_paths(arch)[0]
    widths = [value.shape[-1] for key, value in flat.items()
              if key[0] == "params" and key[1:1 + len(first)] == first and key[-1] in ("kernel", "bias")]
    return int(widths[0]) if widths else 0


class Misfit(NamedTuple):
    """The first leaf that keeps variables from being a model's: its path, and its shape in the variables
    and in the model (None where it is missing there)."""

    path: str
    given: tuple[int, ...] | None
    expected: tuple[int, ...] | None

    def describe(self) -> str:
        """The mismatch as a clause: "X is (a, b) there and (c, d) in the model"."""
        return (f"{self.path} is {self.given or 'missing'} there and "
                f"{self.expected or 'absent'} in the model")


def _head_leaves(arch: str) -> tuple[str, ...]:
    """Path endings of the class layers' leaves: a mismatch there is a class count, not an input size."""
    return tuple("/".join(("params", *path, leaf)) for path in head_paths(arch) for leaf in ("kernel", "bias"))


def misfit(model: nn.Module, variables: Mapping[str, Any], shape: tuple[int, int, int]) -> Misfit | None:
    """What first keeps ``variables`` from being those of ``model`` on ``shape`` (H, W, C) images: a leaf the
    model has and they lack, one shaped otherwise, or one they have and the model lacks; None when they fit.
    Nothing is computed (the model's variables are traced)."""
    expected = {key: tuple(leaf.shape) for key, leaf in _flat(abstract_variables(model, (1, *shape))).items()}
    given = {key: tuple(np.shape(leaf)) for key, leaf in _flat(variables).items()}
    for key, want in expected.items():
        if given.get(key) != want:
            return Misfit("/".join(key), given.get(key), want)
    extra = [key for key in given if key not in expected]
    return Misfit("/".join(extra[0]), given[extra[0]], None) if extra else None


def _check_fits(arch: str, model: nn.Module, variables: Mapping[str, Any], shape: tuple[int, int, int],
                saving: bool = False) -> None:
    """`StateDictMismatchError` naming the first leaf of ``variables`` that ``model`` on ``shape`` (H, W, C)
    images lacks or shapes otherwise; ``saving``: the caller took ``input_shape``, which may be the cause."""
    found = misfit(model, variables, shape)
    if found is not None:
        hint = (" (if the images are not the architecture's own size, pass input_shape=(H, W, C))"
                if saving and found.given and found.expected and not found.path.endswith(_head_leaves(arch)) else "")
        raise StateDictMismatchError(f"the variables do not fit {arch} on {'x'.join(map(str, shape))} images: "
                                     f"{found.describe()}{hint}.")


def reset_classifier(arch: str, variables: Mapping[str, Any], num_classes: int | None = None, *,
                     rng: int | jax.Array = 0, **options: Any) -> dict:
    """``variables`` with a new class layer for ``num_classes`` classes (0: none, the pooled features).

    The class layers are `flaxnets.convert.head_paths` (GoogLeNet's and Inception v3's auxiliary heads'
    included); they are initialised as ``create_model(arch, num_classes=num_classes, **options)``
    initialises them, from ``rng``, and every other tensor is kept as it is. ``options`` are the model's
    other fields (those that shape the network, e.g. ``aux_logits=False``). Returns params and batch_stats.
    """
    model = create_model(arch, num_classes=num_classes, **options)
    spec = get_spec(arch)
    target = _flat(abstract_variables(model, (1, spec.input_size, spec.input_size, spec.in_channels)))
    classes = spec.torch_layout.heads  # always new
    # Auxiliary heads exist only with a class layer: they go with it (num_classes=0) and come back with it.
    auxiliary = tuple((name,) for name in spec.torch_layout.aux_heads)
    under = lambda key, prefixes: any(key[1:1 + len(prefix)] == prefix for prefix in prefixes)
    kept = {key: value for key, value in _flat(variables).items()
            if key in target and not (key[0] == "params" and under(key, classes))}
    fresh = [key for key in target if key not in kept and (under(key, classes) or under(key, auxiliary))]
    missing = [key for key in target if key not in kept and key not in fresh]
    if missing:
        raise StateDictMismatchError(f"the variables do not fit {arch}: they have nothing for {'/'.join(missing[0])}.")
    # A class layer's shape never depends on the input size: the new one is made at the architecture's own.
    # The rest is not checked against the model, since the variables may be for any input size or channels.
    initial = initialise(model, spec, rng, fresh) if fresh else {}
    return unflatten_dict({**kept, **initial})
