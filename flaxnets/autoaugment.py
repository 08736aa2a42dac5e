"""TrivialAugment Wide and RandAugment as pure JAX functions of one uint8 image and a key, for use inside a
jitted (and vmapped) training step.

The fourteen operations, their order, their magnitude bins and the way each policy samples them are
torchvision's (``torchvision.transforms.autoaugment``, v0.28: ``TrivialAugmentWide`` and ``RandAugment``
with their defaults: nearest interpolation, fill 0), and each operation computes what torchvision's tensor
implementation computes on a uint8 image (``torchvision.transforms._functional_tensor``), to float32
rounding:

- TrivialAugment Wide (Muller and Hutter, "TrivialAugment: Tuning-free Yet State-of-the-Art Data
  Augmentation", ICCV 2021, arXiv:2103.10158): one operation, uniformly chosen, at a uniformly chosen bin
  of 31, its sign flipped with probability 1/2 where it has one.
- RandAugment (Cubuk, Zoph, Shlens, Le, "RandAugment: Practical automated data augmentation with a reduced
  search space", CVPR Workshops 2020, arXiv:1909.13719): ``num_ops`` operations in a row, each uniformly
  chosen, all at bin ``magnitude`` of 31 (9 by default), signs flipped with probability 1/2.

Departures: the choice of operation is a `lax.switch`, which under `jax.vmap` evaluates every operation for
every image and keeps one (cheap beside a network's step: see benchmarks/RESULTS.md); affine matrices are
computed in float32 where torchvision computes them in float64, so a pixel whose source coordinate falls
within float32 rounding of a half-pixel can come from the neighbouring pixel.

    >>> import jax, jax.numpy as jnp
    >>> from flaxnets import autoaugment
    >>> images = jnp.zeros((8, 32, 32, 3), jnp.uint8)
    >>> keys = jax.random.split(jax.random.key(0), 8)
    >>> out = jax.vmap(autoaugment.trivial_augment_wide)(images, keys)   # uint8, (8, 32, 32, 3)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["OPS", "trivial_augment_wide", "rand_augment", "apply_op", "magnitude_table"]

# torchvision's order of the operations (the keys of its ``_augmentation_space``): a draw of index k picks
# the same operation here and there.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
       "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
SIGNED = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast",
                    "Sharpness"})


def magnitude_table(policy: str, num_bins: int = 31, image_size: tuple[int, int] = (32, 32)) -> np.ndarray:
    """``(len(OPS), num_bins)`` float32: the magnitude of each operation at each bin, as torchvision's
    ``_augmentation_space`` of ``policy`` ("trivial_augment_wide" or "rand_augment") defines it; operations
    without a magnitude hold zeros. ``image_size`` (height, width) scales RandAugment's translations."""
    def line(stop: float) -> np.ndarray:
        return np.linspace(0.0, stop, num_bins, dtype=np.float32)

    bins = np.arange(num_bins, dtype=np.float32)
    if policy == "trivial_augment_wide":
        rows = {"ShearX": line(0.99), "ShearY": line(0.99), "TranslateX": line(32.0), "TranslateY": line(32.0),
                "Rotate": line(135.0), "Brightness": line(0.99), "Color": line(0.99), "Contrast": line(0.99),
                "Sharpness": line(0.99), "Posterize": 8 - np.round(bins / ((num_bins - 1) / 6))}
    elif policy == "rand_augment":
        height, width = image_size
        rows = {"ShearX": line(0.3), "ShearY": line(0.3), "TranslateX": line(150.0 / 331.0 * width),
                "TranslateY": line(150.0 / 331.0 * height), "Rotate": line(30.0), "Brightness": line(0.9),
                "Color": line(0.9), "Contrast": line(0.9), "Sharpness": line(0.9),
                "Posterize": 8 - np.round(bins / ((num_bins - 1) / 4))}
    else:
        raise ValueError(f"policy must be 'trivial_augment_wide' or 'rand_augment', got {policy!r}.")
    rows["Solarize"] = np.linspace(255.0, 0.0, num_bins, dtype=np.float32)
    table = np.zeros((len(OPS), num_bins), np.float32)
    for index, name in enumerate(OPS):
        if name in rows:
            table[index] = rows[name]
    return table


# -- the operations, each (uint8 HWC image, float32 magnitude) -> uint8 image --------------------------------
def _to_uint8(x: jnp.ndarray) -> jnp.ndarray:
    """Clamp to [0, 255] and truncate, as torchvision's ``.clamp(0, 255).to(torch.uint8)``."""
    return jnp.clip(x, 0.0, 255.0).astype(jnp.uint8)


