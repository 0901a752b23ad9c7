"""A final run planned from typed options before anything is written: the run's options (:class:`FinalOptions`,
from :func:`tune_agb.final_train.run`'s arguments and ``--set final.KEY`` overrides), the config of every member
(:class:`MemberPlan`) and where each came from (:class:`Plan`).

Precedence of a member's config: built-in defaults < the experiment's best config (or, with ``ensemble_top``, the
trial's) < the ``config`` file < ``config.KEY`` overrides (the command line's flags and ``--set config.KEY``).
Precedence of the run's options (ensemble_top, ensemble, cv_final, calibration, forest): final_train's defaults < the
experiment's recipe (the ``final`` section of its search space, :func:`read_recipe`) < run()'s arguments and
``final.KEY`` overrides (flags, ``--set final.KEY``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tune_agb.demo_data import data_dirs
from tune_agb.engine.calibration import DEFAULT_METHOD, METHODS
from tune_agb.engine.checkpoint import load_checkpoint
from tune_agb.engine.config import TrainConfig, config_from_dict, read_config_values
from tune_agb.engine.train import init_state
from tune_agb.errors import TuneAgbError
from tune_agb.forest_mix import FOREST_DIR, check_weight
from tune_agb.location import resolve
from tune_agb.overrides import parse_overrides
from tune_agb.runs import (
    CALIBRATION_FILE,
    ENSEMBLE_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    CVBest,
    RankedTrial,
    rank_trials,
    read_best,
    read_cv_best,
    read_results,
    read_search,
    read_space,
)
from tune_agb.search.space import CV_FINAL, SearchSpace, parse_search_space
from tune_agb.search.space import FINAL_KEYS as RECIPE_KEYS

log = logging.getLogger("tune_agb.final_train")

# Files that mark a folder as holding a run.
RUN_MARKERS = ("config.yaml", METRICS_FILE, "best.pt", "last.pt", "members")
# CV_FINAL (from the search space's schema): what final_train does with a spatial k-fold search: retrain on
# train+val, or keep the fold models. RECIPE_KEYS: the options a search space's final section may set.
# A previous run's files that would otherwise be read with the new one's (predict loads every members/member_*):
# removed from an out dir before a run replaces it (overwrite).
REPLACED_ON_OVERWRITE = (
    "members", "best.pt", "last.pt", "config.yaml", METRICS_FILE, ENSEMBLE_FILE, CALIBRATION_FILE, FOREST_DIR,
)  # fmt: skip
# The sections of ``--set SECTION.KEY=VALUE``.
SECTIONS = ("config", "final")


@dataclass(frozen=True)
class FinalOptions:
    """The options of a final run (the ``final`` section of ``--set``; ``config_values`` is the ``config`` one).

    Attributes:
        config: a YAML/JSON file of TrainConfig keys, or None.
        experiment: a search's folder ``STORAGE/NAME`` whose best configuration is retrained, or None.
        input_dir: tile inputs folder (None: the experiment's, else the demo data).
        label_dir: tile labels folder, given with ``input_dir``.
        out_dir: the run's folder.
        ensemble: seeds per configuration (>= 1).
        ensemble_top: with ``experiment``: train its K best distinct configurations (None: its best one).
        cv_final: with a cross-validated ``experiment``: ``retrain`` (default) or ``folds``.
        calibration: variance recalibration method (:data:`tune_agb.engine.calibration.METHODS`).
        forest: the texture forest's weight in the final model's mixture (:mod:`tune_agb.forest_mix`), in (0, 1);
            None: no forest part.
        resume: continue a run from ``resume_from`` (default ``out_dir/last.pt``).
        resume_from: the checkpoint to continue from.
        overwrite: replace a run already in ``out_dir``.
        config_values: TrainConfig keys set over every member's config (flags and ``--set config.KEY``).
        origin: where each of :data:`RECIPE_KEYS` came from: ``default``, ``search space`` (the experiment's recipe),
            ``argument`` (run()'s) or ``flag/--set`` (a ``final.KEY`` override).
    """

    config: str | None = None
    experiment: str | None = None
    input_dir: str | None = None
    label_dir: str | None = None
    out_dir: str = "runs/final"
    ensemble: int = 1
    ensemble_top: int | None = None
    cv_final: str | None = None
    calibration: str = DEFAULT_METHOD
    forest: float | None = None
    resume: bool = False
    resume_from: str | None = None
    overwrite: bool = False
    config_values: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)


# The keys of ``--set final.KEY``: the run's options, and the two config keys a run is most often changed by.
FINAL_KEYS = ("ensemble", "ensemble_top", "cv_final", "calibration", "forest", "epochs", "seed")


def apply_final_overrides(opts: FinalOptions, overrides: Mapping[str, Any] | Sequence[str]) -> FinalOptions:
    """``opts`` with ``{"SECTION.KEY": value}`` (or ``SECTION.KEY=VALUE`` items) applied, in order.

    Raises:
        TuneAgbError: one line for an unknown section, an unknown key (listing the valid ones) or a bad value.
    """
    changes: dict[str, Any] = {}
    config = dict(opts.config_values)
    for path, value in parse_overrides(overrides).items():
        section, _, key = path.partition(".")
        if section not in SECTIONS:
            raise TuneAgbError(f"--set {path}: unknown section '{section}'; allowed: {', '.join(SECTIONS)}")
        if "." in key:
            raise TuneAgbError(f"--set {path}: '{section}.{key.split('.')[0]}' is a value, not a section with keys")
        if section == "config":
            config_from_dict({key: value}, source=f"--set {path}")  # the config file's check: one line
            config[key] = value
        elif key in ("epochs", "seed"):
            config_from_dict({key: value}, source=f"--set {path}")
            config[key] = value
        elif key in FINAL_KEYS:
            changes[key] = _final_value(path, key, value)
        else:
            raise TuneAgbError(f"--set {path}: unknown key '{key}'; valid keys: {', '.join(FINAL_KEYS)}")
    return replace(opts, config_values=config, **changes)


def _final_value(path: str, key: str, value: Any) -> Any:
    """A ``final.KEY`` value checked for its type and allowed values."""
    if key in ("ensemble", "ensemble_top"):
        if value is None and key == "ensemble_top":
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TuneAgbError(f"--set {path}: must be an integer, got {value!r}")
        return value
    if key == "forest":
        return None if value is None else check_weight(value, f"--set {path}")
    allowed = CV_FINAL if key == "cv_final" else METHODS
    if value is None and key == "cv_final":
        return None
    if not isinstance(value, str) or value.lower() not in allowed:
        raise TuneAgbError(f"--set {path}: must be one of {', '.join(allowed)}, got {value!r}")
    return value.lower()


def read_recipe(experiment: str) -> dict[str, Any] | None:
    """The recipe of a search's final model: the ``final`` section of the space it ran (its search.yaml's space, with
    the search's own ``final.KEY`` overrides applied), as given; None when the folder has no search.yaml or its space
    no final section.

    Raises:
        TuneAgbError: one line naming search.yaml when it, or its space's final section, is invalid.
    """
    record = read_search(experiment)
    if record is None:
        return None
    ran = record.ran_space()
    if ran.get("final") is None:
        return None
    return parse_search_space(ran, source=f"{resolve(experiment)}/search.yaml (space)").final


def apply_recipe(opts: FinalOptions, given: Mapping[str, str]) -> FinalOptions:
    """``opts`` with the experiment's recipe (:func:`read_recipe`) set for each of :data:`RECIPE_KEYS` not in
    ``given`` (key -> where it was given), and ``origin`` saying where each came from. Without an experiment, or
    with one whose space has no final section, only ``origin`` changes."""
    recipe = read_recipe(opts.experiment) if opts.experiment else None
    changes = {k: v for k, v in (recipe or {}).items() if k not in given}
    origin = {k: given.get(k, "search space" if k in changes else "default") for k in RECIPE_KEYS}
    return replace(opts, origin=origin, **changes)


def _recipe_note(opts: FinalOptions, message: str) -> str:
    """Appended to an error ``message`` about the run's options that names (by its flag) an option the experiment's
    recipe set, so that the line says where the value came from."""
    named = [k for k in RECIPE_KEYS if re.search(rf"--{k.replace('_', '-')}(?![\w-])", message)]
    keys = [k for k in named if opts.origin.get(k) == "search space"]
    if not keys:
        return ""
    values = ", ".join(f"{k}: {getattr(opts, k)}" for k in keys)
    where = f"the final: section of {opts.experiment}'s search space"
    return f" ({values}: from {where}; a flag or --set final.KEY=VALUE overrides it)"


@dataclass
class MemberPlan:
    """One model of the run: its config, its folder, and the search trial it comes from (None: not from a search) or
    the fold of a cv search whose trained model it keeps (cv_final folds)."""

    cfg: TrainConfig
    out: Path
    trial: RankedTrial | None = None
    fold: int | None = None


@dataclass
class Plan:
    """A run validated before anything is written: its config (of the first member for ``ensemble_top``), data
    folders, out dir, the checkpoint it resumes, where the config came from, and its members."""

    cfg: TrainConfig
    input_dir: str  # a local path or a s3:// / gs:// URI
    label_dir: str
    out: Path
    resume: dict[str, Any] | None
    source: str
    members: list[MemberPlan]
    experiment: dict[str, Any] | None = None  # ensemble_top / a cv search: the search's location, metric, mode
    cv: CVBest | None = None  # the experiment is a spatial k-fold search
    cv_final: str | None = None  # then: retrain (on train+val) or folds (keep the k fold models)
    calibration: str = DEFAULT_METHOD
    ensemble_top: int | None = None  # the options asked for: configurations (None: the best one) ...
    ensemble: int = 1  # ... and seeds per configuration
    forest: float | None = None  # the texture forest's weight in the mixture (None: no forest part)
    origin: dict[str, str] = field(default_factory=dict)  # where each option came from (FinalOptions.origin)

    @property
    def kind(self) -> str:
        """``single``, ``seeds`` (ensemble N), ``configs`` (ensemble_top K) or ``folds`` (cv_final folds)."""
        if self.cv_final == "folds":
            return "folds"
        if any(mp.trial is not None for mp in self.members):
            return "configs"
        return "seeds" if len(self.members) > 1 else "single"


def make_plan(opts: FinalOptions, check_out: bool = True) -> Plan:
    """Resolve config, data folders and resume state; validate everything before anything is written.

    Args:
        opts: the run's options.
        check_out: refuse an out dir that holds a run (unless ``overwrite`` or ``resume``); False to only look.
    """
    values: dict[str, Any] = {}
    source = "defaults"
    data: dict[str, Any] = {}
    top: list[RankedTrial] = []
    space: SearchSpace | None = None
    cv: CVBest | None = None
    cv_final: str | None = None
    try:  # an error about an option the experiment's recipe set says so
        check_options(opts)
        if opts.ensemble_top is not None:
            space, top, data = top_trials(opts.experiment, opts.ensemble_top)
    except TuneAgbError as exc:
        raise TuneAgbError(f"{exc}{_recipe_note(opts, str(exc))}") from None
    if opts.ensemble_top is not None:
        if space.cv is None and opts.cv_final is not None:
            raise TuneAgbError(f"--cv-final: {opts.experiment} has no cv: section; drop --cv-final")
        if space.cv is not None:  # each of the K retrained on train+val for the epoch its fold mean was best at
            cv, cv_final = read_cv_best(opts.experiment), "retrain"
            if cv is None:
                raise TuneAgbError(f"--ensemble-top: {opts.experiment} is a cv search without its best.yaml cv entry")
        source = f"the {len(top)} best distinct configurations of {opts.experiment}"
    elif opts.experiment:
        best = read_best(opts.experiment)
        values |= best.config
        data = best.data
        source = f"best trial {best.trial_id} of {opts.experiment}"
        cv = read_cv_best(opts.experiment)
        if cv is None and opts.cv_final is not None:
            raise TuneAgbError(
                f"--cv-final: {opts.experiment} has no cv: section (its best.yaml names no folds); drop --cv-final"
            )
        if cv is not None:
            cv_final = opts.cv_final or "retrain"
            if cv_final == "retrain":
                last = _last_epoch(opts.experiment, cv.trial_id)
                values |= {"epochs": cv_epochs(cv.epoch, last, cv.config["epochs"])}
                source += f" ({cv.folds.k}-fold cv), retrained on train+val for {values['epochs']} epochs"
            else:
                source += f" ({cv.folds.k}-fold cv): its {cv.folds.k} fold models at epoch {cv.epoch}"
    layers: dict[str, Any] = {}  # what the config file and the overrides set: applied over every member's config
    if opts.config:
        layers |= _raw_yaml(opts.config)
        source = opts.config if source == "defaults" else f"{source} + {opts.config}"
    resume = None
    if opts.resume:
        ckpt = Path(opts.resume_from) if opts.resume_from else Path(opts.out_dir) / "last.pt"
        resume = load_checkpoint(ckpt)
        values = resume["config"] | {k: v for k, v in (values | layers).items() if k == "epochs"}
        layers = {}
        source = f"checkpoint {ckpt}"
    elif opts.resume_from:
        raise TuneAgbError("--model_weights_path: only used with --train_mode resume")
    layers |= opts.config_values
    out = Path(opts.out_dir)
    if cv_final == "folds" and (layers or resume is not None):
        given = ", ".join(sorted(layers)) or "--train_mode resume"
        raise TuneAgbError(
            f"--cv-final folds keeps the search's trained fold models; {given} cannot change them "
            f"(use --cv-final retrain to train the configuration again){_recipe_note(opts, '--cv-final')}"
        )
    if space is not None:  # K configurations x N seeds: member_{k * N + i} is configuration k with seed + i
        members = []
        for k, t in enumerate(top):
            tcfg = config_from_dict(
                space.trial_config(t.params).to_dict()
                | ({"epochs": cv_epochs(t.epoch, t.last_epoch, space.max_t)} if cv is not None else {})
                | layers,
                source=f"config of trial {t.trial_id} of {opts.experiment}",
            )
            members += seeded_members(tcfg, opts.ensemble, out / "members", k * opts.ensemble, t)
        _warn_identical(members)
        cfg = members[0].cfg
    else:
        cfg = config_from_dict(values | layers, source="config")
        if opts.ensemble == 1:
            members = [MemberPlan(cfg, out)]
        else:
            members = seeded_members(cfg, opts.ensemble, out / "members", 0)
    chans = {m.cfg.in_channels for m in members}
    if len(chans) > 1:
        raise TuneAgbError(f"--ensemble-top: the members' in_channels differ ({sorted(chans)}); they must share it")
    stored = (data["input_dir"], data["label_dir"]) if data.get("input_dir") and data.get("label_dir") else None
    input_dir, label_dir = data_dirs(opts.input_dir or None, opts.label_dir or None, stored)
    if check_out and resume is None and holds_run(out) and not opts.overwrite:
        raise TuneAgbError(
            f"{out}: already holds a run (config.yaml/best.pt/...); use --overwrite to replace it, "
            f"--train_mode resume to continue it, or another --out-dir"
        )
    experiment = None
    if space is not None:
        experiment = {"experiment": resolve(opts.experiment), "metric": space.metric, "mode": space.mode}
    if cv is not None and space is None:
        experiment = {"experiment": resolve(opts.experiment), "metric": cv.metric, "mode": best.mode}
        if cv_final == "folds":
            members = [MemberPlan(cfg, out / "members" / f"member_{j:02d}", fold=j) for j in range(cv.folds.k)]
    if resume is None and cv_final != "folds":
        for m in members:  # init_weights: a missing or mismatched file is one error line before anything trains
            init_state(m.cfg)
    return Plan(
        cfg, input_dir, label_dir, out, resume, source, members, experiment, cv, cv_final, opts.calibration,
        ensemble_top=opts.ensemble_top, ensemble=opts.ensemble, forest=opts.forest, origin=dict(opts.origin),
    )  # fmt: skip


def seeded_members(
    cfg: TrainConfig, n: int, folder: Path, first: int, trial: RankedTrial | None = None
) -> list[MemberPlan]:
    """``n`` members of ``cfg`` with seeds ``cfg.seed .. cfg.seed + n - 1``, in ``folder/member_{first + i}``."""
    return [MemberPlan(cfg.replace(seed=cfg.seed + i), folder / f"member_{first + i:02d}", trial) for i in range(n)]


def holds_run(out: Path) -> bool:
    """Whether ``out`` already holds a run's files (:data:`RUN_MARKERS`)."""
    return out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)


def clear_run(out: Path) -> None:
    """Remove the model files of the run that ``overwrite`` replaces, so that none of them is read with the new
    one (a third member left from an older three-member ensemble would join a new two-member one in predict)."""
    import shutil

    for name in REPLACED_ON_OVERWRITE:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def check_options(opts: FinalOptions) -> None:
    """ensemble, ensemble_top and cv_final: their values and the options they go (or do not go) with."""
    if opts.ensemble < 1:
        raise TuneAgbError(f"--ensemble: must be >= 1, got {opts.ensemble}")
    if opts.resume and opts.ensemble != 1:
        raise TuneAgbError("--train_mode resume continues one model; it cannot be combined with --ensemble")
    if opts.cv_final is not None and opts.cv_final not in CV_FINAL:
        raise TuneAgbError(f"--cv-final: must be one of {', '.join(CV_FINAL)}, got {opts.cv_final!r}")
    if opts.calibration not in METHODS:
        raise TuneAgbError(f"--calibration: must be one of {', '.join(METHODS)}, got {opts.calibration!r}")
    if opts.forest is not None:
        check_weight(opts.forest, "--forest")
        try:  # before anything trains, not after
            import sklearn.ensemble  # noqa: F401
        except ImportError:
            raise TuneAgbError("--forest: needs scikit-learn (pip install 'tune_agb[baselines]')") from None
        if opts.cv_final == "folds":
            raise TuneAgbError(
                "--forest: the forest is fitted on train and calibrated on val; it cannot go with --cv-final folds"
            )
    if opts.cv_final is not None and not opts.experiment:
        raise TuneAgbError("--cv-final: needs --experiment STORAGE/NAME, a search with a cv: section")
    if opts.cv_final is not None and opts.ensemble != 1:
        raise TuneAgbError("--cv-final: cannot be combined with --ensemble N (folds is already an ensemble)")
    k = opts.ensemble_top
    if k is None:
        return
    if opts.cv_final == "folds":
        raise TuneAgbError(
            "--ensemble-top with --cv-final folds: the K best configurations of a cv search are retrained on "
            "train+val (--cv-final retrain, the default); keep the fold models with --cv-final folds alone"
        )
    if k < 1:
        raise TuneAgbError(f"--ensemble-top: must be >= 1 (the number of configurations), got {k}")
    if not opts.experiment:
        raise TuneAgbError(
            "--ensemble-top: needs --experiment STORAGE/NAME, the search whose best configurations it trains"
        )
    if opts.resume:
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
    its last epochs only because it stopped: it gets the budget, as ``ensemble_top`` gives a single-split trial)."""
    return best_epoch if last_epoch >= max_t else max_t


def _last_epoch(experiment: str, trial_id: str) -> int:
    """The last epoch ``trial_id`` ran in ``experiment``'s results.parquet (0 when it is not there)."""
    df = read_results(experiment, columns=["trial_id", "epoch"])
    epochs = df.loc[df["trial_id"].astype(str) == trial_id, "epoch"] if not df.empty else []
    return int(epochs.max()) if len(epochs) else 0


def _warn_identical(members: list[MemberPlan]) -> None:
    """Members that the config file or overrides made identical add nothing but cost: say so."""
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


def resolved_config(plan: Plan) -> dict[str, Any]:
    """What a run would train, as ``--print-config`` prints it: where the config came from, the data and out
    folders, the final model (kind, members, the options and where each came from: ``default``, ``search space``,
    ``argument`` or ``flag/--set``), the config, and per member of an ensemble its keys that differ from the
    first's."""
    doc: dict[str, Any] = {
        "source": plan.source,
        "input_dir": str(plan.input_dir),
        "label_dir": str(plan.label_dir),
        "out_dir": str(plan.out),
        "final": {
            "kind": plan.kind,
            "members": len(plan.members),
            "ensemble_top": plan.ensemble_top,
            "ensemble": plan.ensemble,
            "cv_final": plan.cv_final,
            "calibration": plan.calibration,
            "forest": plan.forest,
            "from": {k: plan.origin.get(k, "default") for k in RECIPE_KEYS},
        },
        "config": plan.cfg.to_dict(),
    }
    if plan.kind != "single":
        first = plan.cfg.to_dict()
        doc["members"] = []
        for mp in plan.members:
            rec: dict[str, Any] = {"folder": str(mp.out.relative_to(plan.out))}
            if mp.trial is not None:
                rec["trial_id"] = mp.trial.trial_id
            if mp.fold is not None:
                rec["fold"] = mp.fold
            rec["differences"] = {k: v for k, v in mp.cfg.to_dict().items() if first.get(k) != v}
            doc["members"].append(rec)
    return doc
