"""What a run shows and records: a progress bar on a terminal (plain lines otherwise), ``metrics.jsonl``
and TensorBoard event files in the workdir. Only process 0 writes; files are appended to, never replaced.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO

import jax

from train.tensorboard import ScalarWriter

__all__ = ["Reporter"]


class Reporter:
    """Progress and metric records for one run."""

    def __init__(self, workdir: str, total_steps: int, *, stream: TextIO | None = None, tensorboard: bool = True):
        self.primary = jax.process_index() == 0
        self.stream = stream or sys.stdout
        self.total_steps = total_steps
        self.workdir = workdir
        self._bar = None
        self._writer = None
        self._jsonl = None
        if not self.primary:
            return
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                self._writer = ScalarWriter(os.path.join(workdir, "tensorboard"))
            except OSError as error:  # TensorBoard is a convenience, never a failure
                self.info(f"warning: TensorBoard logging is off ({error}).")

    def info(self, message: str) -> None:
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def start(self, step: int) -> None:
        """Begin showing progress from ``step``: a tqdm bar on a terminal, nothing more otherwise."""
        if self.primary and self.stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=self.total_steps, initial=step, unit="step", file=self.stream, dynamic_ncols=True)

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
