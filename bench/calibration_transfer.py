"""Does a variance calibration carry over to new ground? Read back a ``real_selection.py --outer-k K`` run and, per
method, score the pooled test pixels of its outer folds under several sigma factors (issue 11).

    python bench/calibration_transfer.py --out DIR [--seeds 0,1,2] [--methods ...]

``DIR`` is the ``--out`` folder of ``bench/real_selection.py --outer-k K``: ``outerJ/data`` (the fold's tiles),
``outerJ/runs/METHOD_sSEED`` (each run's ``predictions.parquet`` and ``calibration.json``) and, for the cv methods,
``outerJ/searches/cv_sSEED``. Nothing is trained. For each run the factor on sigma is fitted on the sample its
calibration was fitted on, two ways:

- ``nll``: the factor that minimises the NLL of the sample (what ``--calibration scale`` fitted until 0.2; it now
  fits a 68.27 % quantile, :func:`tune_agb.engine.calibration.fit_scale`);
- ``coverage``: the factor whose calibrated central intervals best match their nominal levels on the sample (least
  squares over the reliability diagram's 20 levels, under the run's own distribution; a grid of 2,000 factors).

The sample is the val split (``predictions.parquet``'s val rows) for a single-split run, and the out-of-fold
predictions of the best trial's fold models for ``cv_search`` and ``cv_folds`` (recomputed from the search's
checkpoint, as final_train does). ``cv_top_k`` is left out: its sample combines several trials' fold models.
Each factor is applied to the run's uncalibrated test sigma; a row gives the pooled test coverage of the 68.27 % and
95.45 % intervals (``within_1sigma`` / ``within_2sigma``), with ``raw`` (factor 1) and ``test`` (``fit_scale``
on the test pixels themselves: what would have been right) for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tune_agb.engine.calibration import RELIABILITY_LEVELS, interval_halfwidth, sigma_halfwidth

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_selection import right_scale_on_test, run_test  # same folder: one reader of a run's test rows

METHODS = ["ridge", "rf", "default", "search", "top_k", "cv_search", "cv_folds"]
FACTORS = ["raw", "nll", "coverage", "test"]


def nll_scale(r: np.ndarray, sd: np.ndarray, loss: str) -> float:
    """The NLL-optimal factor on sigma ``sd`` for residuals ``r``: Gaussian ``sqrt(mean((r / sd)^2))``, Laplacian
    ``mean(|r| / b)`` with ``b = sd / sqrt(2)``."""
    z = np.abs(r) / sd
    return float(np.mean(z * np.sqrt(2))) if loss == "laplacian_nll" else float(np.sqrt(np.mean(z**2)))


def coverage_scale(r: np.ndarray, sd: np.ndarray, loss: str, levels: tuple[float, ...] = RELIABILITY_LEVELS) -> float:
    """The factor ``s`` on sigma whose central intervals (``+- s * halfwidth(level) * sd``) hold shares of the
    residuals ``r`` closest to their nominal levels (least squares over ``levels``), on a log grid 0.2 .. 5."""
    a = np.abs(np.asarray(r, float)) / np.asarray(sd, float)
    z = np.array([interval_halfwidth(lvl, loss) for lvl in levels])
    grid = np.exp(np.linspace(np.log(0.2), np.log(5.0), 2000))
    inside = np.sort(a)
    shares = np.searchsorted(inside, np.outer(grid, z), side="right") / a.size  # (grid, levels)
    return float(grid[int(np.argmin(((shares - np.asarray(levels)) ** 2).sum(1)))])


def sample(method: str, seed: int, fold: Path, run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y, mean, var)`` of the sample the run's calibration was fitted on (uncalibrated variance)."""
    if method in ("cv_search", "cv_folds"):
        from tune_agb.cv import out_of_fold
        from tune_agb.runs import read_cv_best
        from tune_agb.store import DataSource

        best = read_cv_best(str(fold / "searches" / f"cv_s{seed}"))
        data = DataSource(str(fold / "data" / "inputs"), str(fold / "data" / "labels")).open()
        oof = out_of_fold(best.fold_states(), data.tiles, best.folds)
        return oof.y, oof.mean, oof.var
    d = pd.read_parquet(run / "predictions.parquet")
    v = d[d["split"] == "val"]
    return v["label"].to_numpy(float), v["mean"].to_numpy(float), v["std_uncalibrated"].to_numpy(float) ** 2


