"""How far averaging seeds takes one configuration, and what no number of seeds removes.

    python bench/seed_ensembles.py RUNS [RUNS ...] [--baseline PATH_WITH_{fold}] [--weights 0.2,0.3,0.5]
        [--json FILE]

``RUNS``: a ``config_screen.py`` variant folder (``OUT/runs/NAME``), holding one ``final_train`` run per seed and
outer fold, ``s{seed}_f{fold}/predictions.parquet``. Every run of a fold must have predicted the same labelled
pixels (same folds, same data).

For each K from 1 to the number of seeds S, every K-subset of the seeds is averaged (the mean of the members' means,
per outer fold, as ``final_train --ensemble`` combines them), its test predictions are pooled over the folds, and
the mean squared error is averaged over the subsets. For members that differ only in their seed that average is
exactly ``B + V / K``:

- ``V``: the members' seed-to-seed variance (unbiased, over the S seeds), averaged over the test pixels;
- ``B = MSE(all S averaged) - V / S``: the error of an ensemble of infinitely many seeds. It is what the
  configuration gets wrong on average (its bias) plus the labels' own noise, and averaging seeds cannot lower it.

The table prints the measured curve beside that line, and ``sqrt(B)``, the RMSE an unlimited seed ensemble of the
configuration would reach on these test labels.

``--baseline``: another model's runs, one per outer fold (``{fold}`` in the path, e.g. a ``tune_agb.baseline``
output ``.../rft_f{fold}/rf``). The all-seed average is blended with it, ``w U-Net + (1 - w) baseline``, at the fixed
``--weights`` and at the weight that fits the val labels best (least squares, within [0, 1]). The val labels also
chose each U-Net run's best epoch, so that weight leans towards the U-Net.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

KEY = ["tile", "row", "col"]


def read_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int, int]]]:
    """(labels, means, pixel keys) of one run's ``split`` rows, ordered by tile, row and col."""
    import pandas as pd

    d = pd.read_parquet(path)
    d = d[d["split"] == split].sort_values(KEY)
    if d.empty:
        raise SystemExit(f"{path}: no {split} rows")
    keys = list(zip(d["tile"], d["row"].astype(int), d["col"].astype(int), strict=True))
    return d["label"].to_numpy(float), d["mean"].to_numpy(float), keys


def runs_of(folder: Path) -> dict[int, dict[int, Path]]:
    """{fold: {seed: predictions.parquet}} of a variant folder; every fold with the same seeds."""
    found: dict[int, dict[int, Path]] = {}
    for p in sorted(folder.glob("s*_f*/predictions.parquet")):
        m = re.fullmatch(r"s(\d+)_f(\d+)", p.parent.name)
        if m:
            found.setdefault(int(m[2]), {})[int(m[1])] = p
    if not found:
        raise SystemExit(f"{folder}: no s{{seed}}_f{{fold}}/predictions.parquet")
    seeds = {tuple(sorted(v)) for v in found.values()}
    if len(seeds) != 1:
        raise SystemExit(f"{folder}: the folds hold different seeds ({sorted(seeds)}); finish or remove the runs")
    return dict(sorted(found.items()))


def members(folder: Path, split: str) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Per outer fold: the labels (n,) and the members' means (S, n), pixels aligned; and the seeds."""
    labels, means, seeds = [], [], []
    for fold, by_seed in runs_of(folder).items():
        seeds = sorted(by_seed)
        first = None
        rows = []
        for s in seeds:
            y, m, keys = read_split(by_seed[s], split)
            if first is None:
                first = (y, keys)
            elif keys != first[1] or not np.array_equal(y, first[0]):
                raise SystemExit(f"{by_seed[s]}: other {split} pixels than seed {seeds[0]}'s run of fold {fold}")
            rows.append(m)
        labels.append(first[0])
        means.append(np.stack(rows))
    return labels, means, seeds


def pooled_mse(labels: list[np.ndarray], preds: list[np.ndarray]) -> float:
    """Mean squared error over the folds' pixels together."""
    se = sum(float(((p - y) ** 2).sum()) for y, p in zip(labels, preds, strict=True))
    return se / sum(len(y) for y in labels)


def k_curve(labels: list[np.ndarray], means: list[np.ndarray]) -> list[float]:
    """Pooled MSE of the K-seed average, averaged over every K-subset of the seeds, for K = 1 .. S."""
    s = means[0].shape[0]
    out = []
    for k in range(1, s + 1):
        subsets = list(itertools.combinations(range(s), k))
        out.append(sum(pooled_mse(labels, [m[list(c)].mean(0) for m in means]) for c in subsets) / len(subsets))
    return out


def bias_variance(labels: list[np.ndarray], means: list[np.ndarray]) -> tuple[float, float]:
    """(B, V): V the seeds' unbiased variance of the means averaged over the pooled pixels; B the all-seed average's
    MSE less V / S. The K-subset average MSE is B + V / K exactly."""
    s = means[0].shape[0]
    if s < 2:
        raise SystemExit("at least 2 seeds are needed to separate the seeds' variance from the rest")
    n = sum(len(y) for y in labels)
    v = sum(float(m.var(0, ddof=1).sum()) for m in means) / n
    return pooled_mse(labels, [m.mean(0) for m in means]) - v / s, v


