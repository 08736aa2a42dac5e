"""The smallest input each architecture accepts, found by tracing its shapes, and the guard that uses it.

A too-small image does not fail cleanly in XLA: a convolution window larger than its input is a shape
error from deep inside ``lax``, and a pooling that leaves zero pixels makes empty arrays that flow on
silently (a ``Dense`` after ``flatten`` even initialises with zero input features). The guard below runs
every submodule call of a model through an interceptor that rejects empty activations; when the model
fails on a small input it searches for the smallest square side that traces cleanly and says so.
"""

from __future__ import annotations

import contextvars
import functools
import re
import warnings
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxnets.layers import BatchTooSmallError, InputTooSmallError

__all__ = ["checks_input_size", "smallest_input", "InputTooSmallError", "VariablesMisfitError"]

_SEARCHING: contextvars.ContextVar[bool] = contextvars.ContextVar("flaxnets_min_size_search", default=False)
_LARGEST_SIDE = 4096
# lax reports impossible shapes as TypeError (negative dimensions) or ValueError.
_SHAPE_ERRORS = (InputTooSmallError, TypeError, ValueError)


def _reject_empty(values: Any, where: str) -> None:
    for leaf in jax.tree_util.tree_leaves(values):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape) >= 2 and 0 in shape[1:]:
            raise InputTooSmallError(f"{where} produced or received an empty activation of shape {tuple(shape)}")


def _interceptor(next_fun, args, kwargs, context):
    where = "/".join(context.module.path) or type(context.module).__name__
    _reject_empty(args, where)
    out = next_fun(*args, **kwargs)
    _reject_empty(out, where)
    return out


def checks_input_size(call: Callable) -> Callable:
    """Decorate a model's ``__call__(self, x, train)`` so a too-small ``x`` gets a clear ValueError.

    The error names the smallest square side the model accepts (for the channels of ``x``). Errors on
    inputs at least that large are re-raised untouched: the guard never hides a real bug.
    """

    @functools.wraps(call)
    def guarded(self, x, *args, **kwargs):
        if _SEARCHING.get():  # the search below already rejects empty activations
            return call(self, x, *args, **kwargs)
        if args or "train" in kwargs:  # else Python's own error names the missing argument
            _check_train_flag(self, args[0] if args else kwargs["train"])
        try:
            with nn.intercept_methods(_interceptor):
                out = call(self, x, *args, **kwargs)
        except flax.errors.ScopeParamShapeError as error:
            raise VariablesMisfitError(_misfit(self, x, error)) from None
        except _SHAPE_ERRORS as error:
            if isinstance(error, (BatchTooSmallError, VariablesMisfitError)):  # not the input's side
                raise
            if getattr(x, "ndim", 0) != 4:
                raise ValueError(
                    f"{type(self).__name__} takes NHWC images (4 dimensions); got shape {tuple(x.shape)}."
                ) from None
            height, width, channels = x.shape[1:]
            try:
                smallest = smallest_input(self.clone(parent=None), channels)
            except RuntimeError:
                raise error from None  # no size works: not a size problem
            if min(height, width) >= smallest:
                raise
            raise ValueError(
                f"{type(self).__name__} needs an input of at least {smallest}x{smallest} pixels; "
                f"got {height}x{width}{_nchw_hint(x.shape)}."
            ) from None
        shape = tuple(getattr(x, "shape", ()))
        if self.is_initializing() and _nchw_hint(shape) and shape[2] == shape[3]:  # e.g. (1, 3, 224, 224)
            warnings.warn(f"{type(self).__name__} was initialised for {shape[1]}x{shape[2]} images of {shape[3]} "
                          f"channels{_nchw_hint(shape)}.", stacklevel=2)
        return out

    return guarded


