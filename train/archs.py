"""What ``--arch`` names: an architecture of the registry, or a model of the user's own.

``--arch path/to/file.py:factory`` and ``--arch package.module:factory`` name a callable that takes
``num_classes`` and the fields every flaxnets model has (``dtype``, ``param_dtype``, ``bn_axis_name``, and
any ``--model-arg``) and returns a `flax.linen` module whose ``__call__(x, train)`` returns logits. It is
added to the registry under that very name, once per process, so that training, resuming, evaluating,
predicting and plotting all find it the same way as a built-in architecture. Attributes of the factory
give what the registry records: ``input_size`` (default 224), ``in_channels`` (3), ``num_classes`` (10).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Callable

from flaxnets.cli import error_phrase
from flaxnets.registry import ModelSpec, get_spec, list_models, register
from train.config import ConfigError

__all__ = ["ArchError", "resolve_arch", "is_user_arch", "check_user_model"]


class ArchError(ConfigError):
    """A user architecture that cannot be loaded; the message says why in one sentence."""


def is_user_arch(arch: str) -> bool:
    """Whether ``arch`` names a factory (``FILE.py:NAME`` or ``MODULE:NAME``) rather than a registry entry."""
    return ":" in arch


def _load_factory(arch: str) -> Callable:
    where, _, name = arch.rpartition(":")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise ArchError(f"--arch {arch}: {where} is not a file.")
        module_name = "flaxnets_user_" + os.path.splitext(os.path.basename(where))[0]
        spec = importlib.util.spec_from_file_location(module_name, where)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - the user's file: any failure or exit, in one line
            raise ArchError(f"--arch {arch}: importing {where} failed ({error_phrase(error)}).") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as error:
            raise ArchError(f"--arch {arch}: cannot import {where} ({error}).") from None
        except (Exception, SystemExit) as error:  # noqa: BLE001 - as for a file
            raise ArchError(f"--arch {arch}: importing {where} failed ({error_phrase(error)}).") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ArchError(f"--arch {arch}: {where} has no callable {name!r}.")
    return factory


def resolve_arch(arch: str) -> ModelSpec:
    """The registry's spec of ``arch``; a user factory is loaded and registered first (once per process)."""
    if not is_user_arch(arch) or arch in list_models():
        return get_spec(arch)
    factory = _load_factory(arch)
    doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
    return register(ModelSpec(
        name=arch, build=factory, family="user", paper=getattr(factory, "paper", "a model of the user's own"),
        input_size=int(getattr(factory, "input_size", 224)), in_channels=int(getattr(factory, "in_channels", 3)),
        num_classes=int(getattr(factory, "num_classes", 10)), description=doc[0] if doc else arch))


def check_user_model(arch: str, *, num_classes: int, channels: int, side: int, overrides: dict) -> None:
    """Raise `ArchError`, naming ``arch``, unless its factory builds a flax module that takes
    ``(batch, side, side, channels)`` images and returns ``(batch, num_classes)`` logits in both modes.

    The model is only traced (`jax.eval_shape`): nothing is computed. Run before anything else builds or
    traces the model, so that a factory that raises, returns something else, or returns logits of another
    width is one sentence rather than a traceback from deep inside the trainer.
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flaxnets.registry import create_model

    try:
        model = create_model(arch, num_classes=num_classes, **overrides)
    except Exception as error:  # noqa: BLE001 - the user's code: whatever it raises is theirs to see, in one line
        raise ArchError(f"--arch {arch}: the factory failed ({error_phrase(error)}).") from None
    if not isinstance(model, nn.Module):
        raise ArchError(f"--arch {arch}: the factory returned a value of type {type(model).__name__}, not a "
                        "flax.linen Module.")

    def both_modes(rngs, images):
        variables = model.init(rngs, images, train=False)
        trained, _ = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": rngs["dropout"]})
        return model.apply(variables, images, train=False), trained

    images = jax.ShapeDtypeStruct((2, side, side, channels), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    try:
        outputs = jax.eval_shape(both_modes, rngs, images)
    except Exception as error:  # noqa: BLE001 - as above
        raise ArchError(f"--arch {arch} fails on {side}x{side}x{channels} images ({error_phrase(error)}).") from None
    for mode, logits in zip(("inference", "training"), outputs):
        shape = getattr(logits, "shape", None)
        if shape != (2, num_classes):
            got = f"logits of shape {tuple(shape)}" if shape is not None else f"a {type(logits).__name__}"
            raise ArchError(f"--arch {arch} returns {got} in {mode} for 2 images; {num_classes} classes need "
                            f"logits of shape (batch, {num_classes}).")
