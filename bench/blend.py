"""The recipe's U-Net ensemble blended with a per-pixel forest (issue 31), scored side by side on the same finished
runs. Nothing is trained.

    python bench/region_transfer.py --methods rf,rf_texture,recipe_cv --directions pooledcv ... --out DIR  # first
    python bench/blend.py --out DIR --seeds 0 [--directions pooledcv,ab,ba] [--weights 0,0.25,0.5,0.75,1] [--json F]
        [--forest-calibration scale|isotonic|distance|none]

The U-Net runs must be of the U-Nets alone: since ``search_spaces/real-cpu.yaml`` ships ``final: {forest: 0.5}``,
its ``recipe_cv`` runs are already the mixture; run ``region_transfer.py`` with ``--cv-set final.forest=null`` to
blend. For a transfer direction (``ab``: trained on region A, tested on every tile of B) the runs are
``DIR/ab/runs/{recipe_cv,rf,rf_texture}_s<seed>``; for ``pooledcv`` each outer fold's runs
(``DIR/pooledcv/fold<j>/runs/...``), their test pixels pooled (each tile tested once). The test pixels of the recipe
and of each forest are matched by tile, row and column, and every weight ``w`` on the U-Net scores the mixture of
the two predictive distributions (calibrated sigmas as each run ships them; a U-Net run calibrated for Laplacian
intervals has its sigma refitted for Gaussian ones, as ``final_train --forest`` does):

    mean = w m_u + (1 - w) m_f,    var = w (s_u^2 + (m_u - mean)^2) + (1 - w) (s_f^2 + (m_f - mean)^2)

``w = 1`` is the recipe as shipped, ``w = 0`` the forest (with the forest's own sigma). The weights are fixed before
looking at any test pixel (no weight is fitted on test); ``0.5`` is the candidate. A row: direction, seed, forest,
w, test RMSE, bias, R², 1σ / 2σ coverage (Gaussian intervals, as ``final_train --forest`` reads the mixture) and
median 1σ width, and the correlation of the two models' errors. ``w = 1`` is then the U-Net part as the mixture uses
it (for a Laplacian run, not its own coverage). :func:`tune_agb.forest_mix.mixture` is the formula.

``--forest-calibration METHOD`` calibrates each forest run's sigma anew by METHOD on its own val rows (their
uncalibrated sigma; ``distance`` reads the bands of the direction's or fold's ``data/`` tiles), as ``final_train
--forest`` calibrates its forest part with the run's ``--calibration`` (the recipe's: ``distance``); without it
each forest keeps the sigma its run shipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_selection import run_test  # same folder: a finished run's test rows, calibration and loss
from region_transfer import interval_figures  # coverage and widths of the intervals, as region_transfer scores them

from tune_agb.engine.calibration import METHODS

KEY = ["tile", "row", "col"]


def runs_of(out: Path, direction: str, method: str, seed: int) -> list[Path]:
    """The finished runs of one method: one per outer fold for ``pooledcv``, else the direction's one run."""
    if direction == "pooledcv":
        folds = sorted((out / direction).glob("fold*"), key=lambda p: int(p.name[4:]))
        return [f / "runs" / f"{method}_s{seed}" for f in folds]
    return [out / direction / "runs" / f"{method}_s{seed}"]


def forest_recalibrated(run: Path, method: str) -> Any:
    """A forest run's test rows with sigma calibrated by ``method`` on its val rows, as final_train's forest part
    (:func:`tune_agb.forest_mix.fit_forest_part`); the tiles are the run's ``../../data/{inputs,labels}``."""
    import pandas as pd

    from tune_agb.baseline import LOSS
    from tune_agb.engine.calibration import fit_calibration, labelled_bands, pixel_bands
    from tune_agb.store import DataSource

    data = run.parent.parent / "data"
    tiles = DataSource(str(data / "inputs"), str(data / "labels")).open().tiles
    d = pd.read_parquet(run / "predictions.parquet")

    def bands(split: str, rows: Any) -> np.ndarray:
        ts, w = tiles[split], tiles[split].inputs.shape[-1]
        index = rows["tile"].map({n: i for i, n in enumerate(ts.names)}).to_numpy()
        return pixel_bands(ts.inputs, index, (rows["row"] * w + rows["col"]).to_numpy())

    val, test = d[d["split"] == "val"], d[d["split"] == "test"]
    y, mean, raw = (val[c].to_numpy(np.float64) for c in ("label", "mean", "std_uncalibrated"))
    shift = {}
    if method == "distance":
        shift = {"bands": bands("val", val), "reference": labelled_bands(tiles["train"].inputs, tiles["train"].labels)}
    cal = fit_calibration(method, y, mean, raw**2, LOSS, split="val", **shift)
    var = cal.variance(test["std_uncalibrated"].to_numpy(np.float64) ** 2, bands("test", test) if shift else None)
    return test.assign(std=np.sqrt(var))


