"""Independent references: PyTorch and torchvision on the CPU, when they are installed.

torchvision 0.28.0 from the package registry is a CUDA build: its compiled operators do not load on the
CPU-only torch 2.13.0, and importing it fails unless the two operator schemas it registers Python
implementations for already exist. Defining them (and nothing else) lets every model build and run on
CPU; detection operators stay unusable, which no test needs.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest


def _native_operators_load(torch) -> bool:
    """Whether torchvision's compiled operators load into this torch. Asked before torchvision is
    imported: where they load, they register the schemas themselves and a shim would clash with them."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to shim; the import below reports the absence
    for library in Path(spec.submodule_search_locations[0]).glob("_C*"):
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError):
            return False
        return True
    return False


def _schemas_registered(torch) -> bool:
    """Whether the two schemas are already defined in this process."""
    try:
        torch.ops.torchvision.nms  # noqa: B018 - looking it up is the question
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.cache
def _load():
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the machine
        return None, None, f"torch is not installed ({error}); install the 'parity' extra"
    # A second copy of this file in the process (benchmarks/vs_torch.py loads it under its own name) finds
    # the shim of the first already registered: defining the namespace twice is an error in torch.
    if not _native_operators_load(torch) and not _schemas_registered(torch):
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _load.library = library  # keep the definitions alive
    try:
        import torchvision
    except Exception as error:  # pragma: no cover - depends on the machine
        return torch, None, f"torchvision does not import here ({type(error).__name__}: {error})"
    return torch, torchvision, None


def torch_or_skip():
    """The ``torch`` module, or skip the calling test with the reason it is unavailable."""
    torch, _, reason = _load()
    if torch is None:
        pytest.skip(reason)
    return torch


def torchvision_or_skip():
    """``(torch, torchvision)``, or skip the calling test with the reason they are unavailable."""
    torch, torchvision, reason = _load()
    if torchvision is None:
        pytest.skip(reason)
    return torch, torchvision
