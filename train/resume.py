"""Resuming a run: whether a workdir's checkpoint is of this very run (`check_resume`), and the state the
run goes on from (`resume`).

A checkpoint of another architecture, class count, image side or of other "fixed" settings
(`train.config.RESUME`) is refused; settings that change the result may differ only with
``--allow-changes``, and are then recorded in the run's history.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from train.checkpoint import CheckpointError, Checkpoints
from train.config import RESUME, Config, ConfigError
from train.data import DataError, parse_val_split
from train.run import Run

__all__ = ["check_resume", "resume", "Resumed", "flags"]


def flags(values: dict[str, Any]) -> str:
    """``--seed 0, --lr 0.05`` for ``{"seed": 0, "lr": 0.05}`` (JSON for what is not a plain value)."""
    def shown(value):
        if value is None:
            return "(none)"
        if isinstance(value, tuple):
            return ",".join(map(str, value)) or "(none)"
        return json.dumps(value) if isinstance(value, (dict, bool)) else str(value)

    def flag(name, value):
        if name == "model_args":  # the flag is --model-arg KEY=VALUE, once per option
            return " ".join(f"--model-arg {k}={v if isinstance(v, str) else json.dumps(v)}"
                            for k, v in value.items()) or "no --model-arg"
        return f"--{name.replace('_', '-')} {shown(value)}"
    return ", ".join(flag(name, value) for name, value in values.items())


def check_resume(meta: dict, run: Run, directory: str) -> dict[str, tuple[Any, Any]]:
    """Raise unless ``run`` may go on from a checkpoint with ``meta``; return the settings that change the
    result (`train.config.RESUME`) and differ from the recorded ones, which ``--allow-changes`` allowed.

    A checkpoint of another architecture, class count or image side, or recorded under other "fixed"
    settings, is a `CheckpointError`; "result" settings that differ without ``--allow-changes`` are a
    `ConfigError` listing them.
    """
    ours = (run.config.arch, run.data.num_classes)
    theirs = (meta["arch"], meta["num_classes"])
    if ours != theirs:
        raise CheckpointError(f"{directory} holds a checkpoint of {theirs[0]} with {theirs[1]} classes, not "
                              f"{ours[0]} with {ours[1]}; use another --workdir.")
    if meta["image_side"] != run.image_side:
        raise CheckpointError(f"{directory} was trained on {meta['image_side']}-pixel images, this run would "
                              f"use {run.image_side}; use the same --image-size or another --workdir.")
    if "config" not in meta:  # checkpoints of early versions record only these
        if meta.get("batch_size") != run.config.batch_size:
            raise CheckpointError(f"{directory} was trained with --batch-size {meta.get('batch_size')}; resume with "
                                  "the same batch size (the data order depends on it) or use another --workdir.")
        return {}
    # Compared as the run uses them: the image side (compared above) where the data decides it, a validation
    # fraction whether given as text or as a number.
    def used(config: Config) -> Config:
        try:
            val_split = parse_val_split(config.val_split)
        except DataError:
            val_split = config.val_split
        return dataclasses.replace(config, image_size=run.image_side, val_split=val_split)

    if bool((meta.get("config") or {}).get("ema_decay")) != bool(run.config.ema_decay):
        had = "with" if (meta.get("config") or {}).get("ema_decay") else "without"
        raise CheckpointError(f"{directory} was trained {had} a moving average of the weights (--ema-decay); resume "
                              "the same way (its checkpoints hold the average or do not) or use another --workdir.")
    differences = used(run.config).changes(used(Config.recorded(meta["config"])))
    fixed = {name: old for name, (old, new) in differences.items() if RESUME[name] == "fixed"}
    if fixed:
        now = flags({name: differences[name][1] for name in fixed})
        raise CheckpointError(f"{directory} holds a run trained with {flags(fixed)} (this run: {now}), which its "
                              "checkpoints and the order of its data depend on; resume with the same or use another "
                              "--workdir.")
    if differences and not run.config.allow_changes:
        now = flags({name: new for name, (_, new) in differences.items()})
        which = "settings that change" if len(differences) > 1 else "a setting that changes"
        raise ConfigError(f"{directory} holds a run trained with {flags({k: v[0] for k, v in differences.items()})} "
                          f"(this run: {now}), {which} the result; resume with the recorded settings, add "
                          "--allow-changes to change them (recorded in the run's history), or use another --workdir.")
    return differences


@dataclasses.dataclass
class Resumed:
    """Where a run goes on from (`resume`): its state, and what the checkpoint it was read from records."""

    state: Any
    step: int | None = None  # the checkpoint's step; None for a run that starts afresh
    epoch: int = 0
    position: int = 0  # steps into the epoch in progress
    epoch_sums: dict | None = None  # that epoch's metric sums so far
    history: list = dataclasses.field(default_factory=list)  # changes allowed on resume, with their step
    changes: dict = dataclasses.field(default_factory=dict)  # those allowed by this run


def resume(run: Run, workdir: str, checkpoints: Checkpoints) -> Resumed:
    """The state ``run`` starts from: the newest checkpoint that can be read (those that cannot are set
    aside) if it is of this very run (`check_resume`), else a fresh state; raises `CheckpointError` or
    `ConfigError` when the workdir holds another run's checkpoints or none that can be read."""
    restored = checkpoints.restore(run.state_shapes(), check=lambda meta, _: check_resume(meta, run, workdir))
    if restored is None:
        return Resumed(run.init_state())
    state, meta, step = restored
    changes = check_resume(meta, run, workdir)
    history = list(meta.get("history", []))
    if changes:
        history.append({"step": step, "changes": {name: list(pair) for name, pair in changes.items()}})
    position = meta.get("position", 0)
    return Resumed(state, step, meta["epoch"], position, meta.get("epoch_sums") if position else None, history,
                   changes)
