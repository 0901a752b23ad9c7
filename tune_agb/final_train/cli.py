"""Final training from the command line: a thin client of :func:`tune_agb.final_train.run`.

    python -m tune_agb.final_train [--config FILE | --experiment STORAGE/NAME] [--input-dir D --label-dir D]
        [--out-dir OUT] [--epochs N] [--device auto|cpu|cuda] [--seed S] [--ensemble N | --ensemble-top K]
        [--overwrite] [--calibration scale|isotonic|distance|none] [--forest W] [--set SECTION.KEY=VALUE ...]
        [--print-config]

The flags of the original training script are accepted with their meanings (``--train_input_data_dir``,
``--nb_epoch``, ``--base_learning_rate``, ``--train_mode resume --model_weights_path P``, ...); see ``--help``.
Every hyperparameter flag is a ``--set config.KEY=VALUE`` (``--nb_epoch 5`` is ``--set config.epochs=5``) and every
ensemble/calibration flag a ``--set final.KEY=VALUE``; flags are applied after the ``--set`` items.
Precedence: built-in defaults < the experiment's best config < ``--config`` file < ``--set`` items and flags.
With ``--experiment``, the ``final:`` section of the search's space (its recipe: ensemble_top, ensemble, cv_final,
calibration, forest) replaces the defaults of those flags; the flags and ``--set final.KEY`` override it.
``--print-config`` prints the resolved configuration (YAML) and exits without training or writing anything.
Exit codes: 0 done, 2 bad input (one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from tune_agb.engine.calibration import METHODS
from tune_agb.engine.config import CHOICES, LOSS_ALIASES, loss_name
from tune_agb.errors import TuneAgbError
from tune_agb.final_train.api import resolved_config, run
from tune_agb.final_train.plan import CV_FINAL
from tune_agb.overrides import FORM, format_overrides, parse_overrides

log = logging.getLogger("tune_agb.final_train")

# The original training script's hyperparameter flags and the TrainConfig key each one sets (the flag's argparse
# dest; each also has a newer spelling, see build_parser). Their values are converted by config_overrides.
LEGACY_FLAGS: dict[str, str] = {
    "--nb_epoch": "epochs",
    "--batch_size": "batch_size",
    "--base_learning_rate": "lr",
    "--l2_lambda": "weight_decay",
    "--optimizer": "optimizer",
    "--momentum": "momentum",
    "--gradient_clipping": "grad_clip",
    "--num_ch": "in_channels",
    "--amp": "amp",
    "--bilinear": "upsampling",
    "--loss_key": "loss",
}
# The flags that set a run option (``--set final.KEY``), by argparse dest.
FINAL_FLAGS = ("ensemble", "ensemble_top", "cv_final", "calibration", "forest")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``TuneAgbError`` line (the original ignored typos silently)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise TuneAgbError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the command, the original script's included (``--help`` lists them)."""
    p = _Parser(
        prog="python -m tune_agb.final_train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML/JSON file of hyperparameters (TrainConfig keys)")
    g.add_argument("--experiment", help="search experiment folder STORAGE/NAME: retrain its best.yaml config, or "
                   "build what its space's final: section says (the flags below override it)")  # fmt: skip
    g.add_argument("--input-dir", "--train_input_data_dir", dest="input_dir",
                   help="INPUT_DIR holding {train,val,test}/NAME.npy (default: the demo data)")  # fmt: skip
    g.add_argument("--label-dir", "--train_label_data_dir", dest="label_dir", help="LABEL_DIR, same layout")
    g.add_argument("--out-dir", "--out_dir", dest="out_dir", default="runs/final", help="output folder")
    g.add_argument("--overwrite", action="store_true", help="allow an out dir that already holds a run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--ensemble", type=int, help="train N members with seeds seed..seed+N-1 (default 1); with "
                   "--ensemble-top K, N seeds of each configuration")  # fmt: skip
    g.add_argument("--ensemble-top", dest="ensemble_top", type=int, metavar="K",
                   help="with --experiment: train the K best distinct configurations of the search (by its metric at "
                   "each trial's best epoch) as an ensemble, each with its own config")  # fmt: skip
    g.add_argument("--cv-final", dest="cv_final", choices=CV_FINAL,
                   help="with --experiment of a spatial k-fold search (a cv: section): retrain the best configuration "
                   "on train+val for the epoch count the fold mean was best at (retrain, default), or keep the best "
                   "trial's k fold models as an ensemble (folds, no training); either way the variance calibration is "
                   "fitted on the fold models' out-of-fold predictions")  # fmt: skip
    g.add_argument("--calibration", type=str.lower, choices=METHODS,
                   help="recalibrate the predicted variance on the validation split: one factor on sigma (scale, "
                   "default), a nondecreasing map of the variance (isotonic), one factor and a widening where a "
                   "pixel's bands lie far from the train pixels' (distance), or not at all (none)")  # fmt: skip
    g.add_argument("--forest", type=float, metavar="W",
                   help="mix the final model with the texture forest (fitted on the train pixels, calibrated on val) "
                   "at weight W in (0, 1) on the forest; predict and the map workers use the mixture (needs "
                   "scikit-learn)")  # fmt: skip
    g.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config.KEY (any TrainConfig key) or final.KEY (ensemble, ensemble_top, cv_final, "
                   "calibration, forest, epochs, seed), value read as YAML; repeatable. "
                   f"{FORM.split(' ', 1)[1]}")  # fmt: skip
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (YAML; final.from: where each option came from) and exit "
                   "without training or writing")  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline without WANDB_API_KEY)")
    g.add_argument("--wandb-project", default="tune_agb")
    h = p.add_argument_group("hyperparameters (override the config: --set config.KEY=VALUE)")
    h.add_argument("--epochs", "--nb_epoch", dest="epochs", type=int)
    h.add_argument("--seed", type=int)
    h.add_argument("--steps-per-epoch", dest="steps_per_epoch", type=int,
                   help="batches per epoch (0: one pass over the train tiles); passes span epochs, every tile seen "
                   "once per pass")  # fmt: skip
    h.add_argument("--data-mode", dest="data_mode", type=str.lower, choices=CHOICES["data_mode"],
                   help="tiles resident on the device or streamed from the packed store (auto: resident on a GPU "
                   "when they fit)")  # fmt: skip
    h.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int)
    h.add_argument("--lr", "--base_learning_rate", dest="lr", type=float)
    h.add_argument("--weight-decay", "--l2_lambda", dest="weight_decay", type=float)
    h.add_argument("--optimizer", type=str.lower, choices=CHOICES["optimizer"])
    h.add_argument("--momentum", type=float)
    h.add_argument("--gradient_clipping", "--grad-clip", dest="grad_clip", nargs="?", const=1.0, type=float,
                   help="clip the gradient norm (at VALUE, default 1.0); --no-gradient_clipping: off")  # fmt: skip
    h.add_argument("--no-gradient_clipping", dest="grad_clip", action="store_const", const=0.0)
    h.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (bf16 on CUDA); --no-amp for full precision")  # fmt: skip
    h.add_argument("--bilinear", dest="upsampling", action=argparse.BooleanOptionalAction, default=None,
                   help="bilinear upsampling; --no-bilinear for transposed convolutions")  # fmt: skip
    h.add_argument("--num_ch", "--in-channels", dest="in_channels", type=int, help="number of input channels")
    h.add_argument("--loss_key", "--loss", dest="loss", type=str.lower,
                   help=f"loss: {', '.join(sorted(CHOICES['loss']))} (or the original script's names)")  # fmt: skip
    o = p.add_argument_group("original training script")
    o.add_argument("--all_checkpoint_dir", help="also keep a checkpoint of every epoch here (with --save_checkpoint)")
    o.add_argument("--save_checkpoint", action=argparse.BooleanOptionalAction, default=False,
                   help="keep every epoch's checkpoint (in --all_checkpoint_dir, default OUT/checkpoints)")  # fmt: skip
    o.add_argument("--train_mode", choices=["scratch", "resume"], default="scratch")
    o.add_argument("--model_weights_path", help="checkpoint to continue from with --train_mode resume")
    o.add_argument("--num_workers", type=int,
                   help="accepted for compatibility; tiles are streamed by a background thread, so unused")  # fmt: skip
    return p