def _check_train_flag(model: nn.Module, train: Any) -> None:
    """``train`` chooses Python branches (dropout, batch statistics), so it must be a concrete bool: a string
    would pass as truthy and a traced one fail deep inside with JAX's own error."""
    if isinstance(train, (bool, np.bool_)):
        return
    name = type(model).__name__
    if isinstance(train, jax.core.Tracer):
        raise TypeError(f"{name}'s train flag was traced (an argument of jit, vmap, ...): pass it as a static "
                        "Python bool, e.g. jax.jit(functools.partial(model.apply, train=True)) or "
                        "jax.jit(model.apply, static_argnames='train').")
    raise TypeError(f"{name}'s train flag is True or False, got {train!r}.")


class VariablesMisfitError(ValueError):
    """Raised when a model's variables were made for inputs of another kind than those it is applied to."""


def _misfit(model: nn.Module, x: Any, error: Exception) -> str:
    """Flax's report of a parameter of the wrong shape, as the likely cause: images with other channels than
    the variables were made for, often PyTorch's NCHW layout (or, behind a flattening, another size)."""
    shape = tuple(getattr(x, "shape", ()))
    detail = re.sub(r"\s*\(https?://[^)]*\)\s*$", "", str(error)).strip()
    return (f"{type(model).__name__}'s variables were made for other images than these, of shape "
            f"{shape}{_nchw_hint(shape)} ({detail})")


def _nchw_hint(shape: tuple[int, ...]) -> str:
    """A clause for images that look like PyTorch's layout (few channels first, many last), else ``""``."""
    if len(shape) == 4 and shape[1] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        return "; they look like PyTorch's NCHW layout, and the models take NHWC: x.transpose(0, 2, 3, 1)"
    return ""


def _traces(module: nn.Module, side: int, channels: int, train: bool = False) -> bool:
    token = _SEARCHING.set(True)
    try:
        # Training traces a batch of 2: BatchNorm refuses one value per channel, a property of the batch.
        images = jax.ShapeDtypeStruct((2 if train else 1, side, side, channels), jnp.float32)
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
        # Intercepted here, not only inside `checks_input_size`: a module of the user's own (``--arch
        # FILE.py:FACTORY``) has no guard, and an empty activation reaching its dense layer fails inside the
        # initialiser (a ZeroDivisionError from the fan-in) rather than as a shape error.
        def initialised_then_applied(rngs, images):  # a training apply: what `init` skips (an auxiliary head)
            variables = module.init(rngs, images, train=False)
            return module.apply(variables, images, train=True, mutable=True, rngs={"dropout": rngs["dropout"]})

        with nn.intercept_methods(_interceptor):
            if train:
                jax.eval_shape(initialised_then_applied, rngs, images)
            else:
                jax.eval_shape(functools.partial(module.init, train=False), rngs, images)
        return True
    except _SHAPE_ERRORS:
        return False
    finally:
        _SEARCHING.reset(token)


@functools.lru_cache(maxsize=256)
def _smallest_cached(key: tuple, module: nn.Module, channels: int, train: bool) -> int:
    del key  # only there to make the cache key hashable and exact
    high = 8
    while not _traces(module, high, channels, train):
        high *= 2
        if high > _LARGEST_SIDE:
            raise RuntimeError(f"{type(module).__name__} traces at no square input up to {_LARGEST_SIDE} pixels.")
    low = 0  # invariant: `low` fails (0 always does), `high` works
    while high - low > 1:
        mid = (low + high) // 2
        if _traces(module, mid, channels, train):
            high = mid
        else:
            low = mid
    return high


def smallest_input(module: nn.Module, channels: int = 3, train: bool = False) -> int:
    """The smallest square side ``s`` such that ``module`` traces on ``(1, s, s, channels)`` input in
    inference or, with ``train``, on ``(2, s, s, channels)`` in training mode (Inception v3's auxiliary head
    needs more then; BatchNorm refuses a batch of 1 whose map is 1x1, see `flaxnets.layers.BatchNorm`).

    Assumes larger inputs keep working once one does, which holds for every convolution-and-pooling
    stack (each output side is non-decreasing in its input side).
    """
    module = module.clone(parent=None) if module.parent is not None else module
    return _smallest_cached((type(module), repr(module), channels, train), module, channels, train)
