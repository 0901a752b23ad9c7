"""An HTML report of a search or of a final training, one self-contained page (images embedded, no scripts).

    python -m tune_agb.report PATH [--unit Mg/ha]

``PATH`` is a search's experiment folder ``STORAGE/NAME`` (it holds ``results.parquet``, ``search.yaml`` and
``best.yaml``) or a ``tune_agb.final_train`` out dir (``metrics.json`` and ``predictions.parquet``), a local folder
or a URI (``s3://``, ``gs://``, ``file://``: the files the page needs are read through pyarrow's filesystem into a
temporary folder). The page is written to ``PATH/report/index.html`` and opens offline.

- Search: learning curves of every trial (those ASHA stopped early marked), the optimisation history, Optuna's
  parameter importances on a study rebuilt from ``results.parquet``, slice plots of the three most important
  parameters and the best trials with their differences from the space's base config.
- Final training: predicted vs observed and residuals vs observed (val and test), a reliability diagram of the
  central intervals of the predicted distributions (Gaussian, or Laplacian for ``laplacian_nll``; after and, dashed,
  before the variance calibration),
  RMSE vs predicted σ per equal-count bin, the metrics table (before and after calibration), and
  the predicted mean and σ maps of the test tiles in ``test_maps.npz`` with their GEDI footprints marked.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from tune_agb.engine.calibration import RELIABILITY_LEVELS, Calibration, calibration_from_dict
from tune_agb.engine.metric_names import METRIC_NAMES
from tune_agb.engine.metrics import equal_count_bins
from tune_agb.engine.plots import (
    binned_rmse_vs_rmv,
    draw_pred_vs_obs,
    draw_reliability,
    new_figure,
    png_bytes,
    with_unit,
)
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.location import is_uri, open_location, read_path, write_path_atomic
from tune_agb.runs import (
    BEST_FILE,
    CV_FOLDS_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RESULTS_FILE,
    SEARCH_FILE,
    TEST_MAPS_FILE,
    TileMaps,
    is_missing,
    rank_trials,
    read_best,
    read_folds,
    read_metrics,
    read_predictions,
    read_results,
    read_space,
    read_test_maps,
)
from tune_agb.search.space import ParamSpec, SearchSpace

REPORT_DIR = "report"
INDEX = "index.html"
TOP_TRIALS = 10
SLICE_PARAMS = 3
STATUS_COLORS = {"completed": "#1f5fbf", "stopped early": "#e08a1e", "errored": "#c43c1e"}
SPLIT_COLORS = {"val": "#1f5fbf", "test": "#c43c1e"}
MEAN_CMAP = colormaps["viridis"].with_extremes(bad="0.82")  # bad: pixels without a prediction
STD_CMAP = colormaps["magma"].with_extremes(bad="0.82")

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1180px; color: #222; padding: 0 16px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 4px; }
.meta { color: #555; margin-top: 0; } nav a { margin-right: 14px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f4f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eef6e8; font-weight: 600; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; border: 1px solid #eee; }
.figs { display: flex; flex-wrap: wrap; gap: 12px; } .figs img { max-width: 560px; }
.note { color: #555; font-size: 0.92em; } pre { background: #f6f8fa; padding: 8px; overflow-x: auto; }
"""


# -- page building ---------------------------------------------------------------------------------------------
def img_tag(fig: Figure, alt: str) -> str:
    """``<img>`` holding the figure as a base64 PNG data URI."""
    data = base64.b64encode(png_bytes(fig)).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "–" if not math.isfinite(v) else f"{float(v):.4g}"
    return "–" if v is None else str(v)


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], row_class: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(
            f'<td class="num">{html.escape(_fmt(v))}</td>'
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            else f"<td>{html.escape(_fmt(v))}</td>"
            for v in row
        )
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, meta: str, sections: list[tuple[str, str, str]]) -> str:
    """A complete HTML page; ``sections``: ``(id, heading, inner html)``."""
    nav = " ".join(f'<a href="#{sid}">{html.escape(head)}</a>' for sid, head, _ in sections)
    body = "\n".join(
        f'<section id="{sid}">\n<h2>{html.escape(head)}</h2>\n{inner}\n</section>' for sid, head, inner in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="meta">{meta}</p>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n'
    )


