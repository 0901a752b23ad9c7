"""Intervals that widen under input shift, without labels of the new region (issue 31). Reads back finished runs of
``bench/region_transfer.py`` and scores each run's test pixels under calibrations fitted on its val pixels only.

    python bench/region_transfer.py ... --out DIR        # first: the runs
    python bench/shift_calibration.py --out DIR [--methods recipe,rf] [--json FILE]

A run folder is ``DIR/<direction>/runs/<method>_s<seed>`` (or ``DIR/pooledcv/fold<j>/runs/...``, pooled over the
folds) with its dataset layout beside it in ``../data``. Nothing is trained.

The shift signal is the Mahalanobis distance ``d`` of a pixel's 14 input bands from the labelled train pixels'
bands (their mean and covariance): how far the pixel lies from what the model was fitted on, computed from inputs
only, so it is known on a region without labels. ``d_ref`` is the median distance of the train pixels themselves.
Calibrations, each fitted on the run's val pixels by ``fit_scale`` (a 68.27 % quantile since 0.3, the NLL factor
before) on the uncalibrated sigma:

- ``shipped``: what final_train wrote (one factor on sigma, fitted on val);
- ``distance``: the engine's ``--calibration distance`` (:mod:`tune_agb.engine.calibration`), sigma x s x
  max(1, d / d_ref): the interval grows in proportion to the distance beyond the train pixels' typical one; s
  refitted on val with the widening applied. Its form was chosen on the forests' runs of seed 0, before any
  recipe run was read (bench/RESULTS.md);
- ``distance, alpha on val``: sigma x s x max(1, d / d_ref) ** alpha, alpha (0 to 3 in steps of 0.05) and s
  fitted together on val (alpha by NLL, s by ``fit_scale``): what val alone says of the widening;
- ``right``: the shipped sigma times ``fit_scale`` fitted on the test pixels themselves (a reference).

A row: test labels, 1σ / 2σ coverage, the 1σ / 2σ interval's full width (median, mean), the median of d on val and
on test, and the factor still right for the test pixels after the calibration (1: right).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_selection import run_test  # same folder: one reader of a run's test rows
from region_transfer import interval_figures

from tune_agb.engine.calibration import Calibration, fit_band_distance, fit_scale, labelled_bands
from tune_agb.engine.calibration import pixel_bands as engine_pixel_bands

ALPHAS = np.round(np.arange(0.0, 3.0001, 0.05), 2)
CALIBRATIONS = ("shipped", "distance", "distance, alpha on val", "right")


def band_distance(data: Path) -> Calibration:
    """The engine's ``distance`` calibration shape (factor 1) from the labelled train pixels of a dataset layout."""
    labels = [np.load(f) for f in sorted((data / "labels" / "train").glob("*.npy"))]
    inputs = [np.load(data / "inputs" / "train" / f.name) for f in sorted((data / "labels" / "train").glob("*.npy"))]
    band_mean, band_icov, ref = fit_band_distance(labelled_bands(np.stack(inputs), np.stack(labels)))
    return Calibration("distance", 1.0, band_mean=band_mean, band_icov=band_icov, distance_ref=ref)


def pixel_bands(data: Path, split: str, rows: Any) -> np.ndarray:
    """The bands (pixels, C) of each prediction row (``tile``, ``row``, ``col``) of one split, in the rows' order:
    the split's tiles named in the rows, gathered by :func:`tune_agb.engine.calibration.pixel_bands`."""
    names = list(dict.fromkeys(rows["tile"]))
    inputs = np.stack([np.load(data / "inputs" / split / f"{t}.npy") for t in names])
    tile = rows["tile"].map({n: i for i, n in enumerate(names)}).to_numpy(np.int64)
    flat = rows["row"].to_numpy(np.int64) * inputs.shape[-1] + rows["col"].to_numpy(np.int64)
    return engine_pixel_bands(inputs, tile, flat).T


def run_sample(run: Path) -> dict[str, Any]:
    """A run's val and test pixels: labels, means, uncalibrated and shipped sigma, and the widening signal."""
    import pandas as pd

    data = run.parents[1] / "data"
    d = pd.read_parquet(run / "predictions.parquet")
    _, _, loss = run_test(run)
    shape = band_distance(data)
    out: dict[str, Any] = {"loss": loss}
    for split in ("val", "test"):
        s = d[d["split"] == split].reset_index(drop=True)
        x = pixel_bands(data, split, s)
        out[split] = {k: s[c].to_numpy(np.float64) for k, c in
                      (("y", "label"), ("mu", "mean"), ("sd", "std"), ("raw", "std_uncalibrated"))}  # fmt: skip
        g = shape.widening(x.T)
        out[split]["d"] = shape.distance(x.T)
        out[split]["g"] = {a: g**a for a in ALPHAS}
    return out


