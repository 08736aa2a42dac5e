"""Decoding a JPEG straight to a resized crop of it, at reduced size where the crop allows.

A JPEG stores 8x8 blocks of frequencies, and libjpeg can run its inverse transform at 1/2, 1/4 or 1/8 of
the size by leaving out the highest ones: an area-averaging downscale that costs a fraction of a full
decode. When a crop is resized to an output at least that many times smaller in both dimensions, decoding
at that scale first leaves the output the same image up to the difference between two ways of
resampling (measured in benchmarks/RESULTS.md), and the crop box itself is unchanged: it is chosen in
the full-size image from the header's size alone, before anything is decoded.

Two back ends, both built on libjpeg-turbo (their full-size pixels are bitwise equal):

- ``"pillow"``: `PIL.Image.draft` picks the scale; the crop's exact (fractional) box in the reduced image is
  resized with Pillow's antialiased bilinear filter, torchvision's resampling. At scale 1 the result is
  bitwise the one of decoding the whole image, cropping and resizing.
- ``"opencv"`` (``pip install opencv-python-headless``): ``cv2.imdecode`` with ``IMREAD_REDUCED_COLOR_{2,4,8}``;
  the box is rounded to whole pixels of the reduced image (its edges move by at most half of one, under one
  pixel of the output) and resized bilinearly, after a Gaussian blur along each axis it shrinks (close to
  Pillow's antialiasing, `_antialiased_resize`). Faster than Pillow at every step (benchmarks/RESULTS.md),
  so ``"auto"`` takes it when OpenCV is installed.

Only JPEGs that decode to RGB or grey and end with their end-of-image marker take this path (`jpeg_shape`);
the caller decodes anything else (other formats, CMYK, a file cut short) the exact way, which also
reports damaged files.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import math
from types import ModuleType

import numpy as np

from train.data.errors import DataError

__all__ = ["Crop", "BACKENDS", "SCALES", "jpeg_shape", "dct_scale", "decode_crop", "resolve_backend", "opencv"]

BACKENDS = ("auto", "opencv", "pillow")
SCALES = (8, 4, 2, 1)  # the inverse-DCT reductions both back ends offer, largest first


@dataclasses.dataclass(frozen=True)
class Crop:
    """A box of an image, in the pixels of the full-size image, and the size it is resized to."""

    top: int
    left: int
    height: int
    width: int
    out_height: int
    out_width: int


def jpeg_shape(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from the header of a whole JPEG that decodes to RGB or grey; None for anything
    else (another format, CMYK, no end-of-image marker at the end: a file cut short or with bytes appended)."""
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None
    return height, width


def dct_scale(crop: Crop) -> int:
    """The largest of 8, 4, 2 that leaves the crop at least the output's size in both dimensions, else 1."""
    return next((s for s in SCALES if crop.height >= s * crop.out_height and crop.width >= s * crop.out_width), 1)


def decode_crop(data: bytes, crop: Crop, backend: str) -> np.ndarray:
    """The crop of the JPEG ``data`` resized to its output size, uint8 ``(out_height, out_width, 3)``, decoded
    at `dct_scale`; ``backend`` is "pillow" or "opencv". Raises OSError when the data do not decode."""
    if backend == "opencv":
        return _opencv_crop(data, crop)
    if backend == "pillow":
        return _pillow_crop(data, crop)
    raise ValueError(f"unknown JPEG back end {backend!r}")


