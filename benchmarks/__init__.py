"""Benchmarks of the flaxnets models, each a command: ``python -m benchmarks.<name>`` from the repository root.

* ``throughput``: images/s, ms/step, compile time, memory, achieved TFLOP/s and MFU of a train or inference step;
* ``flops``: parameters and forward multiply-accumulates per architecture, counted three ways;
* ``profile``: a per-layer table of shapes, parameters, MACs and activation memory;
* ``vs_torch``: the same architecture and batch in PyTorch and flaxnets, alternating, and their ratio;
* ``peers``: flaxnets beside a plain Flax model, torchvision and torch.compile on the same batch;
* ``step_variants``: the train step under each BatchNorm formulation and kernel set, with a kernel profile;
* ``gpu``: the steps of ``bash benchmarks/gpu_run.sh``, everything claimed for GPUs in one short run.

Every result states its conditions (device, versions, batch, dtype, input size, repeats, median and spread);
it is printed, and written as JSON and CSV only into a folder named by ``--out DIR`` (the committed ones
are in ``benchmarks/results/``). `benchmarks/RESULTS.md` holds the tables.
"""