def fit_weight(y: np.ndarray, u: np.ndarray, r: np.ndarray) -> float:
    """The w in [0, 1] minimising the squared error of w u + (1 - w) r against y."""
    d = u - r
    den = float((d * d).sum())
    return 0.5 if den == 0 else float(np.clip(((y - r) * d).sum() / den, 0.0, 1.0))


def baseline_means(pattern: str, folds: int, split: str, labels: list[np.ndarray]) -> list[np.ndarray]:
    """The baseline's means per fold, aligned with the U-Net runs' pixels (same labels required)."""
    out = []
    for j in range(folds):
        path = Path(pattern.replace("{fold}", str(j))) / "predictions.parquet"
        if not path.exists():
            raise SystemExit(f"--baseline: {path} not found")
        y, m, _ = read_split(path, split)
        if not np.array_equal(y, labels[j]):
            raise SystemExit(f"--baseline: {path} holds other {split} pixels than the U-Net runs of fold {j}")
        out.append(m)
    return out


def analyse(folder: Path, baseline: str | None, weights: list[float]) -> dict[str, Any]:
    labels, means, seeds = members(folder, "test")
    curve = k_curve(labels, means)
    b, v = bias_variance(labels, means)
    res: dict[str, Any] = {
        "runs": str(folder),
        "seeds": seeds,
        "folds": len(labels),
        "test_n": int(sum(len(y) for y in labels)),
        "rmse_by_k": [math.sqrt(x) for x in curve],
        "line_rmse_by_k": [math.sqrt(max(b + v / k, 0.0)) for k in range(1, len(seeds) + 1)],
        "bias_mse": b,
        "seed_variance": v,
        "rmse_unlimited_seeds": math.sqrt(max(b, 0.0)),
    }
    if baseline:
        avg = [m.mean(0) for m in means]
        base = baseline_means(baseline, len(labels), "test", labels)
        vy, vm, _ = members(folder, "val")
        vb = baseline_means(baseline, len(vy), "val", vy)
        w_val = fit_weight(np.concatenate(vy), np.concatenate([m.mean(0) for m in vm]), np.concatenate(vb))
        blend = {
            f"{w:g}": math.sqrt(pooled_mse(labels, [w * u + (1 - w) * r for u, r in zip(avg, base, strict=True)]))
            for w in [0.0, *weights, 1.0]
        }
        res["baseline"] = baseline
        res["blend_rmse"] = blend
        res["val_weight"] = w_val
        res["val_weight_rmse"] = math.sqrt(
            pooled_mse(labels, [w_val * u + (1 - w_val) * r for u, r in zip(avg, base, strict=True)])
        )
    return res


def markdown(results: list[dict[str, Any]]) -> str:
    s = max(len(r["seeds"]) for r in results)
    lines = [
        "| runs | test labels | " + " | ".join(f"K={k}" for k in range(1, s + 1)) + " | V (m²) | B (m²) | "
        "unlimited seeds |",
        "|---|---|" + "---|" * s + "---|---|---|",
    ]
    for r in results:
        cells = [f"{m:.2f} ({line:.2f})" for m, line in zip(r["rmse_by_k"], r["line_rmse_by_k"], strict=True)]
        cells += [""] * (s - len(cells))
        lines.append(
            f"| {r['runs']} | {r['test_n']} | " + " | ".join(cells) + f" | {r['seed_variance']:.1f} | "
            f"{r['bias_mse']:.1f} | {r['rmse_unlimited_seeds']:.2f} |"
        )
    blends = [r for r in results if "blend_rmse" in r]
    if blends:
        ws = list(blends[0]["blend_rmse"])
        lines += [
            "",
            "| runs (all seeds averaged), w U-Net + (1 - w) baseline | "
            + " | ".join(f"w={w}" for w in ws)
            + " | w fitted on val |",
            "|---|" + "---|" * len(ws) + "---|",
        ]
        for r in blends:
            lines.append(
                f"| {r['runs']} | "
                + " | ".join(f"{r['blend_rmse'][w]:.2f}" for w in ws)
                + f" | {r['val_weight_rmse']:.2f} (w={r['val_weight']:.2f}) |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="config_screen variant folders (OUT/runs/NAME)")
    p.add_argument("--baseline", help="another model's run per outer fold, {fold} in the path")
    p.add_argument("--weights", default="0.2,0.3,0.5", help="fixed U-Net weights of the blends")
    p.add_argument("--json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    weights = [float(w) for w in a.weights.split(",") if w.strip()]
    if any(not 0.0 <= w <= 1.0 for w in weights):
        raise SystemExit(f"--weights: each must be in [0, 1], got {a.weights!r}")
    results = [analyse(Path(r), a.baseline, weights) for r in a.runs]
    print(f"Command: `python bench/seed_ensembles.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print("RMSE (m) of the K-seed average, mean over K-subsets (in brackets: sqrt(B + V / K))\n")
    print(markdown(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
