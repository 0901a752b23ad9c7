"""Final training: retrain a configuration (given, or the best of a search), evaluate on the test split, write
the model, metrics, per-pixel predictions and TensorBoard logs.

    python -m tune_agb.final_train [--config FILE | --experiment STORAGE/NAME] [--input-dir D --label-dir D]
        [--out-dir OUT] [--epochs N] [--device auto|cpu|cuda] [--seed S] [--ensemble N | --ensemble-top K]
        [--overwrite] [--calibration scale|isotonic|none]

The flags of the original training script are accepted with their meanings (``--train_input_data_dir``,
``--nb_epoch``, ``--base_learning_rate``, ``--train_mode resume --model_weights_path P``, ...); see ``--help``.
Precedence: built-in defaults < the experiment's best config < ``--config`` file < command-line flags.

Ensembles: ``--ensemble N`` trains one configuration with N seeds; ``--ensemble-top K`` (with ``--experiment``) trains
the K best distinct configurations of the search, each with its own config (the ``--config`` file and flags apply to
every member). Either way members go to ``OUT/members/member_KK/``, ``OUT/ensemble.yaml`` says where each came from,
and the ensemble predicts the mean of the members' means with the mean of their variances plus the variance of their
means as its variance.

After training, the predicted variance is recalibrated on the validation split (:mod:`tune_agb.engine.calibration`,
saved as ``OUT/calibration.json``); predictions, maps, plots and the ``val_*``/``test_*`` metrics are calibrated,
and ``metrics.json["uncalibrated"]`` holds the metrics before.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tune_agb.cv import merge_train_val, out_of_fold
from tune_agb.demo_data import data_dirs
from tune_agb.engine.calibration import DEFAULT_METHOD, METHODS, Calibration, fit_calibration
from tune_agb.engine.checkpoint import load_checkpoint, save_checkpoint
from tune_agb.engine.config import (
    CHOICES,
    LOSS_ALIASES,
    TrainConfig,
    config_from_dict,
    loss_name,
    read_config_values,
    save_config,
)
from tune_agb.engine.data import NormStats, SplitFeed, TileSet
from tune_agb.engine.device import resolve_amp, resolve_device
from tune_agb.engine.inference import combine_members, member_from_state
from tune_agb.engine.train import EpochReport, SplitEval, TrainResult, evaluate_split, init_state, train
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.location import resolve
from tune_agb.runs import (  # the files of a search's folder and of this run's
    CALIBRATION_FILE,
    ENSEMBLE_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    CVBest,
    Prediction,
    RankedTrial,
    TileMaps,
    rank_trials,
    read_best,
    read_cv_best,
    read_results,
    read_space,
    save_calibration,
    write_ensemble,
    write_metrics,
    write_predictions,
    write_test_maps,
)
from tune_agb.search.space import SearchSpace
from tune_agb.store import DataSource

log = logging.getLogger("tune_agb.final_train")

# Files that mark a folder as holding a run.
RUN_MARKERS = ("config.yaml", METRICS_FILE, "best.pt", "last.pt", "members")
# What final_train does with a spatial k-fold search: retrain on train+val, or keep the fold models.
CV_FINAL = ("retrain", "folds")
# A previous run's files that would otherwise be read with the new one's (predict loads every members/member_*):
# removed from an out dir before a run replaces it (--overwrite).
REPLACED_ON_OVERWRITE = (
    "members",
    "best.pt",
    "last.pt",
    "config.yaml",
    METRICS_FILE,
    ENSEMBLE_FILE,
    CALIBRATION_FILE,
)
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


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one ``TuneAgbError`` line (the original ignored typos silently)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise TuneAgbError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m tune_agb.final_train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML/JSON file of hyperparameters (TrainConfig keys)")
    g.add_argument("--experiment", help="search experiment folder STORAGE/NAME: retrain its best.yaml config")
    g.add_argument(
        "--input-dir",
        "--train_input_data_dir",
        dest="input_dir",
        help="INPUT_DIR holding {train,val,test}/NAME.npy (default: the demo data)",
    )
    g.add_argument("--label-dir", "--train_label_data_dir", dest="label_dir", help="LABEL_DIR, same layout")
    g.add_argument("--out-dir", "--out_dir", dest="out_dir", default="runs/final", help="output folder")
    g.add_argument("--overwrite", action="store_true", help="allow an out dir that already holds a run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help="train N members with seeds seed..seed+N-1; with --ensemble-top K, N seeds of each configuration",
    )
    g.add_argument(
        "--ensemble-top",
        dest="ensemble_top",
        type=int,
        metavar="K",
        help="with --experiment: train the K best distinct configurations of the search (by its metric at each "
        "trial's best epoch) as an ensemble, each with its own config",
    )
    g.add_argument(
        "--cv-final",
        dest="cv_final",
        choices=CV_FINAL,
        help="with --experiment of a spatial k-fold search (a cv: section): retrain the best configuration on "
        "train+val for the epoch count the fold mean was best at (retrain, default), or keep the best trial's k fold "
        "models as an ensemble (folds, no training); either way the variance calibration is fitted on the fold "
        "models' out-of-fold predictions",
    )
    g.add_argument(
        "--calibration",
        type=str.lower,
        choices=METHODS,
        default=DEFAULT_METHOD,
        help="recalibrate the predicted variance on the validation split: one factor on sigma (scale, default), "
        "a nondecreasing map of the variance (isotonic), or not at all (none)",
    )
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (offline without WANDB_API_KEY)")
    g.add_argument("--wandb-project", default="tune_agb")
    h = p.add_argument_group("hyperparameters (override the config)")
    h.add_argument("--epochs", "--nb_epoch", dest="epochs", type=int)
    h.add_argument("--seed", type=int)
    h.add_argument(
        "--steps-per-epoch",
        dest="steps_per_epoch",
        type=int,
        help="batches per epoch (0: one pass over the train tiles); passes span epochs, every tile seen once per pass",
    )
    h.add_argument(
        "--data-mode",
        dest="data_mode",
        type=str.lower,
        choices=CHOICES["data_mode"],
        help="tiles resident on the device or streamed from the packed store (auto: resident on a GPU when they fit)",
    )
    h.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int)
    h.add_argument("--lr", "--base_learning_rate", dest="lr", type=float)
    h.add_argument("--weight-decay", "--l2_lambda", dest="weight_decay", type=float)
    h.add_argument("--optimizer", type=str.lower, choices=CHOICES["optimizer"])
    h.add_argument("--momentum", type=float)
    h.add_argument(
        "--gradient_clipping",
        "--grad-clip",
        dest="grad_clip",
        nargs="?",
        const=1.0,
        type=float,
        help="clip the gradient norm (at VALUE, default 1.0); --no-gradient_clipping turns it off",
    )
    h.add_argument("--no-gradient_clipping", dest="grad_clip", action="store_const", const=0.0)
    h.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (bf16 on CUDA); --no-amp for full precision",
    )
    h.add_argument(
        "--bilinear",
        dest="upsampling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bilinear upsampling; --no-bilinear for transposed convolutions",
    )
    h.add_argument("--num_ch", "--in-channels", dest="in_channels", type=int, help="number of input channels")
    h.add_argument(
        "--loss_key",
        "--loss",
        dest="loss",
        type=str.lower,
        help=f"loss: {', '.join(sorted(CHOICES['loss']))} (or the original script's names)",
    )
    o = p.add_argument_group("original training script")
    o.add_argument("--all_checkpoint_dir", help="also keep a checkpoint of every epoch here (with --save_checkpoint)")
    o.add_argument(
        "--save_checkpoint",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep every epoch's checkpoint (in --all_checkpoint_dir, default OUT/checkpoints)",
    )
    o.add_argument("--train_mode", choices=["scratch", "resume"], default="scratch")
    o.add_argument("--model_weights_path", help="checkpoint to continue from with --train_mode resume")
    o.add_argument(
        "--num_workers",
        type=int,
        help="accepted for compatibility; tiles are streamed by a background thread, so unused",
    )
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
    """The TrainConfig values given by hyperparameter flags (``--seed`` and the :data:`LEGACY_FLAGS`), not yet
    validated."""
    out: dict[str, Any] = {}
    for key in (*LEGACY_FLAGS.values(), "seed", "steps_per_epoch", "data_mode"):
        value = getattr(args, key)
        if value is not None:
            out[key] = _FLAG_TO_CONFIG.get(key, lambda v: v)(value)
    return out


@dataclass
class MemberPlan:
    """One model of the run: its config, its folder, and the search trial it comes from (None: not from a search) or
    the fold of a cv search whose trained model it keeps (--cv-final folds)."""

    cfg: TrainConfig
    out: Path
    trial: RankedTrial | None = None
    fold: int | None = None


@dataclass
class Plan:
    cfg: TrainConfig  # the config of the run (of the first member for --ensemble-top)
    input_dir: Path
    label_dir: Path
    out: Path
    resume: dict[str, Any] | None
    source: str
    members: list[MemberPlan]
    experiment: dict[str, Any] | None = None  # --ensemble-top / a cv search: the search's location, metric, mode
    cv: CVBest | None = None  # --experiment of a spatial k-fold search
    cv_final: str | None = None  # then: retrain (on train+val) or folds (keep the k fold models)

    @property
    def kind(self) -> str:
        """``single``, ``seeds`` (--ensemble N), ``configs`` (--ensemble-top K) or ``folds`` (--cv-final folds)."""
        if self.cv_final == "folds":
            return "folds"
        if any(mp.trial is not None for mp in self.members):
            return "configs"
        return "seeds" if len(self.members) > 1 else "single"


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolve config, data folders and resume state; validate everything before anything is written."""
    values: dict[str, Any] = {}
    source = "defaults"
    data: dict[str, Any] = {}
    check_ensemble_flags(args)
    top: list[RankedTrial] = []
    space: SearchSpace | None = None
    cv: CVBest | None = None
    cv_final: str | None = None
    if args.ensemble_top is not None:
        space, top, data = top_trials(args.experiment, args.ensemble_top)
        if space.cv is None and args.cv_final is not None:
            raise TuneAgbError(f"--cv-final: {args.experiment} has no cv: section; drop --cv-final")
        if space.cv is not None:  # each of the K retrained on train+val for the epoch its fold mean was best at
            cv, cv_final = read_cv_best(args.experiment), "retrain"
            if cv is None:
                raise TuneAgbError(f"--ensemble-top: {args.experiment} is a cv search without its best.yaml cv entry")
        source = f"the {len(top)} best distinct configurations of {args.experiment}"
    elif args.experiment:
        best = read_best(args.experiment)
        values |= best.config
        data = best.data
        source = f"best trial {best.trial_id} of {args.experiment}"
        cv = read_cv_best(args.experiment)
        if cv is None and args.cv_final is not None:
            raise TuneAgbError(
                f"--cv-final: {args.experiment} has no cv: section (its best.yaml names no folds); drop --cv-final"
            )
        if cv is not None:
            cv_final = args.cv_final or "retrain"
            if cv_final == "retrain":
                values |= {
                    "epochs": cv_epochs(cv.epoch, _last_epoch(args.experiment, cv.trial_id), cv.config["epochs"])
                }
                source += f" ({cv.folds.k}-fold cv), retrained on train+val for {values['epochs']} epochs"
            else:
                source += f" ({cv.folds.k}-fold cv): its {cv.folds.k} fold models at epoch {cv.epoch}"
    layers: dict[str, Any] = {}  # what the --config file and the flags set: applied over every member's config
    if args.config:
        layers |= _raw_yaml(args.config)
        source = args.config if source == "defaults" else f"{source} + {args.config}"
    resume = None
    if args.train_mode == "resume":
        ckpt = Path(args.model_weights_path) if args.model_weights_path else Path(args.out_dir) / "last.pt"
        resume = load_checkpoint(ckpt)
        if "pretrain" in resume:
            raise TuneAgbError(
                f"{ckpt}: a pretrained trunk (python -m tune_agb.pretrain), not a run to resume; train from it with "
                f"init_weights: {ckpt} in the --config file"
            )
        values = resume["config"] | {k: v for k, v in (values | layers).items() if k == "epochs"}
        layers = {}
        source = f"checkpoint {ckpt}"
    elif args.model_weights_path:
        raise TuneAgbError("--model_weights_path: only used with --train_mode resume")
    layers |= config_overrides(args)
    out = Path(args.out_dir)
    if cv_final == "folds" and (layers or resume is not None):
        given = ", ".join(sorted(layers)) or "--train_mode resume"
        raise TuneAgbError(
            f"--cv-final folds keeps the search's trained fold models; {given} cannot change them "
            "(use --cv-final retrain to train the configuration again)"
        )
    if space is not None:  # K configurations x N seeds: member_{k * N + i} is configuration k with seed + i
        n = args.ensemble
        members = []
        for k, t in enumerate(top):
            tcfg = config_from_dict(
                space.trial_config(t.params).to_dict()
                | ({"epochs": cv_epochs(t.epoch, t.last_epoch, space.max_t)} if cv is not None else {})
                | layers,
                source=f"config of trial {t.trial_id} of {args.experiment}",
            )
            members += seeded_members(tcfg, n, out / "members", k * n, t)
        _warn_identical(members)
        cfg = members[0].cfg
    else:
        cfg = config_from_dict(values | layers, source="config")
        if args.ensemble == 1:
            members = [MemberPlan(cfg, out)]
        else:
            members = seeded_members(cfg, args.ensemble, out / "members", 0)
    chans = {m.cfg.in_channels for m in members}
    if len(chans) > 1:
        raise TuneAgbError(f"--ensemble-top: the members' in_channels differ ({sorted(chans)}); they must share it")
    stored = (data["input_dir"], data["label_dir"]) if data.get("input_dir") and data.get("label_dir") else None
    input_dir, label_dir = data_dirs(args.input_dir or None, args.label_dir or None, stored)
    if resume is None and holds_run(out) and not args.overwrite:
        raise TuneAgbError(
            f"{out}: already holds a run (config.yaml/best.pt/...); use --overwrite to replace it, "
            f"--train_mode resume to continue it, or another --out-dir"
        )
    experiment = None
    if space is not None:
        where = resolve(args.experiment)  # a local path made absolute, a URI as given
        experiment = {"experiment": where, "metric": space.metric, "mode": space.mode}
    if cv is not None and space is None:
        experiment = {"experiment": resolve(args.experiment), "metric": cv.metric, "mode": best.mode}
        if cv_final == "folds":
            members = [MemberPlan(cfg, out / "members" / f"member_{j:02d}", fold=j) for j in range(cv.folds.k)]
    if resume is None and cv_final != "folds":
        for m in members:  # init_weights: a missing or mismatched file is one error line before anything trains
            init_state(m.cfg)
    return Plan(cfg, input_dir, label_dir, out, resume, source, members, experiment, cv, cv_final)


