"""What the commands share about the network they look at.

``python -m flaxnets summary`` and the benchmarks (``profile``, ``flops``, ``throughput``) take the same
``--model-arg KEY=VALUE`` options of the architecture (repeatable, passed to `create_model`) and, where
the input matters, the same ``--input-size``, ``--channels`` and ``--num-classes``. `request_from_args`
reads them into a `ModelRequest`, and `ModelRequest.checked` turns every refusal (an unknown option, a
value the module rejects, an input below the architecture's minimum) into one `ModelRequestError`
sentence before anything is compiled. `PlainParser` is the parser of ``python -m flaxnets``: a bad argument
is one sentence, and ``--help`` shows the docstrings it quotes without their reST markup (the commands of
``train`` and the benchmarks use `train.arguments.CommandParser`, which does the same without importing
flaxnets: a streamed run's Grain workers import the trainer's command line again).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import secrets
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn

from flaxnets.analysis import abstract_variables, min_input_size
from flaxnets.registry import ModelSpec, UnknownOptionError, create_model, get_spec, parse_model_arg

__all__ = ["ModelRequest", "ModelRequestError", "PlainParser", "add_model_arguments", "error_phrase", "out_of_memory",
           "plain", "request_from_args", "closed_pipe_status", "unwritable"]


# ``code`` and `name` (reST's literal and interpreted text) around anything but a backtick.
_MARKUP = re.compile(r"``([^`]+)``|`([^`]+)`")


def error_phrase(error: BaseException, limit: int = 200) -> str:
    """An exception as a phrase for a one-sentence message: its kind and the first line of what it says
    (at most ``limit`` characters), e.g. ``"TypeError: unexpected keyword 'width'"``; the kind alone when it
    says nothing. XLA's pointers into its own sources (``[external/xla/...]``) are left out."""
    text = str(error).strip()
    text = _XLA_SOURCE.sub("", text.splitlines()[0]).strip()[:limit] if text else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


_XLA_SOURCE = re.compile(r"\[external/[^\]]*\]\s*")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's report of memory a device could not allocate, when compiling or running,
    on any backend (a GPU's ``RESOURCE_EXHAUSTED``, a CPU's "Out of memory allocating ... bytes"), or the
    host's `MemoryError`."""
    if isinstance(error, MemoryError):
        return True
    import jax

    text = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in text
                                                               or "out of memory" in text.lower())


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why no file can be written into ``folder`` (made with its parents where missing), as a phrase for a
    one-sentence message, e.g. ``"results/a is not a folder"``; None when one can.

    A file is made and removed in the nearest folder that exists: permission bits do not tell, as root
    ignores them while /proc, /sys and read-only mounts refuse files all the same.
    """
    existing = os.path.normpath(folder)  # relative stays relative: the message names the folder as it was given
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing) or os.curdir
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    probe = os.path.join(existing, f".flaxnets-probe.{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as error:
        return f"no file can be made in {existing} ({error.strerror or error})"
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def closed_pipe_status() -> int:
    """After a `BrokenPipeError` (the reader of the output left, as ``| head`` does): stdout pointed at
    /dev/null, so that the interpreter's last flush fails no more, and the status a shell shows for a POSIX
    tool that SIGPIPE ended (128 + 13)."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 128 + 13


def plain(text: str) -> str:
    """``text`` without its reST inline markup: the words a terminal should show."""
    return _MARKUP.sub(lambda match: match.group(1) or match.group(2), text)


class PlainParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that reports a bad argument in one sentence (exit 2, no usage dump) and
    whose help is plain words: descriptions are the modules' docstrings, written in reST for the API pages,
    and a terminal would show their backticks as they are."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"error: {message} (see --help)\n")

    def format_help(self) -> str:  # noqa: D102
        return plain(super().format_help())


class ModelRequestError(ValueError):
    """A network a command cannot build as asked; the message is one sentence for stderr."""


