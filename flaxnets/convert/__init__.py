"""Weights in and out: torchvision ``state_dict``s to flaxnets variables and back, with numerical parity.

Every architecture torchvision has (alexnet, vgg11..19 with and without BatchNorm, squeezenet1_0 and 1_1,
googlenet, inception_v3, resnet18..152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2,
wide_resnet101_2, densenet121..201) is
laid out in flaxnets with module names that mirror torchvision's ``state_dict`` keys, so a conversion is a
table of names plus four layout changes:

* convolution kernels: PyTorch ``(out, in, kh, kw)`` (OIHW) -> flax ``(kh, kw, in, out)`` (HWIO);
* dense kernels: ``torch.nn.Linear`` stores ``(out, in)`` and computes ``x @ W.T``; flax stores ``(in, out)``;
* the first dense layer of AlexNet, VGG and GoogLeNet's auxiliary heads: torchvision flattens ``(C, H, W)``
  feature maps, flaxnets ``(H, W, C)``; the rows of that layer are permuted, so the model stays NHWC;
* BatchNorm: ``weight``/``bias``/``running_mean``/``running_var`` -> params ``scale``/``bias`` and
  batch_stats ``mean``/``var``. ``num_batches_tracked`` is dropped on the way in (PyTorch only reads it when
  ``momentum=None``) and written as 0 on the way out.

Nothing else changes: `flaxnets.layers` pools, pads and normalises as PyTorch does (unbiased running
variance included), so converted weights give torchvision's outputs in both modes (tests/test_convert.py).

Two facts of torchvision's GoogLeNet and Inception v3 live outside their ``state_dict``. ``transform_input``
is a model field: torchvision's ImageNet weights were trained with it on (its ``googlenet()`` and
``inception_v3()`` builders set it whenever weights are given), so build with `pretrained_overrides`
(``transform_input=True``) to reproduce them. The auxiliary heads are in a checkpoint only if the torch
model had them; `from_torch` follows the checkpoint, and `load_pretrained` initialises GoogLeNet's afresh
when they are missing (torchvision's are untrained anyway: "the auxiliary heads in the pretrained googlenet
model are NOT pretrained", its builder warns). Inception v3's pretrained checkpoint has its trained head.

Files: ``.pth``/``.pt``/``.bin`` are read without torch (`flaxnets.pth`, which refuses any pickle that names
more than tensors) and written with it; ``.safetensors`` and ``.npz`` are read and written with numpy alone.
`load_pretrained` also takes the name of a published weight set (``"IMAGENET1K_V1"``) or a URL, downloaded
once into a cache and checked (`flaxnets.hub`). This package imports jax, flax and numpy only.

Where things are: each family declares its torchvision layout (module names, flattened dense layers,
auxiliary heads, renamed keys, class layers) beside its definition, as a `flaxnets.torch_layout.TorchLayout`
on its specs; `flaxnets.convert.tensors` matches and converts tensors by those facts alone,
`flaxnets.convert.files` reads and writes state dicts, and `flaxnets.convert.finetune` fits a checkpoint to
a new class count.
"""

from flaxnets.convert.files import WeightsFileError, load_state_dict, save_state_dict
from flaxnets.convert.finetune import head_mask, head_paths, input_kernel, load_pretrained, pretrained_overrides
from flaxnets.convert.tensors import StateDictMismatchError, from_torch, supported_models, to_torch, torch_shapes

__all__ = [
    "StateDictMismatchError",
    "WeightsFileError",
    "from_torch",
    "to_torch",
    "load_pretrained",
    "load_state_dict",
    "save_state_dict",
    "head_paths",
    "head_mask",
    "input_kernel",
    "pretrained_overrides",
    "supported_models",
    "torch_shapes",
]
