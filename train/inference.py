"""Using a trained checkpoint or published weights without training: finding them, rebuilding their model,
scoring and predicting.

Shared by ``python -m train.evaluate`` and ``python -m train.predict``. A checkpoint's ``meta`` item says
which architecture, classes, input side and normalisation it was trained with, so prediction needs no
dataset at all; `published_variables` gives published torchvision weights the same kind of ``meta``, from
the weights table (`flaxnets.hub`): ImageNet's class names and the preprocessing torchvision measured
their accuracy with.
"""

from __future__ import annotations

import os
import sys
import warnings
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import flaxnets
from flaxnets.cli import error_phrase
from train.checkpoint import CheckpointError, Checkpoints
from train.config import WEIGHT_SETS
from train.step import Preprocess, eval_step

__all__ = ["choose_weights", "file_resize", "load_checkpoint", "load_variables", "locate", "open_checkpoint",
           "predict_images", "published_variables", "read_images", "score_split"]


def locate(path: str, which: str = "latest") -> tuple[str, int]:
    """``(workdir, step)`` for a workdir (``which``: latest, best or a step number) or a checkpoint folder."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder (give a --workdir of a run, or one of its checkpoints).")
    if os.path.basename(os.path.dirname(path)) == "checkpoints" and os.path.basename(path).isdigit():
        return os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"{path} holds no checkpoint (expected {path}/checkpoints/STEP).")
    checkpoints = Checkpoints(path, warn=_warn, writable=False)
    try:
        steps = checkpoints.steps()
        if not steps:
            if checkpoints.unusable:
                newest = max(checkpoints.unusable)
                raise CheckpointError(f"no checkpoint in {path} can be read (checkpoint {newest}: "
                                      f"{checkpoints.unusable[newest]}).")
            raise CheckpointError(f"{path} holds no checkpoint (expected {path}/checkpoints/STEP).")
        if which == "latest":
            step = steps[-1]
        elif which == "best":
            step = checkpoints.best_step()
            if step is None:
                raise CheckpointError(f"{path} has no checkpoint saved with its accuracy (only interrupted or older "
                                      f"ones: steps {steps}); use --checkpoint latest or a step number.")
        elif which.isdigit() and int(which) in steps:
            step = int(which)
        elif which.isdigit() and int(which) in checkpoints.unusable:
            raise CheckpointError(f"checkpoint {which} in {path} cannot be read ({checkpoints.unusable[int(which)]}).")
        else:
            raise CheckpointError(f"{path} has no checkpoint {which!r}; it has latest, best and steps {steps}.")
        for warning in checkpoints.skipped(newer_than=step if which == "latest" else None):
            _warn(warning)
        return path, step
    finally:
        checkpoints.close()


def load_checkpoint(workdir: str, step: int) -> tuple[dict[str, Any], dict[str, Any] | None, str, dict]:
    """``(trained, averaged, chosen, meta)`` of checkpoint ``step``: the model variables (params and
    batch_stats) as trained, their moving average (None for a run without ``--ema-decay``), which of the
    two the checkpoint was ranked by ("trained" or "averaged") and its meta. Read only, so that it can run
    while a run trains into ``workdir``."""
    checkpoints = Checkpoints(workdir, warn=_warn, writable=False)
    try:
        state, meta = checkpoints.restore_saved(step)
        ranked_by_average = bool((checkpoints.manager.metrics(step) or {}).get("chosen_ema"))
    finally:
        checkpoints.close()
    where = f"checkpoint {step} in {workdir}"
    trained = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    _check_fit(trained, meta, where)
    averaged = None
    if isinstance(state.get("ema"), dict):
        averaged = {"params": state["ema"]["params"], "batch_stats": state["ema"].get("batch_stats") or {}}
        _check_fit(averaged, meta, f"the averaged weights of {where}")
    return trained, averaged, "averaged" if ranked_by_average and averaged is not None else "trained", meta


def open_checkpoint(path: str, which: str = "latest") -> tuple[str, int, tuple]:
    """``(workdir, step, load_checkpoint(workdir, step))`` for what `locate` finds. With ``which`` "latest"
    (and ``path`` a workdir), a checkpoint whose files fail to load, damage that choosing it could not see
    without reading them, is skipped with a warning for the newest one before it, as training skips it."""
    workdir, step = locate(path, which)
    named = os.path.abspath(path) != workdir  # a checkpoint folder: that one or none
    while True:
        try:
            return workdir, step, load_checkpoint(workdir, step)
        except CheckpointError as error:
            checkpoints = Checkpoints(workdir, warn=lambda message: None, writable=False)
            try:
                earlier = [s for s in checkpoints.steps() if s < step]
            finally:
                checkpoints.close()
            if which != "latest" or named or not earlier:
                raise
            _warn(f"warning: {str(error).rstrip('.')}; using checkpoint {earlier[-1]}, the one before it.")
            step = earlier[-1]


def load_variables(workdir: str, step: int, weights: str = "chosen") -> tuple[dict[str, Any], dict]:
    """The model variables (params and batch_stats) and the meta of checkpoint ``step``. ``weights`` (one
    of `WEIGHT_SETS`): the set the checkpoint was ranked by, the trained one, or the moving average;
    ``meta["weights"]`` says which it is."""
    return choose_weights(load_checkpoint(workdir, step), weights, f"checkpoint {step} in {workdir}")


def choose_weights(loaded: tuple, weights: str, where: str) -> tuple[dict[str, Any], dict]:
    """`load_variables` of what `load_checkpoint` returned for the checkpoint ``where`` names."""
    if weights not in WEIGHT_SETS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_SETS)}, not {weights!r}")
    trained, averaged, chosen, meta = loaded
    if weights == "averaged" and averaged is None:
        raise CheckpointError(f"{where} holds no moving average of the weights (its run had no --ema-decay).")
    name = chosen if weights == "chosen" else weights
    return (averaged if name == "averaged" else trained), {**meta, "weights": name}


def _check_fit(variables: dict, meta: dict, where: str) -> None:
    """Raise `CheckpointError` unless ``variables`` have the shapes of the model ``meta`` describes (a
    checkpoint is untrusted: its arrays and its meta could come from different runs)."""
    from flaxnets.pretrained import misfit

    side, channels = meta["image_side"], meta["dataset"]["image_shape"][-1]
    found = misfit(_model(meta), variables, (side, side, channels))
    if found is not None:
        raise CheckpointError(f"{where} holds variables that do not fit {meta['arch']}: {found.describe()}.")


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def published_variables(arch: str, weights: str) -> tuple[dict[str, Any], dict]:
    """``(variables, meta)`` of torchvision weights, as `load_variables` gives a checkpoint's.

    ``weights`` is a published set's name (``IMAGENET1K_V1``), a URL or a file (`flaxnets.load_pretrained`).
    The meta holds what `predict_images` and `score_split` need: the model fields the weights were trained
    under (`flaxnets.pretrained_overrides`), ImageNet's class names and the weights' preprocessing; for a
    file not in the weights table, that of the architecture's ``IMAGENET1K_V1`` weights.
    """
    from flaxnets import hub
    from flaxnets.pretrained import class_count

    published = hub.find_weights(arch, weights)
    recipe = published or hub.get_weights(arch, "IMAGENET1K_V1")
    overrides = flaxnets.pretrained_overrides(arch)
    if "aux_logits" in flaxnets.registry.model_options(arch):
        # Auxiliary heads only add to the training loss; GoogLeNet's file lacks them, and initialising
        # them afresh would cost a compilation for nothing.
        overrides["aux_logits"] = False
    variables = flaxnets.load_pretrained(arch, weights, **overrides)
    num_classes = class_count(arch, variables)
    classes = hub.imagenet_classes()
    names = list(classes) if num_classes == len(classes) else [f"class {i}" for i in range(num_classes)]
    meta = {
        "arch": arch,
        "num_classes": num_classes,
        "image_side": recipe.crop,
        "resize": recipe.resize,
        "weights": published.name if published else str(weights),
        "published": {"acc1": published.acc1, "acc5": published.acc5} if published else None,
        "dataset": {"name": "imagenet2012", "class_names": names, "image_shape": [0, 0, 3],
                    "mean": list(recipe.mean), "std": list(recipe.std)},
        "config": {"model_args": overrides},
    }
    return variables, meta


def file_resize(meta: dict) -> int | None:
    """The shorter side a file is resized to before its centre crop, where the model's images were not
    taken whole: as the meta records it (published weights, a run that read images of varying size into
    memory), or, for a folder run saved before that was recorded, its input side, at which its images were
    read in; None where files are resized whole or by 256/224 of the side (`read_images`)."""
    if meta.get("resize"):
        return int(meta["resize"])
    if (meta.get("config") or {}).get("dataset") == "folder" and all(meta["dataset"]["image_shape"][:2]):
        return int(meta["image_side"])
    return None


def read_images(paths: list[str], shape: tuple[int, int, int], side: int | None = None,
                resize: int | None = None) -> np.ndarray:
    """Image files as uint8 ``(N, H, W, C)`` in the training data's size and channels (grey or RGB).

    A model trained on images of varying size sees each file as evaluation did: the shorter side resized to
    ``resize`` (recorded where the images were read into memory so; else, for a streamed dataset, whose
    recorded shape is 0x0, 256/224 of ``side``), then the centre crop of ``side``. Images of one size are
    resized to it whole.
    """
    from PIL import Image, UnidentifiedImageError

    from train.data.sources import decode_image
    from flaxnets import images

    height, width, channels = shape
    if not (height and width) and not side:
        raise CheckpointError("the checkpoint records neither an image shape nor an input side.")
    out = []
    for path in paths:
        try:
            with warnings.catch_warnings():
                # PIL warns of images of 89 to 179 million pixels and refuses larger ones: both are refused
                # here, in one sentence, rather than decoded into gigabytes (or echoed as a warning).
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                array = decode_image(path, channels)
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist.") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise CheckpointError(f"{path} is too large to decode safely ({str(error).split(' could')[0]}).") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise CheckpointError(f"{path} is not an image PIL can read ({error}).") from None
        except Exception as error:  # noqa: BLE001 - an image file is untrusted input: anything PIL raises
            raise CheckpointError(f"{path} is not an image PIL can read ({error_phrase(error)}).") from None
        if height and width and not resize:
            array = images.resize(array, height, width)
        else:
            array = images.center_crop(images.resize_shorter(array, resize or round(side * 256 / 224)), side)
        out.append(array)
    return np.stack(out)


def _model(meta: dict):
    """The model a checkpoint's (or published weights') ``meta`` describes; a model of the user's own is
    registered again in this process and checked, so that a factory since broken is one sentence."""
    from train.archs import check_user_model, is_user_arch, resolve_arch

    options = dict((meta.get("config") or {}).get("model_args") or {})
    if is_user_arch(meta["arch"]):
        resolve_arch(meta["arch"])
        check_user_model(meta["arch"], num_classes=meta["num_classes"], channels=meta["dataset"]["image_shape"][-1],
                         side=meta["image_side"], overrides=options)
    return flaxnets.create_model(meta["arch"], num_classes=meta["num_classes"], **options)


def predict_images(variables: dict, meta: dict, images: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Class probabilities ``(N, classes)`` of uint8 images already in the training data's shape, by the
    model a checkpoint's ``meta`` describes (architecture, options, classes, input side, normalisation).

    One compiled function for every batch: the last batch is padded to ``batch_size``, not compiled again.
    """
    dataset = meta["dataset"]
    model = _model(meta)
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


