"""The one error type of the data package, raised wherever data cannot be used and reported by every
command as one sentence (`train.exits`)."""

__all__ = ["DataError"]


class DataError(ValueError):
    """The data cannot be used; the message says which file and why."""
