"""Region transfer on the two real regions (issue 31): train on one region's tiles, test on every tile of the other,
both ways; the documented recipe beside the per-pixel forests fitted on the same labels.

    python bench/region_transfer.py [--a ../shared/data/gedi-s1s2-real] [--b ../shared/data/gedi-s1s2-real-b]
        [--seeds 0] [--methods rf,rf_texture,recipe] [--directions ab,ba] [--out DIR] [--json FILE]

A direction ``ab`` trains on region A's train tiles, selects and calibrates on A's val tiles, and tests on all of
region B's tiles (its train, val and test): the layout is a folder of links under ``--out`` (``ab/data``). Methods:

- ``rf``, ``rf_texture``: ``tune_agb.baseline --model rf`` (the texture forest with ``--texture-windows 3,7,15``),
  as in ``bench/real_selection.py``;
- ``recipe``: what the README tells a user to run, with no further flags: ``python -m tune_agb.search --space
  search_spaces/real-cpu.yaml`` on the direction's train+val, then ``python -m tune_agb.final_train --experiment``
  (the space's ``final:`` section builds the final model). Seed 0 runs the space as shipped (its time budget
  included, so ``minutes`` is what a user waits on this machine); another seed sets ``searcher.seed``,
  ``fixed.seed`` and ``cv.seed``. Since the sixth run the shipped space selects on 3 spatial folds (its ``cv:``
  section); the ``recipe`` rows of earlier runs selected on val: ``--space`` of that file
  (``git show 92c3c44:search_spaces/real-cpu.yaml``) runs it again.
- ``recipe_cv``: the recipe with model selection on spatial folds of the training region's train+val tiles: the same
  space with ``cv: {k: --cv-k, block_size: --cv-block, seed}`` and any ``--cv-set`` changes (a cv trial trains k
  models, so fewer trials fit the time), then ``final_train --experiment`` (the space's ``final:`` section: its
  ensemble members retrained on train+val, the sigma calibration fitted on the search's out-of-fold pixels). On the
  val-selection space with ``--cv-set experiment.num_samples=12 --cv-set searcher.n_startup_trials=5 --cv-set
  experiment.time_budget_s=1080`` it is the space shipped since the sixth run.
- ``recipe_cv_seeds``: recipe_cv's search (run once, shared), its final with ``--ensemble 3``: three seeds of each
  of the 3 configurations (9 members; ``real_selection.py``'s ``cv_top_k_seeds``).

Every run is scored on the other region's labelled pixels: RMSE, R², the shares of labels inside the calibrated
1-sigma and 2-sigma intervals (and uncalibrated), and the intervals' full width in metres, median and mean over
the pixels (so that a wider interval is not the only fix: a calibration that reaches its coverage by widening
everywhere shows here).
Two sigma factors are also tried on the recipe's test pixels, without training anything:

- ``right``: the factor (``fit_scale``) fitted on the test pixels themselves (what would have been right; a
  reference, not a method);
- ``cross``: the factor that was right in the *other* direction, applied on top of the shipped calibration: what a
  user who has measured one region shift would widen by (needs both directions).

Everything is kept under ``--out``; a rerun reads back finished searches and runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_selection import TILE, baseline, final, outer_data, outer_splits, run_test, search, strip_folds, tile_labels
from search_efficiency import apply_changes, parse_change

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
METHODS = ["rf", "rf_texture", "recipe", "recipe_cv", "recipe_cv_seeds"]
# final_train options of a method beyond its search space's final: section, and the search it shares
FINAL_OPTIONS = {"recipe_cv_seeds": {"ensemble": 3}}
SEARCH_OF = {"recipe_cv_seeds": "recipe_cv"}
SPLITS = ("train", "val", "test")


def transfer_layout(train_region: Path, test_region: Path, where: Path) -> list[str]:
    """The dataset layout of one direction under ``where`` as links: train and val from ``train_region``'s train and
    val splits, test = every tile of ``test_region``. Returns the ``--input-dir/--label-dir`` flags.

    Raises:
        SystemExit: a tile name found in both regions (the layout could not tell them apart), or an empty split.
    """
    picks = {"train": [("train", train_region)], "val": [("val", train_region)]}
    return layout(picks | {"test": [(s, test_region) for s in SPLITS]}, where)


def pooled_layout(regions: list[Path], where: Path) -> list[str]:
    """Both regions in one layout, each split the union of the regions' own (``pooled``: train on both)."""
    return layout({s: [(s, r) for r in regions] for s in SPLITS}, where)