# -- search --------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    trial_id: str
    curve: pd.DataFrame  # epoch, metric (sorted by epoch)
    best_value: float  # nan when no finite value was reported
    best_epoch: int | None
    last_epoch: int
    finished_at: float  # last wall_time (nan if unknown)
    status: str  # completed, stopped early, errored
    params: dict[str, Any]  # searched values as stored in results.parquet (inactive conditional ones left out)


def _errored(trial_path: Any) -> bool:
    """Ray leaves error.txt / error.pkl in the folder of a trial that raised (a local folder or a URI)."""
    if not isinstance(trial_path, str) or not trial_path:
        return False
    if not is_uri(trial_path):
        p = Path(trial_path)
        return (p / "error.txt").is_file() or (p / "error.pkl").is_file()
    try:
        fs, root = open_location(trial_path)
        return any(read_path(fs, f"{root}/{name}") is not None for name in ("error.txt", "error.pkl"))
    except (OSError, TuneAgbError):  # storage unreachable: the trial is shown as not errored
        return False


def load_trials(df: pd.DataFrame, space: SearchSpace) -> list[Trial]:
    """One :class:`Trial` per trial of ``results.parquet``, in finishing order; best value and epoch as
    :func:`tune_agb.runs.rank_trials` ranks them."""
    ranked = {t.trial_id: t for t in rank_trials(df, space)}
    trials = []
    for tid, g in df.groupby(df["trial_id"].astype(str), sort=False):
        g = g.sort_values("epoch")
        r = ranked[str(tid)]
        first = g.iloc[0]
        if _errored(first.get("trial_path")):
            status = "errored"
        elif r.last_epoch >= space.max_t:
            status = "completed"
        else:
            status = "stopped early"
        params = {p.name: first.get(f"config/{p.name}") for p in space.params}
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
                params={k: v for k, v in params.items() if not is_missing(v)},
            )
        )
    order = sorted(range(len(trials)), key=lambda i: (math.isnan(trials[i].finished_at), trials[i].finished_at, i))
    return [trials[i] for i in order]


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
            diffs.append(f"{name} = {_fmt(v)} (base {_fmt(base.get(name))})")
    return "; ".join(diffs) or "none (the base config)"


def search_report(path: Path, unit: str = "", source: str = "") -> str:
    """The HTML of a search's experiment folder (``source``: how the page names it; default ``path``)."""
    space, _ = read_space(str(path))
    df = read_results(str(path))
    best = read_best(str(path), required=False)
    trials = load_trials(df, space) if not df.empty else []
    by_id = {t.trial_id: t for t in trials}
    ranked = [by_id[r.trial_id] for r in rank_trials(df, space) if r.scored]
    best_id = best.trial_id if best is not None else None
    if best_id is None and ranked:
        best_id = ranked[0].trial_id
    counts = {s: sum(t.status == s for t in trials) for s in STATUS_COLORS}
    meta = html.escape(
        f"{source or path} — {len(trials)} trials ({counts['completed']} ran all {space.max_t} epochs, "
        f"{counts['stopped early']} stopped early, {counts['errored']} errored); "
        f"metric {space.metric} ({space.mode}); scheduler {space.settings['scheduler']['type']}"
    )
    if ranked:
        meta += html.escape(f"; best {space.metric} = {_fmt(ranked[0].best_value)} (trial {ranked[0].trial_id})")
    sections: list[tuple[str, str, str]] = []
    if not trials:
        sections.append(("curves", "Learning curves", '<p class="note">No trial reported a result yet.</p>'))
        return page(f"Search report: {path.name}", meta, sections)

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
            sections.append(("folds", "Spatial cross-validation", _folds_html(path, df, best_trial)))
    return page(f"Search report: {path.name}", meta, sections)


