"""Training recipes as data: ``python -m train --recipe NAME`` starts from the settings of ``NAME.json`` in this
folder (or of a recipe file given by its path), which the ``--config`` file's and the command line's override.

A recipe file is a JSON object:

- ``name`` and ``version`` (a whole number, raised whenever a setting changes; ``--recipe NAME@VERSION``
  insists on one);
- ``reference``: the paper or published recipe it follows, and ``departures``: where it does not;
- ``settings``: `train.config.Config` keys and values;
- ``expected_top1``: architecture name -> the test top-1 the recipe is expected to reach with it, and
  ``expected_from``: where that number comes from.

`train.config.Config.from_recipe` turns one into settings; the run records ``recipe`` in its config.json
(``NAME@VERSION``, or the path of a file of the user's), and its last line puts its own test top-1 beside
the expected one (`report_line`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

__all__ = ["Recipe", "RecipeError", "load_recipe", "list_recipes", "report_line", "RECIPES_DIR"]

RECIPES_DIR = os.path.dirname(os.path.abspath(__file__))
_KEYS = ("name", "version", "reference", "departures", "settings", "expected_top1", "expected_from")


class RecipeError(ValueError):
    """A recipe that cannot be read or used; the message is one sentence naming the file."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One recipe file, read and checked (`load_recipe`)."""

    name: str
    version: int
    reference: str
    settings: dict[str, Any]
    expected_top1: dict[str, float]
    expected_from: str = ""
    departures: str = ""
    path: str = ""

    @property
    def label(self) -> str:
        """What a run's config records: ``NAME@VERSION`` for a shipped recipe, the path of another file."""
        return f"{self.name}@{self.version}" if os.path.dirname(self.path) == RECIPES_DIR else self.path


def list_recipes() -> list[str]:
    """The names of the recipes shipped in this folder."""
    return sorted(entry[:-len(".json")] for entry in os.listdir(RECIPES_DIR) if entry.endswith(".json"))


def load_recipe(name: str) -> Recipe:
    """The recipe ``name`` (a shipped name, optionally ``@VERSION``, or a path to a recipe file), checked;
    a `RecipeError` names what is wrong."""
    wanted = None
    if not name.endswith(".json") and "@" in name:
        name, _, version = name.rpartition("@")
        if not version.isdigit():
            raise RecipeError(f"--recipe {name}@{version}: the version after @ is a whole number.")
        wanted = int(version)
    path = name if name.endswith(".json") or os.sep in name else os.path.join(RECIPES_DIR, f"{name}.json")
    try:
        with open(path) as handle:
            values = json.load(handle)
    except FileNotFoundError:
        raise RecipeError(f"--recipe {name} is neither a recipe ({', '.join(list_recipes())}) nor a recipe file.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"recipe file {path} cannot be read ({error}).") from None
    except json.JSONDecodeError as error:
        raise RecipeError(f"recipe file {path} is not valid JSON ({error.msg}, line {error.lineno}).") from None
    if not isinstance(values, dict) or not {"name", "version", "reference", "settings"} <= set(values):
        raise RecipeError(f"recipe file {path} must be a JSON object with name, version, reference and settings.")
    unknown = sorted(set(values) - set(_KEYS))
    if unknown:
        raise RecipeError(f"recipe file {path} has unknown key(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}.")
    recipe = Recipe(values["name"], values["version"], values["reference"], values["settings"],
                    values.get("expected_top1", {}), values.get("expected_from", ""), values.get("departures", ""),
                    os.path.abspath(path))
    expected = recipe.expected_top1
    if isinstance(recipe.version, bool) or not isinstance(recipe.version, int) or not isinstance(recipe.settings, dict) \
            or not isinstance(expected, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         and 0 < v <= 1 for v in expected.values()):
        raise RecipeError(f"recipe file {path}: version must be a whole number, settings an object, and "
                          "expected_top1 map architectures to accuracies in (0, 1].")
    if wanted is not None and wanted != recipe.version:
        raise RecipeError(f"recipe {recipe.name} is at version {recipe.version}; version {wanted} is not the one "
                          f"in {path}.")
    return recipe


def report_line(recipe: str | None, arch: str, test_top1: float) -> str | None:
    """The run's test top-1 beside what its recipe (a config's ``recipe``) expects for ``arch``; None
    without a recipe."""
    if not recipe:
        return None
    try:
        loaded = load_recipe(recipe)
    except RecipeError:
        return f"recipe {recipe}: its file is no longer here, so there is no expected figure to compare with."
    expected = loaded.expected_top1.get(arch)
    head = f"recipe {loaded.label} ({loaded.reference})"
    if expected is None:
        known = ", ".join(sorted(loaded.expected_top1)) or "none"
        return f"{head}: no expected figure for {arch} (it has one for {known})."
    delta = 100 * (test_top1 - expected)
    source = f"; expected from {loaded.expected_from}" if loaded.expected_from else ""
    return (f"{head}: test top-1 {test_top1:.2%} against the {expected:.2%} expected for {arch} "
            f"({delta:+.2f} points){source}.")
