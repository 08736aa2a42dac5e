"""``python -m train --arch ARCH --dataset NAME [...]``: parse the command line and train (see --help)."""

import sys

from train.cli import run_command
from train.config import parse_args


def main(argv=None) -> int:
    def body() -> int:
        config = parse_args(argv)
        from flaxnets.cpu import prefer_eigen

        prefer_eigen()  # before JAX starts: Eigen's CPU convolutions, YNNPACK's reductions (flaxnets.cpu)
        from train.loop import initialize_distributed, train_and_evaluate  # JAX starts here, after parsing

        initialize_distributed(config)
        results = train_and_evaluate(config)
        import jax

        if config.lr_find or jax.process_index() != 0:  # the range test printed its own report  # only process 0 reports (DESIGN: "only process 0 writes logs")
            return 0
        top5 = f", top-5 {results['eval_top5']:.2%}" if "eval_top5" in results else ""
        print(f"done: {config.arch} on {config.dataset}, test top-1 {results['eval_top1']:.2%}{top5} "
              f"after {results['epoch']} epochs; workdir {config.workdir}")
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
