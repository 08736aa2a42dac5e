"""``python -m train --arch ARCH --dataset NAME [...]``: parse the command line and train (see --help)."""

import os
import sys

# Only what is light at the top: every Grain worker process of a streamed run imports this module again.
from train.arguments import parse_args


def done_line(config, results: dict) -> str:
    """The run's last line: final test accuracy, and which checkpoint is "best" and on what it was chosen."""
    from train.text import count

    top5 = f", top-5 {results['test_top5']:.2%}" if "test_top5" in results else ""
    one = f" (one view: {results['test_top1_one_view']:.2%})" if "test_top1_one_view" in results else ""
    ema = f" (averaged weights: {results['ema_test_top1']:.2%})" if "ema_test_top1" in results else ""
    line = (f"done: {config.arch} on {config.dataset}, test top-1 {results['test_top1']:.2%}{one}{top5}{ema} after "
            f"{count(results['epoch'], 'epoch')}; workdir {config.workdir}")
    if "best_step" in results:
        on = results["best_selected_on"]
        line += (f". Best checkpoint: step {results['best_step']} (epoch {results['best_epoch']}), {on} top-1 "
                 f"{results['best_top1']:.2%}, selected on the {'validation' if on == 'val' else 'test'} split")
        if on == "test":
            line += " (no --val-split: the test split chose it, so its test accuracy is optimistic)"
        elif "best_test_top1" in results:
            line += f"; its test top-1 {results['best_test_top1']:.2%} ({results['best_weights']} weights)"
            if "best_test_top1_one_view" in results:
                line += f", {results['best_test_top1_one_view']:.2%} with one view"
    return line + "."


def recipe_line(config, results: dict) -> str | None:
    """The run's test top-1 beside its recipe's expected figure (`train.recipes.report_line`): that of the
    checkpoint chosen on the validation split where there is one, else of the last epoch's weights."""
    from train.recipes import report_line

    chosen = results.get("best_test_top1") if results.get("best_selected_on") == "val" else None
    return report_line(config.recipe, config.arch, results["test_top1"] if chosen is None else chosen)


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
        print(done_line(config, results))
        recipe = recipe_line(config, results)
        if recipe:
            print(recipe)
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