def layout(picks: dict[str, list[tuple[str, Path]]], where: Path) -> list[str]:
    """Links under ``where`` for each split of ``picks`` (split -> the (split, region) folders it takes)."""
    seen: dict[str, Path] = {}
    for side in ("inputs", "labels"):
        for split, sources in picks.items():
            folder = where / side / split
            folder.mkdir(parents=True, exist_ok=True)
            names = []
            for source_split, region in sources:
                for f in sorted((region / side / source_split).glob("*.npy")):
                    if side == "inputs":
                        if f.stem in seen and seen[f.stem] != f:
                            raise SystemExit(f"{f}: the tile name {f.stem!r} is in both regions ({seen[f.stem]})")
                        seen[f.stem] = f
                    link = folder / f.name
                    if not link.exists():
                        os.symlink(f.resolve(), link)
                    names.append(f.stem)
            if not names:
                raise SystemExit(f"{where}: no {side} tile for {split} (from {[str(r) for _, r in sources]})")
    return ["--input-dir", str(where / "inputs"), "--label-dir", str(where / "labels")]


def pooled_cv_folds(regions: dict[str, Path], k: int, val_share: float) -> list[dict[str, dict[str, list[str]]]]:
    """K outer folds over every tile of every region: each region is cut into K strips on its own (``tile_ROW_COL``
    names along the grid, as ``real_selection.py --outer-k``; other names in the order of the number they end with,
    each tile its own block, neighbouring ids kept together), and fold j tests on strip j of every region, with its
    val the tiles that follow the strip in each region (``val_share`` of that region's labels). Returns, per fold,
    region key -> {split: tile names}.

    Raises:
        SystemExit: fewer tiles in a region than folds.
    """
    per_region = {}
    for key, root in regions.items():
        labels = tile_labels(root)
        if len(labels) < k:
            raise SystemExit(f"--outer-k {k}: {root} has only {len(labels)} tiles")
        if all(TILE.match(n) for n in labels):
            per_region[key] = outer_splits(labels, k, val_share)
        else:
            order = sorted(labels, key=lambda n: (int(re.search(r"(\d*)$", n).group(1) or -1), n))
            per_region[key] = strip_folds(order, labels, k, val_share)
    return [{key: folds[j] for key, folds in per_region.items()} for j in range(k)]


def pooled_cv_layout(regions: dict[str, Path], fold: dict[str, dict[str, list[str]]], where: Path) -> list[str]:
    """The dataset layout of one pooled outer fold under ``where`` (links into each region); the data flags."""
    for key, names in fold.items():
        flags = outer_data(regions[key], names, where)
    return flags


def test_rows(runs: str | Path | list) -> tuple[Any, str]:
    """The test rows of one finished run, or of several (outer folds: each tile tested once) pooled, and the loss."""
    import pandas as pd

    got = [run_test(r) for r in (runs if isinstance(runs, list) else [runs])]
    return pd.concat([d for d, _, _ in got]), got[0][2]


