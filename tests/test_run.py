"""`train.run.build_run`: the run built once from its config, checked against data, devices and weights."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxnets
from train.config import Config, ConfigError
from train.run import build_run, image_side


def _run(digits, **changes):
    config = Config(arch="lenet5_bn", batch_size=64, epochs=2, lr=0.1, **changes).validate()
    return build_run(config, data=digits)


def test_batch_must_split_over_devices(digits):
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_run(Config(batch_size=12), data=digits, device_count=8)


def test_a_batch_of_one_is_refused_where_batch_norm_would_see_one_value(digits):
    """LeNet-5-BN normalises its dense features (one value per channel per image); LeNet-5 has no BatchNorm
    and ResNet-20's last maps are 2x2 at the digits' 8 pixels, so both train on single images."""
    with pytest.raises(ConfigError, match=r"^--batch-size 1 leaves a BatchNorm layer of lenet5_bn one value per "
                                          r"channel at 12x12 input, .* a batch of 2 or more\.$"):
        build_run(Config(arch="lenet5_bn", batch_size=1).validate(), data=digits, device_count=1)
    for arch in ("lenet5", "resnet20"):
        assert build_run(Config(arch=arch, batch_size=1).validate(), data=digits, device_count=1).config.batch_size == 1


def test_image_side_is_raised_to_the_architecture_minimum(digits):
    assert image_side(Config(arch="lenet5_relu"), digits, "lenet5_relu") == flaxnets.min_input_size("lenet5_relu", 1)
    # ImageNet networks see at least 16 pixels (their last maps 1x1), small-image ones the data's own 8.
    assert [image_side(Config(arch=a), digits, a) for a in ("resnet18", "googlenet", "resnet18_cifar")] == [16, 16, 8]
    with pytest.raises(ConfigError, match="minimum input of 32x32"):
        image_side(Config(arch="vgg11", image_size=16), digits, "vgg11")


def test_image_side_is_one_the_model_trains_on(digits):
    # Inception v3 infers from 75 pixels, but its auxiliary head trains from 299; without the head, 75 will do.
    assert image_side(Config(arch="inception_v3"), digits, "inception_v3") == 299
    without_head = Config(arch="inception_v3", model_args={"aux_logits": False})
    assert image_side(without_head, digits, "inception_v3") == 75
    with pytest.raises(ConfigError, match="minimum input of 299x299 pixels for training .*aux_logits=false"):
        image_side(Config(arch="inception_v3", image_size=100), digits, "inception_v3")


# -- starting from torchvision weights ------------------------------------------------------------------------------


def test_init_from_weights_and_freeze_backbone(digits, tmp_path, reference_step):
    from flaxnets.convert import save_state_dict, to_torch

    # ImageNet-shaped resnet18 weights (3 channels, 1000 classes), written as torchvision keys in .npz.
    imagenet = flaxnets.create_model("resnet18", num_classes=1000)
    weights = jax.jit(lambda key: imagenet.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(3))
    path = tmp_path / "resnet18.npz"
    save_state_dict(to_torch("resnet18", weights, return_numpy=True), path)

    config = Config(arch="resnet18", batch_size=32, epochs=2, warmup_epochs=0, lr=0.5, weight_decay=0.0,
                    init_from=str(path), freeze_backbone=True).validate()
    run = build_run(config, data=digits)
    state = run.init_state()
    # The backbone is the file's: grey images get the first kernel summed over its RGB inputs.
    np.testing.assert_allclose(state.params["conv1"]["kernel"],
                               weights["params"]["conv1"]["kernel"].sum(axis=2, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(state.params["layer4_1"]["conv2"]["kernel"],
                                  weights["params"]["layer4_1"]["conv2"]["kernel"])
    assert state.params["fc"]["kernel"].shape == (512, 10)  # a new 10-class head

    after, _ = reference_step(run)(state, {"image": jnp.asarray(digits.train_images[:32]),
                                            "label": jnp.asarray(digits.train_labels[:32]),
                                            "index": jnp.arange(32)})
    frozen = [k for k in flax_paths(state.params) if k[0] != "fc"]
    for key in frozen:
        np.testing.assert_array_equal(get(after.params, key), get(state.params, key), err_msg="/".join(key))
    assert not np.allclose(after.params["fc"]["kernel"], state.params["fc"]["kernel"])


def flax_paths(tree):
    from flax.traverse_util import flatten_dict
    return list(flatten_dict(dict(tree)))


def get(tree, key):
    for part in key:
        tree = tree[part]
    return tree


def test_init_from_rejects_weights_of_another_shape(digits, tmp_path):
    from flaxnets.convert import save_state_dict, to_torch

    other = flaxnets.create_model("resnet18", num_classes=1000)
    weights = jax.eval_shape(lambda: other.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    weights = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), weights)
    path = tmp_path / "resnet18.npz"
    save_state_dict(to_torch("resnet18", weights, return_numpy=True), path)
    with pytest.raises(Exception, match="does not fit"):
        build_run(Config(arch="resnet34", init_from=str(path), batch_size=32), data=digits).init_state()


def test_bfloat16_computes_in_bf16_and_keeps_float32_state(digits, reference_step):
    run = _run(digits, dtype="bfloat16", warmup_epochs=0)
    assert run.preprocess.dtype == jnp.bfloat16 and run.model.dtype == jnp.bfloat16
    state = run.init_state()
    after, metrics = reference_step(run)(state, {"image": jnp.asarray(digits.train_images[:64]),
                                                  "label": jnp.asarray(digits.train_labels[:64]),
                                                  "index": jnp.arange(64)})
    leaves = jax.tree_util.tree_leaves((after.params, after.batch_stats, after.opt_state))
    assert {leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss_sum"]))
    assert not np.allclose(after.params["conv1"]["kernel"], state.params["conv1"]["kernel"])


def test_model_args_reach_the_model_and_bad_ones_are_one_sentence(digits):
    run = build_run(Config(arch="alexnet_small", batch_size=64, model_args={"dropout": 0.3}).validate(), data=digits)
    assert run.model.dropout == 0.3
    with pytest.raises(ConfigError, match=r"--model-arg: alexnet_small has no option 'dropuot'; Did you mean 'dropout'\?"):
        build_run(Config(arch="alexnet_small", batch_size=64, model_args={"dropuot": 0.3}).validate(), data=digits)
    with pytest.raises(ConfigError, match=r"lenet5 cannot be built with \{'activation': 'tanh'\}: LeNet-5's activ"):
        build_run(Config(arch="lenet5", batch_size=64, model_args={"activation": "tanh"}).validate(), data=digits)
    with pytest.raises(ConfigError, match="option dropout is a probability of dropping, at least 0 and below 1, got 1"):
        build_run(Config(arch="alexnet_small", batch_size=64, model_args={"dropout": 1}).validate(), data=digits)
    for option, by in (("num_classes", "the dataset's class count"), ("dtype", "--dtype")):
        with pytest.raises(ConfigError, match=f"--model-arg {option} is set by {re.escape(by)}, not by --model-arg"):
            build_run(Config(arch="lenet5", batch_size=64, model_args={option: 3}).validate(), data=digits)
    with pytest.raises(ConfigError, match=r"--ten-crop applies to streamed datasets; digits is held in memory\.$"):
        build_run(Config(batch_size=64, ten_crop=True).validate(), data=digits)


def test_model_args_from_the_command_line_and_a_config_file(tmp_path):
    from train.arguments import parse_args

    path = tmp_path / "run.json"
    path.write_text('{"arch": "vgg16_cifar", "model_args": {"dropout": 0.2, "hidden": [256]}}')
    config = parse_args(["--config", str(path), "--model-arg", "dropout=0.4", "--model-arg", "batch_norm=false"])
    assert config.model_args == {"dropout": 0.4, "hidden": [256], "batch_norm": False}
    with pytest.raises(SystemExit):
        parse_args(["--model-arg", "no equals sign"])


def test_a_user_factory_is_an_architecture(tmp_path, digits):
    from train.arguments import parse_args

    (tmp_path / "mynet.py").write_text(USER_MODEL)
    config = parse_args(["--arch", f"{tmp_path / 'mynet.py'}:make", "--batch-size", "64", "--model-arg", "width=6"])
    run = build_run(config, data=digits)
    assert run.spec.family == "user" and run.model.width == 6 and run.image_side == 8
    state = run.init_state()
    assert state.params["conv"]["kernel"].shape == (3, 3, 1, 6)
    with pytest.raises(ConfigError, match="has no callable 'nothing'"):
        build_run(Config(arch=f"{tmp_path / 'mynet.py'}:nothing"), data=digits)
    (tmp_path / "leaves.py").write_text("raise SystemExit(0)\n")  # a script's exit is no model, and no success
    with pytest.raises(ConfigError, match=r"importing .*leaves\.py failed \(SystemExit: 0\)"):
        build_run(Config(arch=f"{tmp_path / 'leaves.py'}:make"), data=digits)


# A model of a user's own, as a file: the usual fields, `__call__(x, train)`, a factory.
USER_MODEL = '''
from typing import Any
import flax.linen as nn
import jax.numpy as jnp


class MyNet(nn.Module):
    num_classes: int = 10
    width: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: Any = None

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.Conv(self.width, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x))
        x = nn.BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name, name="bn")(x)
        return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2))).astype(jnp.float32)


def make(num_classes, **fields):
    """A two-layer network of my own."""
    return MyNet(num_classes=num_classes, **fields)


make.input_size = 8
make.in_channels = 1
'''
