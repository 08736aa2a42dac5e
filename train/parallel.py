"""Running the per-device step over every device: `jax.shard_map` over a mesh (default) or `jax.pmap`,
one `Driver` subclass each.

Both drivers take the global batch either as dataset indices, gathering the examples from the
device-resident dataset (`Driver.train`, `Driver.evaluate`), or as examples read by the host
(`Driver.train_batch`, `Driver.evaluate_batch`, for streamed datasets); they split it evenly over the
devices and return replicated state and summed metrics. In a multi-process run the mesh spans every
process's devices; each process feeds only the rows of the global batch that belong to its own devices.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from train.tuning import StepSettings, step_settings

__all__ = ["Driver", "ShardMapDriver", "PmapDriver", "DRIVERS", "make_driver", "host", "AXIS"]

AXIS = "batch"


def _gather(data: dict[str, jnp.ndarray], indices: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """The examples at ``indices``; negative indices are padding (mask 0, any real example's pixels)."""
    safe = jnp.maximum(indices, 0)
    return {"image": data["image"][safe], "label": data["label"][safe], "index": safe, "mask": indices >= 0}


def _mesh(devices) -> jax.sharding.Mesh:
    # Auto axes: the steps place their collectives themselves; "Explicit" sharding-in-types (the default of
    # make_mesh) would also differ from what pmap returns and retrace the step once.
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def host(tree: Any) -> Any:
    """Replicated device values as NumPy, also in a multi-process run (where `jax.device_get` refuses
    arrays that span other processes' devices: every copy is equal, so the local one is read)."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree_util.tree_map(fetch, tree)


class Driver:
    """Places data and state on the devices and runs the compiled train and eval steps; one subclass per
    way of mapping a per-device step over the devices (`ShardMapDriver`, `PmapDriver`).

    ``train_step(state, batch)`` and ``eval_step(state, batch)`` are per-device functions whose
    collectives use the axis name `AXIS`. ``traces`` counts how often each was traced: after the first
    step it must stay at one per step kind, or the step is recompiling. ``settings`` (default: the
    backend's, `train.tuning.step_settings`) gives the compiled steps their XLA options and matmul
    precision; `jax.pmap` takes no per-executable options, so under pmap only the precision applies.
    """

    kind: str

    def __init__(self, train_step: Callable, eval_step: Callable, settings: StepSettings | None = None):
        self.settings = step_settings() if settings is None else settings
        self.devices = jax.devices()
        self.local_devices = jax.local_devices()
        self.traces = {"train": 0, "eval": 0}
        self.mesh = _mesh(self._mesh_devices())
        self.replicated = NamedSharding(self.mesh, P())
        self.split = NamedSharding(self.mesh, P(AXIS))
        self._compile(self.settings.traced(train_step), self.settings.traced(eval_step))

    @property
    def device_count(self) -> int:
        return len(self.devices)

    def _counted(self, fn: Callable, name: str) -> Callable:
        def traced(*args):
            self.traces[name] += 1
            return fn(*args)
        return traced

    # -- what each strategy defines -------------------------------------------------------------------
    def _mesh_devices(self) -> list:
        raise NotImplementedError

    def _compile(self, train_step: Callable, eval_step: Callable) -> None:
        raise NotImplementedError

    def put_replicated(self, tree: Any) -> Any:
        """Copy host arrays (the same in every process) to every device."""
        raise NotImplementedError

    def put_indices(self, indices: np.ndarray) -> Any:
        """The global batch's dataset indices, each device getting its contiguous share."""
        raise NotImplementedError

    def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
        """This process's rows of a global batch read on the host, split over the devices (asynchronously)."""
        raise NotImplementedError

    def train(self, state, data, indices):
        """A train step on the device-resident ``data``'s examples at ``indices`` (from `put_indices`)."""
        raise NotImplementedError

    def evaluate(self, state, data, indices):
        """Eval metric sums of the device-resident ``data``'s examples at ``indices`` (-1: padding)."""
        raise NotImplementedError

    def train_batch(self, state, batch):
        """A train step on a batch placed by `put_batch` (keys image, label, index)."""
        raise NotImplementedError

    def evaluate_batch(self, state, batch):
        """Eval metric sums of a batch placed by `put_batch` (keys image, label, index, mask)."""
        raise NotImplementedError

    def _check_divisible(self, indices: np.ndarray) -> None:
        if len(indices) % self.device_count:
            raise ValueError(f"a batch of {len(indices)} does not split over {self.device_count} devices.")


class ShardMapDriver(Driver):
    """`jax.shard_map` over a mesh of every device of every process, under `jax.jit` (the default)."""

    kind = "shard_map"

    def _mesh_devices(self) -> list:
        return self.devices

    def _compile(self, train_step: Callable, eval_step: Callable) -> None:
        jit = partial(jax.jit, compiler_options=dict(self.settings.compiler_options) or None)
        self._train = jit(self._over_indices(train_step, "train", with_state=True), donate_argnums=0)
        self._eval = jit(self._over_indices(eval_step, "eval", with_state=False))
        self._train_batch = jit(self._over_batch(train_step, "train", with_state=True), donate_argnums=0)
        self._eval_batch = jit(self._over_batch(eval_step, "eval", with_state=False))

    def _over_indices(self, fn: Callable, name: str, with_state: bool) -> Callable:
        # check_vma=False: gradients are averaged explicitly with pmean inside the step; with the
        # default check the replicated parameters' gradients would arrive already summed.
        # The dataset is replicated and the indices split, so each device gathers its own examples from
        # its own copy: no communication.
        out_specs = (P(), P()) if with_state else P()
        counted = self._counted(fn, name)

        def local(state, data, indices):
            return counted(state, _gather(data, indices))
        return jax.shard_map(local, mesh=self.mesh, in_specs=(P(), P(), P(AXIS)), out_specs=out_specs,
                             check_vma=False)

    def _over_batch(self, fn: Callable, name: str, with_state: bool) -> Callable:
        out_specs = (P(), P()) if with_state else P()
        return jax.shard_map(self._counted(fn, name), mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=out_specs,
                             check_vma=False)

    def put_replicated(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_callback(np.shape(x), self.replicated, lambda index: np.asarray(x)[index]),
            tree)

    def put_indices(self, indices: np.ndarray) -> Any:
        self._check_divisible(indices)
        return jax.make_array_from_callback(indices.shape, self.split, lambda index: indices[index])

    def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
        return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(self.split, np.asarray(x)),
                                      batch)

    def train(self, state, data, indices):
        return self._train(state, data, indices)

    def evaluate(self, state, data, indices):
        return self._eval(state, data, indices)

    def train_batch(self, state, batch):
        return self._train_batch(state, batch)

    def evaluate_batch(self, state, batch):
        return self._eval_batch(state, batch)


class PmapDriver(Driver):
    """`jax.pmap` over this process's devices (``--parallel pmap``). Inputs are placed there explicitly,
    since pmap refuses a committed single-device array rather than moving it."""

    kind = "pmap"

    def _mesh_devices(self) -> list:
        return self.local_devices

    def _compile(self, train_step: Callable, eval_step: Callable) -> None:
        self._gather = jax.jit(_gather)
        self._train = jax.pmap(self._counted(train_step, "train"), axis_name=AXIS, in_axes=(None, 0),
                               out_axes=(None, None))
        self._eval = jax.pmap(self._counted(eval_step, "eval"), axis_name=AXIS, in_axes=(None, 0), out_axes=None)

    def put_replicated(self, tree: Any) -> Any:
        return jax.device_put(jax.device_get(tree), self.replicated)

    def put_indices(self, indices: np.ndarray) -> Any:
        self._check_divisible(indices)
        per_device = len(indices) // self.device_count
        first = jax.process_index() * len(self.local_devices) * per_device
        return indices[first:first + per_device * len(self.local_devices)]

    def put_batch(self, batch: dict[str, np.ndarray]) -> Any:
        return self._split_local(batch)

    def train(self, state, data, indices):
        return self._train(state, self._split_local(self._gather(data, jnp.asarray(indices))))

    def evaluate(self, state, data, indices):
        return self._eval(state, self._split_local(self._gather(data, jnp.asarray(indices))))

    def train_batch(self, state, batch):
        return self._train(state, batch)

    def evaluate_batch(self, state, batch):
        return self._eval(state, batch)

    def _split_local(self, batch):
        n = len(self.local_devices)
        return jax.device_put(jax.tree_util.tree_map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch), self.split)


DRIVERS: dict[str, type[Driver]] = {driver.kind: driver for driver in (ShardMapDriver, PmapDriver)}


def make_driver(kind: str, train_step: Callable, eval_step: Callable, settings: StepSettings | None = None) -> Driver:
    """The `Driver` for ``kind`` (``"shard_map"`` or ``"pmap"``) over every device of every process."""
    if kind not in DRIVERS:
        raise ValueError(f"parallel driver must be one of {', '.join(DRIVERS)}, got {kind!r}.")
    return DRIVERS[kind](partial(train_step, axis_name=AXIS), partial(eval_step, axis_name=AXIS), settings)
