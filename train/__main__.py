"""``python -m train --arch ARCH --dataset NAME [...]``: parse the command line and train (see --help)."""

import os
import sys

# Only what is light at the top: every Grain worker process of a streamed run imports this module again.
from train.arguments import parse_args


def main(argv=None) -> int:
    from train.exits import run_command

    def body() -> int:
        config = parse_args(argv)
        if config.distributed:  # before JAX starts: its runtime may end this process from C++
            from train.stderr_watch import watch_stderr

            watch_stderr(-1 if config.process_id is None else config.process_id, config.num_processes or -1,
                         os.path.abspath(config.workdir))
        from flaxnets.cpu import cpu_backend_ahead, prefer_eigen

        if cpu_backend_ahead():  # before JAX starts: Eigen's CPU convolutions, YNNPACK's reductions (flaxnets.cpu)
            prefer_eigen()
        from train.loop import initialize_distributed, train_and_evaluate  # JAX starts here, after parsing

        initialize_distributed(config)
        if config.lr_find:  # a range test from a copy of the initial state, which prints its own report
            from train.lr_find import lr_find

            lr_find(config)
            return 0
        results = train_and_evaluate(config)
        import jax

        if jax.process_index() != 0:  # only process 0 reports (DESIGN: "only process 0 writes logs")
            return 0
        from train.report import done_line, recipe_line

        print(done_line(config, results))
        recipe = recipe_line(config, results)
        if recipe:
            print(recipe)
        return 0

    return run_command(body, memory_advice="a smaller --batch-size or --eval-batch-size needs less, as do --dtype "
                       "bfloat16 and --model-arg remat=true (activations recomputed; not LeNet-5 nor AlexNet)")


if __name__ == "__main__":
    sys.exit(main())
