"""Where a family's variables sit in torchvision's ``state_dict``: the facts `flaxnets.convert` works from.

Each family declares one `TorchLayout` beside its definition (``flaxnets/models/<family>.py``) and hands it to
every `ModelSpec` it registers, the way timm keeps a model's pretrained configuration next to the model. The
conversion itself (`flaxnets.convert`) reads only these facts and knows no family by name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import flax.linen as nn

__all__ = ["TorchLayout", "dotted", "joined"]

ModulePath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """One family's torchvision ``state_dict`` layout, as data.

    Attributes:
      heads: the param sub-trees of the class layers, whose shapes follow ``num_classes`` (the first is the
        main one: its kernel's last axis counts the classes). Every family has them, torchvision's or not.
      module_name: flax module path -> torchvision module name (``("layer1_0", "conv1")`` ->
        ``"layer1.0.conv1"``), given the built model; None for families torchvision does not have.
      flattened: the dense layers that follow a flatten of ``(C, H, W)`` maps in torchvision, each with the
        ``(H, W)`` grid it flattens (a function of the built model); their input rows are permuted, since
        flaxnets flattens ``(H, W, C)``.
      aux_heads: the top-level modules of the auxiliary heads, present when the model field ``aux_logits`` is
        on; a state_dict holding them implies ``aux_logits=True``.
      untrained: sub-trees a published checkpoint may lack, initialised afresh by ``load_pretrained``.
      renamed_keys: ``(pattern, replacement)`` pairs (`re.sub`) that bring the keys of older torchvision
        releases to their current names.
      pretrained_overrides: model fields under which torchvision's own ImageNet weights reproduce its
        pretrained model (one architecture's fact: set it on that spec's layout with `dataclasses.replace`).
    """

    heads: tuple[ModulePath, ...]
    module_name: Callable[[nn.Module, ModulePath], str] | None = None
    flattened: Mapping[ModulePath, Callable[[nn.Module], tuple[int, int]]] = dataclasses.field(default_factory=dict)
    aux_heads: tuple[str, ...] = ()
    untrained: tuple[ModulePath, ...] = ()
    renamed_keys: tuple[tuple[str, str], ...] = ()
    pretrained_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def dotted(model: nn.Module, path: ModulePath, *, renamed: Mapping[str, str] | None = None) -> str:
    """The name rule of models whose flax names end in a Sequential's index: ``layer1_0/conv1`` ->
    ``layer1.0.conv1``, ``branch2_1/bn`` -> ``branch2.1.bn``; ``renamed`` replaces whole segments first."""
    renamed = renamed or {}
    return ".".join(renamed.get(segment) or re.sub(r"_(\d+)$", r".\1", segment) for segment in path)


def joined(model: nn.Module, path: ModulePath) -> str:
    """The name rule of models whose flax modules carry torchvision's names: ``Mixed_6e/branch7x7_2/conv``."""
    return ".".join(path)
