"""The architectures flaxnets itself registers, read once when the test modules are collected.

Some tests run the trainer in-process with ``--arch FILE.py:FACTORY``, which registers the user's factory in
the same registry for the rest of that worker's life; a check meant for the library's own families (each
declares its torchvision layout, each family has a feature test) iterates this tuple, never a later
`flaxnets.list_models()`.
"""

from __future__ import annotations

import flaxnets

BUILT_IN: tuple[str, ...] = tuple(flaxnets.list_models())
