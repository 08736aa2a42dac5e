"""Images prepared as published weights were scored: torchvision's evaluation preprocessing, in numpy and Pillow.

The shorter side resized with bilinear interpolation (Pillow's, which torchvision's ``Resize`` uses on
Pillow images; the longer side truncated as it truncates it), the centre crop (its offsets rounded as
``CenterCrop`` rounds them), pixels scaled to [0, 1] and normalised per channel. `prepare` does all of it
for a batch; `flaxnets.hub.Weights.preprocess` calls it with one weight set's sizes, mean and std. The
trainer's streamed pipeline resizes and crops with the same functions, so a model trained here and
torchvision's weights see images the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["resize", "shorter_size", "resize_shorter", "center_crop", "prepare"]


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A uint8 ``(H, W, C)`` image at ``height`` x ``width``, with Pillow's bilinear filter (C is 1 or 3)."""
    from PIL import Image

    if image.shape[:2] == (height, width):
        return image
    grey = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if grey else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR, reducing_gap=None))
    return out[..., None] if grey else out


def shorter_size(height: int, width: int, side: int) -> tuple[int, int]:
    """The size with the shorter side ``side`` and the aspect ratio kept. The longer side is truncated, not
    rounded, as torchvision's ``Resize(side)`` does, so published weights see the pixels they were scored on."""
    if height <= width:
        return side, int(side * width / height)
    return int(side * height / width), side


def resize_shorter(image: np.ndarray, side: int) -> np.ndarray:
    """Scale so the shorter side is ``side`` (`shorter_size`)."""
    return resize(image, *shorter_size(*image.shape[:2], side))


def center_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The central ``side`` x ``side`` square, its offsets rounded as torchvision's ``CenterCrop`` rounds them
    (Python's round of half the margin). An image smaller than ``side`` is stretched to it, where
    torchvision pads it with zeros."""
    h, w = image.shape[:2]
    top, left = max(0, int(round((h - side) / 2.0))), max(0, int(round((w - side) / 2.0)))
    out = image[top:top + side, left:left + side]
    return out if out.shape[:2] == (side, side) else resize(out, side, side)


def _rgb(image: Any) -> np.ndarray:
    """A Pillow image or an array as uint8 ``(H, W, 3)``: grey replicated, an alpha channel dropped."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a Pillow image, in any mode
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"images are uint8 pixels (0-255) or Pillow images; got an array of {array.dtype}.")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image is (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {array.shape}.")
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]


def prepare(images: Any | Sequence[Any], *, resize: int, crop: int, mean: Sequence[float],
            std: Sequence[float]) -> np.ndarray:
    """One image or several (Pillow images or uint8 arrays, grey or colour, of any sizes; a list, or an
    ``(N, H, W, C)`` array) as the float32 NHWC batch ``(N, crop, crop, 3)`` a model takes: the shorter side
    resized to ``resize``, the centre ``crop``, ``(pixels / 255 - mean) / std``.
    """
    if hasattr(images, "convert") or (not isinstance(images, (list, tuple)) and np.ndim(images) in (2, 3)):
        batch = [images]  # one image: a Pillow image, or an (H, W) or (H, W, C) array
    else:
        batch = list(images)  # a list, or an (N, H, W, C) array
    if not batch:
        raise ValueError("no images to prepare.")
    pixels = np.stack([center_crop(resize_shorter(_rgb(image), resize), crop) for image in batch])
    return (pixels.astype(np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
