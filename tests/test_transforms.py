"""Every JAX transformation on every architecture, with the default settings and no environment variable:
what research code that imports flaxnets relies on.

Forward and reverse mode trace through every architecture in float64; on the members whose layers are
written here, forward mode (and `jax.linearize`) is checked against reverse mode by the identity ``<u, J t>
= <J^T u, t>`` for random tangents ``t`` (on parameters and images together) and cotangents ``u``; the
smooth LeNet-5 also against central finite differences. ReLU and max-pool kinks make finite differences
unreliable elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding, PartitionSpec as P

import flaxnets
from flaxnets.analysis import abstract_variables
from flaxnets.models.googlenet import collect_aux_logits
from siblings import DEEPER, without_deeper

MODELS = flaxnets.list_models()


@pytest.fixture
def x64():
    """float64 arithmetic for one test (JAX's switch is process-wide, so it is set back afterwards)."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def _random_like(tree, seed):
    """Standard normal values of each leaf's shape and dtype (drawn with NumPy: no compilation per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype), tree)


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# Inception v3's auxiliary head trains only from 299 pixels up (tests/test_models.py runs it there); at the
# small inputs of this file the model trains without it, as its docstring says to. DenseNet-BC with two
# dense layers per block has every kind of layer of its 48 (tracing all of them in every mode took 10 s).
FIELDS = {"inception_v3": {"aux_logits": False}, "densenet_bc100_k12": {"block_sizes": (2, 2, 2)}}


def _float64_model(name: str) -> nn.Module:
    return flaxnets.create_model(name, num_classes=min(flaxnets.get_spec(name).num_classes, 10), dtype=jnp.float64,
                                 param_dtype=jnp.float64, **FIELDS.get(name, {}))


def _image_shape(name: str, batch: int = 2) -> tuple[int, int, int, int]:
    """A small input: 16 pixels, or the architecture's smallest if that is larger."""
    side = max(flaxnets.min_input_size(name), 16)
    return batch, side, side, flaxnets.get_spec(name).in_channels


def _float64_setup(name: str, batch: int = 2):
    """A float64 model at a small input, its variables drawn from their shapes, and an image batch."""
    model = _float64_model(name)
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        values = rng.standard_normal(leaf.shape)
        if path[-1].key == "var":  # running variances must be positive
            return jnp.asarray(np.abs(values) + 0.5, leaf.dtype)
        fan_in = math.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 1  # He-like scale: activations stay O(1)
        return jnp.asarray(values * math.sqrt(2.0 / fan_in), leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, abstract_variables(model, _image_shape(name, 1)))
    images = jax.random.normal(jax.random.key(2), _image_shape(name, batch), jnp.float64)
    return model, variables, images


# The default library defines no derivative of its own (no `jax.custom_jvp`/`custom_vjp`: those live in the
# opt-in kernel sets, tests/test_cpu.py and test_gpu_ops.py), so forward and reverse mode of a model agree
# wherever they agree for JAX's primitives. What each architecture must show is that every mode traces
# through it, in float64 where asked; the numbers are compared on the members whose layers are written
# here rather than composed from Flax's: BatchNorm (LeNet-5-BN, ResNet-20), Local Response Normalization
# and dropout (AlexNet 2012, NiN), option A's zero-padded strided shortcuts (ResNet-20). Compiling the
# comparison for every architecture took 170 s of the suite (Inception v3 and GoogLeNet near 20 s each).
COMPARED = ("lenet5_bn", "alexnet_paper", "nin", "resnet20")
# These take tangents on every parameter as well as on the images (AlexNet's 58 million, in float64, on the
# images alone: its Local Response Normalization has no parameters).
WITH_PARAMETER_TANGENTS = ("lenet5_bn", "nin", "resnet20")
# The ImageNet members of the newer families are made of layers that members traced here have: DenseNet-BC's
# dense layers and transitions, ResNeXt-29's grouped bottlenecks, ResNet-50's bottlenecks (Wide ResNet's are
# twice as wide inside) and stem (DenseNet's is the same convolution and pool).
_STAND_INS = {"densenet121": "densenet_bc100_k12", "resnext50_32x4d": "resnext29_8x64d", "wide_resnet50_2": "resnet50"}
# ResNet-50 for CIFAR is ResNet-50 with the CIFAR stem (traced on resnet18_cifar, resnet20 and
# resnext29_8x64d): it differs from its stand-in in the one field named here, which the test below asserts
# (the deeper ResNets and VGGs are in siblings.DEEPER).
SAME_MODULE_AS = {"resnet50_cifar": ("resnet50", "stem")}
SAME_LAYERS_AS = {**_STAND_INS, **{deeper: _STAND_INS.get(smaller, smaller) for deeper, smaller in DEEPER.items()},
                  **{name: stand_in for name, (stand_in, _) in SAME_MODULE_AS.items()}}
TRACED = [name for name in MODELS if name not in SAME_LAYERS_AS]
# The largest programs (Inception v3, whose 11 modules all differ, both GoogLeNets and ResNet-50) are traced
# in training alone, the mode with batch statistics: evaluation differs only in BatchNorm, which the smaller
# members trace in both modes. A third of the trace test's time.
TRAINING_ONLY = ("inception_v3", "googlenet", "googlenet_paper", "resnet50")


def test_every_architecture_is_traced_in_float64_or_made_of_traced_layers():
    assert set(SAME_LAYERS_AS.values()) <= set(TRACED) and set(COMPARED) <= set(TRACED)


@pytest.mark.parametrize("name", sorted(SAME_MODULE_AS))
def test_a_stood_in_for_architecture_differs_from_its_stand_in_in_one_field(name):
    stand_in, field = SAME_MODULE_AS[name]
    model, checked = (flaxnets.create_model(n, num_classes=10) for n in (name, stand_in))
    assert type(model) is type(checked)
    assert {f.name for f in dataclasses.fields(model) if getattr(model, f.name) != getattr(checked, f.name)} == {field}


def _modes(name: str, linearize: bool = True, modes: tuple[bool, ...] = (False, True)):
    """``check(variables, images, tangents)``: in each of ``modes`` (eval, train), the float64 logits, `jax.jvp`'s and
    `jax.linearize`'s tangents (`jax.jvp`'s again without ``linearize``), and ``<u, J t>`` and ``<J^T u,
    t>`` (the latter by `jax.vjp`) for tangents ``t`` on the images (and first on every parameter for
    `WITH_PARAMETER_TANGENTS`) and fixed cotangents ``u``."""
    model = _float64_model(name)
    on_params = name in WITH_PARAMETER_TANGENTS

    def check(variables, images, tangents):
        results = []
        for train in modes:
            def f(*inputs):
                state = {**variables, "params": inputs[0]} if on_params else variables
                return model.apply(state, inputs[-1], train, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.key(3)})[0]

            primals = (variables["params"], images) if on_params else (images,)
            out, jt = jax.jvp(f, primals, tangents)
            linearized = jax.linearize(f, *primals)[1](*tangents) if linearize else jt
            cotangent = jnp.cos(jnp.arange(out.size, dtype=out.dtype)).reshape(out.shape)
            _, vjp = jax.vjp(f, *primals)
            results.append((out, jt, linearized, jnp.vdot(cotangent, jt), _vdot(vjp(cotangent), tangents)))
        return results

    return check, on_params


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", TRACED)
def test_forward_and_reverse_mode_trace_in_float64(name):
    """Traced only (`jax.eval_shape`, on shapes): forward and reverse mode go through the architecture and
    give float64 results of the logits' shape (`jax.linearize`, forward mode partially evaluated, is
    compared on `COMPARED`: tracing it too took a third more time)."""
    check, on_params = _modes(name, linearize=False, modes=(True,) if name in TRAINING_ONLY else (False, True))
    variables = abstract_variables(_float64_model(name), _image_shape(name, 1))
    images = jax.ShapeDtypeStruct(_image_shape(name), jnp.float64)
    tangents = (variables["params"], images) if on_params else (images,)
    for out, jt, linearized, forward, reverse in jax.eval_shape(check, variables, images, tangents):
        assert out.dtype == jt.dtype == linearized.dtype == forward.dtype == reverse.dtype == jnp.float64
        assert jt.shape == linearized.shape == out.shape and forward.shape == reverse.shape == ()


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", COMPARED)
def test_forward_mode_agrees_with_reverse_mode_in_float64(name):
    """``<u, J t> = <J^T u, t>`` and `jax.linearize` equal to `jax.jvp`, in eval and train mode, for random
    tangents."""
    check, on_params = _modes(name)
    _, variables, images = _float64_setup(name)
    tangents = (_random_like(variables["params"], 4),) if on_params else ()
    tangents += (_random_like(images, 5),)
    for out, jt, linearized, forward, reverse in jax.jit(check)(variables, images, tangents):
        assert np.isfinite(float(forward)) and abs(float(forward)) > 0
        np.testing.assert_allclose(linearized, jt, rtol=1e-10, atol=1e-10 * float(jnp.max(jnp.abs(jt))))
        np.testing.assert_allclose(float(forward), float(reverse), rtol=1e-9)


