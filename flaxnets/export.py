"""A model for runtimes that are not JAX: serialized StableHLO (`jax.export`) and ONNX (jax2onnx), each file
written only after it computed what the JAX model computes.

`export(model, variables, path)` exports inference (``train=False``) with the weights inside the file and
the batch size symbolic: the file takes any batch of NHWC float32 images of the side and channels it was
exported for, normalised as the model expects, and returns the model's output (logits, or a
``features_only`` model's maps). ``python -m flaxnets export NAME ...`` does the same from a shell.

* ``.stablehlo`` (or ``format="stablehlo"``): `jax.export.Exported.serialize`'s bytes. Read them back with
  ``jax.export.deserialize(data).call(images)`` in any process with jax, or hand them to another StableHLO
  consumer (IREE, XLA's PJRT C API). Needs ``flatbuffers``.
* ``.onnx``: converted by jax2onnx and run by onnxruntime for the check; any ONNX runtime reads it. Max
  pooling is exported through `flax.linen.max_pool` on -inf-padded maps, the same values as
  `flaxnets.layers.max_pool`: jax2onnx turns the `lax.reduce_window` of the latter into a pooling over all
  four NHWC axes, which onnxruntime refuses.

The check: the exported program and the JAX model run on the same random normal images (``batch`` of
them, 2 by default, and 1: two sizes of the symbolic batch), and every output must agree within
``tolerance`` times the largest magnitude of the JAX model's output (1e-4 by default; float32 results
differ by the order in which each runtime sums). A file that disagrees is not written: `ExportCheckError`
says by how much. Both extras install with ``pip install 'flaxnets[export]'``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import numbers
import os
import secrets
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxnets.cli import unwritable
from flaxnets.features import FeatureNet
from flaxnets.layers import MaxPool, Ops

__all__ = ["FORMATS", "TOLERANCE", "ExportCheckError", "ExportError", "ExportReport", "export", "onnx_ops"]

FORMATS = {".stablehlo": "stablehlo", ".onnx": "onnx"}
TOLERANCE = 1e-4
_INSTALL = "pip install 'flaxnets[export]'"


class ExportError(ValueError):
    """An export that cannot be made as asked (a missing package, a bad argument); one sentence."""


class ExportCheckError(ExportError):
    """The exported program computes something else than the JAX model: nothing was written."""


def _write_new(path: Path, data: bytes, replace: bool) -> None:
    """Write ``data`` beside ``path`` and move it into place, so that no partial file is ever seen there;
    the folders made for it are removed again if the file cannot be written. Without ``replace``, a file
    that appeared at ``path`` meanwhile (another process's) is kept and this one refused."""
    made = [folder for folder in path.parents if not folder.exists()]  # innermost first
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        # "x": a new file with the mode a plain open() gives (0666 less the umask), not mkstemp's 0600; opened
        # before the inner try, as a name another process took is not this one's to remove.
        file = open(temporary, "xb")
        try:
            with file:
                file.write(data)
            if replace:
                os.replace(temporary, path)
            else:
                _link_new(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: something else is in it now
                folder.rmdir()
        raise


def _link_new(source: Path, path: Path) -> None:
    # A hard link is made only where no file is: the check and the write are one step, unlike exists()
    # then rename. On a file system without hard links, the check just before the rename has to do.
    try:
        os.link(source, path)
        return
    except FileExistsError:
        pass
    except OSError:
        if not path.exists():
            os.replace(source, path)
            return
    raise ExportError(f"{path} appeared while exporting; it is kept, and nothing was written.")


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What `export` wrote and how well the file agreed with the JAX model.

    Attributes:
      path, format: the file written and its format.
      input_shape: ``(None, H, W, C)``: the batch is symbolic.
      max_error: the largest absolute difference over every output and checked batch.
      scale: the largest magnitude of the JAX model's outputs (the tolerance is relative to it).
      tolerance: the relative tolerance the check applied.
      bytes: the file's size.
    """

    path: Path
    format: str
    input_shape: tuple[int | None, ...]
    max_error: float
    scale: float
    tolerance: float
    bytes: int

    def describe(self) -> str:
        """One line for a report."""
        relative = self.max_error / self.scale if self.scale else 0.0
        return (f"wrote {self.path} ({self.format}, {self.bytes / 2**20:.1f} MiB, input (batch, "
                f"{', '.join(map(str, self.input_shape[1:]))})): agrees with the JAX model to {relative:.1e} of its "
                f"largest output (tolerance {self.tolerance:.0e}).")


def _onnx_max_pool(x: jnp.ndarray, window: tuple[int, int], strides: tuple[int, int],
                   pads: tuple[tuple[int, int], tuple[int, int]]) -> jnp.ndarray:
    # Padding with -inf first gives `flaxnets.layers.max_pool`'s windows and values exactly.
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, window_shape=tuple(window), strides=tuple(strides), padding="VALID")


def onnx_ops() -> Ops:
    """The kernel set models are exported to ONNX with: `flaxnets.layers.PLAIN` but for max pooling (see
    the module's docstring)."""
    return _ONNX_OPS


_ONNX_OPS = Ops(max_pool=partial(MaxPool, max_pool=_onnx_max_pool))


def _with_ops(model: nn.Module, ops: Ops) -> nn.Module:
    if isinstance(model, FeatureNet):
        return model.clone(model=_with_ops(model.model, ops))
    return model.clone(ops=ops) if hasattr(model, "ops") else model


def _serialize_stablehlo(fn: Callable, shape: tuple[int, ...]) -> tuple[bytes, Callable]:
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {', '.join(map(str, shape))}"), jnp.float32)
    exported = jax.export.export(jax.jit(fn))(spec)
    try:
        data = exported.serialize()
    except (ImportError, ModuleNotFoundError):
        raise ExportError(f"writing StableHLO needs flatbuffers, which is not installed here: {_INSTALL}.") from None
    restored = jax.export.deserialize(data)
    return bytes(data), lambda images: restored.call(images)


def _serialize_onnx(fn: Callable, shape: tuple[int, ...]) -> tuple[bytes, Callable]:
    try:
        import onnxruntime
        for logger in ("jax2onnx", "onnx_ir"):  # tracebacks of plugins for other libraries, notes on value types
            logging.getLogger(logger).setLevel(logging.ERROR)
        from jax2onnx import to_onnx
    except ImportError:
        raise ExportError(f"writing ONNX needs jax2onnx and onnxruntime, which are not installed here: "
                          f"{_INSTALL}.") from None
    with contextlib.redirect_stdout(io.StringIO()):  # some jax2onnx releases print debugging lines
        proto = to_onnx(fn, [("B", *shape)], model_name="flaxnets")
    data = proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return data, lambda images: session.run(None, {name: np.asarray(images)})


_SERIALIZERS = {"stablehlo": _serialize_stablehlo, "onnx": _serialize_onnx}


def _check(exported: Callable, reference: Callable, shape: tuple[int, ...], batches: tuple[int, ...], seed: int,
           tolerance: float) -> tuple[float, float]:
    """Largest absolute difference and largest reference magnitude over ``batches``; raises if they disagree."""
    error, scale = 0.0, 0.0
    rng = np.random.default_rng(seed)
    for batch in batches:
        images = rng.standard_normal((batch, *shape), dtype=np.float32)
        expected = [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(reference(images))]
        got = [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(exported(images))]
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise ExportCheckError(f"the exported program returns shapes {[g.shape for g in got]}, the JAX model "
                                   f"{[e.shape for e in expected]}; nothing was written.")
        error = max([error] + [float(np.max(np.abs(g - e))) if e.size else 0.0 for g, e in zip(got, expected)])
        scale = max([scale] + [float(np.max(np.abs(e))) if e.size else 0.0 for e in expected])
    if not np.isfinite(error) or error > tolerance * scale:
        raise ExportCheckError(f"the exported program differs from the JAX model by up to {error:.3g} where its "
                               f"outputs reach {scale:.3g} (allowed: {tolerance:g} of that); nothing was written.")
    return error, scale


def export(model: nn.Module, variables: Mapping[str, Any], path: str | os.PathLike, *,
           format: Literal["stablehlo", "onnx"] | None = None, input_shape: tuple[int, int, int],
           batch: int = 2, tolerance: float = TOLERANCE, seed: int = 0, overwrite: bool = False) -> ExportReport:
    """Export ``model.apply(variables, images, train=False)`` to ``path`` and check it (see the module).

    Args:
      model, variables: a flaxnets model (``features_only`` ones included) and its variables.
      path: the file to write; its suffix (``.stablehlo``, ``.onnx``) gives the format unless ``format`` does.
      input_shape: ``(H, W, C)`` of the images the file takes; the batch size stays symbolic.
      batch: the batch of random images checked (with a batch of 1 as well).
      tolerance: allowed difference, relative to the largest magnitude of the JAX model's output.
      seed: of the random images.
      overwrite: replace an existing file (else `ExportError`).

    Raises:
      ExportCheckError: the exported program disagrees with the JAX model (nothing is written).
      ExportError: a model that is not a linen module (an NNX one: pass ``model.module, model.variables``),
        a missing package, an unknown format, a tolerance that is not a finite number above 0, a
        file already there, or a folder where no file can be written.
    """
    if not isinstance(model, nn.Module) or not isinstance(variables, Mapping):
        nnx_model = hasattr(model, "module") and hasattr(model, "variables")  # flaxnets.nnx.Model, say
        raise ExportError(f"export takes a flax.linen model and its variables, got a {type(model).__name__} and a "
                          f"{type(variables).__name__}"
                          + ("; for an NNX model pass model.module, model.variables." if nnx_model else "."))
    path = Path(path)
    kind = format or FORMATS.get(path.suffix)
    if kind not in _SERIALIZERS:
        raise ExportError(f"cannot tell the format of {path}: name it .stablehlo or .onnx, or pass format= "
                          f"({' or '.join(_SERIALIZERS)}).")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; choose another name or pass overwrite=True.")
    finite = isinstance(tolerance, numbers.Real) and not isinstance(tolerance, bool) and math.isfinite(tolerance)
    if not (finite and tolerance > 0):  # nan would pass every comparison, a negative tolerance none
        raise ExportError(f"tolerance must be a finite number above 0, got {tolerance!r}.")
    shape = tuple(int(side) for side in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ExportError(f"input_shape is (height, width, channels), got {tuple(input_shape)!r}.")
    problem = unwritable(path.parent)
    if problem:  # found out now, not after minutes of conversion
        raise ExportError(f"cannot write {path}: {problem}.")
    variables = {c: variables[c] for c in ("params", "batch_stats") if c in variables}
    reference_fn = jax.jit(lambda images: model.apply(variables, images, train=False))
    exported_model = _with_ops(model, _ONNX_OPS) if kind == "onnx" else model
    data, run_exported = _SERIALIZERS[kind](lambda images: exported_model.apply(variables, images, train=False), shape)
    error, scale = _check(run_exported, reference_fn, shape, tuple(sorted({1, batch})), seed, tolerance)
    try:
        _write_new(path, data, replace=overwrite)
    except OSError as error:  # the folder changed since the check, or the disk is full
        raise ExportError(f"cannot write {path} ({error.strerror or error}); nothing was written.") from None
    return ExportReport(path, kind, (None, *shape), error, scale, tolerance, len(data))
