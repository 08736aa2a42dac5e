"""How the tests' processes ask XLA to compile, the suite's own and the commands they start.

The suite compiles well over a thousand programs and runs each a few times on tiny inputs, so XLA's
slower LLVM optimisations cost it more time than they save (benchmarks/RESULTS.md, "The test suite's
compile settings"). They change how the machine code is generated, not what it computes (no
fast-math); the benchmarks keep XLA's defaults.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a test process: ``devices`` CPU devices, compiled without the slow passes."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