@pytest.mark.usefixtures("x64")
def test_lenet5_derivatives_equal_central_differences_in_float64():
    """LeNet-5 as in d2l (sigmoid, average pooling) is smooth: forward mode, reverse mode and central
    differences of float64 logits agree to 1e-7, parameters and images alike."""
    model, variables, images = _float64_setup("lenet5", batch=3)
    tangents = (_random_like(variables["params"], 4), _random_like(images, 5))

    def f(params, images):
        return model.apply({"params": params}, images, False)

    _, jt = jax.jvp(f, (variables["params"], images), tangents)
    step = 1e-5
    shifted = [f(*jax.tree_util.tree_map(lambda p, t: p + sign * step * t, (variables["params"], images), tangents))
               for sign in (1, -1)]
    central = (shifted[0] - shifted[1]) / (2 * step)
    np.testing.assert_allclose(jt, central, rtol=1e-7, atol=1e-9)
    cotangent = jax.random.normal(jax.random.key(6), jt.shape, jnp.float64)
    reverse = _vdot(jax.vjp(f, variables["params"], images)[1](cotangent), tangents)
    np.testing.assert_allclose(float(jnp.vdot(cotangent, central)), float(reverse), rtol=1e-7)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("name", ["lenet5_bn", "alexnet_small"])