def seeded_members(
    cfg: TrainConfig, n: int, folder: Path, first: int, trial: RankedTrial | None = None
) -> list[MemberPlan]:
    """``n`` members of ``cfg`` with seeds ``cfg.seed .. cfg.seed + n - 1``, in ``folder/member_{first + i}``."""
    return [MemberPlan(cfg.replace(seed=cfg.seed + i), folder / f"member_{first + i:02d}", trial) for i in range(n)]


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)


def check_ensemble_flags(args: argparse.Namespace) -> None:
    """--ensemble and --ensemble-top: their values and the flags they go (or do not go) with."""
    if args.ensemble < 1:
        raise TuneAgbError(f"--ensemble: must be >= 1, got {args.ensemble}")
    if args.train_mode == "resume" and args.ensemble != 1:
        raise TuneAgbError("--train_mode resume continues one model; it cannot be combined with --ensemble")
    if args.cv_final is not None and not args.experiment:
        raise TuneAgbError("--cv-final: needs --experiment STORAGE/NAME, a search with a cv: section")
    if args.cv_final is not None and args.ensemble != 1:
        raise TuneAgbError("--cv-final: cannot be combined with --ensemble N (folds is already an ensemble)")
    k = args.ensemble_top
    if k is None:
        return
    if args.cv_final == "folds":
        raise TuneAgbError(
            "--ensemble-top with --cv-final folds: the K best configurations of a cv search are retrained on "
            "train+val (--cv-final retrain, the default); keep the fold models with --cv-final folds alone"
        )
    if k < 1:
        raise TuneAgbError(f"--ensemble-top: must be >= 1 (the number of configurations), got {k}")
    if not args.experiment:
        raise TuneAgbError(
            "--ensemble-top: needs --experiment STORAGE/NAME, the search whose best configurations it trains"
        )
    if args.train_mode == "resume":
        raise TuneAgbError("--ensemble-top: --train_mode resume continues one model; it cannot train an ensemble")


