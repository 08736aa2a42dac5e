"""How every command of `train` ends: the errors a user can cause as one sentence and an exit code.

Shared by the commands and imported by nothing they run (tests/test_layout.py); the commands' parser is
`train.arguments`.

A run of several processes (``--coordinator``, ``--distributed``) can also end because another of its
processes died: a collective then fails with a `jax.errors.JaxRuntimeError`, which is one sentence here, or
JAX's distributed runtime ends the process from C++, which `train.stderr_watch` reports in one sentence.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable

from flaxnets.cli import closed_pipe_status, error_phrase, out_of_memory
from flaxnets.convert import StateDictMismatchError, WeightsFileError
from flaxnets.registry import UnknownModelError
from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.data import DataError
from train.stderr_watch import RESTART
from train.workdir import WorkdirError

USER_ERRORS = (ConfigError, DataError, UnknownModelError, CheckpointError, StateDictMismatchError, WeightsFileError,
               WorkdirError)


def run_command(body: Callable[[], int], memory_advice: str = "a smaller batch needs less") -> int:
    """Run ``body``; a user error prints ``error: <sentence>`` and returns 2 instead of a traceback. A device
    (or the host) out of memory is one sentence too, ending with ``memory_advice``, and returns 1.

    In a run of several processes, a failed collective (another process died) is one sentence too, and a
    process that fails leaves at once (`os._exit`): JAX's exit handler would otherwise wait at a shutdown
    barrier for processes that are gone or that wait for this one, for minutes.
    """
    from train.loop import Interrupted, TrainError

    try:
        code = body()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        code = 2
    except TrainError as error:
        print(f"error: {error}", file=sys.stderr)
        code = 1
    except Interrupted as stop:
        code = 128 + stop.signum
    except BrokenPipeError:  # the reader of the output went away (``| head``): end quietly, as POSIX tools do
        code = closed_pipe_status()
    except OSError as error:  # a file or folder the system refused (a path given, the disk, permissions)
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}.", file=sys.stderr)
        code = 1
    except Exception as error:  # noqa: BLE001 - memory, or a multi-process run's peers; re-raised otherwise
        if out_of_memory(error):  # the settings asked for more than the machine has: no defect to trace
            print(f"error: out of memory ({error_phrase(error)}); {memory_advice}.", file=sys.stderr)
            code = 1
        elif not _multi_process():
            raise
        else:
            code = _peer_failure(error)
    if code and _multi_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _peer_failure(error: Exception) -> int:
    """Report a failed collective of a multi-process run (another process died) in one sentence."""
    import jax

    if isinstance(error, jax.errors.JaxRuntimeError) or _PEER_FAILURE.search(str(error)):
        print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: an operation with the "
              f"other processes failed ({error_phrase(error)}), most likely because one of them died; "
              f"{RESTART}.", file=sys.stderr)
    else:
        traceback.print_exc()
    return 1


# How a collective or a barrier with a process that died fails when JAX re-raises it as another type (a
# ValueError from `jax.experimental.multihost_utils`, Orbax's barriers): CPU (Gloo, MPI) and GPU (NCCL)
# collectives, the coordination service's barriers and RPCs.
_PEER_FAILURE = re.compile(r"Gloo|NCCL|\bMPI\b|barrier|coordination service|heartbeat|Connection reset|Socket closed|"
                           r"DEADLINE_EXCEEDED|UNAVAILABLE", re.IGNORECASE)


def _multi_process() -> bool:
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.distributed.is_initialized() and jax.process_count() > 1
