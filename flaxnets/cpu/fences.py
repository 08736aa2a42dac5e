"""Fences against two passes of XLA's CPU compiler: fusion that recomputes, and copies before updates.

XLA's CPU compiler drops `lax.optimization_barrier` before fusion and copy insertion, so neither pass can
be told "this value is computed once" or "these reads come before that write" with it. A conditional is
an edge the fusion pass does not cross, and a data dependence orders what copy insertion sees; the
three fences below are built from those two facts. Each one is an exact identity on values.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

__all__ = ["stored_once", "stored", "tie_gradients"]


def stored_once(witness: jnp.ndarray, keep: Callable, recompute: Callable, *operands: Any) -> Any:
    """``keep(*operands)``, passed through a conditional so that XLA's CPU fusion stores the result once.

    XLA's CPU fusion copies a cheap elementwise chain into every consumer that reads its result; a
    conditional is an edge it does not fuse across. ``recompute(*operands)`` is the other branch and
    must give the same array, so the result never depends on the predicate, which only has to be
    opaque to the compiler: the first element of the floating-point ``witness`` equals itself (false
    only when it is NaN). Empty arrays pass straight.
    """
    if not witness.size:
        return keep(*operands)
    corner = witness[(0,) * witness.ndim]
    return lax.cond(corner == corner, keep, recompute, *operands)


@jax.custom_vjp
def stored(x: jnp.ndarray) -> jnp.ndarray:
    """``x`` itself; under reverse-mode differentiation, ``x`` stored once for the backward pass.

    A convolution's kernel gradient reads its input through a transposed copy (channels first). XLA's
    CPU fusion rebuilds that input inside the copy from whatever cheap elementwise chain made it (in a
    ResNet, BatchNorm, ReLU and the residual sums of every earlier block of the stage), in the copy's
    transposed order. Only the differentiated forward pass has the fence: inference is untouched.
    """
    return x


def _stored_forward(x):
    # The second branch is an exact identity too (rounding to the dtype's own precision).
    info = jnp.finfo(x.dtype)
    return stored_once(x, lambda v: v, lambda v: lax.reduce_precision(v, info.nexp, info.nmant), x), None


def _stored_backward(_, g):
    return (g,)


stored.defvjp(_stored_forward, _stored_backward)


def _tie(grads: Any) -> Any:
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(grads) if leaf.size]
    if not leaves:
        return grads
    firsts = jnp.stack([leaf.reshape(-1)[0].astype(jnp.float32) for leaf in leaves])
    # -0.0 is an exact identity under addition for every float, signed zeros, infinities and NaN
    # included; the conditional keeps a non-finite first element from being multiplied by zero.
    tie = lax.cond(jnp.all(jnp.isfinite(firsts)), lambda f: -(0.0 * jnp.max(jnp.abs(f))),
                   lambda f: jnp.float32(-0.0), firsts)
    return jax.tree_util.tree_map(lambda g: g + tie.astype(g.dtype), grads)


def tie_gradients() -> optax.GradientTransformation:
    """A stateless optax transformation that returns the gradients unchanged, each now depending on all.

    Chain it in front of the optimizer: ``optax.chain(flaxnets.cpu.tie_gradients(), optax.sgd(...))``.
    With the train state donated, XLA updates each parameter in place; a parameter that the backward
    pass also reads, where nothing orders that read before the update (a dense layer's input gradient
    reads its kernel), is first copied: 151 MB for AlexNet's first dense layer, eight such copies per
    step. A value that depends on every gradient orders all those reads before any update, since the
    last gradient computed depends on the whole backward pass. Its state is ``optax.EmptyState()``.
    """
    return optax.stateless(lambda updates, params: _tie(updates))