def test_float64_end_to_end(name):
    """Parameters, BatchNorm statistics, logits and gradients all float64 when asked for. Traced only: the
    dtypes are the question (the float64 checks above compute)."""
    spec = flaxnets.get_spec(name)
    model = flaxnets.create_model(name, num_classes=10, dtype=jnp.float64, param_dtype=jnp.float64)
    side = flaxnets.min_input_size(name)
    images = jax.ShapeDtypeStruct((2, side, side, spec.in_channels), jnp.float64)
    variables = jax.eval_shape(lambda k, x: model.init(k, x, False), jax.random.key(1), images)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float64)}
    logits, updates = jax.eval_shape(lambda v, x: model.apply(v, x, True, mutable=["batch_stats", "aux_logits"],
                                                              rngs={"dropout": jax.random.key(2)}), variables, images)
    assert logits.dtype == jnp.float64
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(updates))
    grads = jax.eval_shape(jax.grad(lambda p, v, x: jnp.sum(model.apply({**v, "params": p}, x, False) ** 2)),
                           variables["params"], variables, images)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float64)}


@pytest.mark.parametrize("dtype, param_dtype, expected", [
    (jnp.float32, jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16, jnp.float32),
])
def test_logits_are_at_least_float32(dtype, param_dtype, expected):
    model = flaxnets.create_model("lenet5_bn", num_classes=10, dtype=dtype, param_dtype=param_dtype)
    variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)), False)
    kernel_dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables["params"]) if leaf.ndim > 1}
    assert kernel_dtypes == {jnp.dtype(param_dtype)}
    assert model.apply(variables, jnp.zeros((2, 28, 28, 1)), False).dtype == expected


