"""``python -m train.evaluate --workdir W [--checkpoint latest|best|STEP]``: re-score a checkpoint on every
example of its dataset's test split, with the trainer's own data path and eval step."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from train.cli import run_command
from train.config import Config, ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__)
    parser.add_argument("--workdir", required=True, help="a run's workdir, or one checkpoint folder in it")
    parser.add_argument("--checkpoint", default="latest", help="latest, best, or a step number")
    parser.add_argument("--data-dir", help="where the dataset's files are, if not where training found them")
    parser.add_argument("--parallel", choices=("shard_map", "pmap"))
    args = parser.parse_args(argv)

    def body() -> int:
        from train import loop
        from train.inference import load_variables, locate

        workdir, step = locate(args.workdir, args.checkpoint)
        _, meta = load_variables(workdir, step)
        try:
            config = Config.from_dict(meta["config"])
        except (KeyError, TypeError):
            raise ConfigError(f"checkpoint {step} in {workdir} does not record its run's config.") from None
        changes = {k: v for k, v in (("data_dir", args.data_dir), ("parallel", args.parallel)) if v}
        config = dataclasses.replace(config, workdir=workdir, **changes).validate()
        run = loop.build_run(config)
        results = loop.evaluate_checkpoint(run, workdir, step)
        print(json.dumps({"workdir": workdir, "step": step, "arch": config.arch, "dataset": config.dataset,
                          **results}, indent=2))
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