def transfer(out: Path, method: str, seed: int) -> dict[str, Any] | None:
    """Pooled test coverage of one method and seed under each factor; None when a fold's run is missing."""
    inside: dict[str, list[np.ndarray]] = {f: [] for f in FACTORS}
    factors: dict[str, list[float]] = {f: [] for f in FACTORS}
    folds = sorted(out.glob("outer*"), key=lambda p: int(p.name[5:]))
    for fold in folds:
        run = fold / "runs" / f"{method}_s{seed}"
        if not (run / "metrics.json").exists():
            return None
        t, _, loss = run_test(run)
        y, mean, var = sample(method, seed, fold, run)
        err = np.abs(t["label"].to_numpy(float) - t["mean"].to_numpy(float))
        sd = t["std_uncalibrated"].to_numpy(float)
        got = {
            "raw": 1.0,
            "nll": nll_scale(y - mean, np.sqrt(var), loss),
            "coverage": coverage_scale(y - mean, np.sqrt(var), loss),
            "test": right_scale_on_test(t, loss),
        }
        halves = np.array([sigma_halfwidth(1, loss), sigma_halfwidth(2, loss)])
        for name, s in got.items():
            factors[name].append(s)
            inside[name].append(err[:, None] <= s * halves[None, :] * sd[:, None])
    row: dict[str, Any] = {"method": method, "seed": seed, "folds": len(folds)}
    for name in FACTORS:
        c = np.concatenate(inside[name]).mean(0)
        row[name] = {"within_1sigma": float(c[0]), "within_2sigma": float(c[1]), "factors": factors[name]}
    row["test_n"] = int(sum(len(x) for x in inside["raw"]))
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | seed | test labels | " + " | ".join(f"{f}: 1σ / 2σ (factors)" for f in FACTORS) + " |",
        "|---|---|---|" + "---|" * len(FACTORS),
    ]
    for r in rows:
        cells = [
            f"{r[f]['within_1sigma'] * 100:.1f} / {r[f]['within_2sigma'] * 100:.1f} % "
            f"({', '.join(f'{s:.2f}' for s in r[f]['factors'])})"
            for f in FACTORS
        ]
        lines.append(f"| {r['method']} | {r['seed']} | {r['test_n']} | " + " | ".join(cells) + " |")
    lines += ["", "| method | seeds | " + " | ".join(f"{f}: 1σ / 2σ, mean over seeds" for f in FACTORS) + " |"]
    lines.append("|---|---|" + "---|" * len(FACTORS))
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        cells = [
            f"{np.mean([r[f]['within_1sigma'] for r in rs]) * 100:.1f} / "
            f"{np.mean([r[f]['within_2sigma'] for r in rs]) * 100:.1f} %"
            for f in FACTORS
        ]
        lines.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the --out folder of real_selection.py --outer-k K")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    out = Path(a.out)
    if not list(out.glob("outer*")):
        raise SystemExit(f"--out: {out} holds no outerJ folder (run bench/real_selection.py --outer-k K there)")
    rows = []
    for seed in (int(s) for s in a.seeds.split(",") if s.strip()):
        for m in (m for m in a.methods.split(",") if m):
            if m not in METHODS:
                raise SystemExit(f"--methods: unknown {m}; known: {', '.join(METHODS)}")
            if (row := transfer(out, m, seed)) is not None:
                rows.append(row)
    print(f"Command: `python bench/calibration_transfer.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
