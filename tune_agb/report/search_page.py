"""The page of a search's experiment folder ``STORAGE/NAME``: learning curves of every trial (those ASHA stopped
early marked), the optimisation history, Optuna's parameter importances on a study rebuilt from ``results.parquet``,
slice plots of the most important parameters, the best trials with their differences from the space's base config,
and for a cross-validated search the best trial's folds. Trials are ranked by :func:`tune_agb.runs.rank_trials`.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tune_agb.engine.plots import new_figure
from tune_agb.location import exists, join
from tune_agb.report.html_page import fmt, folder_name, html_table, img_tag, page
from tune_agb.runs import rank_trials, read_best, read_folds, read_results, read_space
from tune_agb.search.space import ParamSpec, SearchSpace

TOP_TRIALS = 10
SLICE_PARAMS = 3
STATUS_COLORS = {"completed": "#1f5fbf", "stopped early": "#e08a1e", "errored": "#c43c1e"}
ERROR_FILES = ("error.txt", "error.pkl")  # what Ray leaves in the folder of a trial that raised


@dataclass
class Trial:
    """One trial of a search as the page draws it.

    ``curve``: ``epoch`` and ``value`` (the search metric) per reported epoch, by epoch; ``best_value``,
    ``best_epoch``, ``last_epoch``, ``finished_at`` (s since the epoch) and ``params`` as
    :class:`tune_agb.runs.RankedTrial` has them; ``status``: ``completed``, ``stopped early`` or ``errored``;
    ``rank``: its place in :func:`tune_agb.runs.rank_trials`' order (0: the best).
    """

    trial_id: str
    curve: pd.DataFrame
    best_value: float
    best_epoch: int | None
    last_epoch: int
    finished_at: float
    status: str
    params: dict[str, Any]
    rank: int


def errored(trial_path: str | None) -> bool:
    """Whether Ray left an error file in the trial's folder (a local folder or a URI; False when unreachable)."""
    return bool(trial_path) and any(exists(join(trial_path, name)) for name in ERROR_FILES)


def load_trials(df: pd.DataFrame, space: SearchSpace) -> list[Trial]:
    """One :class:`Trial` per trial of ``results.parquet`` (as a DataFrame), in finishing order (unknown last);
    values, epochs and params as :func:`tune_agb.runs.rank_trials` ranks them."""
    curves = {str(tid): g.sort_values("epoch") for tid, g in df.groupby(df["trial_id"].astype(str), sort=False)}
    trials = []
    for rank, r in enumerate(rank_trials(df, space)):
        g = curves[r.trial_id]
        if errored(r.trial_path):
            status = "errored"
        elif r.last_epoch >= space.max_t:
            status = "completed"
        else:
            status = "stopped early"
        values = pd.to_numeric(g[space.metric], errors="coerce")
        trials.append(
            Trial(
                trial_id=r.trial_id,
                curve=pd.DataFrame({"epoch": g["epoch"].to_numpy(), "value": values.to_numpy()}),
                best_value=r.value,
                best_epoch=r.epoch,
                last_epoch=r.last_epoch,
                finished_at=r.finished_at,
                status=status,
                params=dict(r.params),
                rank=rank,
            )
        )
    seen = {tid: i for i, tid in enumerate(curves)}  # ties of finishing time: in the order results.parquet has them
    trials.sort(key=lambda t: (math.isnan(t.finished_at), t.finished_at, seen[t.trial_id]))
    return trials


def param_value(spec: ParamSpec, value: Any) -> Any:
    """A stored value as the parameter's type (results.parquet may hold it as text); None if not in the domain."""
    try:
        v = spec.from_stored(value)
    except ValueError:
        return None
    return v if spec.kind == "categorical" or spec.low <= v <= spec.high else None


