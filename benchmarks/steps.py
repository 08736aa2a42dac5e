"""The compiled steps a benchmark measures (`build_step`): the trainer's own `train.step.train_step`
(forward, backward, SGD with momentum, the old state donated) or a jitted inference ``apply``, on
synthetic data that already lives on the device, so the input pipeline is no part of the figure.

Parameters are drawn with NumPy from their abstract shapes (`synthetic_variables`: He-normal kernels, unit
BatchNorm scales and variances): initialising through XLA would compile a second program per model, which
costs more than the benchmark itself on a small CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

from benchmarks.errors import BenchmarkError

if TYPE_CHECKING:
    from flaxnets.cli import ModelRequest
    from train.tuning import StepSettings

__all__ = ["parse_dtype", "synthetic_variables", "Step", "build_step", "as_request", "model_for", "KERNEL_CHOICES",
           "add_kernels_option", "kernels_argument"]


def parse_dtype(name: str) -> Any:
    """``"float32"`` or ``"bfloat16"`` to the jax dtype."""
    import jax.numpy as jnp

    table = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in table:
        raise BenchmarkError(f"--dtype must be one of {', '.join(table)}, got {name!r}.")
    return table[name]


def synthetic_variables(abstract: Any, seed: int = 0) -> Any:
    """Concrete variables for an abstract tree: He-normal kernels, ones for BatchNorm scales and running
    variances, zeros elsewhere. Values a trained network could hold, so no denormals or overflows slow
    or spoil a timing."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(leaf.shape)
        if name == "kernel" and len(shape) >= 2:
            std = math.sqrt(2.0 / max(math.prod(shape[:-1]), 1))
            value = rng.standard_normal(shape, dtype=np.float32) * std
        elif name in ("scale", "var"):
            value = np.ones(shape, np.float32)
        else:
            value = np.zeros(shape, np.float32)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(make, abstract)


@dataclasses.dataclass
class Step:
    """One compiled benchmark step and the data it runs on; ``run()`` executes it once and waits."""

    arch: str
    mode: str  # "train" or "infer"
    batch: int
    size: int
    dtype: str
    devices: int
    compiled: Any
    args: list
    lower_s: float
    compile_s: float
    model: Any
    kernels: str  # the kernel set the model is built with: "cpu", "gpu" or "plain" (train.tuning.StepSettings)

    def run(self, steps: int = 1) -> None:
        """Execute ``steps`` steps back to back and wait for the last; a train step feeds its new (donated)
        state into the next call. Waiting once, not after every step, keeps the device's queue full as a
        training loop does: a wait per step adds the host's dispatch time to every step."""
        import jax

        for _ in range(steps):
            out = self.compiled(*self.args)
            if self.mode == "train":
                self.args[0] = out[0]
        jax.block_until_ready(out)

    def cost(self) -> dict[str, float]:
        """XLA's cost analysis of the compiled step (``flops`` counts only the taps inside the padding)."""
        analysis = self.compiled.cost_analysis()
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0] if analysis else {}
        return dict(analysis or {})

    def memory_bytes(self) -> int | None:
        """Peak device memory of the compiled step: arguments, outputs and temporaries, less what aliases."""
        from flaxnets.analysis import compiled_memory_bytes

        return compiled_memory_bytes(self.compiled)


KERNEL_CHOICES = ("auto", "cpu", "gpu", "plain")


def add_kernels_option(parser: Any) -> None:
    """``--kernels auto|cpu|gpu|plain``; `kernels_argument` turns its value into `build_step`'s ``kernels``."""
    parser.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                        help="flaxnets.cpu's kernel set and gradient fence ('cpu'), flaxnets.gpu's ('gpu'), plain JAX "
                             "('plain'), or the backend's own as python -m train takes it ('auto')")


def kernels_argument(value: str) -> str | None:
    """``--kernels``'s value as `build_step`'s ``kernels`` (None for "auto")."""
    return None if value == "auto" else value


def as_request(arch: str | ModelRequest, size: int | None = None) -> ModelRequest:
    """``arch`` as a `flaxnets.cli.ModelRequest` (a name is the architecture with every default), its input
    side replaced by ``size`` when given."""
    from flaxnets.cli import ModelRequest

    request = arch if isinstance(arch, ModelRequest) else ModelRequest(arch)
    return request if size is None else dataclasses.replace(request, input_size=size)


def model_for(arch: str | ModelRequest, dtype: Any, **overrides: Any):
    """The requested model (a registry name: with every default) at its class count, with torchvision's
    reference fields (GoogLeNet without auxiliary heads) unless its ``--model-arg`` options say otherwise."""
    request = as_request(arch)
    return request.build(dtype=dtype, **{**request.spec.reference_overrides, **request.options, **overrides})