def _fold_spread(df: pd.DataFrame, metric: str) -> dict[tuple[str, int], float]:
    """``{(trial_id, epoch): sd over folds}`` of ``metric`` in a cv search's results (empty: not a cv search, or a
    metric without a per-fold spread)."""
    col = f"{metric}_sd"
    if col not in df.columns:
        return {}
    rows = df[["trial_id", "epoch", col]].itertuples(index=False)
    return {(str(t), int(e)): float(v) for t, e, v in rows}


def _folds_html(path: Path, df: pd.DataFrame, best: Any) -> str:
    """The best trial's per-fold validation at its best epoch, with each fold's tiles and labels (cv_folds.json)."""
    row = df[(df["trial_id"].astype(str) == best.trial_id) & (df["epoch"] == best.best_epoch)].iloc[-1]
    k = sum(c.startswith("val_rmse_fold") for c in df.columns)
    folds: dict[int, list[int]] = {}
    assignment = read_folds(str(path))
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


# -- final training ------------------------------------------------------------------------------------------
def _splits(pred: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(s, pred[pred["split"] == s]) for s in ("val", "test") if (pred["split"] == s).any()]


def _pred_vs_obs_figure(pred: pd.DataFrame, unit: str) -> Figure:
    parts = _splits(pred)
    fig = new_figure((5.6 * len(parts), 4.8))
    for ax, (split, d) in zip(fig.subplots(1, len(parts), squeeze=False)[0], parts, strict=True):
        draw_pred_vs_obs(ax, d["label"].to_numpy(), d["mean"].to_numpy(), f"{split}: predicted vs observed", unit, True)
    return fig


def _residual_figure(pred: pd.DataFrame, unit: str) -> Figure:
    parts = _splits(pred)
    fig = new_figure((5.6 * len(parts), 4.4))
    for ax, (split, d) in zip(fig.subplots(1, len(parts), squeeze=False)[0], parts, strict=True):
        y = d["label"].to_numpy(float)
        r = d["mean"].to_numpy(float) - y
        hb = ax.hexbin(y, r, gridsize=40, mincnt=1, bins="log", cmap="viridis")
        fig.colorbar(hb, ax=ax, label="pixels", shrink=0.8)
        ax.axhline(0, color="0.45", lw=1, ls="--")
        chunks = [c.numpy() for c in equal_count_bins(torch.tensor(y), 10) if c.numel()]
        ax.plot([y[c].mean() for c in chunks], [r[c].mean() for c in chunks], "o-", color="#c43c1e", ms=4,
                label="mean residual per equal-count bin of the label")  # fmt: skip
        ax.set_xlabel(with_unit("observed label", unit))
        ax.set_ylabel(with_unit("residual: predicted − observed", unit))
        ax.set_title(f"{split}: residuals vs observed", fontsize=10)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    return fig


def _reliability_figure(pred: pd.DataFrame, loss: str) -> Figure:
    """Both splits' reliability curves: calibrated (solid) and, where predictions.parquet has ``std_uncalibrated``,
    before calibration (dashed); the intervals of the run's predictive distribution (``loss``)."""
    fig = new_figure((5.4, 4.8))
    curves = []
    for split, d in _splits(pred):
        y, m = d["label"].to_numpy(), d["mean"].to_numpy()
        if "std_uncalibrated" in d and not np.allclose(d["std_uncalibrated"], d["std"], rtol=1e-6):
            style = {"color": SPLIT_COLORS[split], "ls": "--", "alpha": 0.6}
            curves.append((f"{split}, before calibration", y, m, d["std_uncalibrated"].to_numpy(), style))
        curves.append((split, y, m, d["std"].to_numpy(), {"color": SPLIT_COLORS[split]}))
    shape = "Laplacian" if loss == "laplacian_nll" else "Gaussian"
    draw_reliability(
        fig.add_subplot(), curves, f"Reliability of the predicted {shape} intervals", RELIABILITY_LEVELS, loss
    )
    return fig


