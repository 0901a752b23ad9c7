"""Two diagnostic plots as PNG, drawn with Pillow (which tensorboard already needs): predicted vs observed, and
the calibration of the predicted uncertainty (RMSE against RMV per bin of predicted variance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tune_agb.engine.metrics import equal_count_bins

SIZE = 420
MARGIN = 50


def _canvas(title: str, xlabel: str, ylabel: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([MARGIN, 20, SIZE - 20, SIZE - MARGIN], outline="black")
    d.text((MARGIN, 4), title, fill="black")
    d.text((SIZE // 2 - 40, SIZE - 20), xlabel, fill="black")
    d.text((4, 20), ylabel, fill="black")
    return img, d


def _to_px(v: np.ndarray, lo: float, hi: float, vertical: bool) -> np.ndarray:
    span = max(hi - lo, 1e-9)
    if vertical:
        return (SIZE - MARGIN) - (v - lo) / span * (SIZE - MARGIN - 20)
    return MARGIN + (v - lo) / span * (SIZE - 20 - MARGIN)


def _ticks(d: ImageDraw.ImageDraw, lo: float, hi: float) -> None:
    for t in np.linspace(lo, hi, 5):
        x, y = _to_px(np.array(t), lo, hi, False), _to_px(np.array(t), lo, hi, True)
        d.text((float(x) - 10, SIZE - MARGIN + 4), f"{t:.3g}", fill="black")
        d.text((4, float(y) - 5), f"{t:.3g}", fill="black")


def scatter_plot(label: np.ndarray, mean: np.ndarray, path: Path, title: str) -> None:
    """Predicted mean against the label, with the 1:1 line."""
    lo = float(min(label.min(), mean.min(), 0.0))
    hi = float(max(label.max(), mean.max()))
    img, d = _canvas(title, "label", "predicted")
    d.line(
        [
            (_to_px(np.array(lo), lo, hi, False), _to_px(np.array(lo), lo, hi, True)),
            (_to_px(np.array(hi), lo, hi, False), _to_px(np.array(hi), lo, hi, True)),
        ],
        fill="gray",
    )
    for x, y in zip(_to_px(label, lo, hi, False), _to_px(mean, lo, hi, True), strict=True):
        d.ellipse([x - 2, y - 2, x + 2, y + 2], outline=(30, 90, 200))
    _ticks(d, lo, hi)
    img.save(path)


def calibration_plot(
    label: np.ndarray, mean: np.ndarray, std: np.ndarray, path: Path, title: str, bins: int = 10
) -> None:
    """RMSE against RMV (root mean predicted variance) in equal-count bins of predicted variance; ideal = 1:1."""
    rmv, rmse = [], []
    for idx_t in equal_count_bins(torch.from_numpy(np.ascontiguousarray(std)), bins):
        idx = idx_t.numpy()
        if idx.size:
            rmv.append(np.sqrt(np.mean(std[idx] ** 2)))
            rmse.append(np.sqrt(np.mean((mean[idx] - label[idx]) ** 2)))
    rmv_a, rmse_a = np.array(rmv), np.array(rmse)
    hi = float(max(rmv_a.max(), rmse_a.max()))
    img, d = _canvas(title, "RMV (predicted)", "RMSE (observed)")
    d.line(
        [
            (_to_px(np.array(0.0), 0, hi, False), _to_px(np.array(0.0), 0, hi, True)),
            (_to_px(np.array(hi), 0, hi, False), _to_px(np.array(hi), 0, hi, True)),
        ],
        fill="gray",
    )
    pts = list(zip(_to_px(rmv_a, 0, hi, False).tolist(), _to_px(rmse_a, 0, hi, True).tolist(), strict=True))
    d.line(pts, fill=(200, 60, 30), width=2)
    for x, y in pts:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 60, 30))
    _ticks(d, 0.0, hi)
    img.save(path)
