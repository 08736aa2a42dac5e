"""The classic exercises from the command line: ``--model-arg``, ``--input-size``, ``--channels`` and
``--num-classes`` in ``python -m flaxnets summary`` and the benchmarks, and ``summary --batch``'s memory.

Commands run in-process on LeNet-5 and NiN, traced with abstract shapes; the only compilations are
LeNet-5's, so the file takes a few seconds.
"""

from __future__ import annotations

import argparse

import pytest

import flaxnets
from benchmarks import common, flops, profile, throughput
from flaxnets import __main__ as command
from flaxnets.analysis import abstract_variables, count_params, step_memory
from flaxnets.cli import ModelRequest, ModelRequestError, add_model_arguments, request_from_args

D2L_NIN = 1_992_166  # d2l's NiN for 1-channel 224x224 Fashion-MNIST with 10 classes (section 8.3)
D2L_NIN_ARGS = ["--channels", "1", "--num-classes", "10"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    return parser.parse_args(argv)


def one_sentence(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# -- the request: parsing and checking, once for every command ----------------------------------------------

def test_model_args_are_parsed_as_json_else_strings_and_the_last_one_wins():
    request = request_from_args("lenet5", parse("--model-arg", "activation=relu", "--model-arg", "batch_norm=true",
                                                "--model-arg", "activation=sigmoid", "--channels", "3"))
    assert request.options == {"activation": "sigmoid", "batch_norm": True}
    assert request.input_shape(4) == (4, 28, 28, 3) and request.classes == 10
    assert request.build().batch_norm is True
    with pytest.raises(ModelRequestError, match="KEY=VALUE"):
        request_from_args("lenet5", parse("--model-arg", "activation"))


@pytest.mark.parametrize("request_, needle", [
    (ModelRequest("lenet5", {"activaton": "relu"}), "--model-arg: lenet5 has no option 'activaton'; Did you mean "
                                                    "'activation'?"),
    (ModelRequest("lenet5", {"activation": "tanh"}), "activation is 'sigmoid' or 'relu', got 'tanh'"),
    (ModelRequest("nin", input_size=66), "below nin's minimum input of 67x67 pixels"),
    # with options the minimum is found by tracing the variant, not read from the registry
    (ModelRequest("lenet5", {"pool": "max"}, input_size=11), "below lenet5's minimum input of 12x12 pixels"),
    (ModelRequest("lenet5", channels=0), "--channels must be an integer of at least 1"),
    (ModelRequest("lenet5", num_classes=-1), "--num-classes must be an integer of at least 0"),
])
def test_a_request_that_cannot_build_is_one_sentence(request_, needle):
    with pytest.raises(ModelRequestError) as error:
        request_.checked()
    assert needle in str(error.value) and len(str(error.value).splitlines()) == 1


def test_a_variant_names_its_results_file_apart_from_the_registered_build():
    assert ModelRequest("nin").tag() == "" and ModelRequest("nin").is_default
    variant = ModelRequest("nin", {"dropout": 0.3}, channels=1, num_classes=10)
    assert variant.tag() == "_c1_k10_dropout-0.3" and not variant.is_default


# -- python -m flaxnets summary --------------------------------------------------------------------------------

def test_summary_counts_d2l_nin_for_fashion_mnist(capsys):
    assert command.main(["summary", "nin", *D2L_NIN_ARGS]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nin: input (1, 224, 224, 1)")
    assert f"total parameters: {D2L_NIN:,}" in out
    assert "avgpool" in out and "(1, 10)" in out


def test_summary_passes_model_args_and_refuses_unknown_ones(capsys):
    assert command.main(["summary", "lenet5", "--model-arg", "batch_norm=true", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "input (1, 32, 32, 1)" in out and "bn1" in out and "BatchNorm statistics" in out
    assert command.main(["summary", "lenet5", "--model-arg", "dropuot=0.3"]) == 2
    err = one_sentence(capsys)
    assert "has no option 'dropuot'" in err and "its options are activation, batch_norm" in err
    assert command.main(["summary", "nin", "--input-size", "50"]) == 2
    assert "minimum input of 67x67 pixels" in one_sentence(capsys)
    assert command.main(["lenet*", "--channels", "1"]) == 2  # the flags belong to summary
    assert "apply to 'python -m flaxnets summary NAME'" in one_sentence(capsys)


def test_summary_batch_prints_xla_memory_of_a_training_step_and_a_prediction(capsys):
    assert command.main(["summary", "lenet5", "--batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "memory at batch 64, input (64, 28, 28, 1), compiled for this backend (cpu)" in out
    assert "training step (SGD with momentum" in out and "prediction: " in out
    assert command.main(["summary", "lenet5", "--batch", "0"]) == 2
    assert "--batch" in one_sentence(capsys)
    assert command.main(["summary", "lenet5_bn", "--batch", "1"]) == 2  # its dense BatchNorm: one value a channel
    assert "more than one value per channel" in one_sentence(capsys)
    # An input the network evaluates on but cannot train on: one sentence, before any table.
    assert command.main(["summary", "inception_v3", "--input-size", "100", "--batch", "2"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("error: --batch measures a training step, which inception_v3 cannot take on 100x100")


def test_step_memory_is_the_trainer_step_and_grows_with_the_batch():
    """flaxnets builds the train step from flax and optax alone; XLA's figure for it is the one of the
    trainer's own step (`train.step.train_step` through `benchmarks.common.build_step`, plain kernels)."""
    small, large = (step_memory("lenet5_bn", batch=batch) for batch in (32, 128))
    trainer = common.build_step("lenet5_bn", "train", 128, kernels="plain").memory_bytes()
    assert large.train_bytes == pytest.approx(trainer, rel=0.01)
    assert 0 < large.predict_bytes < large.train_bytes
    assert small.train_bytes < large.train_bytes and small.predict_bytes < large.predict_bytes
    weights = count_params(abstract_variables("lenet5_bn")["params"]) * 4
    assert large.train_bytes > 3 * weights  # parameters, gradients and momentum at least


def test_step_memory_has_a_floor_from_the_shapes_where_xla_counts_too_little():
    """XLA's CPU analysis reports no temporaries for VGG's prediction; the floor counts the parameters, the
    batch and the largest layer's input and output (the first convolution's: 3 and 64 maps of 32x32)."""
    memory = step_memory("vgg11", (1, 32, 32, 3), batch=2, num_classes=10)
    weights = count_params(abstract_variables("vgg11", (1, 32, 32, 3), num_classes=10)["params"]) * 4
    first_conv = 2 * 32 * 32 * (3 + 64) * 4
    assert memory.predict_floor_bytes >= weights + 2 * 32 * 32 * 3 + first_conv
    assert memory.predict_estimate == max(memory.predict_bytes, memory.predict_floor_bytes)
    assert memory.train_floor_bytes >= 3 * weights + 2 * 32 * 32 * 3 + first_conv  # and gradients, momentum
    text = memory.describe()
    assert text.count("from the shapes") + text.count("the shapes alone need") == 2


# -- the benchmarks -------------------------------------------------------------------------------------------

def test_flops_and_profile_count_d2l_nin_for_fashion_mnist(capsys):
    assert flops.main(["--arch", "nin", *D2L_NIN_ARGS]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| nin "))
    assert "| 224x224x1 |" in row and f"| {D2L_NIN:,} |" in row and "| 0.7623 |" in row
    # the request reaches the per-layer table: the class block is 10 maps wide, the first conv 1 channel deep
    rows = profile.profile_rows(ModelRequest("nin", channels=1, num_classes=10), size=67)
    assert sum(r["params"] for r in rows) == D2L_NIN
    assert rows[0]["params"] == 11 * 11 * 1 * 96 + 96 and rows[-1]["output_shape"] == "1x10"


def test_the_benchmark_step_is_built_from_the_request():
    step = common.build_step(ModelRequest("lenet5", {"batch_norm": True}, num_classes=3), "infer", 2)
    assert step.model.batch_norm is True
    assert step.compiled(*step.args).shape == (2, 3)
    assert throughput.model_flops(ModelRequest("lenet5", channels=3), "infer", 1) > throughput.model_flops(
        "lenet5", "infer", 1)


@pytest.mark.parametrize("module,argv,needle", [
    (profile, ["--arch", "lenet5", "--model-arg", "dropuot=0.3"], "has no option 'dropuot'"),
    (profile, ["--arch", "nin", "--input-size", "66"], "minimum input of 67x67"),
    (flops, ["--arch", "lenet5*", "--model-arg", "mlp_layers=1"], "lenet5 has no option 'mlp_layers'"),
    (flops, ["--arch", "lenet5", "--channels", "0"], "--channels"),
    (throughput, ["--arch", "lenet5", "--model-arg", "activation=tanh"], "activation is 'sigmoid' or 'relu'"),
    (throughput, ["--arch", "lenet5", "--model-arg", "pool"], "KEY=VALUE"),
])
def test_bad_model_requests_get_one_sentence_and_exit_2(module, argv, needle, capsys):
    assert module.main(argv) == 2
    assert needle in one_sentence(capsys)


def test_registered_builds_still_match_torchvision_and_variants_are_not_compared():
    assert flops.flops_row("lenet5")["params"] == flaxnets.get_spec("lenet5").default_params
    variant = flops.flops_row(ModelRequest("alexnet", num_classes=10))
    assert variant["torchvision_params"] is None and variant["gmacs_vs_torchvision_pct"] is None
    assert variant["classes"] == 10