@pytest.mark.parametrize("name", without_deeper(MODELS))
def test_headless_model_returns_pooled_features(name):
    """``num_classes=0``: the model without its class layer returns ``(N, num_features)``, traced
    with `jax.eval_shape` (nothing allocated), in both modes."""
    spec = flaxnets.get_spec(name)
    model = flaxnets.create_model(name, num_classes=0)
    side = max(flaxnets.min_input_size(name), 32)
    images = jax.ShapeDtypeStruct((3, side, side, spec.in_channels), jnp.float32)
    variables = abstract_variables(model, images.shape)
    assert model.num_features == spec.num_features == flaxnets.model_info(name)["num_features"]
    for train in (False, True):
        out = jax.eval_shape(partial(model.apply, train=train, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.key(0)}), variables, images)[0]
        assert out.shape == (3, model.num_features) and out.dtype == jnp.float32


@pytest.mark.parametrize("name, head", [("resnet18_cifar", "fc"), ("vgg16_cifar", "fc3")])
def test_headless_features_feed_the_class_layer(name, head):
    """The features of the headless model, passed through the full model's class layer, give its logits."""
    full, headless = flaxnets.create_model(name, num_classes=7), flaxnets.create_model(name, num_classes=0)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = full.init(jax.random.key(1), images, False)
    trunk = {**variables, "params": {k: v for k, v in variables["params"].items() if not k.startswith(("fc3", "aux")) and k != head}}
    features = headless.apply(trunk, images, False)
    layer = variables["params"][head]
    np.testing.assert_allclose(features @ layer["kernel"] + layer["bias"], full.apply(variables, images, False),
                               rtol=1e-5, atol=1e-5)


def test_create_model_passes_name_through_and_train_is_positional():
    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            backbone = flaxnets.create_model("lenet5_bn", num_classes=0, name="backbone")
            return nn.Dense(3, name="head")(backbone(x, train))

    images = jnp.ones((2, 28, 28, 1))
    variables = Classifier().init(jax.random.key(0), images, False)
    assert set(variables["params"]) == {"backbone", "head"} and set(variables["batch_stats"]) == {"backbone"}
    logits, _ = Classifier().apply(variables, images, True, mutable=["batch_stats"])
    assert logits.shape == (2, 3)


