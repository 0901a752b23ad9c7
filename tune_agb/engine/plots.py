"""Diagnostic plots as PNG, drawn with matplotlib (its Agg renderer; no display and no pyplot state): predicted vs
observed, the calibration of the predicted uncertainty (RMSE against RMV per bin of predicted variance), and the
reliability diagram (observed against expected coverage of the central intervals, before and after recalibration).

The engine does not know the unit of the labels: functions take ``unit`` (e.g. ``"Mg/ha"``; ``""``: none shown).
The figure builders (``*_figure``) are shared with :mod:`tune_agb.report`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tune_agb.engine.calibration import RELIABILITY_LEVELS, coverage
from tune_agb.engine.metrics import equal_count_bins

FIGSIZE = (5.2, 4.6)  # inches
DPI = 110
LINE_COLOR = "0.45"
POINT_COLOR = "#1f5fbf"
CAL_COLOR = "#c43c1e"
# Above this many points a scatter becomes a hexbin (density) plot.
HEXBIN_ABOVE = 3000


def with_unit(name: str, unit: str) -> str:
    """An axis label: ``name (unit)``, or ``name`` without a unit."""
    return f"{name} ({unit})" if unit else name


def new_figure(size: tuple[float, float] = FIGSIZE) -> Figure:
    """A figure detached from pyplot (constrained layout, so labels are never cut off)."""
    return Figure(figsize=size, dpi=DPI, layout="constrained")


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def save_png(fig: Figure, path: Path) -> None:
    Path(path).write_bytes(png_bytes(fig))


def _finite(*arrays: np.ndarray) -> list[np.ndarray]:
    arrays = [np.asarray(a, dtype=np.float64).ravel() for a in arrays]
    ok = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    return [a[ok] for a in arrays]


def _one_to_one(ax: Axes, lo: float, hi: float) -> None:
    ax.plot([lo, hi], [lo, hi], color=LINE_COLOR, lw=1, ls="--", label="1:1", zorder=3)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")


def draw_pred_vs_obs(
    ax: Axes, label: np.ndarray, mean: np.ndarray, title: str, unit: str = "", hexbin: bool | None = None
) -> None:
    """Predicted mean against the observed label with the 1:1 line: points, or a hexbin (``hexbin``; None: when
    there are more than :data:`HEXBIN_ABOVE` points)."""
    y, m = _finite(label, mean)
    lo = float(min(y.min(initial=0.0), m.min(initial=0.0), 0.0))
    hi = float(max(y.max(initial=1.0), m.max(initial=1.0)))
    hi = hi if hi > lo else lo + 1.0
    if (y.size > HEXBIN_ABOVE) if hexbin is None else hexbin:
        hb = ax.hexbin(y, m, gridsize=40, extent=(lo, hi, lo, hi), mincnt=1, bins="log", cmap="viridis")
        ax.figure.colorbar(hb, ax=ax, label="pixels", shrink=0.8)
    else:
        ax.scatter(y, m, s=8, alpha=0.5, color=POINT_COLOR, edgecolors="none", label="pixels")
    _one_to_one(ax, lo, hi)
    if y.size > 1:
        rmse = float(np.sqrt(np.mean((m - y) ** 2)))
        bias = float(np.mean(m - y))
        ax.text(
            0.03,
            0.97,
            f"n = {y.size}\nRMSE = {rmse:.3g}\nbias = {bias:+.3g}",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"},
        )
    ax.set_xlabel(with_unit("observed label", unit))
    ax.set_ylabel(with_unit("predicted mean", unit))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def binned_rmse_vs_rmv(label: np.ndarray, mean: np.ndarray, std: np.ndarray, bins: int) -> tuple[np.ndarray, ...]:
    """Per equal-count bin of predicted std: ``(rmv, rmse, count)`` (RMV: root mean predicted variance)."""
    y, m, s = _finite(label, mean, std)
    rmv, rmse, count = [], [], []
    for idx_t in equal_count_bins(torch.from_numpy(np.ascontiguousarray(s)), bins):
        idx = idx_t.numpy()
        if idx.size:
            rmv.append(np.sqrt(np.mean(s[idx] ** 2)))
            rmse.append(np.sqrt(np.mean((m[idx] - y[idx]) ** 2)))
            count.append(idx.size)
    return np.array(rmv), np.array(rmse), np.array(count)


def draw_calibration(
    ax: Axes, label: np.ndarray, mean: np.ndarray, std: np.ndarray, title: str, bins: int = 10, unit: str = ""
) -> None:
    """RMSE against RMV in equal-count bins of predicted std; a calibrated model lies on the 1:1 line."""
    rmv, rmse, _ = binned_rmse_vs_rmv(label, mean, std, bins)
    hi = float(max(rmv.max(initial=0.0), rmse.max(initial=0.0))) * 1.05 or 1.0
    ax.plot(rmv, rmse, "o-", color=CAL_COLOR, lw=1.5, ms=5, label=f"{len(rmv)} equal-count bins", zorder=4)
    _one_to_one(ax, 0.0, hi)
    ax.set_xlabel(with_unit("RMV: predicted σ (root mean variance)", unit))
    ax.set_ylabel(with_unit("RMSE: observed error", unit))
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)


def draw_reliability(
    ax: Axes,
    curves: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, dict]],
    title: str,
    levels: tuple[float, ...] = RELIABILITY_LEVELS,
    loss: str = "gaussian_nll",
) -> None:
    """Reliability diagram: for each nominal level, the share of labels inside the central interval of that level
    of the predictive distribution (Gaussian, or Laplacian for ``laplacian_nll``), against the level; on the
    diagonal: calibrated, below: sigma too small.

    Args:
        ax: the axes.
        curves: ``(name, label, mean, std, line style)`` per curve (flat arrays in label units; the style is passed
            to ``ax.plot``, e.g. ``{"color": "C0", "ls": "--"}``).
        title: the axes' title.
        levels: the nominal levels (0..1).
        loss: the model's loss, which names its predictive distribution.
    """
    for name, label, mean, std, style in curves:
        y, m, s = _finite(label, mean, std)
        ax.plot(levels, coverage(y, m, s, levels, loss), marker="o", ms=3.5, lw=1.5, label=name, **style)
    ax.plot([0, 1], [0, 1], color=LINE_COLOR, lw=1, ls=":", label="ideal")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("expected coverage (nominal level of the central interval)")
    ax.set_ylabel("observed coverage (share of labels inside)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)


def reliability_figure(
    label: np.ndarray,
    mean: np.ndarray,
    std_before: np.ndarray,
    std_after: np.ndarray | None,
    title: str,
    loss: str = "gaussian_nll",
) -> Figure:
    """:func:`draw_reliability` of one split before (dashed) and, unless ``std_after`` is None, after calibration."""
    fig = new_figure()
    curves = [("before calibration", label, mean, std_before, {"color": LINE_COLOR, "ls": "--"})]
    if std_after is not None:
        curves.append(("after calibration", label, mean, std_after, {"color": CAL_COLOR}))
    draw_reliability(fig.add_subplot(), curves, title, loss=loss)
    return fig


def scatter_figure(label: np.ndarray, mean: np.ndarray, title: str, unit: str = "") -> Figure:
    fig = new_figure()
    draw_pred_vs_obs(fig.add_subplot(), label, mean, title, unit)
    return fig


def calibration_figure(
    label: np.ndarray, mean: np.ndarray, std: np.ndarray, title: str, bins: int = 10, unit: str = ""
) -> Figure:
    fig = new_figure()
    draw_calibration(fig.add_subplot(), label, mean, std, title, bins, unit)
    return fig


def scatter_plot(label: np.ndarray, mean: np.ndarray, path: Path, title: str, unit: str = "") -> None:
    """Predicted mean against the label, with the 1:1 line (a PNG at ``path``)."""
    save_png(scatter_figure(label, mean, title, unit), path)


def calibration_plot(
    label: np.ndarray, mean: np.ndarray, std: np.ndarray, path: Path, title: str, bins: int = 10, unit: str = ""
) -> None:
    """RMSE against RMV (root mean predicted variance) in equal-count bins of predicted variance; ideal = 1:1."""
    save_png(calibration_figure(label, mean, std, title, bins, unit), path)


def reliability_plot(
    label: np.ndarray,
    mean: np.ndarray,
    std_before: np.ndarray,
    std_after: np.ndarray | None,
    path: Path,
    title: str,
    loss: str = "gaussian_nll",
) -> None:
    """Expected against observed coverage of the central intervals, before and after calibration (a PNG)."""
    save_png(reliability_figure(label, mean, std_before, std_after, title, loss), path)