def nll(y: np.ndarray, mu: np.ndarray, sd: np.ndarray, loss: str) -> float:
    """Mean negative log-likelihood (up to a constant) under the run's distribution."""
    if loss == "laplacian_nll":
        b = sd / math.sqrt(2)
        return float(np.mean(np.log(b) + np.abs(y - mu) / b))
    return float(np.mean(np.log(sd) + 0.5 * ((y - mu) / sd) ** 2))


def calibrated(sample: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each calibration's test sigma (see the module docstring), all fitted on val except ``right``."""
    loss, val, test = sample["loss"], sample["val"], sample["test"]
    out = {"shipped": test["sd"]}
    s = fit_scale(val["y"], val["mu"], (val["raw"] * val["g"][1.0]) ** 2, loss)
    out["distance"] = test["raw"] * test["g"][1.0] * s
    best = None
    for a in ALPHAS:
        sd = val["raw"] * val["g"][a]
        s = fit_scale(val["y"], val["mu"], sd**2, loss)
        score = nll(val["y"], val["mu"], sd * s, loss)
        if best is None or score < best[0]:
            best = (score, a, s)
    _, a, s = best
    out["distance, alpha on val"] = test["raw"] * test["g"][a] * s
    out["right"] = test["sd"] * fit_scale(test["y"], test["mu"], test["sd"] ** 2, loss)
    sample["alpha"] = float(a)
    return out


def figures(y: np.ndarray, mu: np.ndarray, sd: np.ndarray, loss: str) -> dict[str, float]:
    out: dict[str, float] = {"n": int(y.size), "still_right": fit_scale(y, mu, sd**2, loss)}
    return out | interval_figures(np.abs(y - mu), sd, loss)


def score(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per calibration over ``samples`` (several: outer folds, their test pixels pooled)."""
    sds = [calibrated(s) for s in samples]
    cat = {k: np.concatenate([s["test"][k] for s in samples]) for k in ("y", "mu", "d")}
    vd = np.concatenate([s["val"]["d"] for s in samples])
    loss = samples[0]["loss"]
    rows = []
    for name in CALIBRATIONS:
        sd = np.concatenate([s[name] for s in sds])
        row = {"calibration": name, "d_val": float(np.nanmedian(vd)), "d_test": float(np.nanmedian(cat["d"]))}
        row["alpha"] = [s["alpha"] for s in samples] if name == "distance, alpha on val" else None
        rows.append(row | figures(cat["y"], cat["mu"], sd, loss))
    return rows


def find_runs(out: Path, methods: list[str]) -> dict[tuple[str, str, int], list[Path]]:
    """(direction, method, seed) -> run folders: ``ab``/``ba``/``pooled`` one each, ``pooledcv`` its folds."""
    found: dict[tuple[str, str, int], list[Path]] = {}
    for pred in sorted(out.glob("*/runs/*/predictions.parquet")) + sorted(
        out.glob("pooledcv/fold*/runs/*/predictions.parquet")
    ):
        run = pred.parent
        m = re.fullmatch(r"(.+)_s(\d+)", run.name)
        if not m or m.group(1) not in methods:
            continue
        direction = run.parents[2].name if run.parents[1].name.startswith("fold") else run.parents[1].name
        found.setdefault((direction, m.group(1), int(m.group(2))), []).append(run)
    return found


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| direction | seed | method | calibration | test labels | 1σ / 2σ coverage | 1σ / 2σ width, median (mean), m "
        "| d median, val / test | factor still right |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        alpha = f" (alpha {', '.join(f'{a:.2f}' for a in r['alpha'])})" if r["alpha"] else ""
        lines.append(
            f"| {r['direction']} | {r['seed']} | {r['method']} | {r['calibration']}{alpha} | {r['n']} | "
            f"{r['within_1sigma'] * 100:.1f} / {r['within_2sigma'] * 100:.1f} % | "
            f"{r['median_width_1sigma']:.1f} / {r['median_width_2sigma']:.1f} "
            f"({r['width_1sigma']:.1f} / {r['width_2sigma']:.1f}) | {r['d_val']:.2f} / {r['d_test']:.2f} | "
            f"{r['still_right']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the --out folder of bench/region_transfer.py")
    p.add_argument("--methods", default="recipe,rf,rf_texture")
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    runs = find_runs(Path(a.out), [m for m in a.methods.split(",") if m])
    if not runs:
        raise SystemExit(f"{a.out}: no finished run of {a.methods} (DIR/<direction>/runs/<method>_s<seed>)")
    names = {"ab": "A→B", "ba": "B→A", "pooled": "pooled", "pooledcv": "pooled CV"}
    rows = []
    for (direction, method, seed), folders in sorted(runs.items()):
        got = score([run_sample(f) for f in folders])
        rows += [{"direction": names.get(direction, direction), "method": method, "seed": seed} | r for r in got]
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