def score(
    runs: str | Path | list,
    factor: float = 1.0,
    regions: dict[str, set[str]] | None = None,
    skip: set[str] = frozenset(),
    offset: float = 0.0,
) -> dict[str, float]:
    """A finished run's test figures (several runs: their test rows pooled); ``factor`` multiplies the calibrated
    sigma and ``offset`` is added to the mean; ``regions`` (name -> tile names) adds each region's test RMSE
    (``rmse_NAME``); the tiles in ``skip`` are left out."""
    d, loss = test_rows(runs)
    if skip:
        d = d[~d["tile"].isin(skip)]
    y, mu = d["label"].to_numpy(np.float64), d["mean"].to_numpy(np.float64) + offset
    err = np.abs(y - mu)
    out = {
        "n": len(d),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": float(1 - np.sum(err**2) / np.sum((y - y.mean()) ** 2)),
        "bias": float(np.mean(mu - y)),
    }
    if regions:  # pooled: each region's own test RMSE too
        for key, names in regions.items():
            pick = d["tile"].isin(names).to_numpy()
            out[f"rmse_{key}"] = float(np.sqrt(np.mean(err[pick] ** 2))) if pick.any() else math.nan
    for prefix, col, f in (("", "std", factor), ("raw_", "std_uncalibrated", 1.0)):
        out |= interval_figures(err, d[col].to_numpy(np.float64) * f, loss, prefix)
    return out


def interval_figures(err: np.ndarray, sd: np.ndarray, loss: str, prefix: str = "") -> dict[str, float]:
    """The shares of absolute errors ``err`` inside the 1σ and 2σ intervals of sigma ``sd`` (under the run's
    distribution) and the intervals' full width, mean and median over the pixels."""
    from tune_agb.engine.calibration import sigma_halfwidth

    out = {}
    for k in (1, 2):
        half = sigma_halfwidth(k, loss) * sd
        out[f"{prefix}within_{k}sigma"] = float(np.mean(err <= half))
        out[f"{prefix}width_{k}sigma"] = float(np.mean(2 * half))
        out[f"{prefix}median_width_{k}sigma"] = float(np.median(2 * half))
    return out


def right_factor(runs: str | Path | list) -> float:
    """The factor (``fit_scale``) on the *calibrated* sigma fitted on the test pixels (1: the calibration was right)."""
    from tune_agb.engine.calibration import fit_scale

    d, loss = test_rows(runs)
    y, mu, sd = (d[c].to_numpy(np.float64) for c in ("label", "mean", "std"))
    return fit_scale(y, mu, sd**2, loss)