def top_trials(experiment: str, k: int) -> tuple[SearchSpace, list[RankedTrial], dict[str, Any]]:
    """The ``k`` best distinct configurations of a search (:func:`tune_agb.runs.rank_trials` with
    ``distinct=True``), best first, with the search space and data folders.

    Raises:
        TuneAgbError: one line naming ``--ensemble-top`` when the folder is not a search with results, or when it has
            fewer than ``k`` distinct configurations with a finite value.
    """
    flag = f"--ensemble-top {k}"
    space, record = read_space(experiment, label=flag)
    df = read_results(experiment)
    if df.empty or space.metric not in df:
        raise TuneAgbError(
            f"{flag}: {experiment}/{RESULTS_FILE}: no results (no trial has reported an epoch yet); "
            "allowed: a search folder whose results.parquet has rows"
        )
    ranked = rank_trials(df, space, experiment, distinct=True)
    found = [t for t in ranked if t.scored]
    if k > len(found):
        n_trials = sum(t.scored for t in rank_trials(df, space, experiment))
        raise TuneAgbError(
            f"{flag}: {experiment} has {len(found)} distinct configuration{'s' if len(found) != 1 else ''} with a "
            f"finite {space.metric} ({n_trials} trials); allowed: 1 to {len(found)}"
        )
    data = record.data
    if not data:
        best = read_best(experiment, required=False)
        data = best.data if best is not None else {}
    return space, found[:k], data


