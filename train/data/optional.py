"""The packages only some datasets need, imported where they are used.

tensorflow-datasets (with array_record) reads datasets it prepared; Grain streams datasets too large for
memory. Neither is needed to import flaxnets, `train` or `benchmarks`, nor to train on a dataset held in
memory (digits, the MNIST and CIFAR files), so a machine with jax, flax and optax but without them, such
as an accelerator host set up with ``pip install --no-deps -e .``, still trains and benchmarks.
"""

from __future__ import annotations

import contextlib
import importlib
import pathlib
import tempfile
from types import ModuleType
from typing import Iterator

from train.data.errors import DataError

__all__ = ["require", "PACKAGES", "no_stray_tfds_folders"]

# import name -> the name pip installs it by (both are dependencies of flaxnets in pyproject.toml)
PACKAGES = {"tensorflow_datasets": "tensorflow-datasets", "array_record": "array-record", "grain": "grain"}


def require(module: str, needed_for: str) -> ModuleType:
    """``module`` imported; if it is missing, a `DataError` saying that ``needed_for`` needs it and how to
    install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = PACKAGES.get(module, module)
        raise DataError(f"{needed_for} needs {package}, which is not installed here: pip install {package} "
                        "(pip install -e . installs it with the rest of flaxnets).") from None


@contextlib.contextmanager
def no_stray_tfds_folders() -> Iterator[None]:
    """Around a call into tensorflow-datasets: remove the empty temporary folders it made meanwhile. It makes
    one for every builder of a dataset whose info files are not on disk (`DatasetInfo.initialize_from_bucket`,
    to copy them from its bucket, which is off) and never removes it: two for each "not prepared" refusal."""
    root = pathlib.Path(tempfile.gettempdir())
    before = set(root.glob("tmp*tfds"))
    try:
        yield
    finally:
        for folder in set(root.glob("tmp*tfds")) - before:
            with contextlib.suppress(OSError):  # empty ones only: a folder in use by anyone stays
                folder.rmdir()