def _sigma_figure(pred: pd.DataFrame, unit: str, bins: int = 10) -> Figure:
    fig = new_figure((5.4, 4.8))
    ax = fig.add_subplot()
    hi = 0.0
    for split, d in _splits(pred):
        rmv, rmse, _ = binned_rmse_vs_rmv(d["label"].to_numpy(), d["mean"].to_numpy(), d["std"].to_numpy(), bins)
        ax.plot(rmv, rmse, "o-", color=SPLIT_COLORS[split], label=split, ms=5)
        hi = max(hi, float(rmv.max(initial=0.0)), float(rmse.max(initial=0.0)))
    hi = hi * 1.05 or 1.0
    ax.plot([0, hi], [0, hi], color="0.45", lw=1, ls="--", label="1:1")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(with_unit("predicted σ (RMV of the bin)", unit))
    ax.set_ylabel(with_unit("RMSE of the bin", unit))
    ax.set_title(f"RMSE vs predicted σ, {bins} equal-count bins of σ", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return fig


def _color_range(*arrays: np.ndarray) -> tuple[float, float]:
    """The 1st-99th percentile of the finite values (so a few extreme pixels do not wash out a map)."""
    vals = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays])
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.quantile(vals, [0.01, 0.99]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _tile_figure(
    maps: TileMaps, k: int, unit: str, mean_range: tuple[float, float], std_range: tuple[float, float]
) -> Figure:
    """Tile ``k``: the predicted mean with the GEDI footprints coloured by their label on the mean's colour scale
    (dark edge), and the predicted σ. Colour scales are shared by all tiles of the page."""
    mean, std, label = maps.mean[k], maps.std[k], maps.label[k]
    rows, cols = np.nonzero(np.isfinite(label))
    h, w = mean.shape
    fig = new_figure((10.5, 4.2 * min(max(h / w, 0.5), 2.0) + 0.8))
    ax_m, ax_s = fig.subplots(1, 2)
    im = ax_m.imshow(mean, cmap=MEAN_CMAP, vmin=mean_range[0], vmax=mean_range[1], interpolation="nearest")
    size = float(np.clip((230 / max(h, w)) ** 2, 6, 40))  # about one pixel wide on small tiles, visible on large
    ax_m.scatter(cols, rows, c=label[rows, cols], cmap=MEAN_CMAP, vmin=mean_range[0], vmax=mean_range[1], s=size,
                 marker="o", edgecolors="0.1", linewidths=0.7)  # fmt: skip
    fig.colorbar(im, ax=ax_m, shrink=0.85, label=with_unit("predicted mean; dots: GEDI label", unit))
    ax_m.set_title(f"predicted mean; dots: {rows.size} GEDI footprints, filled with their label", fontsize=9)
    im = ax_s.imshow(std, cmap=STD_CMAP, vmin=std_range[0], vmax=std_range[1], interpolation="nearest")
    fig.colorbar(im, ax=ax_s, shrink=0.85, label=with_unit("predicted σ", unit))
    ax_s.set_title("predicted σ (standard deviation)", fontsize=10)
    for ax in (ax_m, ax_s):
        ax.set_xlabel("column (px)")
        ax.set_ylabel("row (px)")
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    fig.suptitle(f"test tile {maps.names[k]} ({h} x {w} px)", fontsize=11)
    return fig


def maps_section(maps: TileMaps | None, unit: str) -> str:
    """The inner HTML of the maps section: one figure per tile of ``test_maps.npz``, or a note without it."""
    if maps is None:
        why = "final_train writes it; out dirs of older versions lack it"
        return f'<p class="note">No {TEST_MAPS_FILE} in this folder ({why}): maps skipped.</p>'
    mean_range = _color_range(maps.mean, maps.label)
    std_range = _color_range(maps.std)
    figs = []
    for k, name in enumerate(maps.names):
        n = int(np.isfinite(maps.label[k]).sum())
        figs.append(
            f'<h3 class="tile">{html.escape(name)}</h3>'
            + img_tag(_tile_figure(maps, k, unit, mean_range, std_range), f"maps of test tile {name}")
            + f'<p class="note">{n} labelled pixels (GEDI footprints).</p>'
        )
    return (
        f'<p class="note">The {len(maps.names)} test tiles with the most GEDI footprints. Left: the predicted mean, '
        "with each footprint drawn as a dot filled with its label on the same colour scale (a dot that stands out "
        "from the map around it is a large error). Right: the predicted σ. Colour scales are shared by all tiles "
        "(1st to 99th percentile).</p>" + "".join(figs)
    )


def final_report(path: Path, unit: str = "", source: str = "") -> str:
    """The HTML of a final_train out dir (``source``: how the page names it; default ``path``)."""
    metrics = read_metrics(str(path))
    pred = read_predictions(str(path))
    maps = read_test_maps(str(path))  # before any figure: a malformed file fails at once
    pred = pred[np.isfinite(pred["label"]) & np.isfinite(pred["mean"]) & np.isfinite(pred["std"])]
    keys = [k for k in METRIC_NAMES if any(f"{s}_{k}" in metrics for s in ("val", "test"))]
    cal = _calibration_of(metrics, path)
    before = metrics.get("uncalibrated") if cal is not None and cal.method != "none" else None
    rows = []
    cv = metrics.get("cv") if isinstance(metrics.get("cv"), dict) else None
    for s in ("val", "test"):
        name = f"{s} (in-sample: trained on)" if s == "val" and cv and cv.get("val_in_sample") else s
        if isinstance(before, dict):
            rows.append([f"{name}, before calibration", *(before.get(f"{s}_{k}", math.nan) for k in keys)])
        rows.append([name, *(metrics.get(f"{s}_{k}", math.nan) for k in keys)])
    table = html_table(["split", *keys], rows)
    run = {k: metrics[k] for k in ("best_epoch", "epochs", "ensemble", "input_dir", "label_dir") if k in metrics}
    if cal is not None:
        run["calibration"] = cal.describe()
    if cv:
        kept = "its k fold models kept as an ensemble" if cv.get("final") == "folds" else "retrained on train+val"
        run["cross-validated search"] = (
            f"{cv.get('k')}-fold, best trial {cv.get('trial_id')} at epoch {cv.get('epoch')} "
            f"(fold mean {_fmt(cv.get('value'))} ± {_fmt(cv.get('value_sd'))}): {kept}"
        )
    table += html_table(["setting", "value"], [[k, v] for k, v in run.items()])
    meta = html.escape(
        f"{source or path} — {len(pred)} labelled val/test pixels" + (f"; values in {unit}" if unit else "")
    )
    sections = [
        ("metrics", "Metrics", table),
        ("scatter", "Predicted vs observed", img_tag(_pred_vs_obs_figure(pred, unit), "predicted vs observed")),
        ("residuals", "Residuals vs observed", img_tag(_residual_figure(pred, unit), "residuals vs observed")),
        (
            "calibration",
            "Uncertainty calibration",
            '<div class="figs">'
            + img_tag(_reliability_figure(pred, cal.loss if cal else "gaussian_nll"), "reliability diagram")
            + img_tag(_sigma_figure(pred, unit), "RMSE vs predicted sigma")
            + "</div>"
            + '<p class="note">Left: share of labels inside the central interval of each nominal level of the '
            "predicted distribution (on the diagonal: calibrated; below: σ too small); dashed, for a calibrated run: "
            "before the variance calibration. Right: RMSE against the predicted σ in bins of equal "
            "pixel count (on the diagonal: calibrated).</p>",
        ),
        ("maps", "Test tile maps", maps_section(maps, unit)),
    ]
    return page(f"Final training report: {path.name}", meta, sections)


def _calibration_of(metrics: dict[str, Any], path: Path) -> Calibration | None:
    """The calibration recorded in metrics.json (None for out dirs written before calibration existed)."""
    if "calibration" not in metrics:
        return None
    return calibration_from_dict(metrics["calibration"], f"{path / METRICS_FILE}: 'calibration'")


# -- entry points --------------------------------------------------------------------------------------------
# What a page is built from (the first two required).
SEARCH_INPUTS = (RESULTS_FILE, SEARCH_FILE, BEST_FILE, CV_FOLDS_FILE)
FINAL_INPUTS = (METRICS_FILE, PREDICTIONS_FILE, TEST_MAPS_FILE)


def write_report(path: str | Path, unit: str = "") -> Path | str:
    """Write ``PATH/report/index.html`` for a search's experiment folder or a final_train out dir.

    Args:
        path: the experiment folder ``STORAGE/NAME`` or the final_train out dir: a local folder, or a URI
            (``s3://``, ``gs://``, ``file://``) read and written through pyarrow's filesystem.
        unit: the unit of the labels for axis titles (e.g. ``"Mg/ha"``; ``""``: none shown).

    Returns:
        The path of ``index.html`` (for a URI, its URI).

    Raises:
        TuneAgbError: when ``path`` is neither kind of folder, or its files cannot be read.
    """
    if is_uri(str(path)) or str(path).startswith("file://"):  # read through pyarrow's filesystem, as s3/gs
        return _write_report_through(str(path), unit)
    path = Path(path)
    text = build_page(path, unit)
    out = path / REPORT_DIR / INDEX
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def build_page(path: Path, unit: str = "", source: str = "") -> str:
    """The page of the local folder ``path``, whichever kind it is; ``source`` names it (default ``path``)."""
    if (path / RESULTS_FILE).is_file() and (path / SEARCH_FILE).is_file():
        return search_report(path, unit, source)
    if (path / METRICS_FILE).is_file() and (path / PREDICTIONS_FILE).is_file():
        return final_report(path, unit, source)
    raise TuneAgbError(
        f"{source or path}: neither a search's experiment folder ({RESULTS_FILE} + {SEARCH_FILE}) "
        f"nor a final_train out dir ({METRICS_FILE} + {PREDICTIONS_FILE})"
    )


def _write_report_through(uri: str, unit: str) -> str:
    """:func:`write_report` of a folder on a pyarrow filesystem: its inputs are copied into a temporary folder
    (under the folder's own name, which titles the page), the page is built there and written back atomically."""
    uri = uri.rstrip("/")
    fs, root = open_location(uri)
    with tempfile.TemporaryDirectory(prefix="tune_agb_report_") as tmp:
        local = Path(tmp) / (Path(root).name or "experiment")
        local.mkdir()
        try:
            for name in (*SEARCH_INPUTS, *FINAL_INPUTS):
                data = read_path(fs, f"{root}/{name}")
                if data is not None:
                    (local / name).write_bytes(data)
        except OSError as exc:
            raise TuneAgbError(f"{uri}: cannot read the report's inputs ({str(exc).splitlines()[0]})") from None
        try:
            text = build_page(local, unit, uri)
        except TuneAgbError as exc:  # name the files by their URI, not by the temporary copy
            raise TuneAgbError(str(exc).replace(str(local), uri)) from None
        try:
            fs.create_dir(f"{root}/{REPORT_DIR}", recursive=True)
            write_path_atomic(fs, f"{root}/{REPORT_DIR}/{INDEX}", text.encode("utf-8"))
        except OSError as exc:
            raise TuneAgbError(f"{uri}: cannot write {REPORT_DIR}/{INDEX} ({str(exc).splitlines()[0]})") from None
    return f"{uri}/{REPORT_DIR}/{INDEX}"


def write_report_or_warn(path: str | Path, unit: str = "") -> Path | str | None:
    """:func:`write_report` at the end of a search or a final training: what they wrote is kept whatever happens
    here, so a page that cannot be drawn is one warning line (None), never a failed run."""
    try:
        return write_report(path, unit)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"warning: {path}: report page not written ({first})", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune_agb.report", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="experiment folder STORAGE/NAME or final_train out dir (a path, s3://, gs://, file://)")
    p.add_argument("--unit", default="", help="unit of the labels for axis titles, e.g. Mg/ha")
    args = p.parse_args(argv)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    print(write_report(args.path, args.unit))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
