"""What a final run writes besides the models (through :mod:`tune_agb.runs`) and prints: plots, ensemble.yaml,
the members' records of metrics.json, and the summary tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tune_agb.engine.calibration import Calibration
from tune_agb.final_train.plan import MemberPlan, Plan
from tune_agb.final_train.training import MemberOutput
from tune_agb.runs import Prediction, write_ensemble

SUMMARY_KEYS = ("rmse", "r2", "mae", "me", "nll", "rmv", "within_1sigma", "within_2sigma", "uce", "n")


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


def members_table(plan: Plan, records: list[dict[str, Any]]) -> str:
    """The members of an ensemble of search trials: the trial, its seed, its search value, its own val/test RMSE."""
    metric = plan.experiment["metric"] if plan.experiment else "value"
    lines = [f"{'member':10} {'trial':>14} {'seed':>6} {'search ' + metric:>18} {'val_rmse':>10} {'test_rmse':>10}"]
    lines[0] += "  params"
    for mp, r in zip(plan.members, records, strict=True):
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in mp.trial.params.items())
        lines.append(
            f"{mp.out.name:10} {r['trial_id']:>14} {r['seed']:>6} {r['search_value']:>18.4g} {r['val_rmse']:>10.4g} "
            f"{r['test_rmse']:>10.4g}  {params}"
        )
    return "\n".join(lines)


def metrics_table(metrics: dict[str, Any], cal: Calibration) -> str:
    """The val and test metrics, before and after calibration (after only when there is none)."""
    lines = [f"calibration: {cal.describe()}", f"{'split':12}" + " ".join(f"{k:>13}" for k in SUMMARY_KEYS)]
    for split in ("val", "test"):
        rows = [("", metrics)] if cal.method == "none" else [(" before", metrics["uncalibrated"]), (" after", metrics)]
        for tag, m in rows:
            lines.append(f"{split + tag:12}" + " ".join(f"{m[f'{split}_{k}']:>13.4g}" for k in SUMMARY_KEYS))
    return "\n".join(lines)
