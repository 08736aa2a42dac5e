"""Every command's ``--help`` as a terminal shows it: plain words (no reST backticks from the docstrings it
quotes), and the trainer's flags each in one titled group; and no benchmark has a place it writes to
unless told. The parsers are built, never run."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil

import pytest

import benchmarks
from train.arguments import GROUPS, build_parser
from train.config import Config

COMMANDS = ["train.__main__", "train.evaluate", "train.predict", "train.plots", "train.data.__main__",
            "train.recipes.__main__", "flaxnets.__main__", "benchmarks.gpu.runner",
            *sorted(f"benchmarks.{m.name}" for m in pkgutil.iter_modules(benchmarks.__path__) if not m.ispkg)]


class _Built(BaseException):
    """Raised where a command would parse its arguments: the parser is built and nothing runs."""


def _parsers(command: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parser(s) ``command``'s main builds (``python -m flaxnets export`` has its own), with their
    subcommands' parsers."""
    module = importlib.import_module(command)
    if not hasattr(module, "main"):
        return []
    built = []

    def capture(self, args=None, namespace=None):
        built.append(self)
        raise _Built

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    for argv in ([], ["export"]) if command == "flaxnets.__main__" else ([],):
        with pytest.raises(_Built):
            module.main(argv)
    found = []
    while built:
        parser = built.pop()
        found.append(parser)
        built += [sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                  for sub in action.choices.values()]
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_words(command, monkeypatch):
    for parser in _parsers(command, monkeypatch):
        text = parser.format_help()
        assert "`" not in text, f"{parser.prog} --help shows reST markup:\n{text}"
        assert text.endswith("\n")


def test_every_flag_of_the_trainer_is_in_exactly_one_titled_group():
    parser = build_parser()
    titles = [title for title, _ in GROUPS]
    assert [group.title for group in parser._action_groups][-len(titles):] == titles
    placed = [action.dest for group in parser._action_groups if group.title in titles
              for action in group._group_actions]
    untitled = [action.dest for group in parser._action_groups if group.title not in titles
                for action in group._group_actions]
    assert untitled == ["help"]
    assert len(placed) == len(set(placed))
    assert set(placed) == {field.name for field in dataclasses.fields(Config)} | {"config"}


@pytest.mark.parametrize("command", [command for command in COMMANDS if command.startswith("benchmarks.")])
def test_a_benchmark_writes_only_into_a_folder_or_file_it_is_given(command, monkeypatch):
    for parser in _parsers(command, monkeypatch):
        for action in parser._actions:
            if action.dest in ("out", "json", "folder"):
                assert action.default is None, f"{parser.prog} {action.option_strings[0]} has a default"
