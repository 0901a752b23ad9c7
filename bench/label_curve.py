"""How test RMSE falls with the number of training labels: the U-Net against the per-pixel baselines (issue 11).

    python bench/label_curve.py [--data ../shared/data/gedi-s1s2-real] [--fractions 0.25,0.35,0.5,0.7,1]
        [--seeds 0,1,2] [--outer-k 3] [--space search_spaces/real-cpu.yaml] [--methods unet,rf,rf_texture]
        [--workers 2] --out DIR [--json FILE]

Issue 11 asks a tuned U-Net to beat the random forest by 10 % on the 17 real tiles, where each outer fold trains on
314-346 GEDI labels. Every option screened so far missed it. This asks whether labels are the limit: on the outer
spatial folds of ``real_selection.py --outer-k`` (same strips), each fold's *train* labels are thinned to a fraction
(val and test untouched, every input tile kept), and every method is trained and tested on the thinned folds. A
row pools the folds' test predictions, so every fraction is tested on all 667 labels.

- The subsets are nested: per seed, every train pixel gets one uniform draw (seeded by the seed and the tile's
  name), and fraction f keeps the labels whose draw is below f. A bigger fraction only adds labels, so the curve
  measures labels, not which labels.
- ``unet`` is the space's base configuration (``config_screen.py``: its fixed keys + first point, max_t epochs),
  trained by ``final_train --config`` in subprocesses, ``--workers`` at a time with one torch thread each; ``rf``,
  ``rf_texture`` and ``ridge`` are ``tune_agb.baseline`` (as in ``real_selection.py``).
- Finished runs under ``--out`` are read back, so an interrupted run continues.

Output: per method and fraction, mean +- sd over seeds of the pooled test RMSE; the U-Net's RMSE as a share of the
forest's at each fraction, and a least-squares line of that share on log2(labels) with the label count where it would
reach 0.9 (an extrapolation, printed as one).

It also prints the labels' own semivariogram (pairs of labels in the same tile, by distance): half the mean squared
difference of two labels that far apart. Fitted with a nugget plus an exponential, the nugget is the part of a label
that no map at this resolution can predict (GEDI's own error, geolocation, what varies inside a footprint), so its
square root is a floor under any method's test RMSE on these labels.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import platform
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from config_screen import base_config, train_one  # same folder
from real_selection import ROOT, baseline, mean_sd, outer_data, outer_splits, pooled, tile_labels

METHODS = ["unet", "ridge", "rf", "rf_texture"]


def thin_train_labels(fold_dir: Path, fraction: float, seed: int) -> int:
    """Replace the links of ``fold_dir/labels/train`` by copies keeping ``fraction`` of each tile's labels (nested
    in the fraction for a seed, see the docstring); the labels kept, over all train tiles."""
    kept = 0
    for path in sorted((fold_dir / "labels" / "train").glob("*.npy")):
        y = np.load(path)
        if fraction < 1:
            draw = np.random.default_rng([seed, zlib.crc32(path.stem.encode())]).random(y.shape)
            y = np.where(draw < fraction, y, np.float32(np.nan)).astype(y.dtype)
            path.unlink()  # a link to the source: never write through it
            np.save(path, y)
        kept += int(np.isfinite(y).sum())
    return kept


def fold_folders(data_dir: Path, folds: list[dict[str, list[str]]], fraction: float, seed: int, out: Path):
    """The outer folds' dataset folders at ``fraction`` for ``seed``: (final_train flags, train labels) per fold."""
    got = []
    for j, fold in enumerate(folds):
        where = out / "data" / f"f{fraction:g}_s{seed}" / f"outer{j}"
        flags = outer_data(data_dir, fold, where)
        marker = where / "train_labels.json"
        if not marker.exists():  # thinned once; a rerun reads the count back
            marker.write_text(json.dumps(thin_train_labels(where, fraction, seed)))
        got.append((flags, json.loads(marker.read_text())))
    return got


