"""`flaxnets.nnx`: the architectures as NNX modules, against the linen models they wrap; save and load.

Small members at small inputs; every architecture goes through the same `Model` class, and the linen
models it runs are tested over the registry in tests/test_models.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flaxnets
import flaxnets.nnx


@pytest.fixture(scope="module")
def lenet():
    return flaxnets.nnx.create_model("lenet5_bn", rngs=nnx.Rngs(0))


def test_the_same_outputs_and_statistics_as_the_linen_model(lenet):
    linen = flaxnets.create_model("lenet5_bn")
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    variables = lenet.variables
    assert isinstance(lenet.params["conv1"]["kernel"], nnx.Param)
    assert isinstance(lenet.batch_stats["bn1"]["mean"], nnx.BatchStat)
    lenet.eval()
    np.testing.assert_array_equal(lenet(x), linen.apply(variables, x, False))
    lenet.train()
    expected, updates = linen.apply(variables, x, True, mutable=["batch_stats"])
    np.testing.assert_array_equal(lenet(x), expected)
    np.testing.assert_array_equal(lenet.variables["batch_stats"]["bn1"]["var"], updates["batch_stats"]["bn1"]["var"])
    lenet.use_running_average = True  # one flag for BatchNorm and dropout: a half-set mode is refused
    with pytest.raises(ValueError, match="one train flag"):
        lenet(x)
    lenet.train()


def test_jit_grad_and_remat_train_it(lenet):
    x, labels = jax.random.normal(jax.random.key(1), (8, 28, 28, 1)), jnp.arange(8) % 10
    optimizer = nnx.Optimizer(lenet, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            logits = nnx.remat(lambda m: m(x))(model)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(lenet, optimizer)) for _ in range(4)]
    assert losses[-1] < losses[0]


def test_an_ensemble_of_seeds_with_vmap():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def ensemble(rngs):
        return flaxnets.nnx.create_model("lenet5", rngs=rngs)

    models = ensemble(nnx.Rngs(0))
    assert models.params["conv1"]["kernel"].shape == (3, 5, 5, 1, 6)
    logits = nnx.vmap(lambda model, x: model(x), in_axes=(0, None))(models, jnp.ones((2, 28, 28, 1)))
    assert logits.shape == (3, 2, 10) and not jnp.allclose(logits[0], logits[1])


def test_auxiliary_logits_never_enter_the_state():
    """GoogLeNet's heads through `forward_aux`: the state keeps its shape, so a jitted step traces once."""
    model = flaxnets.nnx.create_model("googlenet", num_classes=3)
    x = jnp.ones((2, 16, 16, 3))
    traces = []

    @nnx.jit
    def step(model):
        traces.append(None)
        logits, aux = model.forward_aux(x)
        return logits.sum() + sum(head.sum() for head in aux), len(aux)

    before = jax.tree.structure(nnx.state(model))
    for _ in range(2):  # the second step would trace again if the state had changed shape
        _, heads = step(model)
    assert heads == 2 and len(traces) == 1 and jax.tree.structure(nnx.state(model)) == before
    model.eval()
    # Jitted: an eager GoogLeNet took 10 s of the test, the compiled one 1 s; the list of heads is as static.
    assert nnx.jit(lambda model: model.forward_aux(x)[1])(model) == []


def test_save_and_load_a_folder_and_reset_the_head(tmp_path, lenet):
    lenet.eval()
    x = jnp.ones((2, 28, 28, 1))
    lenet.save_pretrained(tmp_path / "lenet")
    loaded = flaxnets.nnx.from_pretrained(tmp_path / "lenet")
    loaded.eval()
    np.testing.assert_array_equal(loaded(x), lenet(x))
    model, variables = flaxnets.from_pretrained(tmp_path / "lenet")  # the same folder in linen
    np.testing.assert_array_equal(model.apply(variables, x, False), lenet(x))
    five = flaxnets.nnx.from_pretrained(tmp_path / "lenet", num_classes=5, rngs=nnx.Rngs(3))
    assert five.params["fc3"]["kernel"].shape == (84, 5)
    np.testing.assert_array_equal(five.params["conv1"]["kernel"].get_value(), lenet.params["conv1"]["kernel"].get_value())
    lenet.train()