def build_step(
    arch: str | ModelRequest,
    mode: str,
    batch: int,
    *,
    size: int | None = None,
    dtype: str = "float32",
    devices: int = 1,
    variables: Any = None,
    compiler_options: dict[str, Any] | None = None,
    seed: int = 0,
    kernels: str | None = None,
    ops: Any = None,
    tie_gradients: bool | None = None,
    settings: StepSettings | None = None,
    donate: bool = True,
) -> Step:
    """Compile ``arch``'s train step (``mode="train"``) or inference (``"infer"``) for one batch shape.

    ``arch`` is a registry name or a `flaxnets.cli.ModelRequest` (options, channels, classes, input side);
    ``size`` replaces its input side, by default the architecture's native one. With ``devices > 1`` the
    batch is split over a mesh of the first ``devices`` devices and the state replicated; BatchNorm then
    normalises with the statistics of the whole batch, as the trainer does. ``variables`` (e.g. converted
    from torchvision) replace the synthetic ones. ``compiler_options`` are XLA debug options for this
    executable only.
    ``kernels`` names the kernel set the model is built from ("cpu": `flaxnets.cpu.ops`, with the train
    step's gradients fenced by `flaxnets.cpu.tie_gradients`, as the trainer does on a CPU; "gpu":
    `flaxnets.gpu.ops`; "plain"); `None` takes the backend's, as the trainer does (``settings``).
    ``ops`` and ``tie_gradients`` replace either part (`benchmarks.cpu_kernels` takes them apart).
    ``settings`` (a `train.tuning.StepSettings`; default the backend's, as the trainer uses) adds its XLA
    options under ``compiler_options`` and traces under its matmul precision. ``donate=False`` keeps the
    old train state alive (the trainer always donates it).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import flaxnets
    from flaxnets.analysis import abstract_variables
    from train import step as steps
    from train.optim import after_fence
    from train.tuning import step_settings

    request = as_request(arch, size)
    if mode not in ("train", "infer"):
        raise BenchmarkError(f"--mode must be 'train' or 'infer', got {mode!r}.")
    if batch < 1:
        raise BenchmarkError(f"--batch must be a positive integer, got {batch}.")
    available = jax.device_count()
    if not 1 <= devices <= available:
        raise BenchmarkError(f"--devices {devices} asks for more devices than the {available} this machine has.")
    if batch % devices:
        raise BenchmarkError(f"--batch {batch} does not split evenly over {devices} devices.")
    request.checked()
    size, channels, num_classes = request.side, request.in_channels, request.classes
    jdtype = parse_dtype(dtype)
    settings = step_settings() if settings is None else settings
    compiler_options = {**settings.compiler_options, **(compiler_options or {})}
    kernels = settings.kernels if kernels is None else kernels
    if ops is None:
        ops = dataclasses.replace(settings, kernels=kernels).ops()
    tie_gradients = kernels == "cpu" if tie_gradients is None else tie_gradients
    model = model_for(request, jdtype, ops=ops)
    if variables is None:
        variables = synthetic_variables(abstract_variables(model, (1, size, size, channels)), seed)
    mesh = jax.make_mesh((devices,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    key = jax.random.key(seed)
    images = jax.random.randint(key, (batch, size, size, channels), 0, 256, jnp.int32).astype(jnp.uint8)
    labels = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 0, num_classes, jnp.int32)
    preprocess = steps.Preprocess(mean=(0.45,) * channels, std=(0.225,) * channels, size=size, augment=False,
                                  dtype=jdtype)
    if mode == "train":
        tx = optax.sgd(1e-3, momentum=0.9)
        if tie_gradients:
            import flaxnets.cpu

            tx = after_fence(flaxnets.cpu.tie_gradients(), tx)
        params = variables["params"]
        state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                                 rng=jax.random.key_data(jax.random.key(seed + 1)))
        data = {"image": images, "label": labels, "index": jnp.arange(batch, dtype=jnp.int32)}
        fn = jax.jit(settings.traced(steps.bind(steps.train_step, model=model, tx=tx, preprocess=preprocess,
                                                num_classes=num_classes)), donate_argnums=0 if donate else ())
        args = [jax.device_put(state, replicated), jax.device_put(data, split)]
    else:
        def infer(variables, images):
            return model.apply(variables, preprocess(images, None, train=False), train=False)

        fn = jax.jit(settings.traced(infer))
        args = [jax.device_put(variables, replicated), jax.device_put(images, split)]
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
    compile_s = time.perf_counter() - start
    return Step(request.name, mode, batch, size, dtype, devices, compiled, args, lower_s, compile_s, model, kernels)