def score_split(variables: dict, meta: dict, data, *, batch_size: int = 256, workers: int = 0) -> dict[str, float]:
    """Top-1, top-5 and mean cross-entropy of the model ``meta`` describes over every example of ``data``'s
    test split (a `train.data.Streamed`), preprocessed as ``meta`` says (resize, centre crop, normalisation).

    The batch is split over this process's devices (``jit`` with the batch axis sharded); the last batch is
    padded and its padding masked out, so every example counts once.
    """
    from types import SimpleNamespace

    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from train.data import DataError
    from train.data.stream import eval_batches

    if not len(data.test):
        raise DataError(f"the {data.test_split} split of {data.name} holds no examples.")
    dataset = meta["dataset"]
    devices = jax.local_devices()
    batch_size = -(-max(1, min(batch_size, len(data.test))) // len(devices)) * len(devices)
    preprocess = Preprocess(mean=tuple(dataset["mean"]), std=tuple(dataset["std"]), size=meta["image_side"],
                            augment=False)
    mesh = Mesh(np.asarray(devices), ("batch",))
    sharded = NamedSharding(mesh, PartitionSpec("batch"))
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    # The trainer's own evaluation step (its masked sums), reading the variables where it reads a state's.
    step = partial(eval_step, model=_model(meta), preprocess=preprocess, num_classes=meta["num_classes"])
    sums = jax.jit(lambda variables, batch: step(SimpleNamespace(**variables), batch))
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    totals = None
    for batch in eval_batches(data, side=meta["image_side"], batch=batch_size, workers=workers,
                              resize=meta.get("resize")):
        if np.any((batch["label"] < 0) & batch["mask"]):
            raise DataError(f"the {data.test_split} split of {data.name} has unlabelled examples (label -1): score "
                            "a labelled split, e.g. --split validation.")
        batch = {key: jax.device_put(np.asarray(batch[key]), sharded) for key in ("image", "label", "mask")}
        out = sums(variables, batch)
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    totals = {key: float(value) for key, value in totals.items()}
    count = totals["count"]
    return {"examples": int(count), "top1": totals["correct"] / count, "top5": totals["correct5"] / count,
            "loss": totals["loss_sum"] / count}
