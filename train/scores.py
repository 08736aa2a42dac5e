"""How a run's weights are scored: loss, top-1 and top-5 over every example of the validation and test
splits, for the trained weights and their moving average, and what a checkpoint is ranked by. Training
(`train.loop`) scores its epochs with it, ``python -m train.evaluate`` a saved checkpoint."""

from __future__ import annotations

from train.resume import check_resume
from train.run import Run

__all__ = ["evaluate", "selection_metrics", "evaluate_checkpoint"]


def evaluate(run: Run, feed, state) -> dict[str, float]:
    """Loss, top-1 and top-5 over every example of the validation split (``val_*``, when the run has one)
    and of the test split (``test_*``); with ``--ema-decay``, the same of the averaged weights (``ema_*``)."""
    out = _scores(run, feed, state)
    if run.config.ema_decay:
        out.update({f"ema_{key}": value for key, value in _scores(run, feed, state.averaged()).items()})
    return out


def selection_metrics(run: Run, results: dict[str, float]) -> dict[str, float]:
    """What a checkpoint is saved with: the top-1 it is ranked by on the selection split (the better of the
    trained and the averaged weights, with ``--ema-decay``), and the test top-1 of those same weights."""
    key = f"{run.selection_split}_top1"
    ema = bool(run.config.ema_decay) and results[f"ema_{key}"] > results[key]
    prefix = "ema_" if ema else ""
    chosen = {key: results[prefix + key], "chosen_test_top1": results[prefix + "test_top1"], "chosen_ema": float(ema)}
    if prefix + "test_top1_one_view" in results:
        chosen["chosen_test_top1_one_view"] = results[prefix + "test_top1_one_view"]
    return chosen


def _scores(run: Run, feed, state) -> dict[str, float]:
    out = {}
    for split in ("val", "test") if run.data.val_size else ("test",):
        sums = feed.evaluate(state, split)
        count = float(sums["count"])
        out[f"{split}_loss"] = float(sums["loss_sum"]) / count
        out[f"{split}_top1"] = float(sums["correct"]) / count
        if "correct_one_view" in sums:  # --eval-flip: the images without their mirrors
            out[f"{split}_top1_one_view"] = float(sums["correct_one_view"]) / count
        if run.data.num_classes > 5:
            out[f"{split}_top5"] = float(sums["correct5"]) / count
    return out


def evaluate_checkpoint(run: Run, workdir: str, step: int, variables: dict, meta: dict,
                        averaged: dict | None = None) -> dict[str, float]:
    """Score checkpoint ``step`` of ``workdir`` on every example of the run's validation and test splits, as
    training did: its ``variables`` and ``meta`` (read once by `train.inference.load_checkpoint`, so that a
    run training meanwhile may delete it), and its moving average ``averaged`` where it has one (``ema_*``)."""
    check_resume(meta, run, workdir)
    feed, initial = run.feed(with_train=False), run.init_state(pretrained=False)

    def scores(weights: dict) -> dict[str, float]:
        state = initial.replace(params=weights["params"], batch_stats=weights["batch_stats"] or initial.batch_stats)
        return _scores(run, feed, run.driver.put_replicated(state))

    out = scores(variables)
    if averaged is not None:
        out.update({f"ema_{key}": value for key, value in scores(averaged).items()})
    return out
