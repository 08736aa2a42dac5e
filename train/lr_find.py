"""The learning-rate range test: ``python -m train --arch ARCH --dataset NAME --lr-find``.

From a copy of the run's initial state, train with a learning rate that grows exponentially, from
``--lr-find-start`` to ``--lr-find-end`` over ``--lr-find-steps`` steps, and record the loss of every
step (L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017, section 3.3, which
grows the rate linearly over a few epochs; the exponential sweep over a few hundred steps is the form
fast.ai made common). The loss is smoothed with a bias-corrected exponential moving average, and the test
stops once the smoothed loss exceeds four times its best: past that point the rate is too high.

It uses the run's own optimizer (momentum, weight decay, clipping, frozen layers), data, augmentation and
data-parallel train step; only the rate differs. Nothing of the run is written or changed: no checkpoint,
no ``config.json``, no ``metrics.jsonl``; only ``WORKDIR/plots/lr_find.png`` and ``lr_find.csv``.

The suggestion is where the smoothed loss falls fastest against log(rate), searched between the start
and the rate of the lowest smoothed loss: the rate at which training makes the most progress per step
before it grows unstable. The lowest-loss rate divided by ten, the other common rule, is printed too.

A loss that never falls gives no suggestion: when the smoothed loss's lowest point is less than
``FLAT_TOLERANCE`` (10%) below its start (the median of its first ``START_STEPS`` values, so one noisy
step decides nothing), no rate made progress, and the steepest point of a flat curve is noise. NiN on
the digits stays at ln 10 from 1e-7 to 10 and used to be "suggested" 0.2, which then stayed at chance;
the test now says that no rate helps and what to try instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import TYPE_CHECKING, TextIO

import numpy as np
import optax

if TYPE_CHECKING:
    from train.run import Run

__all__ = ["LRFinding", "exponential_rates", "smooth", "suggest", "no_suggestion", "range_test", "lr_find"]

DIVERGENCE_FACTOR = 4.0  # stop once the smoothed loss exceeds this multiple of its best
SMOOTHING = 0.9  # weight of the past in the moving average of the loss
# The loss "fell" only if its smoothed lowest point is this fraction of the start below it. Well above the
# smoothed noise of a flat run (about 1% at batch 64), well below the fall of a run that learns (LeNet-5
# on the digits: from 2.3 to under 1).
FLAT_TOLERANCE = 0.1
START_STEPS = 10  # the start of the curve: the median of its first smoothed values


@dataclasses.dataclass
class LRFinding:
    """The result of a range test: the rate and loss of every step taken, and what they suggest."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggested_lr: float | None  # None when the loss never fell
    rule: str
    min_loss_lr: float  # the rate of the lowest smoothed loss
    stop_reason: str

    def as_dict(self) -> dict:
        """The summary the trainer returns: suggestion, rule, steps taken and why the test stopped."""
        over_10 = None if self.suggested_lr is None else self.min_loss_lr / 10
        return {"suggested_lr": self.suggested_lr, "rule": self.rule, "min_loss_lr": self.min_loss_lr,
                "min_loss_lr_over_10": over_10, "steps": int(len(self.lrs)), "stop_reason": self.stop_reason}


def exponential_rates(start: float, end: float, steps: int) -> optax.Schedule:
    """The rate of step ``k``: ``start * (end / start) ** (k / (steps - 1))``, ``start`` at 0, ``end`` at the last."""
    import jax.numpy as jnp

    growth = math.log(end / start) / max(steps - 1, 1)
    return lambda step: start * jnp.exp(growth * jnp.asarray(step, jnp.float32))


def smooth(losses: np.ndarray, beta: float = SMOOTHING) -> np.ndarray:
    """Exponential moving average of ``losses`` divided by ``1 - beta**(k+1)``, so the start is not biased to 0."""
    average, out = 0.0, np.empty(len(losses))
    for k, loss in enumerate(losses):
        average = beta * average + (1 - beta) * float(loss)
        out[k] = average / (1 - beta ** (k + 1))
    return out


