"""flaxnets: the classic image-classification CNNs, LeNet-5 to ResNet-152, as pure `flax.linen` modules.

>>> import flaxnets, jax, jax.numpy as jnp
>>> model = flaxnets.create_model("resnet18", num_classes=10)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
>>> logits = model.apply(variables, jnp.zeros((8, 32, 32, 3)), train=False)   # (8, 10)
"""

from flaxnets import cpu, hub, layers, models  # noqa: F401  (models registers every architecture)
from flaxnets.analysis import count_params, min_input_size, summary
from flaxnets.convert import from_torch, load_pretrained, pretrained_overrides, to_torch
from flaxnets.layers import BatchNorm, LocalResponseNorm
from flaxnets.registry import ModelSpec, UnknownModelError, create_model, get_spec, list_models, model_info

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "LocalResponseNorm",
    "ModelSpec",
    "UnknownModelError",
    "count_params",
    "cpu",
    "create_model",
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
    "summary",
    "to_torch",
]