@dataclasses.dataclass(frozen=True)
class ModelRequest:
    """An architecture as a command asks for it; ``None`` means the architecture's own value.

    Attributes:
      name: registry name.
      options: `create_model` keywords from ``--model-arg``.
      input_size: side of the square input (default: the native size).
      channels: input channels (default: those of its usual data).
      num_classes: width of the logits (default: the usual class count; 0 for the pooled features).
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    input_size: int | None = None
    channels: int | None = None
    num_classes: int | None = None

    @property
    def spec(self) -> ModelSpec:
        return get_spec(self.name)

    @property
    def side(self) -> int:
        return self.spec.input_size if self.input_size is None else self.input_size

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels if self.channels is None else self.channels

    @property
    def classes(self) -> int:
        return self.spec.num_classes if self.num_classes is None else self.num_classes

    @property
    def is_default(self) -> bool:
        """Whether this is the architecture as registered: native side, usual channels and classes, no options."""
        spec = self.spec
        return (not self.options and (self.side, self.in_channels, self.classes)
                == (spec.input_size, spec.in_channels, spec.num_classes))

    def input_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """``(batch, side, side, channels)``, NHWC."""
        return (batch, self.side, self.side, self.in_channels)

    def build(self, **fields: Any) -> nn.Module:
        """The module: `create_model` with the request's classes and options, then ``fields`` (``dtype``...)."""
        return create_model(self.name, num_classes=self.classes, **{**self.options, **fields})

    def describe(self) -> str:
        """One line for a report: ``nin (dropout=0.3), input 224x224x1, 10 classes``."""
        options = ", ".join(f"{key}={value!r}" for key, value in self.options.items())
        return (f"{self.name}{f' ({options})' if options else ''}, input {self.side}x{self.side}x{self.in_channels}, "
                f"{self.classes} classes")

    def tag(self) -> str:
        """A file-name suffix naming what differs from the defaults (empty when nothing does), so a variant's
        results never overwrite the architecture's own."""
        parts = [f"{flag}{value}" for flag, value in (("s", self.input_size), ("c", self.channels),
                                                       ("k", self.num_classes)) if value is not None]
        parts += [f"{key}-{value}" for key, value in self.options.items()]
        return "".join(f"_{re.sub(r'[^A-Za-z0-9.-]+', '', str(part))}" for part in parts)

    def checked(self) -> ModelRequest:
        """This request, once it is known to build; otherwise `ModelRequestError` (one sentence).

        An unknown name raises the registry's `UnknownModelError`. Without options the default build
        is known to trace, so only the side is compared with the recorded minimum; with options the
        module is traced once on the requested shape (options are read when it is traced).
        """
        spec = self.spec
        for flag, value, least in (("--input-size", self.input_size, 1), ("--channels", self.channels, 1),
                                   ("--num-classes", self.num_classes, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ModelRequestError(f"{flag} must be an integer of at least {least}, got {value!r}.")
        try:
            module = self.build()
        except UnknownOptionError as error:
            raise ModelRequestError(f"--model-arg: {error}") from None
        except (TypeError, ValueError) as error:  # a value the constructor refuses
            raise ModelRequestError(f"{spec.name} cannot be built with {dict(self.options)}: {error}") from None
        if not self.options:
            self._check_side(min_input_size(self.name))
            return self
        try:
            abstract_variables(module, self.input_shape())
        except Exception as error:  # noqa: BLE001 - whatever the module raises, it is about this request
            try:
                smallest = min_input_size(module, self.in_channels)
            except Exception:  # noqa: BLE001 - no side traces: the options are at fault, not the size
                smallest = 0
            self._check_side(smallest)
            raise ModelRequestError(f"{spec.name} with {dict(self.options)} does not build on {self.side}x{self.side}x"
                                    f"{self.in_channels} input ({error_phrase(error)}).") from None
        return self

    def _check_side(self, smallest: int) -> None:
        if self.side < smallest:
            raise ModelRequestError(f"an input of {self.side}x{self.side} pixels is below {self.name}'s minimum input "
                                    f"of {smallest}x{smallest} pixels.")


def add_model_arguments(parser: argparse.ArgumentParser, *, shape: bool = True,
                        size_flags: Sequence[str] = ("--input-size",)) -> None:
    """Add ``--model-arg`` and, with ``shape``, ``--input-size`` (spelt as ``size_flags``), ``--channels`` and
    ``--num-classes``. `request_from_args` reads them."""
    parser.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the architecture, passed to create_model (repeatable; VALUE as JSON, "
                             "else a string), e.g. dropout=0.3 or activation=relu")
    if shape:
        parser.add_argument(*size_flags, dest="input_size", type=int, default=None, metavar="PIXELS",
                            help="side of the square input (default: the architecture's own)")
        parser.add_argument("--channels", type=int, default=None,
                            help="input channels, e.g. 1 for Fashion-MNIST (default: the architecture's usual data)")
        parser.add_argument("--num-classes", type=int, default=None,
                            help="width of the logits (default: the architecture's usual class count)")


def request_from_args(name: str, args: argparse.Namespace) -> ModelRequest:
    """The `ModelRequest` for ``name`` from arguments `add_model_arguments` added (not yet checked: see
    `ModelRequest.checked`). A later ``--model-arg`` of the same key wins."""
    options: dict[str, Any] = {}
    for text in getattr(args, "model_args", None) or ():
        try:
            key, value = parse_model_arg(text)
        except ValueError as error:
            raise ModelRequestError(str(error)) from None
        options[key] = value
    return ModelRequest(name, options, getattr(args, "input_size", None), getattr(args, "channels", None),
                        getattr(args, "num_classes", None))