def _blend(image: jnp.ndarray, other: jnp.ndarray, magnitude: jnp.ndarray) -> jnp.ndarray:
    """``(1 + m) * image - m * other``, torchvision's ``_blend`` at ratio 1 + m: it forms 1 - ratio in float64,
    which is -m exactly, where 1 - float32(1 + m) would not be (a flat region would lose one grey level)."""
    return _to_uint8((1.0 + magnitude) * image.astype(jnp.float32) + (-magnitude) * other)


def _grayscale(image: jnp.ndarray) -> jnp.ndarray:
    """ITU-R 601-2 luma, truncated to uint8 as torchvision's ``rgb_to_grayscale``; grey images as they are."""
    if image.shape[-1] == 1:
        return image
    x = image.astype(jnp.float32)
    return (0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).astype(jnp.uint8)[..., None]


def _warp(image: jnp.ndarray, inverse: jnp.ndarray) -> jnp.ndarray:
    """Nearest-neighbour resampling through the inverse affine map ``inverse`` (2x3, centred coordinates):
    torchvision's tensor ``affine``/``rotate`` (an affine grid, then ``grid_sample`` without corner
    alignment, zeros outside the image)."""
    h, w = image.shape[:2]
    # Output pixel centres in coordinates centred on the image, as torchvision's _gen_affine_grid.
    xs = jnp.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, dtype=jnp.float32)[None, :]
    ys = jnp.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, dtype=jnp.float32)[:, None]
    scaled = inverse / jnp.asarray([[0.5 * w], [0.5 * h]], jnp.float32)
    gx = xs * scaled[0, 0] + ys * scaled[0, 1] + scaled[0, 2]
    gy = xs * scaled[1, 0] + ys * scaled[1, 1] + scaled[1, 2]
    # grid_sample's unnormalisation without corner alignment, then round half to even (std::nearbyint).
    col = jnp.round(((gx + 1.0) * w - 1.0) / 2.0).astype(jnp.int32)
    row = jnp.round(((gy + 1.0) * h - 1.0) / 2.0).astype(jnp.int32)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    picked = image[jnp.clip(row, 0, h - 1), jnp.clip(col, 0, w - 1)]
    return jnp.where(inside[..., None], picked, jnp.zeros_like(picked))


def _matrix(*entries) -> jnp.ndarray:
    """A 2x3 affine matrix in float32 from its six entries, row by row (numbers or scalar arrays)."""
    return jnp.stack([jnp.asarray(e, jnp.float32) for e in entries]).reshape(2, 3)


def _identity(image, magnitude):
    return image


def _shear_x(image, magnitude):
    # torchvision shears by atan(magnitude) degrees about the top-left corner: the inverse map is
    # x' = x + m * y + m * h / 2 in centred coordinates.
    h = image.shape[0]
    return _warp(image, _matrix(1.0, magnitude, magnitude * h / 2, 0.0, 1.0, 0.0))


def _shear_y(image, magnitude):
    w = image.shape[1]
    return _warp(image, _matrix(1.0, 0.0, 0.0, magnitude, 1.0, magnitude * w / 2))


def _translate_x(image, magnitude):
    shift = jnp.trunc(magnitude)  # torchvision takes int(magnitude) pixels
    return _warp(image, _matrix(1.0, 0.0, -shift, 0.0, 1.0, 0.0))


def _translate_y(image, magnitude):
    shift = jnp.trunc(magnitude)
    return _warp(image, _matrix(1.0, 0.0, 0.0, 0.0, 1.0, -shift))


def _rotate(image, magnitude):
    # Counter-clockwise by ``magnitude`` degrees about the centre (torchvision's rotate passes -angle on).
    angle = -magnitude * (math.pi / 180.0)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return _warp(image, _matrix(cos, sin, 0.0, -sin, cos, 0.0))


def _brightness(image, magnitude):
    return _blend(image, jnp.zeros(image.shape, jnp.float32), magnitude)


def _color(image, magnitude):
    if image.shape[-1] == 1:  # torchvision leaves a grey image's saturation alone
        return image
    return _blend(image, _grayscale(image).astype(jnp.float32), magnitude)


def _contrast(image, magnitude):
    return _blend(image, jnp.mean(_grayscale(image).astype(jnp.float32)), magnitude)


