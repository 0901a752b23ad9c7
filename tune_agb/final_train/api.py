"""Final training's Python API: :func:`run` retrains a configuration (given, or the best of a search), evaluates it
on the test split and writes the run's folder; :func:`resolved_config` says what a run would train without
training or writing anything.

    >>> import tune_agb.final_train as final_train
    >>> outcome = final_train.run(experiment="ray_results/demo", out_dir="runs/demo-final", ensemble=3)
    >>> outcome.metrics["test_rmse"], outcome.out

``python -m tune_agb.final_train`` (:mod:`tune_agb.final_train.cli`) is a thin client of this module.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tune_agb.cv import merge_train_val
from tune_agb.engine.calibration import Calibration, fit_calibration, labelled_bands
from tune_agb.engine.config import TrainConfig, save_config
from tune_agb.engine.device import resolve_device
from tune_agb.final_train.ensemble import (
    combined,
    cv_fold_states,
    ensemble_loss,
    ensemble_out_of_fold,
    out_of_fold_bands,
)
from tune_agb.final_train.outputs import member_record, members_table, metrics_table, write_ensemble_file, write_plots
from tune_agb.final_train.plan import (
    RECIPE_KEYS,
    FinalOptions,
    Plan,
    apply_final_overrides,
    apply_recipe,
    clear_run,
    holds_run,
    make_plan,
)
from tune_agb.final_train.plan import resolved_config as _resolved
from tune_agb.final_train.training import MemberOutput, keep_fold_model, train_member
from tune_agb.forest_mix import FOREST_DIR, MIXTURE_LOSS, fit_forest_part, save_forest_part
from tune_agb.overrides import parse_overrides
from tune_agb.runs import (
    CALIBRATION_FILE,
    Prediction,
    TileMaps,
    save_calibration,
    write_metrics,
    write_predictions,
    write_test_maps,
)
from tune_agb.store import DataSource

log = logging.getLogger("tune_agb.final_train")


@dataclass
class FinalOutcome:
    """What a final run wrote, as returned by :func:`run`.

    Attributes:
        metrics: ``metrics.json`` as written: ``val_*``/``test_*`` (calibrated; RMSE in the label's unit, Mg/ha),
            ``uncalibrated`` (the same before calibration), ``calibration``, ``best_epoch`` (a single model),
            ``members`` and ``ensemble_of`` (an ensemble), ``cv`` (from a cross-validated search), ``epochs``,
            ``ensemble``, ``input_dir``, ``label_dir``, ``search``.
        out: the run's folder (model(s), config.yaml, metrics.json, predictions.parquet, test_maps.npz, plots/,
            calibration.json, ensemble.yaml for an ensemble, report/index.html).
        calibration: the variance recalibration fitted (on val, or out of fold for a cv search).
        config: the run's config (of the first member of an ensemble of configurations).
        kind: ``single``, ``seeds``, ``configs`` or ``folds``.
        source: where the config came from, in words.
        plan: the validated plan the run trained (every member's config and folder).
        report_page: the HTML report written into ``out`` (None on failure).
    """

    metrics: dict[str, Any]
    out: Path
    calibration: Calibration
    config: TrainConfig
    kind: str
    source: str
    plan: Plan
    report_page: str | None = None

    @property
    def members(self) -> list[dict[str, Any]]:
        """``metrics["members"]``: per member its folder, origin (trial, seed or fold) and own metrics; [] for one
        model."""
        return list(self.metrics.get("members", []))

    def summary(self) -> str:
        """The printed summary: the members (an ensemble of search trials), the val/test metrics before and after
        calibration, and where the run was written."""
        parts = [members_table(self.plan, self.members)] if self.kind == "configs" else []
        parts.append(metrics_table(self.metrics, self.calibration))
        page = f"; report: {self.report_page}" if self.report_page else ""
        parts.append(f"model, calibration, metrics and predictions written to {self.out}{page}")
        return "\n".join(parts)


def _to_options(values: Mapping[str, Any]) -> FinalOptions:
    """The :class:`FinalOptions` of :func:`run`'s keyword arguments ``values``: the options, then ``epochs`` and
    ``seed``, then the overrides; the experiment's recipe (its space's ``final`` section) sets the options of
    :data:`~tune_agb.final_train.plan.RECIPE_KEYS` that neither an argument (not None) nor an override gives."""
    names = {f.name for f in fields(FinalOptions)} - {"config_values", "origin"}
    given = {k: str(v) if isinstance(v, Path) else v for k, v in values.items() if k in names and v is not None}
    config = {k: values[k] for k in ("epochs", "seed") if values.get(k) is not None}
    overrides = parse_overrides(values.get("overrides", ()))
    opts = apply_final_overrides(FinalOptions(**given, config_values=config), overrides)
    origin = {k: "argument" for k in RECIPE_KEYS if k in given}
    origin |= {k: "flag/--set" for k in RECIPE_KEYS if f"final.{k}" in overrides}
    return apply_recipe(opts, origin)


def resolved_config(**options: Any) -> dict[str, Any]:
    """What :func:`run` with these arguments would train, validated but neither trained nor written.

    Args:
        **options: :func:`run`'s keyword arguments; those that matter only while training (``device``,
            ``progress``, ``wandb``, ``epoch_checkpoints``) are accepted and ignored, and an out dir that holds a run
            is not refused.

    Returns:
        ``source`` (where the config came from, in words), ``input_dir``, ``label_dir``, ``out_dir``, ``final``
        (``kind``, ``members``, ``ensemble_top``, ``ensemble``, ``cv_final``, ``calibration``, and ``from``: where
        each of these four options came from), ``config`` (every TrainConfig key) and, for an
        ensemble, ``members``: per member its ``folder``, ``trial_id`` or ``fold``, and ``differences`` (the keys
        whose values differ from the first member's config).

    Raises:
        TypeError: a name :func:`run` does not take.
        TuneAgbError: one line for bad input, as :func:`run` raises it.
    """
    unknown = sorted(set(options) - set(inspect.signature(run).parameters))
    if unknown:
        raise TypeError(f"resolved_config() got unexpected keyword argument(s) {', '.join(unknown)}")
    return _resolved(make_plan(_to_options(options), check_out=False))


def run(
    *,
    config: str | Path | None = None,
    experiment: str | None = None,
    input_dir: str | Path | None = None,
    label_dir: str | Path | None = None,
    out_dir: str | Path = "runs/final",
    epochs: int | None = None,
    seed: int | None = None,
    ensemble: int | None = None,
    ensemble_top: int | None = None,
    cv_final: str | None = None,
    calibration: str | None = None,
    forest: float | None = None,
    device: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    resume_from: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    epoch_checkpoints: bool | str | Path | None = None,
    progress: bool = True,
    wandb: str | None = None,
) -> FinalOutcome:
    """Train the final model (or ensemble), evaluate it on val and test, recalibrate its variance, write the run.

    Precedence of the config: built-in defaults < the experiment's best config < the ``config`` file <
    ``epochs``/``seed`` < ``overrides``. Precedence of ``ensemble``, ``ensemble_top``, ``cv_final``, ``calibration``
    and ``forest``: their defaults < the experiment's recipe (the ``final`` section of its search space) < these
    arguments (when not None) < ``final.KEY`` overrides. Everything is validated before anything is written.

    Args:
        config: a YAML/JSON file of TrainConfig keys.
        experiment: a search's folder ``STORAGE/NAME`` (path or URI) whose best configuration (``best.yaml``) is
            retrained, on its data folders unless ``input_dir``/``label_dir`` are given.
        input_dir: tile inputs folder holding ``{train,val,test}/``; default: the experiment's, else the demo data.
        label_dir: tile labels folder, same layout (given with ``input_dir``).
        out_dir: the run's folder.
        epochs: training epochs (sets ``config.epochs``).
        seed: the seed (of the first member; member ``i`` of an ensemble of seeds gets ``seed + i``).
        ensemble: train N members with seeds seed..seed+N-1 (with ``ensemble_top``: N seeds of each configuration);
            None: the experiment's recipe, else 1.
        ensemble_top: with ``experiment``: train its K best distinct configurations (by the search's metric at each
            trial's best epoch, :func:`tune_agb.runs.rank_trials`) as an ensemble, each with its own config; None:
            the experiment's recipe, else its best configuration alone (``overrides={"final.ensemble_top": None}``
            drops a recipe's).
        cv_final: with a cross-validated ``experiment``: ``retrain`` (default: on train+val for the epochs the fold
            mean was best at) or ``folds`` (keep the best trial's k fold models, no training); None: the
            experiment's recipe, else retrain.
        calibration: variance recalibration: ``scale`` (one factor on sigma, the default), ``isotonic`` or ``none``;
            None: the experiment's recipe, else scale.
        forest: mix the final model with the texture forest at this weight in (0, 1) on the forest
            (:mod:`tune_agb.forest_mix`: fitted on the train pixels, calibrated on val, written to ``OUT/forest/``;
            metrics, predictions, ``predict`` and map workers give the mixture); None: the experiment's recipe, else
            no forest (``overrides={"final.forest": None}`` drops a recipe's).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        overwrite: replace a run already in ``out_dir`` (its model files are removed first).
        resume: continue one model from ``resume_from`` (default ``out_dir/last.pt``) with its own config; only
            ``overrides``/``epochs``/``seed`` (and the config file's ``epochs``) apply over it.
        resume_from: the checkpoint to continue from (with ``resume``).
        overrides: ``{"SECTION.KEY": value}`` or ``"SECTION.KEY=VALUE"`` items (values read as YAML):
            ``config.KEY`` for any TrainConfig key, ``final.KEY`` for ensemble, ensemble_top, cv_final, calibration,
            forest, epochs, seed. Applied last, in order.
        epoch_checkpoints: keep every epoch's checkpoint (``epoch_NNNN.pt``): True in each member's
            ``checkpoints/``, a folder: there (an ensemble's members in ``FOLDER/member_KK``); None: not kept.
        progress: show a progress bar.
        wandb: log to Weights & Biases under this project (offline without ``WANDB_API_KEY``); None: no W&B.

    Returns:
        A :class:`FinalOutcome`; its ``metrics`` equal the ``metrics.json`` written.

    Raises:
        TuneAgbError: one line for bad input (unknown key, missing experiment, an out dir holding a run without
            ``overwrite``...), before anything is written.
    """
    opts = _to_options(locals())
    plan = make_plan(opts)
    resolve_device(device)
    data = DataSource(str(plan.input_dir), str(plan.label_dir), in_channels=plan.cfg.in_channels).open()
    tiles = data.tiles
    out = plan.out
    fold_states = cv_fold_states(plan)
    if plan.resume is None and opts.overwrite and holds_run(out):
        clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"final training ({plan.source}) on {plan.input_dir} -> {out}", file=sys.stderr)
    members: list[MemberOutput] = []
    if plan.kind == "folds":
        kept = zip(fold_states[0], plan.members, strict=True)
        members = [keep_fold_model(st, tiles, mp.out, device) for st, mp in kept]
    fit_tiles = merge_train_val(tiles) if plan.cv_final == "retrain" else tiles
    for k, mp in enumerate(plan.members if plan.kind != "folds" else []):
        if len(plan.members) > 1:
            came = f"trial {mp.trial.trial_id}" if mp.trial else f"seed {mp.cfg.seed}"
            print(f"member {k + 1}/{len(plan.members)} ({came}) -> {mp.out}", file=sys.stderr)
        keep = _epoch_dir(epoch_checkpoints, mp.out, len(plan.members) > 1)
        members.append(
            train_member(
                mp.cfg,
                fit_tiles,
                mp.out,
                # a retrain on train+val: normalised with the stats of the tiles it trains on (computed by train)
                norm=None if plan.cv_final == "retrain" else data.norm(mp.cfg.standardize_target),
                resume=plan.resume,
                device=device,
                progress=progress,
                epoch_checkpoints=keep,
                wandb_project=wandb,
                last_is_best=plan.cv_final == "retrain",
            )
        )
    loss = ensemble_loss([mp.cfg for mp in plan.members])
    if plan.forest is not None:  # the mixture with the forest is read as Gaussian: so is its U-Net part calibrated
        loss = MIXTURE_LOSS
    uncalibrated = {split: combined([m.preds[split] for m in members]) for split in ("val", "test")}
    val = uncalibrated["val"]
    if fold_states is not None:  # val is training data here: the out-of-fold predictions are the honest sample
        oof = ensemble_out_of_fold(fold_states, tiles, plan, device)
        shift = {}
        if plan.calibration == "distance":  # the out-of-fold pixels' bands; the fold models were fitted on train+val
            both = merge_train_val(tiles)["train"]
            shift = {"bands": out_of_fold_bands(oof, both), "reference": labelled_bands(both.inputs, both.labels)}
        cal = fit_calibration(plan.calibration, oof.y, oof.mean, oof.var, loss, split="out-of-fold", **shift)
        models = f"{plan.cv.folds.k} fold models" + (f" of each of {len(fold_states)} trials" * (len(fold_states) > 1))
        fit_on = f"out-of-fold predictions of the {models} ({oof.y.size} pixels)"
    else:
        if plan.cv is not None:
            log.warning("calibration: fitted on val, which this retrain trained on (the fold models are gone)")
        shift = {}
        if plan.calibration == "distance":  # the bands of the val pixels, and of the pixels the model was fitted on
            ref = labelled_bands(fit_tiles["train"].inputs, fit_tiles["train"].labels)
            shift = {"bands": val.bands(tiles["val"].inputs), "reference": ref}
        cal = fit_calibration(plan.calibration, val.y, val.mean, val.var, loss, split="val", **shift)
        fit_on = "val" + (" (in-sample: trained on)" if plan.cv is not None else "")
    save_calibration(cal, out / CALIBRATION_FILE)
    preds = {split: pr.calibrated(cal, tiles[split].inputs) for split, pr in uncalibrated.items()}
    mixed = None
    if plan.forest is not None:
        preds, uncalibrated, mixed = _mix_forest(plan, data, preds, uncalibrated, loss)
    metrics: dict[str, Any] = {}
    # before calibration: a single model's own metrics; an ensemble's or a mixture's (each part uncalibrated)
    if plan.kind == "single" and mixed is None:
        before = {k: v for k, v in members[0].metrics.items() if k != "best_epoch"}
    else:
        before = {f"{split}_{k}": v for split, pr in uncalibrated.items() for k, v in pr.metrics(loss).items()}
    if plan.kind == "single":
        metrics["best_epoch"] = members[0].metrics["best_epoch"]
    else:
        if plan.kind == "seeds":
            save_config(plan.cfg, out / "config.yaml")
        write_ensemble_file(out, plan)
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
    if mixed is not None:
        metrics["forest"] = mixed
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
    return FinalOutcome(metrics, out, cal, plan.cfg, plan.kind, plan.source, plan, page)


def _mix_forest(
    plan: Plan, data: Any, preds: dict[str, Prediction], uncalibrated: dict[str, Prediction], loss: str
) -> tuple[dict[str, Prediction], dict[str, Prediction], dict[str, Any]]:
    """The run's predictions mixed with the texture forest (:mod:`tune_agb.forest_mix`), written to ``OUT/forest/``;
    with what ``metrics.json`` records of it: the weight, the forest and its calibration, and each part's own
    val/test metrics (calibrated)."""
    tiles = data.tiles
    print(f"forest part: the texture forest at weight {plan.forest} -> {plan.out / FOREST_DIR}", file=sys.stderr)
    norm = data.norm(standardize_target=False)
    part, res = fit_forest_part(tiles, norm, plan.forest, plan.cfg.seed, plan.calibration)
    save_forest_part(part, plan.out)

    mixed = {s: part.mix_prediction(pr, res.preds[s], tiles[s].inputs) for s, pr in preds.items()}
    raw = {s: part.mix_prediction(pr, res.raw[s]) for s, pr in uncalibrated.items()}  # their maps are not read
    unet = {f"{s}_{k}": v for s, pr in preds.items() for k, v in pr.metrics(loss).items()}
    record = part.about() | {"fit_on": f"train ({res.n_train} pixels), calibrated on val", "forest_alone": res.metrics}
    record.pop("norm")
    return mixed, raw, record | {"unet_alone": unet}


def _epoch_dir(where: bool | str | Path | None, member: Path, ensemble: bool) -> Path | None:
    """Where a member keeps every epoch's checkpoint (None: not kept)."""
    if where is None or where is False:
        return None
    if where is True:
        return member / "checkpoints"
    return Path(where) / member.name if ensemble else Path(where)