def label_variogram(data_dir: Path, edges: tuple[int, ...] = (4, 8, 16, 32, 64, 128)) -> dict[str, Any]:
    """The semivariogram of the labels, from pairs in the same tile, in distance bins ``[edges[i], edges[i+1])`` px
    (below the first edge: pixels of one footprint or shots closer than GEDI's 60 m along-track spacing), and a
    nugget + exponential model fitted to it by least squares weighted by the pairs (range on a log grid)."""
    sums, pairs, lags = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
    values = []
    for path in sorted(data_dir.glob("labels/*/*.npy")):
        y = np.load(path)
        r, c = np.nonzero(np.isfinite(y))
        v = y[r, c].astype(np.float64)
        values.append(v)
        i, j = np.triu_indices(len(v), 1)
        d = np.hypot(r[i] - r[j], c[i] - c[j])
        b = np.searchsorted(edges, d, side="right") - 1
        ok = (b >= 0) & (b < len(edges) - 1)
        np.add.at(sums, b[ok], 0.5 * (v[i] - v[j])[ok] ** 2)
        np.add.at(pairs, b[ok], 1)
        np.add.at(lags, b[ok], d[ok])
    gamma, lag = sums / np.maximum(pairs, 1), lags / np.maximum(pairs, 1)
    best = None
    # gamma = nugget + partial * (1 - exp(-lag / range)); a range below the first edge could not be told from nugget
    for rng in np.geomspace(edges[0], 4 * edges[-1], 200):
        rise = 1 - np.exp(-lag / rng)
        a = np.stack([np.ones_like(lag), rise], 1) * np.sqrt(pairs)[:, None]
        coef, *_ = np.linalg.lstsq(a, gamma * np.sqrt(pairs), rcond=None)
        coef = np.maximum(coef, 0)
        err = float(np.sum(pairs * (gamma - coef[0] - coef[1] * rise) ** 2))
        if best is None or err < best[0]:
            best = (err, float(coef[0]), float(coef[1]), float(rng))
    _, nugget, partial, rng = best
    bins = [{"from_px": int(edges[k]), "to_px": int(edges[k + 1]), "pairs": int(pairs[k]), "gamma": float(gamma[k])}
            for k in range(len(edges) - 1)]  # fmt: skip
    return {"bins": bins, "nugget": nugget, "sill": nugget + partial, "range_px": rng,
            "label_var": float(np.var(np.concatenate(values)))}  # fmt: skip