def _sharpness(image, magnitude):
    """Blend with the image smoothed by the 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 inside its
    one-pixel border (the border kept), as PIL's ImageFilter.SMOOTH and torchvision."""
    h, w, c = image.shape
    if h <= 2 or w <= 2:
        return image
    x = image.astype(jnp.float32)
    kernel = jnp.ones((3, 3), jnp.float32).at[1, 1].set(5.0) / 13.0
    inner = sum(kernel[dy, dx] * x[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
    smooth = x.at[1:-1, 1:-1].set(jnp.round(inner))
    return _blend(image, smooth, magnitude)


def _posterize(image, magnitude):
    shift = (8 - magnitude.astype(jnp.int32)).astype(jnp.uint8)  # keep int(magnitude) bits
    return jnp.left_shift(jnp.right_shift(image, shift), shift)


def _solarize(image, magnitude):
    return jnp.where(image.astype(jnp.float32) >= magnitude, 255 - image, image)


def _autocontrast(image, magnitude):
    x = image.astype(jnp.float32)
    low, high = x.min(axis=(0, 1)), x.max(axis=(0, 1))
    flat = high == low  # torchvision's infinite scale: that channel stays as it is
    # torch divides a number by a tensor as number * (1 / tensor), which rounds differently from 255 / d.
    scale = jnp.where(flat, 1.0, 255.0 * (1.0 / jnp.where(flat, 1.0, high - low)))
    return _to_uint8((x - jnp.where(flat, 0.0, low)) * scale)


def _equalize_channel(channel: jnp.ndarray) -> jnp.ndarray:
    """Histogram equalisation of one uint8 channel, torchvision's ``_scale_channel`` in integers."""
    histogram = jnp.bincount(channel.reshape(-1).astype(jnp.int32), length=256)
    # The histogram's non-zero bins but the last: every pixel but those of the brightest value.
    step = (channel.size - histogram[channel.max().astype(jnp.int32)]) // 255
    safe = jnp.maximum(step, 1)
    lut = (jnp.cumsum(histogram) + safe // 2) // safe
    lut = jnp.clip(jnp.concatenate([jnp.zeros(1, lut.dtype), lut[:-1]]), 0, 255).astype(jnp.uint8)
    return jnp.where(step == 0, channel, lut[channel.astype(jnp.int32)])


def _equalize(image, magnitude):
    # Channels first and vmapped: XLA's CPU backend ran the three strided channel slices 4 to 6 times slower.
    return jnp.moveaxis(jax.vmap(_equalize_channel)(jnp.moveaxis(image, -1, 0)), 0, -1)


_FUNCTIONS = {"Identity": _identity, "ShearX": _shear_x, "ShearY": _shear_y, "TranslateX": _translate_x,
              "TranslateY": _translate_y, "Rotate": _rotate, "Brightness": _brightness, "Color": _color,
              "Contrast": _contrast, "Sharpness": _sharpness, "Posterize": _posterize, "Solarize": _solarize,
              "AutoContrast": _autocontrast, "Equalize": _equalize}
_BRANCHES = tuple(_FUNCTIONS[name] for name in OPS)


def apply_op(image: jnp.ndarray, op: int | jnp.ndarray, magnitude: float | jnp.ndarray) -> jnp.ndarray:
    """Operation ``OPS[op]`` at ``magnitude`` (already signed) on one uint8 image ``(H, W, C)``, C 1 or 3;
    torchvision's ``_apply_op``."""
    if image.dtype != jnp.uint8 or image.ndim != 3:
        raise ValueError(f"apply_op takes one uint8 image (H, W, C), got {image.dtype} {image.shape}.")
    return lax.switch(jnp.asarray(op, jnp.int32), _BRANCHES, image, jnp.asarray(magnitude, jnp.float32))


def _signed(name_index: jnp.ndarray, magnitude: jnp.ndarray, key: jnp.ndarray) -> jnp.ndarray:
    signed = jnp.asarray([name in SIGNED for name in OPS])[name_index]
    flip = jax.random.bernoulli(key) & signed
    return jnp.where(flip, -magnitude, magnitude)


def trivial_augment_wide(image: jnp.ndarray, key: jnp.ndarray, num_bins: int = 31) -> jnp.ndarray:
    """One uint8 image ``(H, W, C)`` through TrivialAugment Wide: a uniformly drawn operation at a uniformly
    drawn bin of ``num_bins``, signed at random where the operation has a sign."""
    table = jnp.asarray(magnitude_table("trivial_augment_wide", num_bins))
    op_key, bin_key, sign_key = jax.random.split(key, 3)
    op = jax.random.randint(op_key, (), 0, len(OPS))
    magnitude = table[op, jax.random.randint(bin_key, (), 0, num_bins)]
    return apply_op(image, op, _signed(op, magnitude, sign_key))


def rand_augment(image: jnp.ndarray, key: jnp.ndarray, num_ops: int = 2, magnitude: int = 9,
                 num_bins: int = 31) -> jnp.ndarray:
    """One uint8 image ``(H, W, C)`` through RandAugment: ``num_ops`` uniformly drawn operations in a row, all
    at bin ``magnitude`` of ``num_bins``, each signed at random where it has a sign."""
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"RandAugment's magnitude must be a bin in 0..{num_bins - 1}, got {magnitude}.")
    table = jnp.asarray(magnitude_table("rand_augment", num_bins, image.shape[:2]))
    for key in jax.random.split(key, num_ops):
        op_key, sign_key = jax.random.split(key)
        op = jax.random.randint(op_key, (), 0, len(OPS))
        image = apply_op(image, op, _signed(op, table[op, magnitude], sign_key))
    return image
