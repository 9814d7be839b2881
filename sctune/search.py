"""``python -m sctune.search [SPACE.yaml] [options]``: range tests, joint search, final fit on Ray Tune.

The command line only: its flags become an ``experiment.Options``, ``pipeline.run`` does the work, and this
module turns the outcome into an exit code and the closing lines (``report.print_summary``).

Everything the user can get wrong (the space file, options, the storage path, an existing
experiment, GPUs that are not there) is checked before Ray starts (``experiment.prepare``); such errors
exit with code 2 and a message naming the file or option, the key path and the rule.

The Python API is ``run(space, options)`` or ``run(space, name=..., ...)``, importable from here.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .core.config import ConfigError
from .service.experiment import (
    DEFAULT_SPACE,
    DEFAULT_STORAGE,
    STAGE_CHOICES,
    Options,
    StageError,
    UsageError,
    prepare,
)
from .service.lifecycle import EXIT_DISK_FULL, Interrupted
from .service.pipeline import SearchResults, run
from .service.space import DEFAULT_SPACE_DIR

__all__ = ["EXIT_DISK_FULL", "EXIT_STAGE", "EXIT_USAGE", "Options", "SearchResults", "UsageError", "main", "prepare", "run"]

EXIT_USAGE = 2  # bad input: nothing was started
EXIT_STAGE = 3  # a stage could not go on (e.g. no usable bounds); finished work is kept


TASK_HELP = """\
your own data and model (the space file's task: section):
  task: {dataset: my_pkg.data:load_cells, model: my_pkg.nets:Net}
      module:attribute, imported from the folder you run in (or PYTHONPATH):
      load_cells(task) -> x_train, y_train, x_test, y_test, num_classes, augment
      Net(num_classes, input_shape, dropout) -> torch.nn.Module (a class or a function)
  task: {dataset: cells, model: cellnet, modules: [my_pkg.tasks]}
      names registered by my_pkg.tasks (register_dataset / register_model), which
      sctune imports in the driver and in every Ray worker
  built-in: datasets digits, mnist1d, cifar10, cifar100, synthetic, synthetic_cifar;
      models digits_cnn, mnist1d_cnn, mlp, resnet20/56/110, torchvision:<name>
  Everything is resolved before Ray starts (exit 2 naming task.dataset etc. if not).
  On a cluster: ray job submit --working-dir YOUR_PROJECT -- python -m sctune.search space.yaml
  (the folder with your module travels to every node; see docs/cluster.md)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sctune.search",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Super-convergence search: LR range tests, then a joint one-cycle + regularization search "
                    "(Optuna + ASHA) on Ray Tune, then a final fit. Results land in STORAGE/NAME/.",
        epilog=TASK_HELP)
    p.add_argument("space", nargs="?", default=None,
                   help=f"search-space YAML (default: {DEFAULT_SPACE.relative_to(DEFAULT_SPACE_DIR.parent)}); "
                        "its task: names the dataset and model (see below)")
    p.add_argument("--name", help="experiment folder name (default: <space>-<timestamp>)")
    p.add_argument("--storage-path", default=DEFAULT_STORAGE, help="where experiments live (default: %(default)s)")
    p.add_argument("--num-samples", type=int, help="search trials (overrides search.num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (also torch threads)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial; fractions pack trials (0.25 = 4 per GPU)")
    p.add_argument("--address", help="connect to an existing Ray cluster (default: start Ray locally)")
    p.add_argument("--stage", choices=STAGE_CHOICES, default="all",
                   help="run only this stage (default: all three); plan: print the iterations and FTE of each "
                        "stage and exit (a dry run: nothing starts)")
    p.add_argument("--budget", type=float, metavar="FTE",
                   help="bound the whole experiment's compute, in full trainings of the space's fixed budget "
                        "(overrides search.budget); stage 1, the search and the final fit share it")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="final fit on train + validation, as the paper's numbers (overrides final.refit)")
    p.add_argument("--resume", action="store_true", help="continue experiment --name where it stopped")
    p.add_argument("--seed", type=int, help="search seed (range-test seeds and sampler)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets from the file's smoke: section (tests, CI)")
    p.add_argument("--lr-bounds", nargs=2, type=float, metavar=("MIN_LR", "MAX_LR"),
                   help="use these LR bounds when the range tests give none")
    p.add_argument("--wd-prior", type=float, help="weight-decay prior to search below (default: from stage 1)")
    p.add_argument("--dashboard", action="store_true", help="start the local Ray dashboard (on 127.0.0.1)")
    p.add_argument("--cluster-yaml", help="launcher config to read autoscaling limits from for the preflight")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    """The parsed flags as ``Options``: each flag is the field of the same name (``--num-samples``: num_samples)."""
    values = {f: getattr(args, f) for f in Options.__dataclass_fields__ if hasattr(args, f)}
    values["lr_bounds"] = tuple(args.lr_bounds) if args.lr_bounds else None
    return Options(**values)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    options = options_from_args(args)
    try:
        res = run(args.space, options)
    except ConfigError as e:
        print(f"sctune: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Interrupted as e:
        print(f"sctune: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before the run took hold of anything (while validating)
        print("sctune: interrupted before the run started; nothing was changed", file=sys.stderr)
        return 130
    except StageError as e:
        print(f"sctune: stopped: {e}", file=sys.stderr)
        return EXIT_STAGE
    if options.stage != "plan":
        from .present.report import print_summary

        print_summary(res.root, bounds=res.bounds, best=res.best, compute=res.compute)
    return 0


if __name__ == "__main__":
    sys.exit(main())
