"""The learning-rate range test's core: the sweep of rates, the smoothing of the loss, the suggestion.

From a copy of a run's initial state, train with a learning rate that grows exponentially, from
``--lr-find-start`` to ``--lr-find-end`` over ``--lr-find-steps`` steps, and record the loss of every
step (L. N. Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017, section 3.3, which
grows the rate linearly over a few epochs; the exponential sweep over a few hundred steps is the form
fast.ai made common). The loss is smoothed with a bias-corrected exponential moving average, and the test
stops once the smoothed loss exceeds four times its best: past that point the rate is too high.

It uses the run's own optimizer (momentum, weight decay, clipping, frozen layers), data, augmentation and
data-parallel train step; only the rate differs. Nothing of the run is written or changed here: what the
test reports and draws is the ``--lr-find`` mode of ``python -m train`` (`train.lr_find`).

The suggestion is where the smoothed loss falls fastest against log(rate), searched between the start
and the rate of the lowest smoothed loss: the rate at which training makes the most progress per step
before it grows unstable. The lowest-loss rate divided by ten, the other common rule, is reported too.

A loss that never falls gives no suggestion: when the smoothed loss's lowest point is less than
``FLAT_TOLERANCE`` (10%) below its start (the median of its first ``START_STEPS`` values, so one noisy
step decides nothing), no rate made progress, and the steepest point of a flat curve is noise. NiN on
the digits stays at ln 10 from 1e-7 to 10 and used to be "suggested" 0.2, which then stayed at chance;
the test now says that no rate helps and what to try instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import optax

if TYPE_CHECKING:
    from train.run import Run

__all__ = ["LRFinding", "exponential_rates", "smooth", "suggest", "no_suggestion", "range_test"]

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


def no_suggestion(finding: LRFinding) -> str:
    """One sentence for a sweep that suggests no rate: what happened and what to try instead."""
    return (f"no suggested --lr: {finding.rule}, over rates {finding.lrs[0]:.3g} to {finding.lrs[-1]:.3g}, so no "
            f"rate made this model learn; try another optimizer (e.g. --optimizer adam), a smaller model or one with "
            f"BatchNorm, or check that the images and labels match.")


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