def _pillow_crop(data: bytes, crop: Crop) -> np.ndarray:
    from PIL import Image

    scale = dct_scale(crop)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if scale > 1:
                # Asking for exactly 1/scale of the size makes draft pick that scale and no larger one; it
                # returns the full image's box in the reduced image, or None where it reduces nothing.
                full_width = image.width
                drafted = image.draft("RGB", (image.width // scale, image.height // scale))
                scale = 1 if drafted is None else round(full_width / drafted[1][2])
            box = (crop.left / scale, crop.top / scale, (crop.left + crop.width) / scale,
                   (crop.top + crop.height) / scale)
            # Cut out the whole pixels around the box first, as torchvision crops before it resizes, so no
            # pixel outside them enters the filter; at scale 1 this is exactly crop-then-resize.
            x0, y0 = math.floor(box[0]), math.floor(box[1])
            x1, y1 = min(math.ceil(box[2]), image.width), min(math.ceil(box[3]), image.height)
            region = image.crop((x0, y0, x1, y1))
    except (OSError, SyntaxError, ValueError) as error:
        raise OSError(f"cannot decode the JPEG ({error})") from None
    size = (crop.out_width, crop.out_height)
    inner = (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
    if region.size != size or inner != (0, 0) + size:
        region = region.resize(size, Image.BILINEAR, box=inner, reducing_gap=None)
    if region.mode != "RGB":
        region = region.convert("RGB")  # grey: resized as one channel, then repeated
    return np.asarray(region)


@functools.cache
def opencv() -> ModuleType | None:
    """OpenCV (``cv2``) with its own thread pool off, or None where it is not installed."""
    if importlib.util.find_spec("cv2") is None:
        return None
    import cv2

    # One image per worker process is the parallelism; OpenCV's own thread pool on every small resize
    # would put that many more threads on the same cores.
    cv2.setNumThreads(1)
    return cv2


def _opencv_crop(data: bytes, crop: Crop) -> np.ndarray:
    cv2 = opencv()
    scale = dct_scale(crop)
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
    try:
        # Pillow (and so torchvision) ignores the EXIF orientation; so must this, or the boxes would differ.
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error as error:
        raise OSError(f"cannot decode the JPEG ({error})") from None
    if bgr is None:
        raise OSError("cannot decode the JPEG")
    top, left = round(crop.top / scale), round(crop.left / scale)
    bottom = min(max(round((crop.top + crop.height) / scale), top + 1), bgr.shape[0])
    right = min(max(round((crop.left + crop.width) / scale), left + 1), bgr.shape[1])
    region = bgr[top:bottom, left:right]
    if region.shape[:2] != (crop.out_height, crop.out_width):
        region = _antialiased_resize(cv2, region, crop.out_height, crop.out_width)
    return cv2.cvtColor(region, cv2.COLOR_BGR2RGB)


def _antialiased_resize(cv2: ModuleType, image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resampling to ``height x width``, blurred first along each axis it shrinks.

    Pillow's antialiased bilinear filter (torchvision's) widens its triangle to the shrink factor ``f``;
    bilinear sampling is that triangle at ``f = 1``. A Gaussian of variance ``(f**2 - 1) / 4`` before it
    brings the pair's width close to Pillow's: pixels as near to Pillow's as OpenCV's area filter, at a
    fraction of its CPU time (the area filter has no fast path for fractional factors; benchmarks/RESULTS.md
    has both comparisons)."""
    sigmas = [math.sqrt((f * f - 1) / 4) if f > 1 else 0.0 for f in (image.shape[0] / height, image.shape[1] / width)]
    if any(sigmas):
        (sy, sx) = sigmas
        # A size-1 kernel leaves an axis that is not shrunk as it is.
        ksize = tuple(2 * math.ceil(3 * s) + 1 if s else 1 for s in (sx, sy))
        image = cv2.GaussianBlur(image, ksize, sigmaX=sx or 1e-3, sigmaY=sy or 1e-3)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def resolve_backend(name: str) -> str:
    """``--decoder`` as a back end: "auto" is "opencv" when OpenCV is installed, else "pillow"; "opencv"
    without OpenCV is a `DataError` naming the package."""
    if name not in BACKENDS:
        raise DataError(f"--decoder must be one of {', '.join(BACKENDS)}; got {name!r}.")
    present = importlib.util.find_spec("cv2") is not None
    if name == "opencv" and not present:
        raise DataError("--decoder opencv needs OpenCV, which is not installed here: pip install "
                        "opencv-python-headless (or pip install -e \".[opencv]\"); --decoder pillow needs nothing "
                        "more.")
    if name == "auto":
        return "opencv" if present else "pillow"
    return name
