"""Random erasing, mixup and cutmix as pure JAX functions, for use inside a jitted training step.

- `random_erasing`: torchvision's ``RandomErasing`` (Zhong, Zheng, Kang, Li, Yang, "Random Erasing Data
  Augmentation", AAAI 2020, arXiv:1708.04896) on one normalised image: with probability ``p``, a rectangle
  of 2-33% of the area and aspect ratio 0.3-3.3 (log-uniform) is set to ``value`` (0: the mean pixel after
  normalisation, torchvision's default). Like torchvision it tries ten rectangles and erases the first that
  fits inside the image, or nothing.
- `mix`: timm's ``Mixup`` (``timm.data.mixup``) of a batch: mixup (Zhang, Cisse, Dauphin, Lopez-Paz,
  "mixup: Beyond Empirical Risk Minimization", ICLR 2018, arXiv:1710.09412) and cutmix (Yun, Han, Oh, Chun,
  Choe, Yoo, "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features", ICCV
  2019, arXiv:1905.04899), each example mixed with the example at the mirrored position of the batch, with
  probability ``prob``, cutmix chosen over mixup with probability ``switch_prob`` when both are on,
  lambda ~ Beta(alpha, alpha), the cutmix box square in proportion to the image, centred uniformly, clipped
  at the borders, and lambda corrected to the area actually pasted. ``mode="batch"`` draws one lambda (and
  box) for the batch, ``"elem"`` one per example, as timm's modes of those names.

    >>> import jax, jax.numpy as jnp
    >>> from flaxnets import augment
    >>> images, targets = jnp.zeros((8, 32, 32, 3)), jax.nn.one_hot(jnp.arange(8), 10)
    >>> images, targets = augment.mix(images, targets, jax.random.key(0), mixup_alpha=0.2, cutmix_alpha=1.0)
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["random_erasing", "mix", "mix_params", "cutmix_box"]


def random_erasing(image: jnp.ndarray, key: jnp.ndarray, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0, attempts: int = 10) -> jnp.ndarray:
    """One image ``(H, W, C)`` with, with probability ``p``, a random rectangle set to ``value``."""
    h, w = image.shape[:2]
    apply_key, area_key, ratio_key, top_key, left_key = jax.random.split(key, 5)
    area = h * w * jax.random.uniform(area_key, (attempts,), minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(ratio_key, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    heights = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    widths = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (heights < h) & (widths < w)
    first = jnp.argmax(fits)  # the first rectangle that fits, as torchvision's loop takes it
    height, width = heights[first], widths[first]
    top = jax.random.randint(top_key, (), 0, h - height + 1)
    left = jax.random.randint(left_key, (), 0, w - width + 1)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    erase = inside & fits.any() & jax.random.bernoulli(apply_key, p)
    return jnp.where(erase[..., None], jnp.asarray(value, image.dtype), image)


def cutmix_box(key: jnp.ndarray, lam: jnp.ndarray, height: int, width: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """timm's ``rand_bbox``: a box of sides ``int(side * sqrt(1 - lam))`` centred at a uniform pixel and clipped
    to the image. Returns the ``(height, width)`` mask of the box and its area as a fraction of the image."""
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
    y_key, x_key = jax.random.split(key)
    cy, cx = jax.random.randint(y_key, (), 0, height), jax.random.randint(x_key, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    mask = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return mask, ((bottom - top) * (right - left)) / (height * width)


def mix_params(key: jnp.ndarray, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
               switch_prob: float = 0.5) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One draw of timm's ``_params_per_batch``: ``(lam, use_cutmix)``, lam 1 (no mixing) with probability
    1 - ``prob``."""
    if not (mixup_alpha > 0 or cutmix_alpha > 0):
        raise ValueError("mix needs mixup_alpha > 0 or cutmix_alpha > 0.")
    apply_key, switch_key, cut_key, mix_key = jax.random.split(key, 4)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_key) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    # Only the alphas that are on are drawn from (a Beta with alpha 0 is not a distribution).
    lam_cut = jax.random.beta(cut_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
    lam_mix = jax.random.beta(mix_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
    lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
    return jnp.where(jax.random.uniform(apply_key) < prob, lam, 1.0), use_cutmix


def mix(images: jnp.ndarray, targets: jnp.ndarray, key: jnp.ndarray, *, mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0, prob: float = 1.0, switch_prob: float = 0.5,
        mode: Literal["batch", "elem"] = "batch") -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mixup or cutmix of ``images`` ``(N, H, W, C)`` (float) with ``targets`` ``(N, K)`` (one-hot, smoothed or
    not), as timm's ``Mixup``: example i is mixed with example N - 1 - i. Returns the mixed images and
    targets; each target row keeps its total mass."""
    n, h, w = images.shape[:3]
    if mode not in ("batch", "elem"):
        raise ValueError(f"mix mode must be 'batch' or 'elem', got {mode!r}.")

    def params(key):
        lam, use_cutmix = mix_params(key, mixup_alpha, cutmix_alpha, prob, switch_prob)
        box_key = jax.random.fold_in(key, 1)
        mask, area = cutmix_box(box_key, lam, h, w)
        mask = mask & use_cutmix & (lam < 1.0)
        # timm's correct_lam: cutmix's lambda is the share of the image that stays the example's own.
        return jnp.where(use_cutmix & (lam < 1.0), 1.0 - area, lam), use_cutmix, mask

    if mode == "batch":
        lam, use_cutmix, mask = params(key)
        lam, use_cutmix, mask = jnp.full((n,), lam), jnp.full((n,), use_cutmix), jnp.broadcast_to(mask, (n, h, w))
    else:
        lam, use_cutmix, mask = jax.vmap(params)(jax.random.split(key, n))
    partner = images[::-1]
    weight = lam.astype(images.dtype)[:, None, None, None]
    blended = weight * images + (1 - weight) * partner
    pasted = jnp.where(mask[..., None], partner, images)
    mixed = jnp.where(use_cutmix[:, None, None, None], pasted, blended)
    targets = lam[:, None] * targets + (1.0 - lam[:, None]) * targets[::-1]
    return mixed, targets