def cv_epochs(best_epoch: int, last_epoch: int, max_t: int) -> int:
    """The epochs of a retrain on train+val after a cv search: the epoch the trial's fold mean was best at when the
    trial ran its whole budget (its curve turned there), else ``max_t`` (a trial the scheduler stopped was best at
    its last epochs only because it stopped: it gets the budget, as ``--ensemble-top`` gives a single-split trial)."""
    return best_epoch if last_epoch >= max_t else max_t


def _last_epoch(experiment: str, trial_id: str) -> int:
    """The last epoch ``trial_id`` ran in ``experiment``'s results.parquet (0 when it is not there)."""
    df = read_results(experiment, columns=["trial_id", "epoch"])
    epochs = df.loc[df["trial_id"].astype(str) == trial_id, "epoch"] if not df.empty else []
    return int(epochs.max()) if len(epochs) else 0


def _warn_identical(members: list[MemberPlan]) -> None:
    """Members that the --config file or flags made identical add nothing but cost: say so."""
    seen: dict[str, str] = {}
    for m in members:
        key = json.dumps(m.cfg.to_dict(), sort_keys=True)
        tid = m.trial.trial_id if m.trial else "?"
        if key in seen:
            log.warning("trials %s and %s train the same configuration once --config/flags apply", seen[key], tid)
        seen.setdefault(key, tid)


def _raw_yaml(path: str) -> dict[str, Any]:
    """Keys of a config file as written, so that it overrides only what it names; validated with the rest, and
    here too so that errors name the file."""
    values = read_config_values(path)
    config_from_dict(values, source=path)
    return values


