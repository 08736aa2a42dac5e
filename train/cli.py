"""Turning the errors a user can cause into one sentence and an exit code, for every command of `train`."""

from __future__ import annotations

import sys
from typing import Callable

from flaxnets.convert import StateDictMismatchError, WeightsFileError
from flaxnets.registry import UnknownModelError
from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.data import DataError

USER_ERRORS = (ConfigError, DataError, UnknownModelError, CheckpointError, StateDictMismatchError, WeightsFileError)


def run_command(body: Callable[[], int]) -> int:
    """Run ``body``; a user error prints ``error: <sentence>`` and returns 2 instead of a traceback."""
    from train.loop import Interrupted, TrainError

    try:
        return body()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        return 128 + stop.signum
