"""The stderr of one process of a multi-process run, watched (`watch_stderr`): JAX's distributed runtime
ends a process whose peer died from C++, with a fatal log record, a stack trace and SIGABRT, where Python
cannot catch it. The process's stderr (file descriptor 2: Python's and the C++ runtime's) goes through a
watcher process (``python -m train.stderr_watch``) that passes the trainer's own lines on, keeps the runtime's
log records in ``WORKDIR/logs/runtime.process-I.log``, and, when the runtime ended the process without a
word from the trainer, says why in one sentence.

Imports nothing heavy: the watcher starts in a fraction of a second, beside every process of the run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

__all__ = ["watch_stderr", "RESTART"]

RESTART = "start every process again with the same command to resume from the last checkpoint"

# A record of the C++ runtime's log (absl): severity, date, time, thread, file:line.
_RECORD = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ")
# The trainer's own lines, and Python's: they end a runtime record that spans several lines.
_OURS = re.compile(r"^(error|warning|note): |^Traceback |^\S+\.py:\d+: \w*Warning")
_FATAL = re.compile(r"^F\d{4} .*(Terminating process|distributed service)")


def watch_stderr(process_id: int, num_processes: int, workdir: str) -> None:
    """Send this process's stderr (file descriptor 2, so C++ writes too) through a watcher process
    (`_watch`); call before JAX starts (-1 for a process index or count not known yet). The core dump of
    an abort is turned off: a trainer's would be its whole memory."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):
        pass
    read, write = os.pipe()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited: Ctrl-C is for the trainer alone
    try:
        subprocess.Popen([sys.executable, "-m", "train.stderr_watch", str(process_id), str(num_processes), workdir],
                         stdin=read, close_fds=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stderr.flush()
    os.dup2(write, 2)
    os.close(write)
    os.close(read)


def _watch(process_id: int, num_processes: int, workdir: str) -> None:
    """Copy stdin to stderr until the trainer closes it, but for the C++ runtime's log records, which go
    to ``WORKDIR/logs/runtime.process-I.log``; if the runtime ended the trainer (a fatal record) and the
    trainer said nothing itself, say why in one sentence."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the trainer's signals are not the watcher's
    pending: list[bytes] = []  # runtime lines written before the workdir exists
    in_record = said_error = False
    fatal = None
    log_path = os.path.join(workdir, "logs", f"runtime.process-{process_id}.log")

    def keep(line: bytes) -> None:
        pending.append(line)
        if os.path.isdir(workdir):
            try:
                if not os.path.isdir(os.path.dirname(log_path)):
                    os.mkdir(os.path.dirname(log_path))  # not makedirs: a workdir removed meanwhile stays removed
                with open(log_path, "ab") as handle:
                    handle.writelines(pending)
                pending.clear()
            except OSError:
                del pending[:-1000]

    for line in sys.stdin.buffer:
        text = line.decode("utf-8", "replace")
        if _RECORD.match(text):
            in_record = True
        elif in_record and _OURS.match(text):
            in_record = False
        if in_record:
            keep(line)
            if fatal is None and _FATAL.match(text):
                status = text.split("absl::Status: ", 1)[-1] if "absl::Status: " in text else text
                fatal = status.split(". ")[0].strip().rstrip(":")[:200]
            continue
        said_error = said_error or text.startswith("error: ")
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
    if fatal is not None and not said_error:
        where = f"; its log is in {log_path}" if os.path.exists(log_path) else ""
        which = f"process {process_id} of {num_processes}" if process_id >= 0 else "this process"
        sys.stderr.write(f"error: {which} was stopped by JAX's distributed runtime: another process died or "
                         f"cannot be reached ({fatal}){where}; {RESTART}.\n")


if __name__ == "__main__":
    _watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
