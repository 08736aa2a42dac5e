"""What a run shows and records: a progress bar updated in place on a terminal (whole lines otherwise: a file,
a pipe, a CI log), ``metrics.jsonl`` and TensorBoard event files in the workdir, and the lines that end it
(`done_line`, `recipe_line`). Only process 0 writes.

``metrics.jsonl`` holds one line per completed epoch, whatever happened to the run: when it (re)starts from
the checkpoint of step S, lines of later steps (epochs it will train again: the process died after writing
them but before their checkpoint, or a checkpoint was unreadable) and a half-written last line are moved
to ``metrics.superseded.jsonl``, never deleted. A resumed run's TensorBoard file likewise supersedes the
events of earlier files after step S.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, TextIO

import jax

from train.tensorboard import ScalarWriter
from train.workdir import Unreadable, WorkdirError, read_records

__all__ = ["Reporter", "done_line", "recipe_line"]

# An evaluation loss this many times the training loss gets the note of `Reporter.epoch`: the training
# loss is the mean over an epoch of augmented batches, so a few times either way is ordinary.
FAR = 5.0


class Reporter:
    """Progress and metric records for one run."""

    def __init__(self, workdir: str, total_steps: int, *, stream: TextIO | None = None, tensorboard: bool = True):
        self.primary = jax.process_index() == 0
        self.stream = stream or sys.stdout
        self.total_steps = total_steps
        self.workdir = workdir
        self.tensorboard = tensorboard
        self._bar = None
        self._writer = None
        self._jsonl = None
        self._explained = False

    def info(self, message: str) -> None:
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def epoch(self, line: str, results: dict[str, Any]) -> None:
        """An epoch's ``line``; the first time an evaluation loss is far above the training loss, a note of why
        that is expected early on rather than a sign of a broken run."""
        self.info(line)
        far = [split for split in ("val", "test") if results.get(f"{split}_loss", 0) > FAR * results["train_loss"]
               and results[f"{split}_loss"] > 1]
        if far and not self._explained:
            self._explained = True
            self.info(f"note: the {far[0]} loss is far above the training loss. Early in a run that is usually "
                      "BatchNorm: evaluation uses its running statistics, a slow average that still lags the "
                      "quickly changing weights; it closes as the learning rate falls (see the README's training "
                      "section).")

    def warn(self, message: str) -> None:
        """A warning: one line on stderr (with the progress bar kept intact)."""
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def start(self, step: int) -> None:
        """Begin recording and showing progress from ``step``, the step the run (re)starts from."""
        if not self.primary:
            return
        path = os.path.join(self.workdir, "metrics.jsonl")
        _keep_records_up_to(path, step, os.path.join(self.workdir, "metrics.superseded.jsonl"))
        self._jsonl = open(path, "a", buffering=1)
        if self.tensorboard:
            try:
                # Events after `step` in earlier files belong to epochs this run trains again (all of them
                # when it starts from step 0: a run whose only checkpoint was set aside, say).
                self._writer = ScalarWriter(os.path.join(self.workdir, "tensorboard"), restart_step=step + 1)
            except OSError as error:  # TensorBoard is a convenience, never a failure
                self.warn(f"warning: TensorBoard logging is off ({error}).")
        if self.stream.isatty() and os.environ.get("TERM") != "dumb":  # a dumb terminal ignores the carriage return
            from tqdm import tqdm

            # A bar wider than the terminal wraps, and the carriage return then redraws only its last row: the
            # bar is printed again instead of updated. tqdm trims to a width it knows, and some terminals
            # (IDE consoles, emulators behind a pseudo-tty) tell it none, so it gets one (COLUMNS, else 80).
            self._bar = tqdm(total=self.total_steps, initial=step, unit="step", file=self.stream,
                             ncols=shutil.get_terminal_size().columns)

    def progress(self, step: int, epoch: int, loss: float, accuracy: float, lr: float, images_per_sec: float) -> None:
        if not self.primary:
            return
        text = f"epoch {epoch} loss {loss:.4f} acc {accuracy:.2%} lr {lr:.3g} {images_per_sec:,.0f} img/s"
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
        else:
            print(f"step {step}/{self.total_steps} {text}", file=self.stream, flush=True)

    def record(self, values: dict[str, Any]) -> None:
        """Append one JSON line and write every number as a TensorBoard scalar at ``values['step']``."""
        if not self.primary:
            return
        values = {"time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(values) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("step", "time"):
                    self._writer.add_scalar(key, value, values["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _keep_records_up_to(path: str, step: int, superseded: str) -> None:
    """Leave in ``path`` the whole JSON lines of steps up to ``step``, in order and each step once (the last
    line of a step wins); append everything else, as it was, to ``superseded``. The file is replaced
    atomically. A line that cannot be read is one more line to set aside (`train.workdir.read_records`)."""
    try:
        lines = read_records(path)
    except Unreadable as error:
        raise WorkdirError(f"{error}.") from None
    kept: dict[int, bytes] = {}
    dropped = []
    for record_step, _, line in lines:
        if record_step is not None and record_step <= step:
            if record_step in kept:
                dropped.append(kept[record_step])
            kept[record_step] = line
        else:
            dropped.append(line)
    if not dropped:
        return
    with open(superseded, "ab") as handle:
        handle.writelines(line if line.endswith(b"\n") else line + b"\n" for line in dropped)
    tmp = path + ".tmp"
    with open(tmp, "wb") as handle:
        handle.writelines(kept[s] for s in sorted(kept))
    os.replace(tmp, path)


def done_line(config, results: dict) -> str:
    """The run's last line: final test accuracy, and which checkpoint is "best" and on what it was chosen."""
    from train.text import count

    top5 = f", top-5 {results['test_top5']:.2%}" if "test_top5" in results else ""
    one = f" (one view: {results['test_top1_one_view']:.2%})" if "test_top1_one_view" in results else ""
    ema = f" (averaged weights: {results['ema_test_top1']:.2%})" if "ema_test_top1" in results else ""
    line = (f"done: {config.arch} on {config.dataset}, test top-1 {results['test_top1']:.2%}{one}{top5}{ema} after "
            f"{count(results['epoch'], 'epoch')}; workdir {config.workdir}")
    if "best_step" in results:
        on = results["best_selected_on"]
        line += (f". Best checkpoint: step {results['best_step']} (epoch {results['best_epoch']}), {on} top-1 "
                 f"{results['best_top1']:.2%}, selected on the {'validation' if on == 'val' else 'test'} split")
        if on == "test":
            line += " (no --val-split: the test split chose it, so its test accuracy is optimistic)"
        elif "best_test_top1" in results:
            line += f"; its test top-1 {results['best_test_top1']:.2%} ({results['best_weights']} weights)"
            if "best_test_top1_one_view" in results:
                line += f", {results['best_test_top1_one_view']:.2%} with one view"
    return line + "."


def recipe_line(config, results: dict) -> str | None:
    """The run's test top-1 beside its recipe's expected figure (`train.recipes.report_line`): that of the
    checkpoint chosen on the validation split where there is one, else of the last epoch's weights."""
    from train.recipes import report_line

    chosen = results.get("best_test_top1") if results.get("best_selected_on") == "val" else None
    return report_line(config.recipe, config.arch, results["test_top1"] if chosen is None else chosen)
