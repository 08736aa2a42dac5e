"""Step ``parallel``: the shard_map and pmap drivers against plain jit after a few steps
(`benchmarks.gpu.checks.drivers_against_jit`)."""

from __future__ import annotations

import argparse
import dataclasses

from benchmarks.gpu.runner import Record, say

__all__ = ["Sizes", "REAL", "DRY", "LIMIT_S", "DRY_LIMIT_S", "run"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    arch: str
    batch: int
    steps: int


REAL = Sizes(arch="lenet5_bn", batch=64, steps=4)
DRY = Sizes(arch="lenet5_bn", batch=16, steps=2)
LIMIT_S, DRY_LIMIT_S = 30, 120  # 12 s on the H200 (2026-11-30)


def run(record: Record, sizes: Sizes, args: argparse.Namespace) -> tuple[bool, str]:
    """The drivers against jit."""
    from benchmarks.gpu.checks import drivers_against_jit

    rows = record.data["drivers"] = drivers_against_jit(sizes.arch, sizes.batch, sizes.steps)
    for row in rows:
        say(f"{row['driver']} on {row['devices']} device(s): parameters {row['params_error']:.1e}, statistics "
            f"{row['batch_stats_error']:.1e} from jit; {'ok' if row['ok'] else 'OUTSIDE'} the tolerance")
    record.save()
    ok = all(row["ok"] for row in rows)
    worst = max(row["worst_over_tolerance"] for row in rows)
    return ok, (f"{' and '.join(r['driver'] for r in rows)} equal jit on {rows[0]['devices']} device(s) "
                f"(worst {worst:.2f} of the tolerance)")