class EpochLogger:
    """Writes best.pt / last.pt / optional per-epoch checkpoints, TensorBoard scalars and images, wandb."""

    def __init__(
        self, out: Path, tb_dir: Path, keep_dir: Path | None, wandb_run: Any = None, last_is_best: bool = False
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        self.last_is_best = last_is_best  # best.pt = the last epoch (no held-out split to pick an epoch on)
        self.keep_dir = keep_dir
        self.writer = SummaryWriter(log_dir=str(tb_dir))
        self.wandb = wandb_run

    def __call__(self, rep: EpochReport) -> None:
        state = rep.state()
        save_checkpoint(state, self.out / "last.pt")
        if rep.is_best or self.last_is_best:
            save_checkpoint(state, self.out / "best.pt")
        if self.keep_dir is not None:
            save_checkpoint(state, self.keep_dir / f"epoch_{rep.epoch:04d}.pt")
        for k, v in rep.metrics.items():
            if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, rep.epoch)
        flat = rep.val.var.sqrt().float()  # at the labelled val pixels
        q = torch.quantile(flat[:: max(1, flat.numel() // 100_000)], torch.tensor([0.1, 0.5, 0.9], device=flat.device))
        stats = dict(zip(("std_p10", "std_median", "std_p90"), q.cpu().tolist(), strict=True))
        for k, v in stats.items():
            self.writer.add_scalar(f"val_variance/{k}", v, rep.epoch)
        self.writer.add_histogram("val_variance/predicted_std", flat.cpu(), rep.epoch)
        if 0 in rep.val.maps:
            mean0, var0 = rep.val.maps[0]
            self.writer.add_image("val_prediction/mean_and_std", prediction_image(mean0, var0.sqrt()), rep.epoch)
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in rep.metrics.items() if k != "epoch"} | stats, step=rep.epoch)

    def close(self) -> None:
        self.writer.close()


def prediction_image(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(1, H, 2W + 2) image in [0, 1]: the mean map beside the std map, each scaled by its own max."""
    m = mean.detach().float().cpu().clamp_min(0)
    s = std.detach().float().cpu()
    m = m / m.max().clamp_min(1e-6)
    s = s / s.max().clamp_min(1e-6)
    gap = torch.ones(m.shape[0], 2)
    return torch.cat([m, gap, s], dim=1).unsqueeze(0)


def _start_wandb(project: str | None, cfg: TrainConfig, out: Path) -> Any:
    if project is None:
        return None
    try:
        import wandb
    except ImportError:
        raise TuneAgbError("--wandb: the wandb package is not installed (pip install 'tune_agb[wandb]')") from None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=project, dir=str(out), config=cfg.to_dict(), mode=mode)


@dataclass
class MemberOutput:
    result: TrainResult | None  # None: a model kept from a search (--cv-final folds), not trained here
    preds: dict[str, SplitEval]  # split -> labelled pixels' predictions (and the maps of the tiles kept)
    metrics: dict[str, float]


def train_member(
    cfg: TrainConfig,
    tiles: dict[str, TileSet],
    out: Path,
    *,
    norm: NormStats | None = None,
    resume: dict[str, Any] | None = None,
    device: str = "auto",
    progress: bool = True,
    epoch_checkpoints: Path | None = None,
    wandb_project: str | None = None,
    last_is_best: bool = False,
) -> MemberOutput:
    """Train one model into ``out`` (config.yaml, best.pt, last.pt, tensorboard/, norm_stats.json) and predict val
    and test with its best epoch.

    Args:
        cfg: hyperparameters.
        tiles: ``train``, ``val`` and ``test`` TileSets.
        out: the member's output folder.
        norm: normalisation stats (None: computed from the train split).
        resume: a checkpoint dict to continue from.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show a progress bar.
        epoch_checkpoints: a folder to keep every epoch's checkpoint in (None: not kept).
        wandb_project: log to Weights & Biases under this project (None: no W&B).
        last_is_best: keep the last epoch as best.pt, not the one with the lowest val RMSE (a retrain on train+val,
            whose val tiles are training tiles: the epoch count was chosen by cross-validation).
    """
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    wb = _start_wandb(wandb_project, cfg, out)
    logger = EpochLogger(out, out / "tensorboard", epoch_checkpoints, wb, last_is_best=last_is_best)
    try:
        result = train(
            cfg,
            {"train": tiles["train"], "val": tiles["val"]},
            norm=norm,
            device=device,
            resume=resume,
            on_epoch=logger,
            progress=progress,
        )
    finally:
        logger.close()
        if wb is not None:
            wb.finish()
    if not (out / "best.pt").is_file():  # resumed elsewhere and no epoch beat the checkpoint's best
        log.warning("%s: no epoch improved on the resumed checkpoint's best; evaluating the last epoch", out)
        save_checkpoint(load_checkpoint(out / "last.pt"), out / "best.pt")
    best = load_checkpoint(out / "best.pt", map_location=result.device)
    member = member_from_state(best, result.device, source=str(out / "best.pt"))  # measures its seam margin
    if best.get("seam_margin", -1) != member.margin:  # stored with the model for tiled prediction without seams
        save_checkpoint({**best, "seam_margin": member.margin}, out / "best.pt")
    log.info("%s: seam margin %s px", out / "best.pt", member.margin)
    preds, metrics = predict_splits(member.model, cfg, result.norm, tiles, result.device, result.amp)
    (out / "norm_stats.json").write_text(json.dumps(result.norm.to_dict(), indent=1))
    return MemberOutput(result, preds, {"best_epoch": int(best["epoch"])} | metrics)


def predict_splits(
    model: torch.nn.Module,
    cfg: TrainConfig,
    norm: NormStats,
    tiles: dict[str, TileSet],
    device: torch.device,
    amp: torch.dtype | None,
) -> tuple[dict[str, SplitEval], dict[str, float]]:
    """A model's predictions of val and test (the test maps of a few tiles kept) and their metrics."""
    preds, metrics = {}, {}
    for split in ("val", "test"):
        feed = SplitFeed(tiles[split], norm, device, cfg.data_mode)
        keep = map_tiles(feed) if split == "test" else ()
        ev = evaluate_split(model, feed, cfg, norm, cfg.batch_size, amp, keep=keep)
        preds[split] = ev
        metrics |= {f"{split}_{k}": v for k, v in ev.metrics.items()}
    return preds, metrics


def keep_fold_model(state: dict[str, Any], tiles: dict[str, TileSet], out: Path, device: str) -> MemberOutput:
    """One fold model of a cross-validated search kept as an ensemble member: written to ``out`` like a trained
    member (best.pt with its seam margin, config.yaml, norm_stats.json) and predicting val and test."""
    dev = resolve_device(device)
    member = member_from_state(state, dev, source=f"{out.name} (fold model)")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint({**state, "seam_margin": member.margin}, out / "best.pt")
    save_config(member.config, out / "config.yaml")
    (out / "norm_stats.json").write_text(json.dumps(member.norm.to_dict(), indent=1))
    preds, metrics = predict_splits(
        member.model, member.config, member.norm, tiles, dev, resolve_amp(member.config, dev)
    )
    return MemberOutput(None, preds, {"best_epoch": int(state["epoch"])} | metrics)


# How many test tiles final_train keeps whole (mean, std and label maps) for the report: the most labelled ones.
MAP_TILES = 4


def map_tiles(feed: SplitFeed, k: int = MAP_TILES) -> tuple[int, ...]:
    """The ``k`` tiles with the most labelled pixels (ties: the first), whose whole maps final_train keeps."""
    counts = feed.labelled.counts()
    return tuple(int(i) for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:k])


def write_plots(
    folder: Path, preds: dict[str, Prediction], uncalibrated: dict[str, Prediction], cal: Calibration
) -> None:
    """For val and test: ``{split}_scatter.png`` (predicted vs label), ``{split}_calibration.png`` (RMSE vs RMV,
    calibrated) and ``{split}_reliability.png`` (expected vs observed coverage before and after calibration)."""
    from tune_agb.engine.plots import calibration_plot, reliability_plot, scatter_plot

    folder.mkdir(exist_ok=True)
    for split, pr in preds.items():
        y, m, sd = pr.y, pr.mean, np.sqrt(pr.var)
        scatter_plot(y, m, folder / f"{split}_scatter.png", f"{split}: predicted vs label ({y.size} pixels)")
        calibration_plot(y, m, sd, folder / f"{split}_calibration.png", f"{split}: uncertainty calibration")
        before = np.sqrt(uncalibrated[split].var)
        title = f"{split}: reliability, calibration {cal.method}"
        after = None if cal.method == "none" else sd
        reliability_plot(y, m, before, after, folder / f"{split}_reliability.png", title, cal.loss)


def combined(evals: list[SplitEval]) -> Prediction:
    """The members' predictions of one split combined (mean of means; mean of variances + variance of means), on
    the host. Every member predicted the same pixels in the same order."""

    def host(t: torch.Tensor) -> np.ndarray:
        return t.float().cpu().numpy()

    for e in evals[1:]:
        if not (np.array_equal(e.tile, evals[0].tile) and np.array_equal(e.flat, evals[0].flat)):
            raise RuntimeError("ensemble members predicted different pixels; they cannot be combined")
    mean, var = combine_members(torch.stack([e.mean for e in evals]), torch.stack([e.var for e in evals]))
    maps = {}
    for k in evals[0].maps:
        m, v = combine_members(torch.stack([e.maps[k][0] for e in evals]), torch.stack([e.maps[k][1] for e in evals]))
        maps[k] = (host(m), host(v))
    return Prediction(evals[0].tile, evals[0].flat, host(evals[0].y), host(mean), host(var), maps)


def _epoch_checkpoint_dir(args: argparse.Namespace, out: Path) -> Path | None:
    """Where --save_checkpoint keeps every epoch's checkpoint (--all_checkpoint_dir, else OUT/checkpoints)."""
    if not args.save_checkpoint:
        return None
    return Path(args.all_checkpoint_dir) if args.all_checkpoint_dir else out / "checkpoints"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    resolve_device(args.device)
    if args.num_workers:
        log.info("--num_workers %d: ignored, tiles are streamed by a background thread", args.num_workers)
    data = DataSource(str(plan.input_dir), str(plan.label_dir), in_channels=plan.cfg.in_channels).open()
    tiles = data.tiles
    out = plan.out
    if plan.resume is None and args.overwrite and holds_run(out):
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"final training ({plan.source}) on {plan.input_dir} -> {out}", file=sys.stderr)
    fold_states = cv_fold_states(plan)
    members: list[MemberOutput] = []
    if plan.kind == "folds":
        members = [
            keep_fold_model(st, tiles, mp.out, args.device) for st, mp in zip(fold_states[0], plan.members, strict=True)
        ]
    fit_tiles = merge_train_val(tiles) if plan.cv_final == "retrain" else tiles
    for k, mp in enumerate(plan.members if plan.kind != "folds" else []):
        if len(plan.members) > 1:
            came = f"trial {mp.trial.trial_id}" if mp.trial else f"seed {mp.cfg.seed}"
            print(f"member {k + 1}/{len(plan.members)} ({came}) -> {mp.out}", file=sys.stderr)
        members.append(
            train_member(
                mp.cfg,
                fit_tiles,
                mp.out,
                # a retrain on train+val: normalised with the stats of the tiles it trains on (computed by train)
                norm=None if plan.cv_final == "retrain" else data.norm(mp.cfg.standardize_target),
                resume=plan.resume,
                device=args.device,
                progress=not args.no_progress,
                epoch_checkpoints=_epoch_checkpoint_dir(args, mp.out),
                wandb_project=args.wandb_project if args.wandb else None,
                last_is_best=plan.cv_final == "retrain",
            )
        )
    loss = ensemble_loss([mp.cfg for mp in plan.members])
    uncalibrated = {split: combined([m.preds[split] for m in members]) for split in ("val", "test")}
    val = uncalibrated["val"]
    if fold_states is not None:  # val is training data here: the out-of-fold predictions are the honest sample
        y, mean, var = ensemble_out_of_fold(fold_states, tiles, plan, args.device)
        cal = fit_calibration(args.calibration, y, mean, var, loss, split="out-of-fold")
        models = f"{plan.cv.folds.k} fold models" + (f" of each of {len(fold_states)} trials" * (len(fold_states) > 1))
        fit_on = f"out-of-fold predictions of the {models} ({y.size} pixels)"
    else:
        if plan.cv is not None:
            log.warning("calibration: fitted on val, which this retrain trained on (the fold models are gone)")
        cal = fit_calibration(args.calibration, val.y, val.mean, val.var, loss, split="val")
        fit_on = "val" + (" (in-sample: trained on)" if plan.cv is not None else "")
    save_calibration(cal, out / CALIBRATION_FILE)
    preds = {split: pr.calibrated(cal) for split, pr in uncalibrated.items()}
    metrics: dict[str, Any] = {}
    if plan.kind == "single":
        metrics["best_epoch"] = members[0].metrics["best_epoch"]
        before = {k: v for k, v in members[0].metrics.items() if k != "best_epoch"}
    else:
        if plan.kind == "seeds":
            save_config(plan.cfg, out / "config.yaml")
        write_ensemble_file(out, plan)
        before = {f"{split}_{k}": v for split, pr in uncalibrated.items() for k, v in pr.metrics(loss).items()}
    metrics |= {f"{split}_{k}": v for split, pr in preds.items() for k, v in pr.metrics(loss).items()}
    metrics |= {"uncalibrated": before, "calibration": cal.to_dict()}
    if plan.cv is not None:
        metrics["cv"] = {
            "final": plan.cv_final,
            "k": plan.cv.folds.k,
            "trial_id": plan.cv.trial_id,
            "epoch": plan.cv.epoch,
            "value": plan.cv.value,
            "value_sd": plan.cv.value_sd,
            "val_in_sample": True,  # every val tile was a training tile (retrain: of the model; folds: of k-1)
            "calibration_fit_on": fit_on,
        }
    if plan.kind != "single":
        metrics["ensemble_of"] = plan.kind
        metrics["members"] = [member_record(mp, m) for mp, m in zip(plan.members, members, strict=True)]
    metrics |= {
        "epochs": plan.cv.epoch if plan.kind == "folds" else max(mp.cfg.epochs for mp in plan.members),
        "ensemble": len(plan.members),
        "input_dir": str(plan.input_dir),
        "label_dir": str(plan.label_dir),
    }
    if plan.experiment is not None:
        metrics["search"] = plan.experiment
    write_predictions(out, tiles, preds, uncalibrated)
    write_plots(out / "plots", preds, uncalibrated, cal)
    write_test_maps(out, TileMaps.of(tiles["test"], preds["test"]))
    write_metrics(out, metrics)
    from tune_agb.report import write_report_or_warn  # matplotlib only once the run is written

    page = write_report_or_warn(out)
    if plan.kind == "configs":
        print_members(plan, metrics["members"])
    print_summary(metrics, cal)
    print(f"model, calibration, metrics and predictions written to {out}" + (f"; report: {page}" if page else ""))
    return 0