def share_line(labels: list[float], share: list[float]) -> dict[str, float]:
    """Least squares ``share = a + b * log2(labels)``; the labels where the line reaches 0.9 (inf when it does not
    fall), and, with 4 or more points, the slope's standard error and the labels at 0.9 for the slope one standard
    error steeper about the points' centre (the optimistic end)."""
    x, y = np.log2(np.asarray(labels, float)), np.asarray(share, float)
    b, a = np.polyfit(x, y, 1)

    def at(slope: float) -> float:  # the line through the points' centre with this slope
        return float(2 ** (x.mean() + (0.9 - y.mean()) / slope)) if slope < 0 else math.inf

    got = {"intercept": float(a), "slope_per_doubling": float(b), "labels_at_0.9": at(b)}
    if len(x) >= 4:
        resid = y - (a + b * x)
        se = math.sqrt(float(resid @ resid) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
        got |= {"slope_se": se, "labels_at_0.9_steep": at(b - se)}
    return got


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "gedi-s1s2-real"))
    p.add_argument("--fractions", default="0.25,0.35,0.5,0.7,1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--outer-k", type=int, default=3)
    p.add_argument("--outer-val-share", type=float, default=0.15)
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "real-cpu.yaml"))
    p.add_argument("--methods", default="unet,rf,rf_texture")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--json")
    a = p.parse_args(argv)
    a.fractions = sorted(float(f) for f in a.fractions.split(",") if f.strip())
    if not a.fractions or not all(0 < f <= 1 for f in a.fractions):
        p.error(f"--fractions: shares of the train labels in (0, 1], got {a.fractions}")
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if bad := [m for m in a.methods if m not in METHODS]:
        p.error(f"--methods: {bad[0]!r} is not one of {', '.join(METHODS)}")
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    out, data_dir = Path(a.out), Path(a.data)
    folds = outer_splits(tile_labels(data_dir), a.outer_k, a.outer_val_share)
    config = out / "unet.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(base_config(yaml.safe_load(Path(a.space).read_text())), sort_keys=False))
    start = time.perf_counter()
    cells = {(f, s): fold_folders(data_dir, folds, f, s, out) for f in a.fractions for s in a.seeds}
    results: dict[tuple[str, float, int, int], dict[str, Any]] = {}
    for (f, s), per_fold in cells.items():  # the baselines: seconds each, in this process
        for j, (flags, _) in enumerate(per_fold):
            for m in (m for m in a.methods if m != "unet"):
                results[m, f, s, j] = baseline(m, s, out / "runs" / f"f{f:g}" / f"outer{j}", flags)
    jobs = [(f, s, j, flags) for (f, s), per_fold in cells.items() for j, (flags, _) in enumerate(per_fold)]
    if "unet" in a.methods:
        with concurrent.futures.ThreadPoolExecutor(a.workers) as pool:
            runs = pool.map(
                lambda job: train_one(out / "runs" / f"f{job[0]:g}" / f"outer{job[2]}" / f"unet_s{job[1]}", config,
                                      job[1], job[3]),
                jobs,
            )  # fmt: skip
            for (f, s, j, _), r in zip(jobs, list(runs), strict=True):
                results["unet", f, s, j] = r
    rows, summary = [], []
    for m in a.methods:
        for f in a.fractions:
            per_seed = []
            for s in a.seeds:
                row, _ = pooled(m, s, [results[m, f, s, j] for j in range(len(folds))])
                row |= {"fraction": f, "train_labels": sum(n for _, n in cells[f, s])}
                per_seed.append(row)
            rows += per_seed
            summary.append(
                {
                    "method": m,
                    "fraction": f,
                    "train_labels_per_fold": float(np.mean([r["train_labels"] for r in per_seed])) / len(folds),
                    "test_rmse": mean_sd([r["test_rmse"] for r in per_seed]),
                    "test_r2": mean_sd([r["test_r2"] for r in per_seed]),
                    "per_seed_rmse": [r["test_rmse"] for r in per_seed],
                }
            )
    by = {(r["method"], r["fraction"]): r for r in summary}
    shares, line = {}, None
    if "unet" in a.methods and "rf" in a.methods:
        shares = {f: by["unet", f]["test_rmse"][0] / by["rf", f]["test_rmse"][0] for f in a.fractions}
    if len(shares) >= 2:
        line = share_line([by["rf", f]["train_labels_per_fold"] for f in a.fractions], list(shares.values()))
    header = (
        f"Machine: {platform.processor() or platform.machine()}, {a.workers} U-Net runs at a time, 1 torch thread "
        "each. "
        f"Data {data_dir}, {a.outer_k} outer folds pooled ({rows[0]['test_n']} test labels), seeds "
        f"{','.join(map(str, a.seeds))}. U-Net: {json.dumps(yaml.safe_load(config.read_text()))}. Wall time "
        f"{(time.perf_counter() - start) / 60:.1f} min (reused runs included).\n"
        f"Command: `python bench/label_curve.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
    )
    lines = ["", "| train labels per fold (share) | " + " | ".join(a.methods) + " | U-Net / rf |",
             "|---|" + "---|" * (len(a.methods) + 1)]  # fmt: skip
    for f in a.fractions:
        cells_md = [f"{by[m, f]['test_rmse'][0]:.2f} +- {by[m, f]['test_rmse'][1]:.2f}" for m in a.methods]
        share = f"{shares[f]:.3f}" if shares else "-"
        n = by[a.methods[0], f]["train_labels_per_fold"]
        lines.append(f"| {n:.0f} ({f:g}) | {' | '.join(cells_md)} | {share} |")
    if line is not None:
        lines += [
            "",
            f"U-Net / rf = {line['intercept']:.3f} {line['slope_per_doubling']:+.3f} x log2(train labels per fold)"
            + (f" (slope +- {line['slope_se']:.3f})" if "slope_se" in line else "")
            + f"; extrapolated to 0.9 at {line['labels_at_0.9']:.0f} labels per fold"
            + (f" ({line['labels_at_0.9_steep']:.0f} with the slope one s.e. steeper)" if "slope_se" in line else "")
            + " (an extrapolation, not a measurement).",
        ]
    vg = label_variogram(data_dir)
    lines += [
        "",
        "Labels' semivariogram (pairs in the same tile): "
        + ", ".join(f"{b['from_px']}-{b['to_px']} px {b['gamma']:.1f} m2 ({b['pairs']} pairs)" for b in vg["bins"])
        + f". Nugget + exponential fit: nugget {vg['nugget']:.1f} m2 (a floor of {math.sqrt(vg['nugget']):.2f} m "
        f"RMSE; without a model, the first bin bounds it: at most {math.sqrt(vg['bins'][0]['gamma']):.2f} m), sill "
        f"{vg['sill']:.1f} m2, range {vg['range_px']:.0f} px; variance of all labels {vg['label_var']:.1f} m2.",
    ]
    print(header + "\n".join(lines))
    if a.json:
        report = {"header": header, "rows": rows, "summary": summary, "line": line, "variogram": vg}
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