def rebuild_study(trials: list[Trial], space: SearchSpace) -> Any:
    """An in-memory Optuna study with one complete trial per search trial (value: its best epoch's metric)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dists: dict[str, Any] = {}
    for p in space.params:
        if p.kind == "categorical":
            dists[p.name] = CategoricalDistribution(p.choices)
        elif p.kind == "int":
            dists[p.name] = IntDistribution(int(p.low), int(p.high), log=p.log, step=int(p.step or 1))
        else:
            dists[p.name] = FloatDistribution(float(p.low), float(p.high), log=p.log, step=p.step)
    by_name = {p.name: p for p in space.params}
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize" if space.mode == "min" else "maximize")
        for t in trials:
            if math.isnan(t.best_value):
                continue
            params = {}
            for name, raw in t.params.items():
                v = param_value(by_name[name], raw)
                if v is not None:
                    params[name] = v
            study.add_trial(
                optuna.trial.create_trial(
                    state=optuna.trial.TrialState.COMPLETE,
                    value=t.best_value,
                    params=params,
                    distributions={k: dists[k] for k in params},
                    user_attrs={"trial_id": t.trial_id},
                )
            )
    finally:
        optuna.logging.set_verbosity(level)
    return study


def param_importances(study: Any) -> tuple[dict[str, float], str]:
    """Optuna's importances (its default evaluator, seeded) and a note; ``{}`` with the reason when impossible."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) < 2:
        return {}, f"needs at least 2 trials with a result (got {len(done)})"
    try:
        # PED-ANOVA: Optuna's default evaluator from 5.0 (fANOVA before, which needs scikit-learn); it also
        # weighs a conditional parameter over the trials that sampled it.
        evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:
        return {}, f"Optuna could not evaluate them: {exc}"
    return dict(imp), (
        f"Optuna's PED-ANOVA importance evaluator over {len(done)} trials (each trial's best epoch): how much "
        "each parameter's distribution among the best 10% of trials differs from its distribution over all."
    )


