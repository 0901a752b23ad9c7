"""Per-pixel ridge regression on the input bands: the no-spatial-context baseline a U-Net has to beat.

    python -m tune_agb.baseline [--input-dir D --label-dir D] [--alpha 1.0]

Fitted on the labelled train pixels (bands normalised with the train split's stats, NaN -> band mean), scored on
the labelled pixels of val and test with the same metrics as the U-Net.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np
import torch

from tune_agb.demo import data_dirs
from tune_agb.engine.data import NormStats, TileSet, compute_norm_stats, load_dataset
from tune_agb.engine.metrics import regression_metrics
from tune_agb.errors import run_cli


def pixel_features(tiles: TileSet, norm: NormStats) -> tuple[np.ndarray, np.ndarray]:
    """(labelled pixels, bands) normalised features and their labels."""
    x = norm.normalize(torch.from_numpy(np.ascontiguousarray(tiles.inputs))).numpy()
    mask = np.isfinite(tiles.labels)
    return x.transpose(0, 2, 3, 1)[mask].astype(np.float64), tiles.labels[mask].astype(np.float64)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Weights (bands + 1) of ridge regression with an unpenalised intercept (last weight)."""
    a = np.c_[x, np.ones(len(x))]
    reg = alpha * np.eye(a.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(a.T @ a + reg, a.T @ y)


def ridge_baseline(tiles: dict[str, TileSet], alpha: float = 1.0) -> dict[str, float]:
    """``{split}_{metric}`` for val and test (variance: the train residual variance, constant)."""
    norm = compute_norm_stats(tiles["train"], standardize_target=False)
    xtr, ytr = pixel_features(tiles["train"], norm)
    w = fit_ridge(xtr, ytr, alpha)
    resid_var = float(np.mean((np.c_[xtr, np.ones(len(xtr))] @ w - ytr) ** 2))
    out: dict[str, float] = {}
    for split in ("val", "test"):
        if split not in tiles:
            continue
        x, y = pixel_features(tiles[split], norm)
        pred = np.c_[x, np.ones(len(x))] @ w
        m = regression_metrics(torch.from_numpy(y), torch.from_numpy(pred), torch.full((len(y),), resid_var))
        out |= {f"{split}_{k}": v for k, v in m.items()}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tune_agb.baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--input-dir")
    p.add_argument("--label-dir")
    p.add_argument("--alpha", type=float, default=1.0)
    a = p.parse_args(argv)
    idir, ldir = data_dirs(a.input_dir, a.label_dir)
    res = ridge_baseline(load_dataset(idir, ldir), a.alpha)
    print(json.dumps({k: round(v, 4) for k, v in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
