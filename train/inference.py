"""Using a trained checkpoint without training: finding it, rebuilding its model, scoring and predicting.

Shared by ``python -m train.evaluate`` and ``python -m train.predict``. A checkpoint's ``meta`` item says
which architecture, classes, input side and normalisation it was trained with, so prediction needs no
dataset at all.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import flaxnets
from train.checkpoint import CheckpointError, Checkpoints, describe_error, drained_event_loops
from train.step import Preprocess

__all__ = ["locate", "load_variables", "predict_images", "read_images"]


def locate(path: str, which: str = "latest") -> tuple[str, int]:
    """``(workdir, step)`` for a workdir (``which``: latest, best or a step number) or a checkpoint folder."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder (give a --workdir of a run, or one of its checkpoints).")
    if os.path.basename(os.path.dirname(path)) == "checkpoints" and os.path.basename(path).isdigit():
        return os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
    checkpoints = Checkpoints(path, warn=lambda message: None)
    try:
        steps = checkpoints.steps()
        if not steps:
            raise CheckpointError(f"{path} holds no checkpoint (expected {path}/checkpoints/STEP).")
        if which == "latest":
            return path, steps[-1]
        if which == "best":
            best = checkpoints.best_step()
            if best is None:
                raise CheckpointError(f"{path} has no checkpoint saved with its accuracy (only interrupted or older "
                                      f"ones: steps {steps}); use --checkpoint latest or a step number.")
            return path, best
        if which.isdigit() and int(which) in steps:
            return path, int(which)
        raise CheckpointError(f"{path} has no checkpoint {which!r}; it has latest, best and steps {steps}.")
    finally:
        checkpoints.close()


def load_variables(workdir: str, step: int) -> tuple[dict[str, Any], dict]:
    """The model variables (params and batch_stats) and the meta of checkpoint ``step``."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                   "meta": ocp.JsonCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        # Onto this process's first device, whatever devices it was saved from: restored as saved, the
        # checkpoint of a multi-process run names other processes' devices and Orbax refuses it
        # ("Topology mismatch detected").
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        metadata = manager.item_metadata(step)["state"]
        target = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                                        getattr(metadata, "tree", metadata))
        with drained_event_loops():
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                     meta=ocp.args.JsonRestore()))
    except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
        raise CheckpointError(f"checkpoint {step} in {workdir} cannot be read ({describe_error(error)}).") from None
    finally:
        manager.close()
    state = restored["state"]
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    return variables, restored["meta"]


def read_images(paths: list[str], shape: tuple[int, int, int], side: int | None = None) -> np.ndarray:
    """Image files as uint8 ``(N, H, W, C)`` in the training data's size and channels (grey or RGB).

    A model trained on images of varying size (a streamed dataset, whose recorded shape is 0x0) sees each
    file as evaluation did: the shorter side resized to 256/224 of ``side``, then the centre crop.
    """
    from PIL import Image, UnidentifiedImageError

    from train.data.sources import decode_image
    from train.data.stream import center_crop, resize_shorter

    height, width, channels = shape
    if not (height and width) and not side:
        raise CheckpointError("the checkpoint records neither an image shape nor an input side.")
    out = []
    for path in paths:
        try:
            array = decode_image(path, channels)
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist.") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise CheckpointError(f"{path} is not an image PIL can read ({error}).") from None
        if height and width:
            pil = Image.fromarray(array[..., 0] if channels == 1 else array)
            array = np.asarray(pil.resize((width, height), Image.BILINEAR), np.uint8).reshape(height, width, channels)
        else:
            array = center_crop(resize_shorter(array, round(side * 256 / 224)), side)
        out.append(array)
    return np.stack(out)


def predict_images(variables: dict, meta: dict, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Class probabilities ``(N, classes)`` of uint8 images already in the training data's shape, by the
    model a checkpoint's ``meta`` describes (architecture, options, classes, input side, normalisation).

    One compiled function for every batch: the last batch is padded to ``batch_size``, not compiled again.
    """
    from train.archs import resolve_arch

    dataset = meta["dataset"]
    resolve_arch(meta["arch"])  # a model of the user's own is registered again in this process
    model = flaxnets.create_model(meta["arch"], num_classes=meta["num_classes"],
                                  **(meta.get("config") or {}).get("model_args", {}))
    preprocess = Preprocess(mean=tuple(dataset["mean"]), std=tuple(dataset["std"]), size=meta["image_side"],
                            augment=False)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)

    @jax.jit
    def probabilities(batch):
        return jax.nn.softmax(model.apply(variables, preprocess(batch, None, train=False), train=False))

    batch_size = max(1, min(batch_size, len(images)))
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)])
        out.append(np.asarray(probabilities(jnp.asarray(padded)))[:len(batch)])
    return np.concatenate(out) if out else np.zeros((0, meta["num_classes"]), np.float32)
