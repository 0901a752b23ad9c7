"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over a search-space file.

    python -m tune_agb.search --space search_spaces/demo.yaml [--set SECTION.KEY=VALUE ...] [--print-config]

A thin client of :func:`tune_agb.search.run` (see :mod:`tune_agb.search.api`): the flags become its arguments,
``--set`` items and the convenience flags (``--num-samples``, ``--seed``...) its overrides, validated like the
space file. ``--print-config`` prints the space as it would run (YAML, overrides applied, with the data folders) and
exits without starting Ray. Exit codes: 0 done, 1 no trial reported a result, 2 bad input (one line on stderr),
130 interrupted (the printed command continues it with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from tune_agb.errors import TuneAgbError
from tune_agb.overrides import FLAG_PATHS, FORM, format_overrides, parse_overrides
from tune_agb.search.api import DEFAULT_STORAGE, resolved_config, run


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2 (run_cli), instead of argparse's usage block
        raise TuneAgbError(f"{self.prog}: {message} (see --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line as an argparse Namespace (``--help`` lists every flag)."""
    p = _Parser(prog="python -m tune_agb.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, help="search-space YAML file (see search_spaces/)")
    p.add_argument("--input-dir", help="tile inputs folder with train/ and val/ (default: space data, else demo)")
    p.add_argument("--label-dir", help="tile labels folder with train/ and val/")
    p.add_argument("--name", help="experiment name (default: the space file's name without .yaml)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help="folder or s3:// / gs:// URI for experiments")
    p.add_argument("--resume", action="store_true", help="continue the experiment STORAGE/NAME")
    p.add_argument(
        "--address",
        help="join a running Ray cluster: auto or HOST:PORT (default: start one here; as a Ray job: the job's cluster)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"change a key of the space file, value read as YAML; repeatable. {FORM.split(' ', 1)[1]}",
    )
    p.add_argument("--print-config", action="store_true", help="print the space as it would run (YAML) and exit")
    p.add_argument("--num-samples", type=int, help="number of trials (--set experiment.num_samples=N)")
    p.add_argument("--max-concurrent", type=int, help="trials running at once")
    p.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (also its torch threads)")
    p.add_argument("--gpus-per-trial", type=float, help="GPUs per trial; 0.25 puts four trials on a card")
    p.add_argument("--time-budget", type=float, help="stop starting/continuing trials after this many seconds")
    p.add_argument("--max-failures", type=int, help="retries of a failing trial from its checkpoint")
    p.add_argument("--seed", type=int, help="searcher seed")
    p.add_argument("--top", type=int, default=5, help="rows of the best-trials table")
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log each trial to Weights & Biases (group = NAME; offline unless WANDB_API_KEY is set; "
        "chosen at the start, kept by --resume)",
    )
    return p.parse_args(argv)


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """``{"SECTION.KEY": value}`` of the ``--set`` items, then of the convenience flags (``--num-samples 8`` is
    ``--set experiment.num_samples=8``); a key given twice keeps its last value."""
    sugar = {path: getattr(args, flag) for flag, path in FLAG_PATHS.items() if getattr(args, flag) is not None}
    return parse_overrides(args.set) | sugar


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code (a :class:`TuneAgbError` is raised for bad input)."""
    args = parse_args(argv)
    overrides = overrides_of(args)
    data = {"input_dir": args.input_dir, "label_dir": args.label_dir}
    if args.print_config:
        config = resolved_config(args.space, overrides=overrides, **data)
        head = f"# {args.space}" + (f" with {format_overrides(overrides)}" if overrides else "")
        print(head + "\n" + yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    outcome = run(
        args.space,
        **data,
        storage=args.storage,
        name=args.name,
        resume=args.resume,
        address=args.address,
        overrides=overrides,
        wandb=args.wandb,
    )
    print(outcome.summary(args.top))
    if not outcome.complete:
        storage, _, name = outcome.experiment.rstrip("/").rpartition("/")
        resume = f"python -m tune_agb.search --space {args.space} --name {name} --storage {storage} --resume"
        print(f"\nsearch interrupted ({outcome.incomplete}); results so far are written. Continue with:\n  {resume}")
        return 130
    if outcome.best is None:
        print("no trial reported a finite result; nothing to train", file=sys.stderr)
        return 1
    return 0
