"""`train.config`: settings from defaults, a JSON file and the command line, checked before anything starts."""

from __future__ import annotations

import json

import pytest

from train.arguments import parse_args
from train.config import Config, ConfigError


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "epochs"),
    (["--lr", "-1"], "lr"),
    (["--batch-size", "0"], "batch-size"),
    (["--label-smoothing", "1.5"], "label-smoothing"),
    (["--schedule", "step"], "lr-decay-epochs"),
])
def test_config_rejects_nonsense(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"arch": "resnet18_cifar", "epochs": 7, "lr_decay_epochs": [3, 5], "schedule": "step"}')
    config = parse_args(["--config", str(path), "--epochs", "9"])
    assert (config.arch, config.epochs, config.lr_decay_epochs) == ("resnet18_cifar", 9, (3, 5))
    assert Config.from_dict(json.loads(config.to_json())) == config
    path.write_text('{"arch": "resnet18", "epoch": 3}')
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="--config's JSON must hold a JSON object of settings, not a JSON list"):
        parse_args(["--config", "[]"])
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder"):
        parse_args(["--config", str(tmp_path)])


def test_a_count_of_one_is_singular_in_what_the_trainer_says():
    from train.report import done_line
    from train.text import count

    assert [count(1, "epoch"), count(3, "epoch"), count(12_000, "image"), count(2, "process", "processes")] == [
        "1 epoch", "3 epochs", "12,000 images", "2 processes"]
    results = {"test_top1": 0.5, "epoch": 1}
    assert "after 1 epoch;" in done_line(Config(epochs=1), results)


def test_an_evaluation_loss_far_above_the_training_loss_is_explained_once(tmp_path):
    import io

    from train.report import Reporter

    stream = io.StringIO()
    reporter = Reporter(str(tmp_path), 10, stream=stream)
    for test_loss in (0.5, 21.9, 62.5):
        reporter.epoch(f"epoch line {test_loss}", {"train_loss": 2.0, "test_loss": test_loss})
    lines = stream.getvalue().splitlines()
    assert lines[:3] == ["epoch line 0.5", "epoch line 21.9", lines[2]] and "BatchNorm" in lines[2]
    assert lines[3:] == ["epoch line 62.5"]


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_is_updated_in_place_on_a_terminal_and_whole_lines_elsewhere(tmp_path, monkeypatch, terminal):
    import io

    from train.report import Reporter

    class Stream(io.StringIO):
        def isatty(self):
            return terminal

    monkeypatch.setenv("COLUMNS", "50")
    monkeypatch.setenv("TERM", "xterm")
    stream = Stream()
    reporter = Reporter(str(tmp_path), 20, stream=stream, tensorboard=False)
    reporter.start(0)
    for step in (10, 20):
        reporter.progress(step, 1, 2.0414, 0.2962, 0.0455, 21.0)
    reporter.close()
    text = stream.getvalue()
    if terminal:  # redrawn after a carriage return, never wider than the terminal (a wider one wraps)
        assert text.count("\r") >= 2 and all(len(part.rstrip("\n")) <= 50 for part in text.split("\r"))
    else:
        assert "\r" not in text and text.splitlines()[-1].startswith("step 20/20 epoch 1 loss 2.0414")


def test_resume_messages_name_the_flags_as_they_are_typed():
    from train.resume import flags

    assert flags({"model_args": {"width": 8, "act": "relu"}, "lr": 0.1}) == (
        "--model-arg width=8 --model-arg act=relu, --lr 0.1")
    assert flags({"model_args": {}, "lr_decay_epochs": ()}) == "no --model-arg, --lr-decay-epochs (none)"