def test_remat_of_a_whole_model_gives_the_same_gradients():
    """`nn.remat` with ``train`` static (argument 2: the module instance counts as 0): same loss,
    gradients and BatchNorm statistics as without rematerialisation. A two-stage ResNet keeps it quick."""
    fields = dict(stage_sizes=(1, 1), block=flaxnets.models.BasicBlock, num_classes=10, stem="cifar", width=16)
    plain = flaxnets.models.ResNet(**fields)
    remat = nn.remat(flaxnets.models.ResNet, static_argnums=(2,))(**fields)
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = jax.jit(plain.init, static_argnums=2)(jax.random.key(1), images, False)

    def loss(model, params):
        logits, updates = model.apply({**variables, "params": params}, images, True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4))), updates

    expected = jax.jit(jax.grad(partial(loss, plain), has_aux=True))(variables["params"])
    got = jax.jit(jax.grad(partial(loss, remat), has_aux=True))(variables["params"])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_memory_efficient_densenet_recomputes_with_the_same_values_and_gradients():
    """``memory_efficient=True`` keeps nothing the dense layers' concatenation, BatchNorm, ReLU and 1x1
    convolution compute for the backward pass (it recomputes them: fewer saved values in all), with the same
    variables, loss, gradients and statistics. A small DenseNet-BC."""
    fields = {"block_sizes": (2, 2), "growth_rate": 4, "num_init_features": 8, "stem": "cifar", "num_classes": 10}
    plain = flaxnets.models.DenseNet(**fields)
    efficient = flaxnets.models.DenseNet(**fields, memory_efficient=True)
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    # Compiled whole: eagerly, initialisation runs one small program per variable.
    variables = jax.jit(plain.init, static_argnums=2)(jax.random.key(1), images, False)
    assert jax.tree.map(jnp.shape, jax.eval_shape(partial(efficient.init, train=False), jax.random.key(1), images)) == jax.tree.map(
        jnp.shape, variables)

    def loss(model, params):
        logits, updates = model.apply({**variables, "params": params}, images, True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4))), updates

    expected = jax.jit(jax.grad(partial(loss, plain), has_aux=True))(variables["params"])
    got = jax.jit(jax.grad(partial(loss, efficient), has_aux=True))(variables["params"])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    def residuals(model) -> tuple[int, int]:
        """Values the backward pass keeps (not the parameters): their elements, and how many come from a
        dense layer's bottleneck."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(lambda params: loss(model, params)[0], variables["params"])
        kept = [line for line in out.getvalue().splitlines() if "from the argument" not in line]
        sizes = [math.prod(map(int, filter(None, re.match(r"\w+\[([\d,]*)\]", line)[1].split(",")))) for line in kept]
        return sum(sizes), sum("DenseLayer.bottleneck" in line for line in kept)

    (plain_kept, plain_bottleneck), (efficient_kept, efficient_bottleneck) = residuals(plain), residuals(efficient)
    assert plain_bottleneck > 0 and efficient_bottleneck == 0
    assert efficient_kept < plain_kept


@pytest.mark.parametrize("name", ["lenet5_bn"])
def test_vmap_over_single_images_equals_the_batch(name):
    spec = flaxnets.get_spec(name)
    side = max(flaxnets.min_input_size(name), 16)
    model = flaxnets.create_model(name, num_classes=10)
    images = jax.random.normal(jax.random.key(0), (3, side, side, spec.in_channels))
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(1), images, False)

    @jax.jit  # one program: eagerly, the vmapped gradient runs op by op (20 s on two cores)
    def both(variables, images):
        one = jax.vmap(lambda image: model.apply(variables, image[None], False)[0])(images)
        # per-example gradients, the usual reason to vmap a model
        def image_sum(p, image):
            return model.apply({**variables, "params": p}, image[None], False).sum()

        per_example = jax.vmap(jax.grad(image_sum), in_axes=(None, 0))(variables["params"], images)
        total = jax.grad(lambda p: model.apply({**variables, "params": p}, images, False).sum())(variables["params"])
        return one, model.apply(variables, images, False), per_example, total

    one, batch, per_example, total = both(variables, images)
    np.testing.assert_allclose(one, batch, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(per_example), jax.tree_util.tree_leaves(total)):
        np.testing.assert_allclose(a.sum(0), b, rtol=1e-4, atol=1e-4)


def test_hessian_and_jacfwd():
    """Second order by forward over reverse: the Hessian of LeNet-5's loss in its last layer's bias is
    symmetric and equals the Jacobian of the gradient taken in reverse mode twice."""
    model = flaxnets.create_model("lenet5_bn", num_classes=10)
    images = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    variables = model.init(jax.random.key(1), images, False)

    def loss(bias):
        params = {**variables["params"], "fc3": {**variables["params"]["fc3"], "bias": bias}}
        logits, _ = model.apply({**variables, "params": params}, images, True, mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(4)))

    bias = variables["params"]["fc3"]["bias"]
    hessian, reverse_twice, forward, reverse = jax.jit(  # one program: eagerly, each runs op by op
        lambda b: (jax.hessian(loss)(b), jax.jacrev(jax.grad(loss))(b), jax.jacfwd(loss)(b), jax.grad(loss)(b)))(bias)
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-6)
    np.testing.assert_allclose(hessian, reverse_twice, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(forward, reverse, rtol=1e-4, atol=1e-6)


def test_jit_with_named_sharding_equals_one_device():
    """The batch split over 8 devices with `NamedSharding` under plain `jit` (XLA partitions the
    program, BatchNorm statistics included): the same loss, gradients and statistics as one device."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")
    model = flaxnets.create_model("resnet18_cifar", num_classes=10, stage_sizes=(1, 1), width=16)
    images = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
    labels = jnp.arange(16) % 10
    variables = model.init(jax.random.key(1), images, False)

    def step(variables, images, labels):
        def loss(params):
            logits, updates = model.apply({**variables, "params": params}, images, True, mutable=["batch_stats"])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), updates
        return jax.grad(loss, has_aux=True)(variables["params"])

    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.jit(step)(jax.device_put(variables, NamedSharding(mesh, P())),
                            jax.device_put(images, NamedSharding(mesh, P("batch"))),
                            jax.device_put(labels, NamedSharding(mesh, P("batch"))))
    single = jax.jit(step)(variables, images, labels)
    for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["googlenet", "googlenet_paper"])
