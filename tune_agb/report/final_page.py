"""The page of a final run's folder (a ``tune_agb.final_train`` or ``tune_agb.baseline`` out dir): the metrics
table (before and after the variance calibration), predicted vs observed and residuals vs observed (val and test), a
reliability diagram of the central intervals of the predicted distributions (Gaussian, or Laplacian for
``laplacian_nll``; after and, dashed, before the calibration), RMSE vs predicted σ per equal-count bin, and the
predicted mean and σ maps of the test tiles in ``test_maps.npz`` with their GEDI footprints marked.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tune_agb.engine.calibration import RELIABILITY_LEVELS, Calibration, calibration_from_dict
from tune_agb.engine.metric_names import METRIC_NAMES
from tune_agb.engine.metrics import equal_count_bins
from tune_agb.engine.plots import binned_rmse_vs_rmv, draw_pred_vs_obs, draw_reliability, new_figure, with_unit
from tune_agb.location import join
from tune_agb.report.html_page import fmt, folder_name, html_table, img_tag, page
from tune_agb.runs import METRICS_FILE, TEST_MAPS_FILE, TileMaps, read_metrics, read_predictions, read_test_maps

SPLIT_COLORS = {"val": "#1f5fbf", "test": "#c43c1e"}
MEAN_CMAP = colormaps["viridis"].with_extremes(bad="0.82")  # bad: pixels without a prediction
STD_CMAP = colormaps["magma"].with_extremes(bad="0.82")


def _splits(pred: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(s, pred[pred["split"] == s]) for s in ("val", "test") if (pred["split"] == s).any()]


def _pred_vs_obs_figure(pred: pd.DataFrame, unit: str) -> Figure:
    parts = _splits(pred)
    fig = new_figure((5.6 * len(parts), 4.8))
    for ax, (split, d) in zip(fig.subplots(1, len(parts), squeeze=False)[0], parts, strict=True):
        draw_pred_vs_obs(ax, d["label"].to_numpy(), d["mean"].to_numpy(), f"{split}: predicted vs observed", unit, True)
    return fig


def _label_axes(ax: Axes, xlabel: str, ylabel: str, title: str, legend: tuple[int, str]) -> None:
    """Axis labels, a title, the legend (``(font size, location)``) and a light grid."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=legend[0], loc=legend[1])
    ax.grid(alpha=0.3)


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
        xlabel, ylabel = with_unit("observed label", unit), with_unit("residual: predicted − observed", unit)
        _label_axes(ax, xlabel, ylabel, f"{split}: residuals vs observed", (7, "upper right"))
    return fig


def reliability_figure(pred: pd.DataFrame, loss: str) -> Figure:
    """The reliability diagram of ``predictions.parquet`` (as read by :func:`tune_agb.runs.read_predictions`): one
    curve per split after calibration (solid, labelled by the split) and, where ``std_uncalibrated`` differs from
    ``std``, before it (dashed, ``"<split>, before calibration"``), then the diagonal (``"ideal"``); the central
    intervals of the run's predictive distribution (``loss``: ``laplacian_nll`` for a Laplacian, else Gaussian)."""
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
    xlabel, ylabel = with_unit("predicted σ (RMV of the bin)", unit), with_unit("RMSE of the bin", unit)
    _label_axes(ax, xlabel, ylabel, f"RMSE vs predicted σ, {bins} equal-count bins of σ", (8, "upper left"))
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


def final_page(folder: str, unit: str = "") -> str:
    """The HTML page of a final run's folder (a local folder or a URI, as the page names it); ``unit``: the labels'
    unit for axis titles (``""``: none)."""
    metrics = read_metrics(folder)
    pred = read_predictions(folder)
    maps = read_test_maps(folder)  # before any figure: a malformed file fails at once
    pred = pred[np.isfinite(pred["label"]) & np.isfinite(pred["mean"]) & np.isfinite(pred["std"])]
    keys = [k for k in METRIC_NAMES if any(f"{s}_{k}" in metrics for s in ("val", "test"))]
    cal = _calibration_of(metrics, folder)
    before = metrics.get("uncalibrated") if cal is not None and cal.method != "none" else None
    rows = []
    cv = metrics.get("cv") if isinstance(metrics.get("cv"), dict) else None
    for s in ("val", "test"):
        name = f"{s} (in-sample: trained on)" if s == "val" and cv and cv.get("val_in_sample") else s
        if isinstance(before, dict):
            rows.append([f"{name}, before calibration", *(before.get(f"{s}_{k}", math.nan) for k in keys)])
        rows.append([name, *(metrics.get(f"{s}_{k}", math.nan) for k in keys)])
    forest = metrics.get("forest") if isinstance(metrics.get("forest"), dict) else None
    for part, key in (("U-Net part", "unet_alone"), ("forest part", "forest_alone")):  # final_train --forest
        if forest and isinstance(forest.get(key), dict):
            rows.append([f"test, {part} alone", *(forest[key].get(f"test_{k}", math.nan) for k in keys)])
    table = html_table(["split", *keys], rows)
    run = {k: metrics[k] for k in ("best_epoch", "epochs", "ensemble", "input_dir", "label_dir") if k in metrics}
    if cal is not None:
        run["calibration"] = cal.describe()
    if forest:
        run["forest part"] = f"texture forest at weight {forest.get('weight')} in the mixture (final_train --forest)"
    if cv:
        kept = "its k fold models kept as an ensemble" if cv.get("final") == "folds" else "retrained on train+val"
        run["cross-validated search"] = (
            f"{cv.get('k')}-fold, best trial {cv.get('trial_id')} at epoch {cv.get('epoch')} "
            f"(fold mean {fmt(cv.get('value'))} ± {fmt(cv.get('value_sd'))}): {kept}"
        )
    table += html_table(["setting", "value"], [[k, v] for k, v in run.items()])
    meta = html.escape(f"{folder} — {len(pred)} labelled val/test pixels" + (f"; values in {unit}" if unit else ""))
    sections = [
        ("metrics", "Metrics", table),
        ("scatter", "Predicted vs observed", img_tag(_pred_vs_obs_figure(pred, unit), "predicted vs observed")),
        ("residuals", "Residuals vs observed", img_tag(_residual_figure(pred, unit), "residuals vs observed")),
        (
            "calibration",
            "Uncertainty calibration",
            '<div class="figs">'
            + img_tag(reliability_figure(pred, cal.loss if cal else "gaussian_nll"), "reliability diagram")
            + img_tag(_sigma_figure(pred, unit), "RMSE vs predicted sigma")
            + "</div>"
            + '<p class="note">Left: share of labels inside the central interval of each nominal level of the '
            "predicted distribution (on the diagonal: calibrated; below: σ too small); dashed, for a calibrated run: "
            "before the variance calibration. Right: RMSE against the predicted σ in bins of equal "
            "pixel count (on the diagonal: calibrated).</p>",
        ),
        ("maps", "Test tile maps", maps_section(maps, unit)),
    ]
    return page(f"Final training report: {folder_name(folder)}", meta, sections)


def _calibration_of(metrics: dict[str, Any], folder: str) -> Calibration | None:
    """The calibration recorded in metrics.json (None for out dirs written before calibration existed)."""
    if "calibration" not in metrics:
        return None
    return calibration_from_dict(metrics["calibration"], f"{join(folder, METRICS_FILE)}: 'calibration'")