def paired(unet_runs: list[Path], forest_runs: list[Path], forest_calibration: str | None = None) -> tuple[Any, str]:
    """The test pixels of both models matched by tile, row and column (outer folds pooled), and the loss the mixture
    is read under: Gaussian, as ``final_train --forest`` reads it. A U-Net run calibrated for Laplacian intervals has
    its sigma refitted for Gaussian ones as final_train does then (the same quantile over the Gaussian's half-width
    1 instead of the Laplacian's 0.81: sigma x 0.81). ``forest_calibration``: calibrate each forest's sigma anew by
    that method (:func:`forest_recalibrated`); None: as its run shipped."""
    import pandas as pd

    from tune_agb.engine.calibration import SCALE_LEVEL, interval_halfwidth
    from tune_agb.forest_mix import MIXTURE_LOSS

    frames = []
    for u, f in zip(unet_runs, forest_runs, strict=True):
        du, _, loss = run_test(u)
        du = du.assign(
            std=du["std"] * interval_halfwidth(SCALE_LEVEL, loss) / interval_halfwidth(SCALE_LEVEL, MIXTURE_LOSS)
        )
        df = run_test(f)[0] if forest_calibration is None else forest_recalibrated(f, forest_calibration)
        m = du[[*KEY, "label", "mean", "std"]].merge(
            df[[*KEY, "label", "mean", "std"]], on=KEY, suffixes=("_u", "_f"), validate="one_to_one"
        )
        if len(m) != len(du) or len(m) != len(df):
            raise SystemExit(f"{u} and {f}: {len(du)} and {len(df)} test pixels, {len(m)} in common")
        if not np.allclose(m["label_u"], m["label_f"]):
            raise SystemExit(f"{u} and {f}: the labels differ at matched pixels")
        frames.append(m)
    return pd.concat(frames, ignore_index=True), MIXTURE_LOSS


def mixture(mu: np.ndarray, su: np.ndarray, mf: np.ndarray, sf: np.ndarray, w: float) -> tuple[np.ndarray, np.ndarray]:
    """The mean and sigma of the two-component mixture with weight ``w`` on the first component (the U-Net): the
    final model's forest part (:func:`tune_agb.forest_mix.mixture`, weight ``1 - w`` on the forest)."""
    from tune_agb.forest_mix import mixture as forest_mixture

    mean, var = forest_mixture(mu, su**2, mf, sf**2, 1 - w)
    return mean, np.sqrt(var)


def blend_rows(d: Any, weights: list[float], loss: str) -> list[dict[str, float]]:
    """One row of test figures per weight on the U-Net."""
    y = d["label_u"].to_numpy(np.float64)
    mu, su, mf, sf = (d[c].to_numpy(np.float64) for c in ("mean_u", "std_u", "mean_f", "std_f"))
    rho = float(np.corrcoef(mu - y, mf - y)[0, 1])
    rows = []
    for w in weights:
        mean, sd = mixture(mu, su, mf, sf, w)
        err = np.abs(mean - y)
        row = {
            "w": w,
            "n": len(y),
            "rmse": float(np.sqrt(np.mean(err**2))),
            "bias": float(np.mean(mean - y)),
            "r2": float(1 - np.sum(err**2) / np.sum((y - y.mean()) ** 2)),
            "error_correlation": rho,
        }
        rows.append(row | interval_figures(err, sd, loss))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| direction | seed | forest | w (U-Net) | test RMSE (m) | bias (m) | R² | 1σ / 2σ coverage "
        "| median 1σ width (m) | error correlation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['direction']} | {r['seed']} | {r['forest']} | {r['w']:g} | {r['rmse']:.2f} | {r['bias']:+.2f} | "
            f"{r['r2']:.3f} | {100 * r['within_1sigma']:.1f} / {100 * r['within_2sigma']:.1f} % | "
            f"{r['median_width_1sigma']:.1f} | {r['error_correlation']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="region_transfer.py's --out folder")
    p.add_argument("--seeds", default="0")
    p.add_argument("--directions", default="pooledcv,ab,ba")
    p.add_argument("--forests", default="rf,rf_texture")
    p.add_argument("--unet", default="recipe_cv", help="the U-Net method's run name (without _s<seed>)")
    p.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="weights on the U-Net, comma-separated, in [0, 1]")
    p.add_argument("--forest-calibration", choices=METHODS,
                   help="calibrate the forests anew on val by this method, as final_train --forest")  # fmt: skip
    p.add_argument("--json")
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.directions = a.directions.split(",")
    a.forests = a.forests.split(",")
    a.weights = [float(w) for w in a.weights.split(",")]
    if bad := [w for w in a.weights if not 0 <= w <= 1]:
        p.error(f"--weights: {bad} outside [0, 1]")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out, rows = Path(a.out), []
    for seed in a.seeds:
        for direction in a.directions:
            unet = runs_of(out, direction, a.unet, seed)
            if not all((r / "predictions.parquet").exists() for r in unet):
                print(f"skipped {direction} seed {seed}: no finished {a.unet} runs under {out}", file=sys.stderr)
                continue
            for forest in a.forests:
                d, loss = paired(unet, runs_of(out, direction, forest, seed), a.forest_calibration)
                info = {"direction": direction, "seed": seed, "forest": forest}
                if a.forest_calibration:
                    info["forest_calibration"] = a.forest_calibration
                rows += [info | r for r in blend_rows(d, a.weights, loss)]
    print(f"machine: {platform.node()}, {os.cpu_count()} cores; out: {out}\n")
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
