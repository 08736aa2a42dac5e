"""The geometry of one image, in numpy and Pillow, as the streamed pipeline's worker processes apply it:
resizing and centre crops (`flaxnets.images`: torchvision's rounding, so published weights see the pixels
they were scored on), random resized and ten crops, and reading an example straight to its crop
(`read_crop`, through `train.data.jpeg`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from flaxnets.images import center_crop, resize
from train.data import jpeg

__all__ = ["crop_box", "read_crop", "ten_crops", "eval_side"]


def crop_box(h: int, w: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a crop of an ``h`` x ``w`` image with random area fraction in ``scale``
    and aspect ratio in ``ratio`` (log-uniform); after ten misses, the centre crop of the whole image at the
    nearest allowed ratio. It needs the image's size only, so a JPEG's header is enough to choose it."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def read_crop(source: Sequence, index: int, geometry: Callable[[int, int], jpeg.Crop],
              decoder: str | None = None) -> tuple[np.ndarray, int]:
    """Example ``index`` of ``source``, cropped and resized as ``geometry`` (the image's height and width ->
    a `jpeg.Crop`) says, and its label.

    With a ``decoder`` ("pillow" or "opencv", `train.data.jpeg`) and a source that gives its examples'
    encoded bytes (``source.encoded(index) -> (bytes, label)``), a JPEG is decoded straight to the crop, at
    reduced size where the crop allows. Anything else is decoded whole and cropped with Pillow's
    resampling, through ``source[index]`` (which reports and skips a damaged file).
    """
    encoded = getattr(source, "encoded", None) if decoder else None
    if encoded is not None:
        try:
            data, label = encoded(index)
            shape = jpeg.jpeg_shape(data)
            if shape is not None:
                return jpeg.decode_crop(data, geometry(*shape), decoder), label
        except OSError:  # unreadable, or damaged past its header: the whole-image path says so and skips it
            pass
    image, label = source[index]
    crop = geometry(*image.shape[:2])
    region = image[crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
    return resize(region, crop.out_height, crop.out_width), label


def mirror(image: np.ndarray) -> np.ndarray:
    """``image`` (HxW or HxWxC) flipped left to right, as a contiguous array. With OpenCV installed its
    flip does it: numpy's copy of a reversed view steps through a colour image three bytes at a time, many
    times slower (benchmarks/RESULTS.md). OpenCV would drop a single channel's axis, so such an image takes
    numpy's way."""
    cv2 = jpeg.opencv()
    keeps_shape = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (2, 3, 4))
    if cv2 is not None and image.dtype == np.uint8 and keeps_shape:
        return cv2.flip(image, 1)
    return np.ascontiguousarray(image[:, ::-1])


def ten_crops(image: np.ndarray, side: int) -> np.ndarray:
    """torchvision's ``TenCrop``: the four corner crops and the centre crop (offsets rounded as
    `flaxnets.images.center_crop` rounds them), then the same five of the mirrored image:
    ``(10, side, side, C)``."""

    def five(picture: np.ndarray) -> list[np.ndarray]:
        h, w = picture.shape[:2]
        corners = ((0, 0), (0, w - side), (h - side, 0), (h - side, w - side))
        return [picture[top:top + side, left:left + side] for top, left in corners] + [center_crop(picture, side)]

    return np.stack(five(image) + five(mirror(image)))


def eval_side(side: int) -> int:
    """The shorter side evaluation resizes to before its centre crop of ``side``: 256 for 224."""
    return round(side * 256 / 224)
