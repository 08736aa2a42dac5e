"""Feature maps at several scales: the points where each architecture's stages end, and two ways to read them.

Every family marks its stage ends in its own ``__call__`` with `tap` (``x = tap(self, x, "layer2",
reduction=8)``): an identity that, only while a reader is listening, records the activation, its name and
its reduction (the product of the strides before it, timm's ``reduction``). Two readers:

* `FeatureNet` (``create_model(name, features_only=True, out_indices=(1, 2, 3))``): a linen module that
  returns the chosen maps, with ``feature_info`` giving each one's name, channels and reduction. It shares
  its model's variables, built without the class layer (``num_classes=0``), so the variables of the
  headless model (pretrained ones included) are its own. Its forward pass stops at the last chosen point
  (timm prunes the layers after it): in training mode their BatchNorm statistics would otherwise be
  computed, and kept by ``jit`` as outputs. ``init`` still runs the whole model, to make every variable.
* `forward_intermediates(model, variables, images)`: the logits and every stage's maps of one ``apply``.

This follows timm's ``features_only``/``out_indices``/``feature_info`` and ``forward_intermediates``, where
timm names its points; the maps stay NHWC. The listener is a context variable, read while the model is
traced: the points are taps at the model's own level (never inside a rematerialised block), so the
recorded values belong to the trace that returns them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["FeatureInfo", "FeatureNet", "feature_points", "forward_intermediates", "resolve_indices", "tap"]


class FeatureInfo(NamedTuple):
    """One feature point: its index among the model's points, its name (the module or stage it closes),
    its channels and its reduction (input side over map side, as the strides give it)."""

    index: int
    name: str
    channels: int
    reduction: int


@dataclasses.dataclass
class _Tap:
    path: tuple[str, ...]
    name: str
    value: jnp.ndarray
    reduction: int


@dataclasses.dataclass
class _Listener:
    """The taps recorded so far; with ``stop_after``, `tap` ends the forward pass (raising `_Enough`) once
    the model at ``path`` has made that many."""

    taps: list[_Tap]
    path: tuple[str, ...] = ()
    stop_after: int | None = None


class _Enough(Exception):
    """A `FeatureNet` has every map it returns; caught by it, never seen by a caller."""


_LISTENER: contextvars.ContextVar[_Listener | None] = contextvars.ContextVar("flaxnets_feature_taps", default=None)


def tap(module: nn.Module, x: jnp.ndarray, name: str, *, reduction: int) -> jnp.ndarray:
    """``x`` itself; while a reader listens, also recorded as ``module``'s feature point ``name``.

    Called by each architecture at the end of its stages, in network order, at the level of its own
    ``__call__``.
    """
    listener = _LISTENER.get()
    if listener is not None:
        path = tuple(module.path)
        listener.taps.append(_Tap(path, name, x, reduction))
        if path == listener.path and len(_own(listener.taps, path)) == listener.stop_after:
            raise _Enough
    return x


@contextlib.contextmanager
def _listening(path: tuple[str, ...] = (), stop_after: int | None = None) -> Iterator[list[_Tap]]:
    listener = _Listener([], path, stop_after)
    token = _LISTENER.set(listener)
    try:
        yield listener.taps
    finally:
        _LISTENER.reset(token)


def _own(taps: list[_Tap], path: tuple[str, ...]) -> list[_Tap]:
    """The taps of the model at ``path`` (not those of another flaxnets model nested inside it)."""
    return [t for t in taps if t.path == path]


def resolve_indices(count: int, indices: Sequence[int] | None, arch: str) -> tuple[int, ...]:
    """``indices`` (None: all; negative ones count from the end) as indices into ``count`` points."""
    if indices is None:
        return tuple(range(count))
    if isinstance(indices, (int, str)) or not isinstance(indices, Sequence):
        raise ValueError(f"out_indices is a sequence of feature points, e.g. (1, 2, 3) or ({indices!r},); "
                         f"got {indices!r}.")
    chosen = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not -count <= index < count:
            raise ValueError(f"{arch} has {count} feature points (indices 0 to {count - 1}, or negative from the "
                             f"end); got out_indices={tuple(indices)!r}.")
        chosen.append(index % count)
    if not chosen:
        raise ValueError("out_indices must name at least one feature point.")
    return tuple(chosen)


@functools.lru_cache(maxsize=128)
def feature_points(model: nn.Module, side: int, channels: int) -> tuple[FeatureInfo, ...]:
    """Every feature point of the unbound ``model`` on a ``side``-pixel input with ``channels`` channels, in
    network order, traced (nothing is computed). `flaxnets.feature_info` asks it by architecture name."""
    images = jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)
    found: list[tuple[str, int, int]] = []

    def run(images):
        with _listening() as taps:
            model.init(jax.random.key(0), images, train=False)  # `init` runs the forward pass once
        found.extend((t.name, t.value.shape[-1], t.reduction) for t in _own(taps, ()))

    jax.eval_shape(run, images)
    return tuple(FeatureInfo(index, name, channels, reduction) for index, (name, channels, reduction) in
                 enumerate(found))


class FeatureNet(nn.Module):
    """The feature maps of ``model`` at the points ``out_indices``, as a list (each NHWC).

    ``model`` is a flaxnets architecture, usually built with ``num_classes=0``; this module shares its
    variables (`flax.linen.share_scope`), so ``FeatureNet(model, ...).init`` gives ``model.init``'s tree and
    the headless model's variables load as they are. ``feature_info`` describes the chosen points
    (`create_model(..., features_only=True)` fills it in).
    """

    model: nn.Module
    out_indices: tuple[int, ...]
    feature_info: tuple[FeatureInfo, ...] = ()

    def setup(self):
        nn.share_scope(self, self.model)

    @property
    def num_features(self) -> int | None:
        """Channels of the last chosen map (timm's ``num_features`` of a feature model)."""
        return self.feature_info[-1].channels if self.feature_info else None

    def __call__(self, x: jnp.ndarray, train: bool) -> list[jnp.ndarray]:
        path = tuple(self.model.path)
        # The layers after the last chosen point run only in `init`, which makes the headless model's variables
        # (and where an index counts from the end, which only the whole network's points resolve).
        indices = self.out_indices
        counted = isinstance(indices, Sequence) and indices and all(isinstance(i, int) and i >= 0 for i in indices)
        stop_after = max(indices) + 1 if counted and not self.is_initializing() else None
        with _listening(path, stop_after) as taps:
            try:
                self.model(x, train)
            except _Enough:
                pass
        own = _own(taps, path)
        # Early stops leave exactly the points asked for; a whole run, all there are (an index too large says so).
        return [own[index].value for index in resolve_indices(len(own), indices, type(self.model).__name__)]


def forward_intermediates(model: nn.Module, variables: Any, x: jnp.ndarray, train: bool = False, *,
                          indices: Sequence[int] | None = None, **apply_kwargs: Any) -> Any:
    """The logits and the feature maps of one ``model.apply(variables, x, train, **apply_kwargs)``.

    Returns ``(logits, maps)``, ``maps`` a list of the chosen points' activations (all of them by default;
    `flaxnets.feature_info` names them), or ``((logits, maps), updates)`` when ``apply_kwargs`` has ``mutable``
    (training mode: ``mutable=["batch_stats"]``), as ``apply`` returns them. timm's
    ``forward_intermediates`` with its defaults, in NHWC.
    """
    with _listening() as taps:
        out = model.apply(variables, x, train, **apply_kwargs)
    own = _own(taps, ())
    chosen = resolve_indices(len(own), indices, type(model).__name__)
    maps = [own[index].value for index in chosen]
    if apply_kwargs.get("mutable"):
        logits, updates = out
        return (logits, maps), updates
    return out, maps