def _curves_figure(trials: list[Trial], space: SearchSpace, best_id: str | None) -> Figure:
    fig = new_figure((10.5, 5.0))
    ax = fig.add_subplot()
    values = []
    for t in trials:
        c = t.curve
        color = STATUS_COLORS[t.status]
        is_best = t.trial_id == best_id
        ax.plot(
            c["epoch"],
            c["value"],
            color="black" if is_best else color,
            lw=2.2 if is_best else 1.0,
            alpha=1.0 if is_best else 0.75,
            ls="--" if t.status == "errored" else "-",
            zorder=5 if is_best else 2,
        )
        if t.status == "stopped early" and c["value"].notna().any():
            last = c.dropna().iloc[-1]
            ax.plot(last["epoch"], last["value"], "x", color=color, ms=7, mew=2, zorder=4)
        values += [v for v in c["value"] if np.isfinite(v)]
    if values:  # first epochs can be far off: keep the interesting range readable
        lo, hi = float(np.min(values)), float(np.quantile(values, 0.95 if space.mode == "min" else 1.0))
        lo = float(np.quantile(values, 0.0 if space.mode == "min" else 0.05))
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.axvline(space.max_t, color="0.6", lw=1, ls=":")
    handles = [
        Line2D([], [], color=STATUS_COLORS["completed"], label=f"ran all {space.max_t} epochs"),
        Line2D([], [], color=STATUS_COLORS["stopped early"], marker="x", mew=2, label="stopped early by ASHA"),
        Line2D([], [], color=STATUS_COLORS["errored"], ls="--", label="errored"),
        Line2D([], [], color="black", lw=2.2, label=f"best trial {best_id}"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    ax.set_xlabel("epoch")
    ax.set_ylabel(space.metric)
    ax.set_title(f"Learning curves of {len(trials)} trials ({space.metric}, {space.mode})", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def _history_figure(trials: list[Trial], space: SearchSpace) -> Figure:
    fig = new_figure((10.5, 4.2))
    ax = fig.add_subplot()
    x = np.arange(1, len(trials) + 1)
    y = np.array([t.best_value for t in trials])
    colors = [STATUS_COLORS[t.status] for t in trials]
    ax.scatter(x, y, c=colors, s=28, zorder=3, label="trial (best epoch)")
    filled = np.where(np.isfinite(y), y, np.inf if space.mode == "min" else -np.inf)
    best = np.minimum.accumulate(filled) if space.mode == "min" else np.maximum.accumulate(filled)
    best = np.where(np.isfinite(best), best, np.nan)
    ax.step(x, best, where="post", color="black", lw=1.8, label="best so far", zorder=4)
    ax.set_xlabel("trial, in the order trials finished")
    ax.set_ylabel(f"{space.metric} (best epoch of the trial)")
    ax.set_title("Optimisation history", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _importance_figure(imp: dict[str, float]) -> Figure:
    names = list(imp)[::-1]
    fig = new_figure((7.0, 0.45 * len(names) + 1.4))
    ax = fig.add_subplot()
    ax.barh(names, [imp[n] for n in names], color="#1f5fbf")
    for i, n in enumerate(names):
        ax.text(imp[n], i, f" {imp[n]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(1.0, max(imp.values()) * 1.15))
    ax.set_xlabel("importance (normalised to sum to 1)")
    ax.set_title("Hyperparameter importance", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return fig


def _slices_figure(names: list[str], trials: list[Trial], space: SearchSpace, best_id: str | None) -> Figure:
    by_name = {p.name: p for p in space.params}
    fig = new_figure((4.0 * len(names), 3.8))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, name in zip(axes, names, strict=True):
        spec = by_name[name]
        pts = [(param_value(spec, t.params[name]), t) for t in trials if name in t.params]
        pts = [(v, t) for v, t in pts if v is not None and np.isfinite(t.best_value)]
        ys = np.array([t.best_value for _, t in pts])
        if spec.kind == "categorical":
            pos = {c: i for i, c in enumerate(spec.choices)}
            xs = np.array([pos[v] for v, _ in pts], dtype=float) + rng.uniform(-0.12, 0.12, len(pts))
            ax.set_xticks(range(len(spec.choices)), [str(c) for c in spec.choices])
            ax.set_xlim(-0.5, len(spec.choices) - 0.5)
        else:
            xs = np.array([v for v, _ in pts], dtype=float)
            if spec.log:
                ax.set_xscale("log")
        ax.scatter(xs, ys, c=[STATUS_COLORS[t.status] for _, t in pts], s=30, zorder=3)
        for x, (_, t) in zip(xs, pts, strict=True):
            if t.trial_id == best_id:
                ax.scatter([x], [t.best_value], marker="*", s=220, color="gold", edgecolors="black", zorder=4)
        ax.set_xlabel(name)
        ax.set_ylabel(space.metric)
        ax.set_title(f"{name} ({spec.kind}{', log' if spec.log else ''})", fontsize=10)
        ax.grid(alpha=0.3)
    return fig


def _differences(t: Trial, space: SearchSpace, base: dict[str, Any]) -> str:
    by_name = {p.name: p for p in space.params}
    diffs = []
    for name, raw in t.params.items():
        v = param_value(by_name[name], raw)
        v = raw if v is None else v
        if v != base.get(name):
            diffs.append(f"{name} = {fmt(v)} (base {fmt(base.get(name))})")
    return "; ".join(diffs) or "none (the base config)"


def search_page(folder: str) -> str:
    """The HTML page of a search's experiment folder ``STORAGE/NAME`` (a local folder or a URI, as the page names
    it)."""
    space, _ = read_space(folder)
    df = read_results(folder)
    best = read_best(folder, required=False)
    trials = load_trials(df, space) if not df.empty else []
    ranked = sorted((t for t in trials if t.best_epoch is not None), key=lambda t: t.rank)
    best_id = best.trial_id if best is not None else None
    if best_id is None and ranked:
        best_id = ranked[0].trial_id
    counts = {s: sum(t.status == s for t in trials) for s in STATUS_COLORS}
    meta = html.escape(
        f"{folder} — {len(trials)} trials ({counts['completed']} ran all {space.max_t} epochs, "
        f"{counts['stopped early']} stopped early, {counts['errored']} errored); "
        f"metric {space.metric} ({space.mode}); scheduler {space.settings['scheduler']['type']}"
    )
    if ranked:
        meta += html.escape(f"; best {space.metric} = {fmt(ranked[0].best_value)} (trial {ranked[0].trial_id})")
    sections: list[tuple[str, str, str]] = []
    if not trials:
        sections.append(("curves", "Learning curves", '<p class="note">No trial reported a result yet.</p>'))
        return page(f"Search report: {folder_name(folder)}", meta, sections)

    sections.append(
        (
            "curves",
            "Learning curves",
            img_tag(_curves_figure(trials, space, best_id), "learning curves")
            + '<p class="note">A trial that stopped before the last epoch and did not error was stopped by the '
            "scheduler (ASHA); the dotted line is the epoch budget max_t.</p>",
        )
    )
    sections.append(("history", "Optimisation history", img_tag(_history_figure(trials, space), "history")))
    imp, note = param_importances(rebuild_study(trials, space))
    if imp:
        inner = img_tag(_importance_figure(imp), "parameter importance") + f'<p class="note">{html.escape(note)}</p>'
    else:
        inner = f'<p class="note">Parameter importances unavailable: {html.escape(note)}</p>'
    sections.append(("importance", "Parameter importance", inner))
    top = [n for n in imp if imp[n] > 0][:SLICE_PARAMS] or [p.name for p in space.params][:SLICE_PARAMS]
    sections.append(
        (
            "slices",
            "Slice plots",
            img_tag(_slices_figure(top, trials, space, best_id), "slice plots")
            + '<p class="note">Each point is a trial at its best epoch; the star is the best trial.</p>',
        )
    )
    base = space.base_config().to_dict()
    sd = _fold_spread(df, space.metric)  # a cv search: the metric's spread over folds at (trial, epoch)
    rows = [
        [i + 1, t.trial_id, t.best_value]
        + ([sd.get((t.trial_id, t.best_epoch), math.nan)] if sd else [])
        + [t.best_epoch, t.last_epoch, t.status, _differences(t, space, base)]
        for i, t in enumerate(ranked[:TOP_TRIALS])
    ]
    table = html_table(
        ["rank", "trial", space.metric + (" (mean over folds)" if sd else "")]
        + (["sd over folds"] if sd else [])
        + ["best epoch", "epochs run", "status", "differences from the base config"],
        rows,
        ["best" if t.trial_id == best_id else "" for t in ranked[:TOP_TRIALS]],
    )
    if best is not None:
        table += f"<h3>best.yaml</h3><pre>{html.escape(yaml.safe_dump(best.to_dict(), sort_keys=False))}</pre>"
    sections.append(("best", "Best trials", table))
    if sd and best_id is not None:
        best_trial = next((t for t in trials if t.trial_id == best_id), None)
        if best_trial is not None:
            sections.append(("folds", "Spatial cross-validation", _folds_html(folder, df, best_trial)))
    return page(f"Search report: {folder_name(folder)}", meta, sections)


def _fold_spread(df: pd.DataFrame, metric: str) -> dict[tuple[str, int], float]:
    """``{(trial_id, epoch): sd over folds}`` of ``metric`` in a cv search's results (empty: not a cv search, or a
    metric without a per-fold spread)."""
    col = f"{metric}_sd"
    if col not in df.columns:
        return {}
    rows = df[["trial_id", "epoch", col]].itertuples(index=False)
    return {(str(t), int(e)): float(v) for t, e, v in rows}


def _folds_html(folder: str, df: pd.DataFrame, best: Trial) -> str:
    """The best trial's per-fold validation at its best epoch, with each fold's tiles and labels (cv_folds.json)."""
    row = df[(df["trial_id"].astype(str) == best.trial_id) & (df["epoch"] == best.best_epoch)].iloc[-1]
    k = sum(c.startswith("val_rmse_fold") for c in df.columns)
    folds: dict[int, list[int]] = {}
    assignment = read_folds(folder)
    if assignment is not None:
        for f, labelled in zip(assignment.folds, assignment.labelled, strict=True):
            folds.setdefault(f, []).append(labelled)
    rows = [
        [j, len(folds.get(j, [])), sum(folds.get(j, []))]
        + [float(row.get(f"{m}_fold{j}", math.nan)) for m in ("val_rmse", "val_r2")]
        for j in range(k)
    ]
    rows.append(["mean ± sd", "", ""] + [f"{row[m]:.4g} ± {row[f'{m}_sd']:.3g}" for m in ("val_rmse", "val_r2")])
    note = (
        f"Trial {best.trial_id} at epoch {best.best_epoch}: fold j's model trained on the other folds' tiles and was "
        "validated on its own (whole spatial blocks). The search acted on the mean; a large spread says the ranking "
        "of close trials is within the noise of the blocks."
    )
    header = ["fold", "validation tiles", "labelled pixels", "val_rmse", "val_r2"]
    return html_table(header, rows) + f'<p class="note">{html.escape(note)}</p>'