def _loss_from_flag(value: str) -> str:
    name = loss_name(value)
    if name is None:
        allowed = ", ".join(sorted([*CHOICES["loss"], *LOSS_ALIASES]))
        raise TuneAgbError(f"--loss_key: unknown loss {value!r}; allowed: {allowed}")
    return name


# How a flag's value becomes the config value, where they differ.
_FLAG_TO_CONFIG: dict[str, Callable[[Any], Any]] = {
    "amp": lambda on: "auto" if on else "none",
    "upsampling": lambda on: "bilinear" if on else "transpose",
    "loss": _loss_from_flag,
}


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``config.KEY`` overrides the hyperparameter flags give (``--seed`` and the :data:`LEGACY_FLAGS`)."""
    out: dict[str, Any] = {}
    for key in (*LEGACY_FLAGS.values(), "seed", "steps_per_epoch", "data_mode"):
        value = getattr(args, key)
        if value is not None:
            out[f"config.{key}"] = _FLAG_TO_CONFIG.get(key, lambda v: v)(value)
    return out


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    """``{"SECTION.KEY": value}`` of the ``--set`` items, then of the flags (a key given twice keeps its last
    value, so a flag wins over a ``--set`` of the same key)."""
    final = {f"final.{k}": getattr(args, k) for k in FINAL_FLAGS if getattr(args, k) is not None}
    return parse_overrides(args.set) | config_overrides(args) | final


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code (a :class:`TuneAgbError` is raised for bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    overrides = overrides_of(args)
    common: dict[str, Any] = {
        "config": args.config,
        "experiment": args.experiment,
        "input_dir": args.input_dir,
        "label_dir": args.label_dir,
        "out_dir": args.out_dir,
        "resume": args.train_mode == "resume",
        "resume_from": args.model_weights_path,
        "overrides": overrides,
    }
    if args.print_config:
        doc = resolved_config(**common)
        head = "# python -m tune_agb.final_train" + (f" {format_overrides(overrides)}" if overrides else "")
        print(head + "\n" + yaml.safe_dump(doc, sort_keys=False), end="")
        return 0
    if args.num_workers:
        log.info("--num_workers %d: ignored, tiles are streamed by a background thread", args.num_workers)
    keep = (args.all_checkpoint_dir or True) if args.save_checkpoint else None
    outcome = run(
        **common,
        device=args.device,
        overwrite=args.overwrite,
        epoch_checkpoints=keep,
        progress=not args.no_progress,
        wandb=args.wandb_project if args.wandb else None,
    )
    print(outcome.summary())
    return 0
