"""torchvision's own record of its ImageNet weights, as flaxnets' table holds them (`flaxnets.hub`).

Read from the installed torchvision's ``*_Weights`` enums, offline: tests/test_hub.py compares the shipped
table with it, and ``python tests/weights_table.py`` writes flaxnets/data/ again after a torchvision upgrade.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

DATA = pathlib.Path(__file__).resolve().parent.parent / "flaxnets" / "data"
# The weight sets flaxnets publishes: torchvision's ImageNet classifiers. vgg16's IMAGENET1K_FEATURES is
# left out: its classifier holds NaN (torchvision: "only the features module has valid values").
SETS = ("IMAGENET1K_V1", "IMAGENET1K_V2")


def weights_entry(weights) -> dict:
    """One ``WeightsEnum`` member as a table row: file, hash prefix, accuracy and evaluation preprocessing."""
    import inspect

    from torch.hub import HASH_REGEX

    preset = weights.transforms  # functools.partial(ImageClassification, crop_size=..., ...)
    defaults = {name: p.default for name, p in inspect.signature(preset.func).parameters.items()}
    settings = {**defaults, **preset.keywords}
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    return {
        "url": weights.url,
        "sha256_prefix": HASH_REGEX.search(weights.url.rsplit("/", 1)[1]).group(1),
        "acc@1": metrics["acc@1"],
        "acc@5": metrics["acc@5"],
        "num_params": weights.meta["num_params"],
        "resize": settings["resize_size"],
        "crop": settings["crop_size"],
        "interpolation": settings["interpolation"].value,
        "mean": list(settings["mean"]),
        "std": list(settings["std"]),
    }


def build() -> tuple[dict, list[str]]:
    """(the weights table, the 1,000 ImageNet class names) from the installed torchvision."""
    torchvision = _torchvision()
    from torchvision.models import get_model_weights
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    import flaxnets

    weights, default = {}, {}
    for arch in flaxnets.list_models():
        builder = flaxnets.get_spec(arch).torchvision
        if not builder:
            continue
        enum = get_model_weights(builder)
        weights[arch] = {member.name: weights_entry(member) for member in enum if member.name in SETS}
        default[arch] = enum.DEFAULT.name
    table = {
        "source": f"torchvision {torchvision.__version__}: the {', '.join(SETS)} members of torchvision.models' "
                  "*_Weights enums (tests/weights_table.py)",
        "base_url": "https://download.pytorch.org/models/",
        "default": default,
        "weights": weights,
    }
    return table, list(_IMAGENET_CATEGORIES)


def _torchvision():
    """torchvision, imported through tests/reference.py (which lets the registry's CUDA build import on CPU)."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from reference import _load

    _, torchvision, reason = _load()
    if torchvision is None:
        raise RuntimeError(reason)
    return torchvision


def dumps(table: dict) -> str:
    """The table as JSON with one line per weight set, so that a diff shows which set changed."""
    lines = ["{"]
    for key in ("source", "base_url", "default"):
        lines.append(f" {json.dumps(key)}: {json.dumps(table[key])},")
    lines.append(' "weights": {')
    archs = list(table["weights"])
    for i, arch in enumerate(archs):
        sets = table["weights"][arch]
        lines.append(f"  {json.dumps(arch)}: {{")
        for j, (name, entry) in enumerate(sets.items()):
            lines.append(f"   {json.dumps(name)}: {json.dumps(entry)}" + ("," if j < len(sets) - 1 else ""))
        lines.append("  }" + ("," if i < len(archs) - 1 else ""))
    lines += [" }", "}"]
    return "\n".join(lines) + "\n"


def write() -> None:
    table, classes = build()
    (DATA / "torchvision_weights.json").write_text(dumps(table))
    (DATA / "imagenet_classes.txt").write_text("\n".join(classes) + "\n")


if __name__ == "__main__":
    write()