def suggest(lrs: np.ndarray, smoothed: np.ndarray) -> tuple[float | None, str, float]:
    """``(rate, rule, lowest-loss rate)``: the steepest fall of the smoothed loss before its minimum.

    The slope is taken against log(rate) over the points up to the minimum; with fewer than five of
    them there is no slope to trust and the lowest-loss rate over ten is suggested instead. When the
    lowest smoothed loss is not ``FLAT_TOLERANCE`` below the start, the loss never fell: the rate is
    ``None`` and the rule says so.
    """
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    finite = np.isfinite(smoothed)
    best = int(np.argmin(np.where(finite, smoothed, np.inf)))
    min_loss_lr = float(lrs[best])
    if not finite.any():
        return None, "the loss was not finite at any rate", min_loss_lr
    start = float(np.median(smoothed[finite][:START_STEPS]))
    if start - smoothed[best] < FLAT_TOLERANCE * abs(start):
        return (None, f"the smoothed loss never fell {FLAT_TOLERANCE:.0%} below its start ({start:.3g}; lowest "
                      f"{smoothed[best]:.3g} at rate {min_loss_lr:.3g})", min_loss_lr)
    if best < 5:
        return min_loss_lr / 10, "the rate of the lowest smoothed loss, divided by 10", min_loss_lr
    slope = np.gradient(smoothed[:best + 1], np.log(lrs[:best + 1]))
    steepest = int(np.argmin(slope))
    return float(lrs[steepest]), "steepest fall of the smoothed loss against log(rate)", min_loss_lr


def range_test(run: "Run") -> LRFinding:
    """Run the range test for ``run`` (its config's ``lr_find_*`` settings) on a copy of its initial state."""
    from train.parallel import host
    from train.run import run_optimizer

    config = run.config
    count = config.lr_find_steps
    rates = exponential_rates(config.lr_find_start, config.lr_find_end, count)
    # The run's optimizer at a constant rate of 1, then every update scaled by the sweep's rate: for SGD,
    # Adam and AdamW alike the rate multiplies the whole update last, so this is the run's optimizer at
    # the sweep's rate (with weight decay, clipping and frozen layers as configured).
    unit = dataclasses.replace(config, lr=1.0, schedule="constant", warmup_epochs=0.0, lr_find=False)
    unit_tx, _ = run_optimizer(unit, run.steps_per_epoch, fence=run.settings.fence)
    run = run.with_optimizer(optax.chain(unit_tx, optax.scale_by_schedule(rates)))
    initial = run.init_state()
    state = run.driver.put_replicated(initial)
    feed = run.feed()
    batches = iter(())

    lrs, losses, smoothed = [], [], []
    average, best, reason = 0.0, math.inf, f"all {count} steps taken"
    beta = SMOOTHING
    for k in range(count):
        epoch, position = divmod(k, run.steps_per_epoch)
        if position == 0:
            batches = feed.batches(epoch, 0)
        state, metrics = feed.train(state, next(batches))
        values = host(metrics)
        loss = float(values["loss_sum"]) / float(values["count"])
        lrs.append(float(rates(k)))
        losses.append(loss)
        if not math.isfinite(loss):
            reason = f"the loss became {loss} at step {k} (rate {lrs[-1]:.3g})"
            smoothed.append(math.nan)
            break
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** (k + 1)))
        best = min(best, smoothed[-1])
        if smoothed[-1] > DIVERGENCE_FACTOR * best:
            reason = (f"the smoothed loss {smoothed[-1]:.3g} passed {DIVERGENCE_FACTOR:g} x its best {best:.3g} "
                      f"at step {k} (rate {lrs[-1]:.3g})")
            break
    lrs, losses, smoothed = np.asarray(lrs), np.asarray(losses), np.asarray(smoothed)
    suggested, rule, min_loss_lr = suggest(lrs, smoothed)
    return LRFinding(lrs, losses, smoothed, suggested, rule, min_loss_lr, reason)


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
    """``lr_find.csv`` (step, lr, loss, smoothed_loss) and ``lr_find.png`` in ``out_dir``; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "lr_find.csv")
    with open(csv_path, "w") as handle:
        handle.write("step,lr,loss,smoothed_loss\n")
        for k, (lr, loss, smoothed) in enumerate(zip(finding.lrs, finding.losses, finding.smoothed)):
            handle.write(f"{k},{lr:.6g},{loss:.6g},{smoothed:.6g}\n")
    return csv_path, plot_finding(finding, os.path.join(out_dir, "lr_find.png"), title)


def no_suggestion(finding: LRFinding) -> str:
    """One sentence for a sweep that suggests no rate: what happened and what to try instead."""
    return (f"no suggested --lr: {finding.rule}, over rates {finding.lrs[0]:.3g} to {finding.lrs[-1]:.3g}, so no "
            f"rate made this model learn; try another optimizer (e.g. --optimizer adam), a smaller model or one with "
            f"BatchNorm, or check that the images and labels match.")


def lr_find(run: "Run", *, stream: TextIO | None = None) -> dict:
    """The range test of ``run``, its plot and table in ``WORKDIR/plots``, the suggestion printed.

    Returns `LRFinding.as_dict` plus the paths written. A failure to plot is a warning.
    """
    import jax

    config = run.config
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
            say(f"warning: could not write the range test's plot ({type(error).__name__}: {error}).")
    return result
