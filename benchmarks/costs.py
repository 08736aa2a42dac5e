"""Analytic costs of each layer, from shapes alone (nothing is allocated or compiled).

Two counts of multiply-accumulates (MACs) are kept for every convolution and dense layer:

* ``macs``: output elements times the taps of one output, ``k_h * k_w * c_in / groups`` for a convolution
  (padding taps included). This is the convention of torchvision's published GFLOPS and of most papers.
* ``macs_valid``: only the taps that land inside the input. XLA's cost analysis counts this way: a 3x3
  convolution with padding 1 on an 8x8 map has 22x22 valid taps per channel pair, not 8x8x9 = 24x24.

XLA's ``flops`` of a convolution or dense layer is then exactly ``2 * macs_valid`` plus one addition per
output element for the bias; everything else it counts (normalisation, activations, pooling, residual
additions, the loss) is elementwise work that the MAC conventions leave out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

__all__ = ["LayerCost", "layer_costs", "totals", "valid_taps"]


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One leaf layer's shapes and costs for a batch of one (multiply by the batch for more)."""

    path: str
    kind: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    state: int  # non-trainable variables (BatchNorm running statistics)
    macs: int  # convention of torchvision and the papers: padding taps included
    macs_valid: int  # taps inside the input only: XLA's convention
    bias_adds: int  # one addition per output element of a layer with a bias
    activation_bytes: int  # the layer's output, at the compute dtype
    weight_bytes: int  # parameters and statistics, float32

    @property
    def arithmetic_intensity(self) -> float | None:
        """FLOPs (2 per MAC) per byte of weights, input and output moved once; ``None`` without MACs."""
        if not self.macs:
            return None
        moved = self.weight_bytes + self.activation_bytes * (1 + _ratio(self.input_shape, self.output_shape))
        return 2 * self.macs / moved


def _ratio(shape_in: Sequence[int], shape_out: Sequence[int]) -> float:
    return math.prod(shape_in) / max(math.prod(shape_out), 1)


def valid_taps(size: int, out: int, kernel: int, stride: int, pad_low: int, dilation: int = 1) -> int:
    """Kernel taps inside an input of ``size`` over ``out`` output positions along one axis."""
    count = 0
    for position in range(out):
        start = position * stride - pad_low
        count += sum(1 for tap in range(kernel) if 0 <= start + tap * dilation < size)
    return count


def _pair(value: Any, default: int = 1) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    return tuple(int(v) for v in value)


def _pads_low(padding: Any, size: tuple[int, int], out: tuple[int, int], kernel: tuple[int, int],
              stride: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    """The padding before each spatial axis, for any padding flax's Conv accepts."""
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return (0, 0)
        lows = []
        for axis in range(2):  # SAME / SAME_LOWER: the total a full output needs, split low-first
            effective = (kernel[axis] - 1) * dilation[axis] + 1
            total = max((out[axis] - 1) * stride[axis] + effective - size[axis], 0)
            lows.append(total // 2 if padding.upper() == "SAME" else total - total // 2)
        return tuple(lows)
    if isinstance(padding, int):
        return (padding, padding)
    pads = list(padding)
    return tuple(int(p[0]) if isinstance(p, (tuple, list)) else int(p) for p in pads)


def _conv_macs(module: Any, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> tuple[int, int]:
    kernel = _pair(module.kernel_size)
    stride = _pair(module.strides)
    dilation = _pair(getattr(module, "kernel_dilation", None))
    if _pair(getattr(module, "input_dilation", None)) != (1, 1):
        raise NotImplementedError("transposed (input-dilated) convolutions are not counted")
    groups = getattr(module, "feature_group_count", 1) or 1
    batch = math.prod(shape_out[:-3])
    out_hw, in_hw = shape_out[-3:-1], shape_in[-3:-1]
    per_tap = shape_in[-1] // groups * shape_out[-1]  # input channels of a group times output channels
    macs = batch * math.prod(out_hw) * math.prod(kernel) * per_tap
    lows = _pads_low(module.padding, in_hw, out_hw, kernel, stride, dilation)
    taps = [valid_taps(in_hw[a], out_hw[a], kernel[a], stride[a], lows[a], dilation[a]) for a in range(2)]
    return macs, batch * taps[0] * taps[1] * per_tap


def layer_costs(model: Any, input_shape: tuple[int, ...] | None = None, *, dtype_bytes: int = 4,
                num_classes: int | None = None, **overrides: Any) -> list[LayerCost]:
    """Every leaf layer of ``model`` (a registry name or a module) with its analytic costs.

    ``input_shape`` is ``(N, H, W, C)``; by default one image at the architecture's native size. Layers
    other than convolutions and dense layers have no MACs; their cost is elementwise.
    """
    from flaxnets.analysis import trace_layers

    rows, _, _ = trace_layers(model, input_shape, num_classes=num_classes, **overrides)
    out = []
    for row in rows:
        macs = valid = bias = 0
        if row.kind == "Conv":
            macs, valid = _conv_macs(row.module, row.input_shape, row.output_shape)
        elif row.kind == "Dense":
            macs = valid = math.prod(row.input_shape) * row.output_shape[-1]
        if row.kind in ("Conv", "Dense") and getattr(row.module, "use_bias", False):
            bias = math.prod(row.output_shape)
        out.append(LayerCost(row.path, row.kind, row.input_shape, row.output_shape, row.params, row.state, macs,
                             valid, bias, math.prod(row.output_shape) * dtype_bytes, (row.params + row.state) * 4))
    return out


def totals(costs: Sequence[LayerCost]) -> dict[str, int]:
    """Sums of the additive columns over ``costs``."""
    keys = ("params", "state", "macs", "macs_valid", "bias_adds", "activation_bytes", "weight_bytes")
    return {key: sum(getattr(c, key) for c in costs) for key in keys}
