"""Words of the messages a person reads: one place that puts a count and its noun together."""

from __future__ import annotations

__all__ = ["count"]


def count(number: int, noun: str, plural: str | None = None) -> str:
    """``"1 epoch"``, ``"3 epochs"``, ``"12,000 images"``: ``number`` with ``noun`` in the singular only for
    one; ``plural`` where adding an "s" is wrong (``count(2, "process", "processes")``)."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"