def test_googlenet_init_returns_only_params_and_batch_stats(name):
    model = flaxnets.create_model(name, num_classes=10)
    side = max(flaxnets.min_input_size(name), 32)
    images = jax.random.normal(jax.random.key(0), (2, side, side, 3))
    variables = jax.eval_shape(partial(model.init, train=True), jax.random.key(1), images)
    assert set(variables) <= {"params", "batch_stats"} and "aux1" in variables["params"]
    # Passing the variables back does not pile auxiliary logits up: one pair per training apply.
    apply = partial(model.apply, train=True, mutable=["batch_stats", "aux_logits"], rngs={"dropout": jax.random.key(2)})
    _, mutated = jax.eval_shape(apply, variables, images)
    assert [a.shape for a in collect_aux_logits(mutated)] == [(2, 10), (2, 10)]
    assert len(jax.tree_util.tree_leaves(mutated["aux_logits"])) == 2


def test_nnx_bridge_trains_a_model_with_batch_norm():
    """`flax.nnx.bridge.ToNNX` wraps a flaxnets model into an NNX module: a training call updates its
    BatchNorm statistics in place, and one `nnx.Optimizer` step equals the same step in Linen."""
    from flax import nnx

    linen_model = flaxnets.create_model("lenet5_bn", num_classes=10)
    images = jax.random.normal(jax.random.key(0), (8, 28, 28, 1))
    labels = jnp.arange(8) % 10
    model = nnx.bridge.ToNNX(linen_model, rngs=nnx.Rngs(0)).lazy_init(images, False)
    linen_variables = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                       "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}
    tx = optax.sgd(0.1)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer, images, labels):
        def loss(model):
            logits = model(images, True, mutable=["batch_stats"])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    nnx_loss = nnx_step(model, optimizer, images, labels)

    def linen_loss(params):
        logits, updates = linen_model.apply({**linen_variables, "params": params}, images, True,
                                            mutable=["batch_stats"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)), updates

    (value, updates), grads = jax.jit(jax.value_and_grad(linen_loss, has_aux=True))(linen_variables["params"])
    params = optax.apply_updates(linen_variables["params"], tx.update(grads, tx.init(grads))[0])
    np.testing.assert_allclose(nnx_loss, value, rtol=1e-6)
    for got, expected in ((nnx.to_pure_dict(nnx.state(model, nnx.Param)), params),
                          (nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), updates["batch_stats"])):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))["bn1"]["mean"],
                           linen_variables["batch_stats"]["bn1"]["mean"])
