"""``python -m train.recipes [NAME]``: list the shipped recipes, or print one (its reference, departures,
settings and expected figures)."""

import json
import sys

from train.exits import run_command
from train.arguments import CommandParser
from train.config import ConfigError
from train.recipes import RecipeError, list_recipes, load_recipe


def main(argv=None) -> int:
    parser = CommandParser(prog="python -m train.recipes", description=__doc__)
    parser.add_argument("name", nargs="?", help="a recipe to print in full")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.name:
            try:
                recipe = load_recipe(args.name)
            except RecipeError as error:
                raise ConfigError(str(error)) from None
            print(json.dumps({"name": recipe.name, "version": recipe.version, "reference": recipe.reference,
                              "departures": recipe.departures, "settings": recipe.settings,
                              "expected_top1": recipe.expected_top1, "expected_from": recipe.expected_from},
                             indent=2))
            return 0
        for name in list_recipes():
            recipe = load_recipe(name)
            expected = ", ".join(f"{arch} {top1:.2%}" for arch, top1 in recipe.expected_top1.items())
            print(f"{recipe.label}: {recipe.reference}; expected test top-1: {expected or 'none stated'}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