def cv_fold_states(plan: Plan) -> list[list[dict[str, Any]]] | None:
    """The k fold models behind a run from a cross-validated search, per configuration: of the best trial and epoch,
    or (``--ensemble-top``) of each member's trial at its best epoch. None: not a cv search, or a retrain whose fold
    models Ray did not keep (it then calibrates on val, with a warning)."""
    if plan.cv is None:
        return None
    sources = [plan.cv]
    if plan.kind == "configs":  # one set of fold models per configuration, however many seeds it is trained with
        trials = list({mp.trial.trial_id: mp.trial for mp in plan.members}.values())
        sources = [replace(plan.cv, trial_id=t.trial_id, epoch=t.epoch, checkpoint=t.checkpoint) for t in trials]
    try:
        return [src.fold_states() for src in sources]
    except TuneAgbError as exc:
        if plan.cv_final == "folds":
            raise
        log.warning("%s", exc)
        return None


def ensemble_out_of_fold(
    per_config: list[list[dict[str, Any]]], tiles: dict[str, TileSet], plan: Plan, device: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The out-of-fold prediction of the run: each labelled train/val pixel predicted by the fold model(s) that
    validated on it, combined over the configurations like the members (mean of means; mean of variances +
    variance of means). Returns ``(y, mean, var)`` (float64 host arrays)."""
    oofs = [out_of_fold(states, tiles, plan.cv.folds, device=device) for states in per_config]
    first = oofs[0]
    if any(not (np.array_equal(o.tile, first.tile) and np.array_equal(o.flat, first.flat)) for o in oofs[1:]):
        raise RuntimeError("out-of-fold predictions of the configurations cover different pixels")
    means, varis = (torch.from_numpy(np.stack([getattr(o, a) for o in oofs])) for a in ("mean", "var"))
    mean, var = combine_members(means, varis)
    return first.y, mean.numpy(), var.numpy()


def clear_run(out: Path) -> None:
    """Remove the model files of the run that ``--overwrite`` replaces, so that none of them is read with the new
    one (a third member left from an older three-member ensemble would join a new two-member one in predict)."""
    import shutil

    for name in REPLACED_ON_OVERWRITE:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def ensemble_loss(cfgs: list[TrainConfig]) -> str:
    """The loss under which an ensemble's predictive distribution is scored and calibrated: the members' loss when
    they share one, else Gaussian (the total variance is a mixture's, whatever each member's distribution)."""
    losses = {c.loss for c in cfgs}
    if len(losses) == 1:
        return losses.pop()
    log.info("members were trained with different losses (%s): the ensemble is scored as Gaussian", sorted(losses))
    return "gaussian_nll"


def member_record(mp: MemberPlan, m: MemberOutput) -> dict[str, Any]:
    """A member's entry in ``metrics.json["members"]``: its folder, where it came from, its own (uncalibrated)
    metrics."""
    rec: dict[str, Any] = {"folder": mp.out.name}
    if mp.trial is not None:
        rec |= {"trial_id": mp.trial.trial_id, "search_value": mp.trial.value, "seed": mp.cfg.seed}
    elif mp.fold is not None:  # a fold model of a cv search
        rec["fold"] = mp.fold
    else:
        rec["seed"] = mp.cfg.seed
    return rec | m.metrics


def write_ensemble_file(out: Path, plan: Plan) -> None:
    """``ensemble.yaml``: where the members came from. ``kind`` is ``seeds`` (one config, ``members[].seed``) or
    ``configs`` (the best distinct configurations of ``experiment``: per member its ``trial_id``, the search's
    ``value`` of ``metric`` at that trial's best ``epoch``, the searched ``params`` and the trials that sampled the
    same ones, ``same_params_as``) or ``folds`` (the k fold models of a cross-validated ``experiment``'s best
    ``trial_id`` at ``epoch``: per member its ``fold``). Each member's full config is
    ``members/member_KK/config.yaml``."""
    doc: dict[str, Any] = {}
    if plan.experiment is not None:
        doc |= plan.experiment
    if plan.kind == "folds":
        doc |= {"trial_id": plan.cv.trial_id, "epoch": plan.cv.epoch, "k": plan.cv.folds.k}
    members = []
    for mp in plan.members:
        rec: dict[str, Any] = {"folder": f"members/{mp.out.name}"}
        if mp.fold is not None:
            rec["fold"] = mp.fold
        elif mp.trial is not None:
            t = mp.trial
            rec |= {"trial_id": t.trial_id, "value": t.value, "epoch": t.epoch, "params": dict(t.params)}
            rec["seed"] = mp.cfg.seed
            rec["same_params_as"] = list(t.duplicates)
        else:
            rec["seed"] = mp.cfg.seed
        members.append(rec)
    write_ensemble(out, plan.kind, members, **doc)


def print_members(plan: Plan, records: list[dict[str, Any]]) -> None:
    """The members of an ensemble of search trials: the trial, its seed, its search value, its own val/test RMSE."""
    metric = plan.experiment["metric"] if plan.experiment else "value"
    head = f"{'member':10} {'trial':>14} {'seed':>6} {'search ' + metric:>18} {'val_rmse':>10} {'test_rmse':>10}"
    print(head + "  params")
    for mp, r in zip(plan.members, records, strict=True):
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in mp.trial.params.items())
        print(
            f"{mp.out.name:10} {r['trial_id']:>14} {r['seed']:>6} {r['search_value']:>18.4g} {r['val_rmse']:>10.4g} "
            f"{r['test_rmse']:>10.4g}  {params}"
        )


SUMMARY_KEYS = ("rmse", "r2", "mae", "me", "nll", "rmv", "within_1sigma", "within_2sigma", "uce", "n")


def print_summary(metrics: dict[str, Any], cal: Calibration) -> None:
    """The val and test metrics, before and after calibration (after only when there is none)."""
    print(f"calibration: {cal.describe()}")
    print(f"{'split':12}" + " ".join(f"{k:>13}" for k in SUMMARY_KEYS))
    for split in ("val", "test"):
        rows = [("", metrics)] if cal.method == "none" else [(" before", metrics["uncalibrated"]), (" after", metrics)]
        for tag, m in rows:
            print(f"{split + tag:12}" + " ".join(f"{m[f'{split}_{k}']:>13.4g}" for k in SUMMARY_KEYS))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
