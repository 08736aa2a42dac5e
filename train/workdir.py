"""A workdir held by one training run at a time, and everything read back from it treated as untrusted.

**The lock.** A training run holds ``WORKDIR/.lock`` (`Lock`) from before it reads the workdir until it
exits: an exclusive ``flock`` on the file, which the kernel releases however the process ends (SIGKILL
included), and in the file the holder's host, pid and start time, to name it to whoever is refused. A lock
file left by a process that is gone is stale: its ``flock`` is free and the next run takes it over. Commands
that only read (``train.evaluate``, ``train.predict``, ``train.plots``) take no lock: they may read while a
run trains, and they never move or write anything in the workdir.

**Untrusted files.** Any file of a workdir may be unreadable, truncated, binary, of the wrong JSON type or
oversized (a disk that filled up, a copy cut short, an edit by hand). One policy for all of them, applied in
`train.checkpoint` (checkpoints) and here (the records):

- a checkpoint any of whose files cannot be used: the trainer sets it aside, moving it whole to
  ``WORKDIR/corrupt_checkpoints/STEP`` (never deleting it), and resumes from the previous one; when none is
  left it stops in one sentence, and the next run starts afresh. Readers leave it where it is: they skip it
  when choosing the latest or best checkpoint (with a warning) and refuse, in one sentence, to use it when it
  is the one asked for;
- ``metrics.jsonl``: a line that is not a whole JSON record of a step moves to ``metrics.superseded.jsonl``
  (`read_records`); a file larger than any run writes is refused in one sentence;
- ``.lock``: its content only names the holder; an unreadable one names "an unknown process";
- ``config.json``, ``tensorboard/`` and ``plots/`` are written, never read back, but for `check_layout`
  telling a run's own ``config.json`` from another file before a new run would replace it (an unreadable
  one is another file).

Nothing here imports JAX: the lock is taken before the runtime starts its threads.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from typing import Any

__all__ = ["Lock", "WorkdirError", "WorkdirBusy", "Unreadable", "check_layout", "read_json", "read_records",
           "RECORDS_LIMIT_BYTES"]

LOCK_NAME = ".lock"
# What a run keeps in its workdir, each name with whether it is a folder.
LAYOUT = {"checkpoints": True, "corrupt_checkpoints": True, "plots": True, "tensorboard": True, "logs": True,
          "config.json": False, "metrics.jsonl": False, "metrics.superseded.jsonl": False, LOCK_NAME: False}
# Settings every config.json a run writes holds (train.config.Config): how a run's own file is told apart.
_CONFIG_KEYS = {"arch", "dataset", "epochs", "batch_size", "workdir"}
# metrics.jsonl takes about 500 bytes an epoch: 64 MiB is more than a hundred thousand epochs.
RECORDS_LIMIT_BYTES = 64 << 20


class WorkdirError(RuntimeError):
    """The workdir cannot be used as it is; the message says why, in one sentence for the user."""


class WorkdirBusy(WorkdirError):
    """Another training run holds the workdir; the message names it."""


class Unreadable(ValueError):
    """A file whose content cannot be used; ``str()`` is the reason, a phrase naming the file."""


# -- the lock --------------------------------------------------------------------------------------------

def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {int(holder['pid'])} on {str(holder['host'])[:80]}, started {str(holder['started'])[:40]}"
    except (ValueError, TypeError, KeyError):
        return "an unknown process: its lock file holds no readable holder"


class Lock:
    """``WORKDIR/.lock``, held exclusively by one process (`acquire`, `release`, or ``with``).

    Written by hand over ``fcntl.flock`` rather than taken from a package (``filelock``): the refused run
    must read who holds the lock from the file, and ``filelock`` truncates the file on every attempt.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise `WorkdirBusy` naming its holder. Where the filesystem has no locks
        (ENOLCK, EOPNOTSUPP), say so on stderr and go on unlocked."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                raise WorkdirBusy(f"--workdir {self.workdir} is in use by another training run "
                                  f"({_describe_holder(holder)}); wait for it to end or stop it, or train into "
                                  "another --workdir.") from None
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                    raise
                print(f"warning: {self.workdir} cannot be locked ({error.strerror}); make sure no other run trains "
                      "into it.", file=sys.stderr, flush=True)
                return
            # The last holder may have removed the file between our open and our flock: then this lock is on
            # a file nobody else opens. Try again with the file now at the path.
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            holder = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": datetime.datetime.now().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
            self._fd = fd
            return

    def release(self) -> None:
        """Remove the lock file, then let go of it (in that order: see `acquire`)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- reading files back ----------------------------------------------------------------------------------

def _is_run(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and os.path.isdir(os.path.join(folder, "checkpoints"))


def check_layout(workdir: str, flag: str = "--workdir") -> None:
    """Raise `WorkdirError` (one sentence) unless the folder ``workdir`` (an absolute path; it need not
    exist) can hold a run without damage to what is there: it is not inside a folder of another run's
    workdir (``RUN/checkpoints``, ``RUN/plots``...), each of the names a run writes (`LAYOUT`) is of its kind where it exists (found
    now, not when the run first writes it), and a folder without checkpoints holds no ``config.json`` and
    no plots (but a range test's) other than those of an earlier start of a run, which a new run replaces."""
    child, parent = workdir, os.path.dirname(workdir)
    while parent != child:
        if LAYOUT.get(os.path.basename(child)) and _is_run(parent):
            raise WorkdirError(f"{flag} {workdir} is inside the {os.path.basename(child)} folder of the run in "
                               f"{parent}: give {parent} to resume that run, or a folder of its own for a new one.")
        child, parent = parent, os.path.dirname(parent)
    if not os.path.isdir(workdir):
        return
    for name, folder in LAYOUT.items():
        path = os.path.join(workdir, name)
        if os.path.lexists(path) and os.path.isdir(path) != folder:
            kind, other = ("a folder", "a file") if folder else ("a file", "a folder")
            raise WorkdirError(f"{flag} {workdir} holds {other} named {name} where a run keeps {kind}: move it "
                               "away, or train into another folder.")
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return  # a run: resuming it decides the rest (train.resume)
    config = os.path.join(workdir, "config.json")
    ours = False
    if os.path.exists(config):
        try:
            values = read_json(config, RECORDS_LIMIT_BYTES)
            ours = isinstance(values, dict) and _CONFIG_KEYS <= set(values)
        except Unreadable:
            pass
        if not ours:
            raise WorkdirError(f"{flag} {workdir} holds a config.json that is not a run's, which a new run would "
                               "overwrite: move it away, or train into another folder.")
    plots = os.path.join(workdir, "plots")
    if not ours and os.path.isdir(plots) and any(not name.startswith("lr_find") for name in os.listdir(plots)):
        raise WorkdirError(f"{flag} {workdir} holds plots/ but no run, and a new run would overwrite them: move "
                           "them away, or train into another folder.")


def read_json(path: str, limit: int, what: str | None = None) -> Any:
    """The JSON value in ``path``, or `Unreadable` saying why not: missing, not a file, larger than
    ``limit`` bytes, not UTF-8, not JSON. ``what`` names the file in the reason (default: its path)."""
    what = what or path
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise Unreadable(f"{what} is missing") from None
    except IsADirectoryError:
        raise Unreadable(f"{what} is a folder, not a file") from None
    except OSError as error:
        raise Unreadable(f"{what} cannot be read ({error.strerror})") from None
    if len(data) > limit:
        raise Unreadable(f"{what} is larger than {limit:,} bytes") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise Unreadable(f"{what} is not text (UTF-8)") from None
    except json.JSONDecodeError as error:
        raise Unreadable(f"{what} is not JSON ({error.msg} at line {error.lineno})") from None


def read_records(path: str) -> list[tuple[int | None, dict | None, bytes]]:
    """The lines of a ``metrics.jsonl`` in file order, each as ``(step, record, line)``.

    A usable line is a whole JSON object (newline-terminated but for the last) with a whole-number ``step``;
    anything else (half a line from a process killed mid-write, binary garbage) comes as ``(None, None,
    line)``, as it was, for the caller to set aside. A missing file has no lines; a file larger than
    `RECORDS_LIMIT_BYTES` is `Unreadable`.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return []
    if not os.path.isfile(path):
        raise Unreadable(f"{path} is not a file")
    if size > RECORDS_LIMIT_BYTES:
        raise Unreadable(f"{path} holds {size:,} bytes, more than a run writes ({RECORDS_LIMIT_BYTES:,} at most); "
                         "move it away and rerun")
    with open(path, "rb") as handle:
        data = handle.read()
    lines = []
    for line in data.splitlines(keepends=True):
        try:
            record = json.loads(line.decode("utf-8"))
            step = record["step"]
            if isinstance(step, bool) or not (isinstance(step, int) or isinstance(step, float) and step.is_integer()):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            lines.append((None, None, line))
            continue
        lines.append((int(step), record, line if line.endswith(b"\n") else line + b"\n"))
    return lines