def test_features_through_nnx():
    model = flaxnets.nnx.create_model("resnet18_cifar", features_only=True, out_indices=(2, 4), width=8)
    model.eval()
    maps = model(jnp.ones((1, 8, 8, 3)))
    assert [m.shape for m in maps] == [(1, 4, 4, 16), (1, 1, 1, 64)]
    logits, all_maps = flaxnets.nnx.create_model("lenet5").forward_intermediates(jnp.ones((1, 28, 28, 1)))
    assert logits.shape == (1, 10) and len(all_maps) == 2


def test_converted_torchvision_weights_load_into_it():
    """A torchvision state_dict (random tensors of ResNet-18's shapes) through `from_pretrained`: the NNX
    model computes what the linen model computes with `from_torch`'s variables."""
    rng = np.random.default_rng(0)
    state_dict = {key: rng.standard_normal(shape).astype(np.float32) * 0.05
                  for key, shape in flaxnets.convert.torch_shapes("resnet18").items()}
    state_dict.update({key: np.abs(value) + 0.5 for key, value in state_dict.items() if key.endswith("running_var")})
    model = flaxnets.nnx.create_model("resnet18", pretrained=state_dict, num_classes=1000)
    model.eval()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    expected = flaxnets.create_model("resnet18").apply(flaxnets.from_torch("resnet18", state_dict), x, False)
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_pretrained_weights_for_grey_images():
    """``input_shape`` with one channel (or ``in_channels=1`` to `from_pretrained`) sums the colour kernel of
    the weights' first convolution: a grey image gets the logits the linen model gives its RGB copy."""
    linen = flaxnets.create_model("squeezenet1_1", num_classes=10)
    variables = jax.jit(lambda key: linen.init(key, jnp.zeros((1, 33, 33, 3)), False))(jax.random.key(0))
    state_dict = flaxnets.convert.to_torch("squeezenet1_1", variables)
    model = flaxnets.nnx.create_model("squeezenet1_1", pretrained=state_dict, input_shape=(33, 33, 1))
    model.eval()
    grey = jax.random.normal(jax.random.key(1), (2, 33, 33, 1))
    np.testing.assert_allclose(model(grey), linen.apply(variables, jnp.tile(grey, (1, 1, 1, 3)), False),
                               rtol=1e-5, atol=1e-6)
    assert model.input_shape == (33, 33, 1)  # what save_pretrained records and checks against



def test_input_shape_is_one_images_as_elsewhere():
    """(H, W, C) as `save_pretrained` and `export` take it; a leading batch axis is dropped, anything else refused."""
    for given in ((28, 28, 1), (2, 28, 28, 1)):
        assert flaxnets.nnx.create_model("lenet5_bn", input_shape=given).input_shape == (28, 28, 1)
    with pytest.raises(ValueError, match="input_shape is one image's"):
        flaxnets.nnx.create_model("lenet5_bn", input_shape=(28, 28))


def test_nnx_view_sets_the_mode_and_params_only_rngs_build_a_model_without_dropout():
    """``nnx.view(..., deterministic=True, use_running_average=True)`` reaches the model, on its own and
    inside a module of the user's (which `nnx.view` switches with it); ``nnx.Rngs(params=0)`` suffices for
    a model that draws no dropout keys."""
    model = flaxnets.nnx.create_model("lenet5_bn", rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    before = jax.tree.map(np.asarray, model.batch_stats)
    evaluating = nnx.view(model, deterministic=True, use_running_average=True)
    assert model.training and not evaluating.training
    np.testing.assert_array_equal(evaluating(x), nnx.view(model, deterministic=True, use_running_average=True)(x))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                   jax.tree.leaves(jax.tree.map(np.asarray, model.batch_stats))))
    model(x)  # training mode: the statistics move
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                       jax.tree.leaves(jax.tree.map(np.asarray, model.batch_stats))))

    class Probe(nnx.Module):
        def __init__(self):
            self.net = flaxnets.nnx.create_model("lenet5_bn", rngs=nnx.Rngs(params=1))
            self.norm = nnx.BatchNorm(10, rngs=nnx.Rngs(0))

    probe = nnx.view(Probe(), deterministic=True, use_running_average=True)
    assert not probe.net.training and probe.norm.use_running_average
