"""Multi-scale features (`flaxnets.features`), ``remat=True`` and auxiliary logits that never accumulate.

One small member of each family, at small inputs: the families share their code with their larger members
(tests/test_models.py checks that each registered architecture is one of these classes).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flaxnets
from flaxnets import models
from flaxnets.features import FeatureNet

# (name, options, input side): a small member of each family, each class of `flaxnets.models` at least once.
MEMBERS = [
    ("lenet5_bn", {}, 28),
    ("alexnet_small", {}, 16),
    ("vgg11", {"config": ((1, 8), (1, 16), (1, 16)), "hidden": (16, 16), "pool_size": None, "batch_norm": True}, 16),
    ("nin", {"mlp_layers": 1}, 67),
    ("squeezenet1_1", {}, 33),
    ("googlenet", {}, 32),
    ("resnet18_cifar", {"width": 8}, 8),
    ("densenet_bc100_k12", {"block_sizes": (2, 2, 2)}, 8),
]
# The forward-pass comparisons, on the cheapest of them (the mechanism is one; the taps' shapes are above).
NUMERIC = [m for m in MEMBERS if m[0] in ("lenet5_bn", "vgg11", "resnet18_cifar", "densenet_bc100_k12")]
# Larger classes, checked on shapes alone (nothing computed).
SHAPES_ONLY = [("alexnet", {}, 63), ("alexnet_paper", {}, 67), ("inception_v3", {}, 75), ("resnet50", {}, 64),
               ("densenet121", {}, 64), ("googlenet_paper", {}, 79)]
CLASSES = {models.LeNet5, models.AlexNetSmall, models.VGG, models.NiN, models.SqueezeNet, models.GoogLeNet,
           models.ResNet, models.DenseNet, models.AlexNet, models.AlexNetPaper, models.InceptionV3}
# Feature points whose maps are exactly input side / reduction (padded convolutions and pools, sides that divide).
EXACT = {"vgg11", "googlenet", "resnet18_cifar", "densenet_bc100_k12", "resnet50", "densenet121"}


def test_every_architecture_is_a_class_whose_features_are_tested():
    for name in flaxnets.list_models():
        assert type(flaxnets.create_model(name)) in CLASSES, name


@pytest.mark.parametrize("name, options, side", MEMBERS + SHAPES_ONLY, ids=lambda v: v if isinstance(v, str) else "")
def test_feature_maps_have_their_info_shapes(name, options, side):
    info = flaxnets.feature_info(name, **options)
    assert [i.index for i in info] == list(range(len(info))) and len(info) >= 2
    assert all(b.reduction >= a.reduction for a, b in zip(info, info[1:]))
    model = flaxnets.create_model(name, features_only=True, **options)
    assert model.feature_info == info
    spec = flaxnets.get_spec(name)
    images = jax.ShapeDtypeStruct((2, side, side, spec.in_channels), jnp.float32)
    maps = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x, False), x, False), images)
    assert [m.shape[-1] for m in maps] == [i.channels for i in info]
    assert all(m.shape[0] == 2 for m in maps)
    if name in EXACT:
        assert [m.shape[1:3] for m in maps] == [(side // i.reduction,) * 2 for i in info]


@pytest.mark.parametrize("name, options, side", NUMERIC, ids=lambda v: v if isinstance(v, str) else "")
def test_features_equal_the_full_forward_pass(name, options, side):
    """`forward_intermediates` gives `apply`'s logits, and `FeatureNet` (sharing the headless model's
    variables) the same maps, chosen by `out_indices`."""
    spec = flaxnets.get_spec(name)
    x = jax.random.normal(jax.random.key(0), (2, side, side, spec.in_channels))
    full = flaxnets.create_model(name, **options)
    variables = jax.jit(lambda k: full.init(k, x, False))(jax.random.key(1))
    logits, maps = jax.jit(lambda v, x: flaxnets.forward_intermediates(full, v, x))(variables, x)
    np.testing.assert_array_equal(logits, jax.jit(lambda v, x: full.apply(v, x, False))(variables, x))
    headless = flaxnets.reset_classifier(name, variables, 0, **options)
    features = flaxnets.create_model(name, features_only=True, out_indices=(0, -1), **options)
    shapes = jax.eval_shape(lambda k: features.init(k, x, False), jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(headless)
    first, last = jax.jit(lambda v, x: features.apply(v, x, False))(headless, x)
    np.testing.assert_allclose(first, maps[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(last, maps[-1], rtol=1e-6, atol=1e-6)


def test_forward_intermediates_in_training_mode_returns_the_updates():
    model = flaxnets.create_model("lenet5_bn")
    x = jnp.ones((2, 28, 28, 1))
    variables = model.init(jax.random.key(0), x, False)
    (logits, maps), updates = flaxnets.forward_intermediates(model, variables, x, True, indices=(1,),
                                                             mutable=["batch_stats"])
    expected, expected_updates = model.apply(variables, x, True, mutable=["batch_stats"])
    np.testing.assert_array_equal(logits, expected)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), updates, expected_updates))
    assert [m.shape for m in maps] == [(2, 10, 10, 16)]


def test_a_feature_model_stops_at_its_last_map_and_leaves_later_statistics_alone():
    """Training mode, as a detection backbone trains: the maps are the full model's, the statistics of the
    layers up to the last chosen point are updated as the full model updates them, and the layers after it
    do not run (their statistics come back as they went in, the whole tree is returned)."""
    options = {"width": 8}
    model = flaxnets.create_model("resnet18_cifar", num_classes=0, **options)
    features = flaxnets.create_model("resnet18_cifar", features_only=True, out_indices=(2,), **options)  # layer2
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = jax.jit(lambda k: features.init(k, x, False))(jax.random.key(1))
    whole = jax.eval_shape(lambda k: model.init(k, x, False), jax.random.key(1))
    assert jax.tree.structure(variables) == jax.tree.structure(whole)  # `init` still makes every variable
    (_, expected_maps), expected = flaxnets.forward_intermediates(model, variables, x, True, mutable=["batch_stats"])
    (got,), updates = jax.jit(lambda v, x: features.apply(v, x, True, mutable=["batch_stats"]))(variables, x)
    np.testing.assert_allclose(got, expected_maps[2], rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(updates) == jax.tree.structure(expected)
    for layer, stats in updates["batch_stats"].items():
        before, full = variables["batch_stats"][layer], expected["batch_stats"][layer]
        want = before if layer.startswith(("layer3", "layer4")) else full
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, want)
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, updates["batch_stats"]["layer2_1"],
                                         variables["batch_stats"]["layer2_1"]))


def test_a_feature_model_inside_a_module_takes_its_name():
    class Detector(nn.Module):
        @nn.compact
        def __call__(self, x):
            maps = flaxnets.create_model("resnet18_cifar", features_only=True, out_indices=(2, 3), width=8,
                                         name="backbone")(x, False)
            return [nn.Conv(4, (1, 1))(m) for m in maps]

    variables = jax.eval_shape(Detector().init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))  # the names alone
    assert set(variables["params"]) == {"backbone", "Conv_0", "Conv_1"}
    assert "layer4_1" in variables["params"]["backbone"] and "fc" not in variables["params"]["backbone"]


@pytest.mark.parametrize("options", [{"out_indices": (5,)}, {"out_indices": (-6,)}, {"out_indices": ()},
                                     {"out_indices": (1.0,)}, {"num_classes": 10}])
def test_bad_feature_requests_are_one_sentence(options):
    with pytest.raises(ValueError, match="feature point|out_indices|class layer"):
        flaxnets.create_model("resnet18_cifar", features_only=True, **options)
    with pytest.raises(ValueError, match="features_only"):
        flaxnets.create_model("resnet18_cifar", out_indices=(1,))
    with pytest.raises(ValueError, match=r"no option 'widht'; Did you mean 'width'\?"):  # not Flax's own 'parent'
        flaxnets.create_model("resnet18_cifar", features_only=True, widht=8)


def test_a_feature_net_built_by_hand_resolves_its_indices_like_create_model():
    """`FeatureNet(backbone, out_indices)` without `create_model`: indices from the end pick the same maps,
    and one past the last point is the same sentence, not an IndexError."""
    backbone = flaxnets.create_model("resnet18_cifar", num_classes=0, width=8)
    x = jnp.ones((1, 8, 8, 3))
    variables = jax.eval_shape(lambda k: backbone.init(k, x, False), jax.random.key(0))

    def maps(indices):
        return [m.shape for m in jax.eval_shape(lambda v: FeatureNet(backbone, indices).apply(v, x, False), variables)]

    assert maps((1, -1)) == maps((1, 4))
    with pytest.raises(ValueError, match=r"ResNet has 5 feature points .* got out_indices=\(7,\)"):
        maps((7,))


# name, options, side: the three ways `remat=True` is wired (a block class, a layer taking `train`, a method);
# NiN, SqueezeNet, GoogLeNet and Inception v3 wrap their block class as ResNet does.
REMAT = [("vgg11", MEMBERS[2][1], 16), ("resnet18_cifar", {"width": 8}, 8),
         ("densenet_bc100_k12", {"block_sizes": (2, 2)}, 8)]


@pytest.mark.parametrize("name, options, side", REMAT, ids=lambda v: v if isinstance(v, str) else "")
def test_remat_gives_the_same_values_gradients_and_statistics(name, options, side):
    spec = flaxnets.get_spec(name)
    x = jax.random.normal(jax.random.key(0), (2, side, side, spec.in_channels))
    plain, remat = (flaxnets.create_model(name, remat=flag, **options) for flag in (False, True))
    variables = jax.jit(lambda k: plain.init(k, x, False))(jax.random.key(1))
    shapes = jax.eval_shape(lambda k: remat.init(k, x, False), jax.random.key(1))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)

    def grads(model):
        def loss(params):
            logits, updates = model.apply({**variables, "params": params}, x, True, rngs={"dropout": jax.random.key(2)},
                                          mutable=["batch_stats", "aux_logits"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(2)).mean(), updates
        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

    for got, expected in zip(jax.tree.leaves(grads(remat)), jax.tree.leaves(grads(plain))):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_models_without_blocks_have_no_remat_option():
    for name in ("lenet5", "alexnet_small"):
        with pytest.raises(flaxnets.registry.UnknownOptionError, match="remat"):
            flaxnets.create_model(name, remat=True)


def test_auxiliary_logits_never_accumulate_in_fed_back_variables():
    """Variables merged with a training apply's mutated collections, step after step, keep one set of
    auxiliary logits (flax's default sow would append one per step, a new shape every time)."""
    model = flaxnets.create_model("googlenet", num_classes=3)
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)  # shapes are the point: traced, not computed
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, False), x)

    def step(variables, x):
        return model.apply(variables, x, True, mutable=["batch_stats", "aux_logits"], rngs={"dropout": jax.random.key(1)})

    for _ in range(3):
        _, mutated = jax.eval_shape(step, variables, x)
        variables = {**variables, **mutated}
    assert [leaf.shape for leaf in jax.tree.leaves(variables["aux_logits"])] == [(2, 3), (2, 3)]
    assert len(models.googlenet.collect_aux_logits(mutated)) == 2


def test_num_classes_defaults_to_the_architectures_own():
    assert flaxnets.create_model("resnet50").num_classes == 1000
    assert flaxnets.create_model("resnet18_cifar").num_classes == 10
    assert flaxnets.create_model("lenet5").num_classes == 10


def test_a_feature_model_has_a_summary(capsys):
    """`flaxnets.summary` builds it without a class count, as `create_model(features_only=True)` requires."""
    flaxnets.summary("lenet5_bn", features_only=True)
    assert "total parameters: 61,308" in capsys.readouterr().out  # LeNet-5 less its 850-parameter class layer
