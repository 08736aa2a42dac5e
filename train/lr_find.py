"""The learning-rate range test: ``python -m train --arch ARCH --dataset NAME --lr-find``.

The ``--lr-find`` mode of the trainer's command: it runs the range test of `train.lr_range` (the sweep,
the smoothing and the suggestion, which the run's modules may use) on the run the command line describes,
prints what it found and writes ``WORKDIR/plots/lr_find.png`` and ``lr_find.csv``. Nothing of the run is
written or changed: no checkpoint, no ``config.json``, no ``metrics.jsonl``. Only commands import this
module.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

import numpy as np

from flaxnets.cli import error_phrase
from train.config import Config
from train.lr_range import LRFinding, no_suggestion, range_test

__all__ = ["lr_find", "plot_finding", "write_finding"]


def plot_finding(finding: LRFinding, path: str, title: str) -> str:
    """Loss against learning rate (log axis): raw and smoothed, the lowest loss and the suggestion marked."""
    from train.figures import new_figure, save_figure

    figure = new_figure(9, 5.2)
    ax = figure.subplots()
    ax.plot(finding.lrs, finding.losses, color="0.75", linewidth=1, label="loss of each step")
    ax.plot(finding.lrs, finding.smoothed, color="C0", linewidth=2, label="smoothed loss")
    ax.axvline(finding.min_loss_lr, color="0.4", linestyle=":",
               label=f"lowest smoothed loss at {finding.min_loss_lr:.2g}")
    if finding.suggested_lr is not None:
        ax.axvline(finding.suggested_lr, color="C3", linestyle="--",
                   label=f"suggested --lr {finding.suggested_lr:.2g} ({finding.rule})")
    else:
        title = f"{title}\nno suggested rate: {finding.rule}"
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    smoothed = finding.smoothed[np.isfinite(finding.smoothed)]
    raw = finding.losses[np.isfinite(finding.losses)]
    if smoothed.size:  # keep the diverging tail from flattening the interesting part
        low, high = float(min(smoothed.min(), raw.min())), float(max(smoothed[0], smoothed.min()) * 1.5)
        ax.set_ylim(max(0.0, low - 0.05 * (high - low)), high)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(title, fontsize=11)
    return save_figure(figure, path)


def write_finding(finding: LRFinding, out_dir: str, title: str) -> tuple[str, str]:
    """``lr_find.csv`` (step, lr, loss, smoothed_loss) and ``lr_find.png`` in ``out_dir``; returns both paths.
    An earlier test's pair is kept: this one is then ``lr_find-2.*`` (or the next free number)."""
    os.makedirs(out_dir, exist_ok=True)
    stem, number = "lr_find", 2
    while any(os.path.lexists(os.path.join(out_dir, f"{stem}.{suffix}")) for suffix in ("csv", "png")):
        stem, number = f"lr_find-{number}", number + 1
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    with open(csv_path + ".tmp", "w") as handle:
        handle.write("step,lr,loss,smoothed_loss\n")
        for k, (lr, loss, smoothed) in enumerate(zip(finding.lrs, finding.losses, finding.smoothed)):
            handle.write(f"{k},{lr:.6g},{loss:.6g},{smoothed:.6g}\n")
    os.replace(csv_path + ".tmp", csv_path)
    return csv_path, plot_finding(finding, os.path.join(out_dir, f"{stem}.png"), title)


def lr_find(config: Config, *, stream: TextIO | None = None) -> dict:
    """The range test of the run ``config`` describes, its plot and table in ``WORKDIR/plots``, the
    suggestion printed.

    Returns `LRFinding.as_dict` plus the paths written. A failure to plot is a warning.
    """
    import jax

    from train.loop import usable_workdir
    from train.run import build_run
    from train.tuning import enable_compilation_cache

    usable_workdir(config.workdir)  # where the plot goes: refused now, not after the test
    enable_compilation_cache()
    run = build_run(config)
    stream = stream or sys.stdout
    primary = jax.process_index() == 0
    say = (lambda message: print(message, file=stream, flush=True)) if primary else (lambda message: None)
    say(f"learning-rate range test: {config.arch} on {config.dataset}, {config.optimizer}, global batch "
        f"{config.batch_size}, rate {config.lr_find_start:g} to {config.lr_find_end:g} over {config.lr_find_steps} "
        f"steps, from a copy of the initial state (nothing of the run is saved).")
    finding = range_test(run)
    result = finding.as_dict()
    say(f"stopped: {finding.stop_reason}.")
    if finding.suggested_lr is None:
        say(no_suggestion(finding))
    else:
        say(f"lowest smoothed loss {np.nanmin(finding.smoothed):.4f} at rate {finding.min_loss_lr:.3g} "
            f"(divided by 10: {finding.min_loss_lr / 10:.3g}).")
        say(f"suggested --lr {finding.suggested_lr:.3g} (rule: {finding.rule}).")
    if primary:
        out_dir = os.path.join(os.path.abspath(config.workdir), "plots")
        title = (f"learning-rate range test: {config.arch} on {config.dataset}, {config.optimizer}, "
                 f"batch {config.batch_size}")
        try:
            result["csv"], result["plot"] = write_finding(finding, out_dir, title)
            say(f"wrote {result['plot']} and {result['csv']}")
        except Exception as error:  # noqa: BLE001 - a plot is never worth failing for
            say(f"warning: could not write the range test's plot ({error_phrase(error)}).")
    return result