def recipe_space(method: str, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    """The space document a recipe method searches: ``--space`` as shipped for seed 0 (another seed sets the
    searcher's, the trials' and the cv section's fold draw seed); ``recipe_cv`` sets the ``cv:`` section to
    ``--cv-k`` folds of ``--cv-block`` blocks (the seed's fold draw) and applies the ``--cv-set`` changes."""
    space = yaml.safe_load(Path(a.space).read_text())
    if seed != 0:
        space = apply_changes(space, {"searcher.seed": seed, "fixed.seed": seed})
        if "cv" in space:
            space = apply_changes(space, {"cv.seed": seed})
    if method == "recipe_cv":
        space = apply_changes(space, {"cv": {"k": a.cv_k, "block_size": a.cv_block, "seed": seed}} | a.cv_set)
    return space


def run_direction(
    name: str, seed: int, a: argparse.Namespace, out: Path, data: list[str], regions: dict[str, set[str]] | None = None
) -> list[dict[str, Any]]:
    rows = []
    for method in ("rf", "rf_texture"):
        if method in a.methods:
            m = baseline(method, seed, out, data)
            rows.append({"direction": name, "method": method, "seed": seed, "seconds": m["seconds"], "run": m["run"]})
    for method in ("recipe", "recipe_cv", "recipe_cv_seeds"):
        if method not in a.methods:
            continue
        searched = SEARCH_OF.get(method, method)
        exp, secs = search(recipe_space(searched, seed, a), f"{searched}_s{seed}", out, data)
        m = final(out / "runs" / f"{method}_s{seed}", {"experiment": exp} | FINAL_OPTIONS.get(method, {}), data)
        rows.append(
            {
                "direction": name,
                "method": method,
                "seed": seed,
                "seconds": m["seconds"] + secs,
                "search_seconds": secs,
                "run": m["run"],
                "right_factor": right_factor(m["run"]),
            }
        )
    for r in rows:
        r |= score(r["run"], regions=regions)
    return rows


def pooled_cv(
    seed: int, a: argparse.Namespace, regions: dict[str, Path], out: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every method on each pooled outer fold; one row per method over the folds (each tile tested once, each
    region's RMSE beside the whole), and the per-fold rows."""
    folds = pooled_cv_folds(regions, a.outer_k, a.outer_val_share)
    per_fold = []
    for j, fold in enumerate(folds):
        print(f"pooled outer fold {j}: " + "; ".join(f"{s} {sum(len(f[s]) for f in fold.values())} tiles"
                                                     for s in SPLITS), flush=True)  # fmt: skip
        data = pooled_cv_layout(regions, fold, out / f"fold{j}" / "data")
        per_fold += [r | {"fold": j} for r in run_direction(f"pooled CV fold {j}", seed, a, out / f"fold{j}", data)]
    tiles = {k.upper(): {n for f in folds for n in f[k]["test"]} for k in regions}
    rows = []
    for method in dict.fromkeys(r["method"] for r in per_fold):
        mine = [r for r in per_fold if r["method"] == method]
        runs = [r["run"] for r in mine]
        row = {"direction": f"pooled CV (k={a.outer_k})", "method": method, "seed": seed, "run": runs}
        row["seconds"] = sum(r["seconds"] for r in mine)
        if method.startswith("recipe"):
            row["right_factor"] = right_factor(runs)
        rows.append(row | score(runs, regions=tiles))
    return rows, per_fold


def local_rows(rows: list[dict[str, Any]], regions: dict[str, Path]) -> list[dict[str, Any]]:
    """Every transfer row (A→B, B→A) scored again after a correction fitted on the labels of the tested region's own
    val tiles (a user mapping a new region has GEDI footprints there too): ``as shipped`` (the same remaining tiles,
    nothing refitted), ``local scale`` (the sigma factor refitted on those labels) and ``local offset + scale`` (the
    mean shifted by their mean residual, then the factor refitted). The val tiles are then left out of the score."""
    from tune_agb.engine.calibration import fit_scale

    out = []
    for r in (r for r in rows if "→" in r["direction"]):
        target = regions[r["direction"][-1].lower()]
        fit = {p.stem for p in (target / "labels" / "val").glob("*.npy")}
        d, loss = test_rows(r["run"])
        d = d[d["tile"].isin(fit)]
        y, mu, sd = (d[c].to_numpy(np.float64) for c in ("label", "mean", "std"))
        offset = float(np.mean(y - mu))
        for name, off in (("as shipped", None), ("local scale", 0.0), ("local offset + scale", offset)):
            f = 1.0 if off is None else fit_scale(y, mu + off, sd**2, loss)
            row = {"direction": r["direction"], "method": f"{r['method']}, {name}", "seed": r["seed"], "factor": f}
            out.append(row | {"offset": off or 0.0, "fit_n": len(d)} | score(r["run"], f, skip=fit, offset=off or 0.0))
    return out


def cross_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recipe's rows of each direction scored again with the factor that was right in the other direction."""
    out = []
    recipe = {(r["direction"], r["seed"]): r for r in rows if r["method"] == "recipe" and "→" in r["direction"]}
    for (direction, seed), r in recipe.items():
        other = next((o for (d, s), o in recipe.items() if d != direction and s == seed), None)
        if other is None:
            continue
        f = other["right_factor"]
        out.append({"direction": direction, "method": "recipe, cross factor", "seed": seed, "factor": f}
                   | score(r["run"], f))  # fmt: skip
    return out


def markdown(rows: list[dict[str, Any]], extra: list[dict[str, Any]]) -> str:
    lines = [
        "| direction | seed | method | test labels | RMSE (m) | R² | bias (m) | 1σ coverage (raw) | 2σ coverage (raw) "
        "| 1σ / 2σ width, median (mean), m | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows + extra:
        minutes = f"{r['seconds'] / 60:.1f}" if "seconds" in r else f"factor {r['factor']:.2f}"
        minutes += f", offset {r['offset']:+.2f}" if r.get("offset") else ""
        lines.append(
            f"| {r['direction']} | {r['seed']} | {r['method']} | {r['n']} | {r['rmse']:.2f} | {r['r2']:.3f} | "
            f"{r['bias']:+.2f} | {r['within_1sigma'] * 100:.1f} % ({r['raw_within_1sigma'] * 100:.1f} %) | "
            f"{r['within_2sigma'] * 100:.1f} % ({r['raw_within_2sigma'] * 100:.1f} %) | "
            f"{r['median_width_1sigma']:.1f} / {r['median_width_2sigma']:.1f} "
            f"({r['width_1sigma']:.1f} / {r['width_2sigma']:.1f}) | {minutes} |"
        )
    lines.append("")
    for r in rows:
        if "rmse_A" in r:
            lines.append(f"- {r['direction']} seed {r['seed']} {r['method']}: test RMSE on region A's test tiles "
                         f"{r['rmse_A']:.2f} m, on region B's {r['rmse_B']:.2f} m")  # fmt: skip
    for r in rows:
        if r["method"].startswith("recipe"):
            lines.append(f"- {r['direction']} seed {r['seed']} {r['method']}: factor right for the test pixels "
                         f"{r['right_factor']:.2f} (on the shipped calibration)")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", default=str(SHARED / "gedi-s1s2-real"), help="region A's dataset folder")
    p.add_argument("--b", default=str(SHARED / "gedi-s1s2-real-b"), help="region B's dataset folder")
    p.add_argument("--seeds", default="0")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument(
        "--directions",
        default="ab,ba",
        help="ab: train on A, test on B; ba: the other way; pooled: both regions' own splits pooled; pooledcv: "
        "outer spatial folds over every tile of both regions (--outer-k)",
    )
    p.add_argument("--outer-k", type=int, default=3, help="pooledcv: outer folds (each tile a test tile once)")
    p.add_argument("--outer-val-share", type=float, default=0.15, help="pooledcv: share of a region's labels in val")
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "real-cpu.yaml"))
    p.add_argument("--cv-k", type=int, default=3, help="recipe_cv: spatial folds of the train+val tiles")
    p.add_argument("--cv-block", type=int, default=2, help="recipe_cv: block side in tile steps (tiles without "
                   "grid positions are each their own block)")  # fmt: skip
    p.add_argument("--cv-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="recipe_cv: a further change to the space (repeatable), e.g. experiment.time_budget_s=1080; "
                   "a rerun reuses a finished search of the same name whatever these say")  # fmt: skip
    p.add_argument("--out", help="folder for layouts, searches and runs (default: a temporary one)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    if bad := [m for m in a.methods if m not in METHODS]:
        p.error(f"--methods: unknown {bad}; allowed: {', '.join(METHODS)}")
    a.directions = [d for d in a.directions.split(",") if d]
    if bad := [d for d in a.directions if d not in ("ab", "ba", "pooled", "pooledcv")]:
        p.error(f"--directions: unknown {bad}; allowed: ab, ba, pooled, pooledcv")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.cv_set = dict(parse_change(c, "--cv-set") for c in a.cv_set)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(1)  # the recipe's trials run one torch thread each; final_train sets its own
    out = Path(a.out or tempfile.mkdtemp(prefix="region_transfer_"))
    regions = {"a": Path(a.a), "b": Path(a.b)}
    rows, fold_rows = [], []
    for seed in a.seeds:
        for d in a.directions:
            if d == "pooledcv":
                got = pooled_cv(seed, a, regions, out / d)
                rows += got[0]
                fold_rows += got[1]
            elif d == "pooled":
                data = pooled_layout(list(regions.values()), out / d / "data")
                tiles = {k.upper(): {p.stem for p in r.glob("labels/test/*.npy")} for k, r in regions.items()}
                rows += run_direction("pooled", seed, a, out / d, data, tiles)
            else:
                data = transfer_layout(regions[d[0]], regions[d[1]], out / d / "data")
                rows += run_direction(f"{d[0].upper()}→{d[1].upper()}", seed, a, out / d, data)
    extra = cross_rows(rows) + local_rows(rows, regions)
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}; out: {out}\n")
    print(markdown(rows, extra))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "cross": extra, "folds": fold_rows}, indent=1, default=str))
    return 0 if all(math.isfinite(r["rmse"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
