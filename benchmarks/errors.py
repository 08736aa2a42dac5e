"""The error every benchmark raises for a request it cannot run, reported as one sentence (`benchmarks.common.run_cli`)."""

__all__ = ["BenchmarkError"]


class BenchmarkError(ValueError):
    """A benchmark cannot run as asked (bad argument, too few devices); the message says why in one sentence."""
