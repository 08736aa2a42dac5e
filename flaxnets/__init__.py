"""flaxnets: the classic image-classification CNNs, LeNet-5 to DenseNet-201, as pure `flax.linen` modules.

>>> import flaxnets, jax, jax.numpy as jnp
>>> model = flaxnets.create_model("resnet18", num_classes=10)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
>>> logits = model.apply(variables, jnp.zeros((8, 32, 32, 3)), train=False)   # (8, 10)

``import flaxnets`` loads the models, the registry, the analysis, feature maps and the torchvision weights'
reader and converter (plain NumPy; torch is never imported). What only some callers need is imported when
first asked for (``flaxnets.gpu.ops()`` works after ``import flaxnets``): `flaxnets.cpu` and `flaxnets.gpu`
(kernel sets for XLA's CPU and GPU backends), `flaxnets.nnx` (the models as Flax NNX modules),
`flaxnets.export` (StableHLO and ONNX files), `flaxnets.training` (optax pieces of a training recipe),
`flaxnets.augment` and `flaxnets.autoaugment` (augmentation on the device) and `flaxnets.images`
(preparing images as torchvision's weights were scored).
"""

import importlib

from flaxnets import hub, layers, models  # noqa: F401  (models registers every architecture)
from flaxnets.analysis import count_params, min_input_size, summary
from flaxnets.convert import from_torch, load_pretrained, pretrained_overrides, to_torch
from flaxnets.features import FeatureInfo, FeatureNet, forward_intermediates
from flaxnets.layers import BatchNorm, LocalResponseNorm
from flaxnets.pretrained import from_pretrained, reset_classifier, save_pretrained
from flaxnets.registry import (ModelSpec, UnknownModelError, create_model, feature_info, get_spec, list_models,
                               model_info)

__version__ = "0.1.0"

# Submodules loaded on first use (PEP 562), so that `import flaxnets` never pays for them.
_ON_DEMAND = ("augment", "autoaugment", "cpu", "export", "gpu", "images", "nnx", "training")


def __getattr__(name: str):
    if name in _ON_DEMAND:
        return importlib.import_module(f"flaxnets.{name}")
    raise AttributeError(f"module 'flaxnets' has no attribute {name!r}")


__all__ = [
    "BatchNorm",
    "FeatureInfo",
    "FeatureNet",
    "LocalResponseNorm",
    "ModelSpec",
    "UnknownModelError",
    "count_params",
    "create_model",
    "feature_info",
    "forward_intermediates",
    "from_pretrained",
    "from_torch",
    "get_spec",
    "hub",
    "layers",
    "list_models",
    "load_pretrained",
    "min_input_size",
    "model_info",
    "models",
    "pretrained_overrides",
    "reset_classifier",
    "save_pretrained",
    "summary",
    "to_torch",
]
