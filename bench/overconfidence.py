"""One overconfident member at one pixel (issue 31): how ensembles combine their members and how the sigma factor
is fitted, compared side by side on the same finished runs. Nothing is trained.

    python bench/region_transfer.py --directions pooledcv --methods recipe_cv ... --out DIR   # first: the runs
    python bench/overconfidence.py --out DIR --seeds 0,2 [--directions pooledcv,ab,ba] [--runaway SD] [--json FILE]

For each pooled outer fold's ``recipe_cv_s<seed>`` run, or a transfer direction's (``ab``: trained on region A,
tested on B), the shipped recipe (a cross-validated search's top configurations retrained on train+val, ``distance``
calibration fitted on the search's out-of-fold pixels), the script reads back

- the out-of-fold prediction of every configuration's fold models (:func:`tune_agb.cv.out_of_fold`), and
- the test prediction of every final member (its ``best.pt``),

and scores every pair of a member combination and a sigma-factor estimator:

combinations of the members' means ``m`` and variances ``v`` at a pixel (weights ``w``, summing to 1; the mixture's
variance is always ``sum(w (v + (m - mean)^2))``):

- ``best``: no ensemble, the best configuration alone (its fold models out of fold, its retrained model on test):
  what ``final_train --experiment`` without ``ensemble_top`` ships;
- ``mean``: equal weights (the deep-ensemble mixture);
- ``precision``: ``w ~ 1 / v`` (what final_train shipped in the fifth to seventh runs);
- ``floor``: ``w ~ 1 / max(v, median(v) / 4)``: precision weights, but no member counts more than 4 times a member
  with the median variance (a member that claims a far smaller variance than the others gains no more);
- ``random_effects``: ``w ~ 1 / (v + tau^2)``, ``tau^2`` the variance of the members' means at the pixel (members
  that disagree by more than their variances say are weighted alike);
- ``sigma``: ``w ~ 1 / sqrt(v)``: between equal and precision weights;
- ``median``: the member whose mean is the median of the members' (the middle two alike for an even count);
- ``screen``: equal weights among the members whose mean lies within ``SCREEN`` times the members' median sigma of
  the median mean (all members if none does): the equal-weight mixture without a member far off the others;
- ``floor_linear``: ``floor``, then its mean mapped by ``a + b mean``, ``a`` and ``b`` the least-squares fit of the
  labels on the mean over the out-of-fold pixels (undoes a shrinkage towards the mean label that the fold models
  show).

estimators of the factor ``s`` on sigma, fitted on the out-of-fold pixels with the ``distance`` widening applied
(``z = r / (sigma g)``; ``h(p)`` the half-width of the distribution's central ``p`` interval in sigmas):

- ``nll``: the NLL-optimal factor (Gaussian ``sqrt(mean z^2)``, Laplacian ``mean(|r| / b)``), what final_train
  shipped until this comparison;
- ``median``: ``median(|z|) / h(0.5)``: the factor that puts half the fit pixels inside the 50 % interval;
- ``q68``: ``quantile(|z|, 0.6827) / h(0.6827)``: the factor that puts 68.27 % inside the 1-sigma interval
  (what :func:`tune_agb.engine.calibration.fit_scale` ships since).

A row: seed, fold (or ``all``: the outer folds' test pixels pooled, each fold with its own fit), combination,
estimator, the fitted factor, the out-of-fold pixels' largest z^2 (before the factor), test RMSE and bias, 1σ / 2σ
coverage and median 1σ width.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibration_transfer import nll_scale  # same folder: the NLL factor of earlier runs
from region_transfer import interval_figures  # same folder: one definition of coverage and width

COMBINES = ("best", "mean", "precision", "floor", "random_effects", "sigma", "median", "screen", "floor_linear")
SCREEN = 3.0  # screen: how many median sigmas a member's mean may lie from the median mean
ESTIMATORS = ("nll", "median", "q68")


def combine(means: np.ndarray, varis: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(members, pixels) means and variances -> the mixture's mean and variance under weighting ``rule``; ``floor``
    is the engine's :func:`~tune_agb.engine.inference.combine_members`, the rule that ships."""
    if rule == "best":
        return means[0], varis[0]
    if rule in ("floor", "floor_linear"):  # floor_linear's map is fitted in variants
        import torch

        from tune_agb.engine.inference import combine_members

        return tuple(t.numpy() for t in combine_members(torch.from_numpy(means), torch.from_numpy(varis)))
    v = np.maximum(varis, np.finfo(np.float64).tiny)
    if rule == "mean":
        w = np.ones_like(v)
    elif rule == "precision":
        w = 1 / v
    elif rule == "random_effects":
        w = 1 / (v + means.var(axis=0))
    elif rule == "sigma":
        w = 1 / np.sqrt(v)
    elif rule == "median":
        k = len(means)
        rank = means.argsort(0).argsort(0)
        w = ((rank == (k - 1) // 2) | (rank == k // 2)).astype(np.float64)
    elif rule == "screen":
        w = (np.abs(means - np.median(means, 0)) <= SCREEN * np.median(np.sqrt(v), 0)).astype(np.float64)
        w[:, w.sum(0) == 0] = 1.0
    else:
        raise ValueError(rule)
    w = w / w.sum(0)
    mean = (w * means).sum(0)
    return mean, (w * (varis + (means - mean) ** 2)).sum(0)


def factor(r: np.ndarray, sd: np.ndarray, loss: str, estimator: str) -> float:
    """The sigma factor of ``estimator`` for residuals ``r`` and (widened) sigma ``sd``."""
    from tune_agb.engine.calibration import interval_halfwidth

    if estimator == "nll":  # the closed forms final_train shipped until this comparison
        return nll_scale(r, sd, loss)
    p = {"median": 0.5, "q68": 0.6827}[estimator]
    return float(np.quantile(np.abs(r) / sd, p) / interval_halfwidth(p, loss))


def member_test(run: Path, plan: Any, tiles: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, Any]:
    """Every final member's test prediction at the labelled pixels: means and variances (members, pixels), and the
    first member's evaluation (labels, pixel positions)."""
    import torch

    from tune_agb.engine.data import SplitFeed
    from tune_agb.engine.device import resolve_amp
    from tune_agb.engine.inference import load_member
    from tune_agb.engine.train import evaluate_split

    dev = torch.device("cpu")
    evals = []
    for mp in plan.members:
        m = load_member(mp.out / "best.pt", dev)
        feed = SplitFeed(tiles["test"], m.norm, dev, m.config.data_mode)
        evals.append(
            evaluate_split(m.model, feed, m.config, m.norm, m.config.batch_size, resolve_amp(m.config, dev), keep=())
        )
    stack = [np.stack([getattr(e, a).double().numpy() for e in evals]) for a in ("mean", "var")]
    return stack[0], stack[1], evals[0]


def fold_sample(run: Path, exp: Path, data: Path) -> dict[str, Any]:
    """What the variants need from one finished run: out-of-fold and test means/variances per member, labels,
    the ``distance`` widening of each pixel, and the loss."""
    from tune_agb.cv import merge_train_val, out_of_fold
    from tune_agb.engine.calibration import Calibration, fit_band_distance, labelled_bands, pixel_bands
    from tune_agb.final_train.ensemble import cv_fold_states, ensemble_loss, out_of_fold_bands
    from tune_agb.final_train.plan import FinalOptions, apply_recipe, make_plan
    from tune_agb.store import DataSource

    opts = FinalOptions(
        experiment=str(exp), input_dir=str(data / "inputs"), label_dir=str(data / "labels"), out_dir=str(run)
    )
    plan = make_plan(apply_recipe(opts, {}), check_out=False)
    src = DataSource(str(plan.input_dir), str(plan.label_dir), in_channels=plan.cfg.in_channels).open()
    tiles = src.tiles
    oofs = [out_of_fold(states, tiles, plan.cv.folds) for states in cv_fold_states(plan)]
    both = merge_train_val(tiles)["train"]
    mean, icov, ref = fit_band_distance(labelled_bands(both.inputs, both.labels))
    shape = Calibration("distance", 1.0, band_mean=mean, band_icov=icov, distance_ref=ref)
    tm, tv, ev = member_test(run, plan, tiles)
    return {
        "loss": ensemble_loss([mp.cfg for mp in plan.members]),
        "oof_y": oofs[0].y,
        "oof_m": np.stack([o.mean for o in oofs]),
        "oof_v": np.stack([o.var for o in oofs]),
        "oof_g": shape.widening(out_of_fold_bands(oofs[0], both)),
        "oof_flat": oofs[0].flat,
        "tile_shape": tuple(both.inputs.shape[-2:]),
        "test_y": ev.y.double().numpy(),
        "test_m": tm,
        "test_v": tv,
        "test_g": shape.widening(pixel_bands(tiles["test"].inputs, ev.tile, ev.flat)),
    }


def variants(s: dict[str, Any]) -> dict[tuple[str, str], dict[str, np.ndarray | float]]:
    """Per (combination, estimator): the factor, the largest out-of-fold z^2, and the test errors and sigma."""
    out = {}
    for rule in COMBINES:
        om, ov = combine(s["oof_m"], s["oof_v"], rule)
        tm, tv = combine(s["test_m"], s["test_v"], rule)
        if rule == "floor_linear":
            b, a = np.polyfit(om, s["oof_y"], 1)
            om, tm = a + b * om, a + b * tm
        r, sd = s["oof_y"] - om, np.sqrt(ov) * s["oof_g"]
        max_z2 = float(np.max((r / sd) ** 2))
        for est in ESTIMATORS:
            f = factor(r, sd, s["loss"], est)
            out[rule, est] = {
                "factor": f,
                "max_z2": max_z2,
                "err": tm - s["test_y"],  # signed: prediction - label
                "sd": np.sqrt(tv) * s["test_g"] * f,
            }
    return out


def edge_share(s: dict[str, Any], z2_min: float = 100.0, edge: int = 2) -> str:
    """How many single fold models' out-of-fold pixels have z^2 (their own sigma) above ``z2_min``, and how many of
    those lie within ``edge`` px of a tile's border, against the share of border pixels among all."""
    h, w = s["tile_shape"]
    row, col = s["oof_flat"] // w, s["oof_flat"] % w
    near = (np.minimum(row, h - 1 - row) < edge) | (np.minimum(col, w - 1 - col) < edge)
    z2 = (s["oof_y"] - s["oof_m"]) ** 2 / s["oof_v"]
    bad = z2 > z2_min
    return (
        f"{int(bad.sum())} member-pixels of {z2.size} with z^2 > {z2_min:g} ({int((bad & near).sum())} within {edge} "
        f"px of a border, where {100 * near.mean():.1f} % of the labelled pixels lie); largest z^2 {z2.max():.3g}"
    )


def figures(err: np.ndarray, sd: np.ndarray, loss: str) -> dict[str, float]:
    """Test RMSE, bias (mean of prediction - label), coverage and width of signed errors ``err`` under ``sd``."""
    fig = interval_figures(np.abs(err), sd, loss)
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "bias": float(np.mean(err)),
        "within_1sigma": fig["within_1sigma"],
        "within_2sigma": fig["within_2sigma"],
        "median_width_1sigma": fig["median_width_1sigma"],
    }


def bases(out: Path, direction: str, folds: list[int]) -> list[tuple[Any, Path]]:
    """(fold, folder) of each run of a direction: the pooled outer folds, or one transfer direction's folder."""
    if direction == "pooledcv":
        return [(j, out / "pooledcv" / f"fold{j}") for j in folds]
    return [(direction, out / direction)]


def with_runaway(s: dict[str, Any], sd: float, seed: int = 0) -> dict[str, Any]:
    """``s`` with its last final member made a runaway on the test pixels: its mean lowered by ``|N(0, sd)|`` at
    each pixel and its variance grown by the square of that (a member that runs away knows it less there, as the
    fifth run's did), or, with ``sd`` negative, lowered by ``|N(0, -sd)|`` with its variance left as it was (one
    that does not know it). The fold models are left alone: the runaway appears on the new region only."""
    off = np.abs(np.random.default_rng(seed).normal(0.0, abs(sd), size=s["test_m"].shape[1]))
    m, v = s["test_m"].copy(), s["test_v"].copy()
    m[-1] -= off
    if sd > 0:
        v[-1] += off**2
    return s | {"test_m": m, "test_v": v}


def rows_for_seed(out: Path, seed: int, where: list[tuple[Any, Path]], runaway: float = 0.0) -> list[dict[str, Any]]:
    rows, pooled = [], {}
    for j, base in where:
        run, exp = base / "runs" / f"recipe_cv_s{seed}", base / "searches" / f"recipe_cv_s{seed}"
        if not (run / "metrics.json").is_file():
            print(f"{run}: not finished, skipped", flush=True)
            continue
        s = fold_sample(run, exp, base / "data")
        if runaway:
            s = with_runaway(s, runaway)
        shipped = json.loads((run / "metrics.json").read_text())
        print(f"seed {seed} fold {j}: shipped factor {shipped['calibration']['scale']:.4f}, test RMSE "
              f"{shipped['test_rmse']:.4f}; {edge_share(s)}", flush=True)  # fmt: skip
        for key, v in variants(s).items():
            rows.append({"seed": seed, "fold": j, "combine": key[0], "estimator": key[1], "factor": v["factor"],
                         "max_z2": v["max_z2"]} | figures(v["err"], v["sd"], s["loss"]))  # fmt: skip
            acc = pooled.setdefault(key, {"err": [], "sd": [], "loss": s["loss"]})
            acc["err"].append(v["err"])
            acc["sd"].append(v["sd"])
        print(f"seed {seed} fold {j}: read", flush=True)
    for key, acc in pooled.items() if len(where) > 1 else ():
        err, sd = np.concatenate(acc["err"]), np.concatenate(acc["sd"])
        rows.append(
            {"seed": seed, "fold": "all", "combine": key[0], "estimator": key[1]} | figures(err, sd, acc["loss"])
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| seed | fold | combine | estimator | factor | max OOF z² | RMSE (m) | bias (m) | 1σ / 2σ coverage "
        "| 1σ median width (m) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = f"{r['factor']:.2f}" if "factor" in r else ""
        z = f"{r['max_z2']:.3g}" if "max_z2" in r else ""
        lines.append(
            f"| {r['seed']} | {r['fold']} | {r['combine']} | {r['estimator']} | {f} | {z} | {r['rmse']:.2f} | "
            f"{r['bias']:+.2f} | "
            f"{100 * r['within_1sigma']:.1f} / {100 * r['within_2sigma']:.1f} % | {r['median_width_1sigma']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="region_transfer.py's --out folder")
    p.add_argument("--seeds", default="0")
    p.add_argument("--folds", default="0,1,2", help="pooledcv: the outer folds")
    p.add_argument("--directions", default="pooledcv", help="pooledcv, ab, ba (comma-separated)")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--runaway", type=float, default=0.0, metavar="SD", help="make the last member a runaway on test (with_runaway)"
    )
    a = p.parse_args(argv)
    rows = []
    folds = [int(f) for f in a.folds.split(",")]
    for direction in a.directions.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            rows += rows_for_seed(a.out, seed, bases(a.out, direction, folds), a.runaway)
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
