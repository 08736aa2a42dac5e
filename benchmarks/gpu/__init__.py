"""The GPU run: everything the project claims for GPUs, measured in one short run of `benchmarks/gpu_run.sh`.

    bash benchmarks/gpu_run.sh --out DIR [--steps a,b,...] [--data-dir data/fashion_mnist] [--dry-run]

The shell script runs each step as its own process, under its own time limit, so one failure or hang loses
only that step; each writes ``DIR/STEP.json`` (rewritten after every result, so a step stopped at its limit
still leaves what it measured) and ``DIR/STEP.log``, and the summary table comes last (also
``DIR/summary.md``). A step is a module of this package, and a command of its own:
``python -m benchmarks.gpu STEP --out DIR [--dry-run] [--budget S] [--data-dir PATH]``. Each module holds
its sizes (``REAL`` on one H200, ``DRY`` at toy sizes on a CPU, which tests/test_gpu_run.py runs) and its
time limits; `benchmarks.gpu.runner` what they share:

* ``environment``: device, versions, the measured matrix and memory ceilings;
* ``correctness``: the train step against float64, converted torchvision weights against torchvision
  (`benchmarks.gpu.checks`);
* ``parallel``: shard_map and pmap against plain jit;
* ``tune``: ResNet-50's step built several ways (kernel sets, compiler settings, batch), with a profile;
* ``peers``: flaxnets beside a plain Flax model and torchvision, eager and compiled (`benchmarks.peers`);
* ``accuracy``: variants of the Fashion-MNIST recipe, one seed each; the one the validation split
  prefers with every seed;
* ``pipeline``: the streamed input pipeline's images/s on the host's cores;
* ``throughput``: every torchvision architecture, train and inference, bfloat16 and float32.
"""
