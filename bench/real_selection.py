"""Selection you can trust on the real tiles (issue 11): every method, several seeds, test RMSE / R2 / coverage.

    python bench/real_selection.py [--data ../shared/data/gedi-s1s2-real] [--seeds 0,1,2]
        [--space search_spaces/real-cpu.yaml] [--set SECTION.KEY=VALUE ...] [--cv-k 3] [--cv-block 2]
        [--top-k 3] [--methods ridge,rf,default,search,top_k,cv_search,cv_folds] [--out DIR] [--json FILE]

Methods, each run once per seed ``s`` on the same tiles (train/val/test of ``--data``), every one scored on the
test split after the variance calibration it ships with (``scale``, fitted on validation or, for the cv methods, on
the fold models' out-of-fold predictions):

- ``ridge``: ``tune_agb.baseline --model ridge`` (deterministic: its seeds agree);
- ``rf``: ``tune_agb.baseline --model rf --seed s``;
- ``rf_texture``: the same forest with ``--texture-windows 3,7,15`` (each band's local standard deviation over 3, 7
  and 15 px windows as features: the strongest baseline without a network, not in the default ``--methods``);
- ``default``: ``tune_agb.final_train --seed s``, the engine's default configuration;
- ``search``: ``tune_agb.search`` of ``--space`` on one validation split (its ``cv:`` section dropped; searcher
  seed and ``fixed.seed`` = s), then ``final_train --experiment`` (the best configuration retrained on train,
  selected on val);
- ``top_k``: ``final_train --experiment (the search above) --ensemble-top K``;
- ``cv_search``: the same space with ``cv: {k, block_size, seed: s}`` (spatial k-fold over train+val), then
  ``final_train --experiment`` (``--cv-final retrain``: the best configuration retrained on train+val for the epoch
  count the fold mean was best at; calibration on out-of-fold predictions);
- ``cv_folds``: ``final_train --experiment (the cv search) --cv-final folds``: the best trial's k fold models kept
  as an ensemble (no training);
- ``cv_top_k``: ``final_train --experiment (the cv search) --ensemble-top K``: the K best configurations by fold
  mean, each retrained on train+val for its own best epoch count (calibration on the ensemble's out-of-fold
  prediction);
- ``cv_top_k_seeds``: the same with ``--ensemble N`` (``--seeds-per-config``, default 3): each of the K
  configurations trained with N seeds, K x N members (asked for by name; not in the default ``--methods``).

**Outer spatial cross-validation** (``--outer-k K``): the 2 test tiles of the real data hold 70 labels, too few to
tell methods apart or to check coverage to +-5 points. With ``--outer-k K`` every tile is a test tile once: the
tiles (named ``tile_ROW_COL``) are ordered along the grid by column, then row, and cut into K contiguous strips
holding about as many labels each. Outer fold j tests on strip j; its val is the tiles that follow the strip in
that order (wrapping round) until they hold ``--outer-val-share`` of the labels, and its train is the rest. Each
outer fold is a folder of links under ``--out`` in the dataset layout, and every method runs on each fold as above.
A method's row for a seed then pools the test predictions of all K folds (every labelled pixel of the data once),
and a third table lists each fold's test RMSE, the calibration factor the method shipped and the factor that would
have been right on that fold's test (``fit_scale`` of its uncalibrated sigma on the test labels).

The time budget of the space is switched off (every search runs all its trials, so results do not depend on the
machine's speed); ``--set experiment.num_samples=N`` sizes the searches. Everything is kept under ``--out``: a rerun
with the same ``--out`` reads back every finished search and run, so an interrupted run continues where it stopped.

Summary per method over the seeds: mean +- sd of test RMSE, R2, 1-sigma and 2-sigma coverage (calibrated, and
uncalibrated for reference), and issue 11's goals: a tuned method (search, top_k and the cv ones) beats rf's
mean test RMSE by >= 10 %; its seed-to-seed sd of test RMSE is at most half of ``default``'s; calibrated coverage
68 +- 5 % and 95 +- 3 %.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_efficiency import apply_changes, folders, parse_change  # same folder: one space editor

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    "ridge", "rf", "rf_texture", "default", "search", "top_k", "cv_search", "cv_folds", "cv_top_k", "cv_top_k_seeds"
]  # fmt: skip
DEFAULT_METHODS = [m for m in METHODS if m not in ("rf_texture", "cv_top_k_seeds")]
TEXTURE = "3,7,15"  # rf_texture's windows (px)
TUNED = ["search", "top_k", "cv_search", "cv_folds", "cv_top_k", "cv_top_k_seeds"]
KEYS = ["rmse", "r2", "within_1sigma", "within_2sigma"]


def done(run: Path) -> dict[str, Any] | None:
    """The metrics of a finished run (its ``metrics.json`` and ``seconds.json``), None when it has not finished."""
    m, t = run / "metrics.json", run / "seconds.json"
    if m.exists() and t.exists():
        return json.loads(m.read_text()) | json.loads(t.read_text())
    return None


def timed(run: Path, fn, *args) -> dict[str, Any]:
    """Run ``fn(*args)`` unless ``run`` already finished; the metrics with the seconds it took."""
    if (got := done(run)) is not None:
        print(f"{run}: reusing", flush=True)
        return got | {"run": str(run)}
    start = time.perf_counter()
    code = fn(*args)
    if code not in (0, None):
        raise SystemExit(f"{run}: exited with {code}")
    (run / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return done(run) | {"run": str(run)}


def baseline(method: str, seed: int, out: Path, data: list[str]) -> dict[str, Any]:
    import tune_agb.baseline

    run = out / "runs" / f"{method}_s{seed}"
    model, windows = ("rf", TEXTURE) if method == "rf_texture" else (method, "")

    def go() -> None:
        tune_agb.baseline.run([model], **folders(data), seed=seed, texture_windows=windows, out_dir=run, overwrite=True)
        for name in ("metrics.json", "predictions.parquet", "calibration.json"):  # OUT/MODEL/* -> OUT/*
            (run / model / name).replace(run / name)

    return timed(run, go)


def final(run: Path, options: dict[str, Any], data: list[str]) -> dict[str, Any]:
    """A final_train run (``options``: :func:`tune_agb.final_train.run`'s arguments) into ``run``, unless it
    finished; its metrics with the seconds it took."""
    import tune_agb.final_train

    def go() -> None:
        tune_agb.final_train.run(**options, **folders(data), out_dir=run, progress=False, overwrite=True)

    return timed(run, go)


def search(space: dict[str, Any], name: str, out: Path, data: list[str]) -> tuple[str, float]:
    """Run (or reuse) one search; its experiment folder and the seconds it took."""
    import tune_agb.search

    exp = out / "searches" / name
    timing = out / "searches" / f"{name}.seconds.json"
    if (exp / "best.yaml").exists() and timing.exists():
        print(f"{exp}: reusing", flush=True)
        return str(exp), json.loads(timing.read_text())["seconds"]
    path = out / "spaces" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    start = time.perf_counter()
    outcome = tune_agb.search.run(path, storage=out / "searches", name=name, resume=exp.exists(), **folders(data))
    print(outcome.summary(), flush=True)
    if not outcome.complete or outcome.best is None:
        raise SystemExit(f"{name}: the search did not finish ({outcome.incomplete or 'no finite result'})")
    secs = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": secs}))
    return str(exp), secs


def row(method: str, seed: int, m: dict[str, Any], search_s: float = 0.0) -> dict[str, Any]:
    r = {"method": method, "seed": seed, "seconds": m["seconds"] + search_s}
    r |= {f"test_{k}": m[f"test_{k}"] for k in KEYS}
    r |= {f"raw_{k}": m["uncalibrated"][f"test_{k}"] for k in KEYS[2:]}
    r["test_n"] = m.get("test_n")
    r["run"] = m["run"]
    return r


def run_seed(seed: int, a: argparse.Namespace, base: dict[str, Any], out: Path, data: list[str]) -> list[dict]:
    rows = []
    runs = out / "runs"
    for model in ("ridge", "rf", "rf_texture"):
        if model in a.methods:
            rows.append(row(model, seed, baseline(model, seed, out, data)))
    if "default" in a.methods:
        rows.append(row("default", seed, final(runs / f"default_s{seed}", {"seed": seed}, data)))
    seeded = apply_changes(base, {"searcher.seed": seed, "fixed.seed": seed})
    if {"search", "top_k"} & set(a.methods):  # selection on val: without the space's cv section, if it has one
        exp, secs = search({k: v for k, v in seeded.items() if k != "cv"}, f"search_s{seed}", out, data)
        if "search" in a.methods:
            rows.append(row("search", seed, final(runs / f"search_s{seed}", {"experiment": exp}, data), secs))
        if "top_k" in a.methods:
            options = {"experiment": exp, "ensemble_top": a.top_k}
            rows.append(row("top_k", seed, final(runs / f"top_k_s{seed}", options, data), secs))
    if {"cv_search", "cv_folds", "cv_top_k", "cv_top_k_seeds"} & set(a.methods):
        cv = {"k": a.cv_k, "block_size": a.cv_block, "seed": seed}
        exp, secs = search(seeded | {"cv": cv}, f"cv_s{seed}", out, data)
        for method, mode in (("cv_search", "retrain"), ("cv_folds", "folds")):
            if method in a.methods:
                options = {"experiment": exp, "cv_final": mode}
                rows.append(row(method, seed, final(runs / f"{method}_s{seed}", options, data), secs))
        for method, seeds in (("cv_top_k", 1), ("cv_top_k_seeds", a.seeds_per_config)):
            if method in a.methods:
                options = {"experiment": exp, "ensemble_top": a.top_k, "ensemble": seeds}
                rows.append(row(method, seed, final(runs / f"{method}_s{seed}", options, data), secs))
    return rows


TILE = re.compile(r"^tile_(\d+)_(\d+)$")


def outer_splits(labels: dict[str, int], k: int, val_share: float) -> list[dict[str, list[str]]]:
    """K outer folds of ``labels`` (tile name -> labelled pixels): contiguous strips of the grid, see the docstring.

    Raises:
        SystemExit: a name that is not ``tile_ROW_COL``, or more folds than tiles.
    """
    if bad := [n for n in labels if not TILE.match(n)]:
        raise SystemExit(f"--outer-k: tile names must be tile_ROW_COL to be placed on the grid; got {bad[0]!r}")
    if not 2 <= k <= len(labels):
        raise SystemExit(f"--outer-k: must be 2 to {len(labels)} (the tiles); got {k}")
    order = sorted(labels, key=lambda n: tuple(int(v) for v in TILE.match(n).groups())[::-1])  # column, then row
    return strip_folds(order, labels, k, val_share)


def strip_folds(order: list[str], labels: dict[str, int], k: int, val_share: float) -> list[dict[str, list[str]]]:
    """K outer folds of the tiles in ``order`` (a line through the ground, so that neighbours stay together): K
    contiguous strips holding about as many of ``labels`` each; a fold's val follows its strip (wrapping round)."""
    total = sum(labels.values())
    strips: list[list[str]] = [[] for _ in range(k)]
    seen = 0
    for i, name in enumerate(order):
        # the strip whose share of the labels this tile's middle falls in, never leaving a later strip empty
        j = min(int((seen + labels[name] / 2) / total * k), k - 1)
        j = max(j, k - (len(order) - i))
        j = min(j, max((x for x, s in enumerate(strips) if s), default=-1) + 1)
        strips[j].append(name)
        seen += labels[name]
    folds = []
    for test in strips:
        rest = order[order.index(test[-1]) + 1 :] + order[: order.index(test[0])]
        val: list[str] = []
        for name in rest:
            if sum(labels[n] for n in val) >= val_share * total:
                break
            val.append(name)
        folds.append({"test": test, "val": val, "train": [n for n in rest if n not in val]})
    return folds


def outer_data(data_dir: Path, fold: dict[str, list[str]], where: Path) -> list[str]:
    """The dataset layout of one outer fold under ``where``, as links to ``data_dir``'s files; final_train's flags."""
    source = {p.stem: p for p in data_dir.glob("inputs/*/*.npy")}
    for side in ("inputs", "labels"):
        for split, names in fold.items():
            folder = where / side / split
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                link = folder / f"{name}.npy"
                if not link.exists():
                    os.symlink(data_dir / side / source[name].parent.name / f"{name}.npy", link)
    return ["--input-dir", str(where / "inputs"), "--label-dir", str(where / "labels")]


def tile_labels(data_dir: Path) -> dict[str, int]:
    import numpy as np

    return {p.stem: int(np.isfinite(np.load(p)).sum()) for p in sorted(data_dir.glob("labels/*/*.npy"))}


def run_test(run: str | Path) -> tuple[Any, dict[str, Any], str]:
    """A finished run's test rows of ``predictions.parquet`` (a DataFrame), its ``calibration.json`` and its loss."""
    import pandas as pd

    d = pd.read_parquet(Path(run) / "predictions.parquet")
    cal = json.loads((Path(run) / "calibration.json").read_text())
    return d[d["split"] == "test"], cal, cal.get("loss", "gaussian_nll")


def right_scale_on_test(test: Any, loss: str) -> float:
    """The sigma factor (``fit_scale``) fitted on the test rows themselves (uncalibrated sigma): what would have
    been right."""
    from tune_agb.engine.calibration import fit_scale

    y, mu, raw = (test[c].to_numpy(float) for c in ("label", "mean", "std_uncalibrated"))
    return fit_scale(y, mu, raw**2, loss)


def pooled(method: str, seed: int, fold_rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One row for a method and seed over all outer folds (their test predictions pooled), and one row per fold."""
    import numpy as np
    import pandas as pd

    from tune_agb.engine.calibration import sigma_halfwidth

    tests, halves, per_fold = [], [], []
    for j, r in enumerate(fold_rows):
        d, cal, loss = run_test(r["run"])
        tests.append(d)
        # each fold's run scores its intervals under its own distribution: (pixels, k = 1, 2) half-widths in sigma
        halves.append(np.tile([sigma_halfwidth(1, loss), sigma_halfwidth(2, loss)], (len(d), 1)))
        per_fold.append(
            {
                "method": method,
                "seed": seed,
                "fold": j,
                "test_n": len(d),
                "test_rmse": r["test_rmse"],
                "scale": cal.get("scale", math.nan),
                "calibrated_on": cal.get("split", "?"),
                "test_scale": right_scale_on_test(d, loss),
            }
        )
    d = pd.concat(tests)
    y, mu = d["label"].to_numpy(np.float64), d["mean"].to_numpy(np.float64)
    err = np.abs(y - mu)
    row = {"method": method, "seed": seed, "seconds": sum(r["seconds"] for r in fold_rows), "test_n": len(d)}
    row["test_rmse"] = float(np.sqrt(np.mean(err**2)))
    row["test_r2"] = float(1 - np.sum(err**2) / np.sum((y - y.mean()) ** 2))
    half = np.concatenate(halves)
    for prefix, col in (("test", "std"), ("raw", "std_uncalibrated")):
        inside = err[:, None] <= half * d[col].to_numpy(np.float64)[:, None]
        row[f"{prefix}_within_1sigma"], row[f"{prefix}_within_2sigma"] = (float(c) for c in inside.mean(0))
    return row, per_fold


def fold_markdown(per_fold: list[dict[str, Any]]) -> list[str]:
    head = "| seed | method | fold | test labels | test RMSE | factor shipped (fitted on) | factor right for test |"
    lines = ["", head]
    lines.append("|---|---|---|---|---|---|---|")
    for f in per_fold:
        lines.append(
            f"| {f['seed']} | {f['method']} | {f['fold']} | {f['test_n']} | {f['test_rmse']:.2f} | "
            f"{f['scale']:.2f} ({f['calibrated_on']}) | {f['test_scale']:.2f} |"
        )
    return lines


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarise(rows: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    out = []
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if rs:
            s = {"method": m, "seeds": len(rs), "minutes": statistics.fmean(r["seconds"] for r in rs) / 60}
            for k in [f"test_{k}" for k in KEYS] + [f"raw_{k}" for k in KEYS[2:]]:
                s[k] = mean_sd([r[k] for r in rs])
            out.append(s)
    return out


def goal_lines(summary: list[dict[str, Any]]) -> list[str]:
    by = {s["method"]: s for s in summary}
    lines = []
    rf = by.get("rf", {}).get("test_rmse", (math.nan,))[0]
    tex = by.get("rf_texture", {}).get("test_rmse", (math.nan,))[0]
    default_sd = by.get("default", {}).get("test_rmse", (math.nan, math.nan))[1]
    for m in TUNED:
        if m not in by:
            continue
        s = by[m]
        mean, sd = s["test_rmse"]
        c1, c2 = s["test_within_1sigma"][0] * 100, s["test_within_2sigma"][0] * 100
        verdict = [
            f"test RMSE {mean:.2f} vs rf {rf:.2f} ({(mean / rf - 1) * 100:+.1f} %; goal <= -10 %): "
            + ("met" if mean <= 0.9 * rf else "MISSED")
            + (f" (vs rf_texture {tex:.2f}: {(mean / tex - 1) * 100:+.1f} %)" if not math.isnan(tex) else ""),
            f"seed sd {sd:.2f} vs default's {default_sd:.2f} (goal <= half): "
            + ("met" if sd <= default_sd / 2 else "MISSED"),
            f"1-sigma {c1:.1f} % (68 +- 5): " + ("met" if abs(c1 - 68) <= 5 else "MISSED"),
            f"2-sigma {c2:.1f} % (95 +- 3): " + ("met" if abs(c2 - 95) <= 3 else "MISSED"),
        ]
        lines.append(f"- {m}: " + "; ".join(verdict))
    return lines


def fmt(pair: tuple[float, float], pct: bool = False) -> str:
    f = 100.0 if pct else 1.0
    mean, sd = pair
    return f"{mean * f:.{1 if pct else 2}f} ± {sd * f:.{1 if pct else 2}f}"


def markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    lines.append("| seed | method | test RMSE | test R² | 1σ coverage (raw) | 2σ coverage (raw) | minutes |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['method']} | {r['test_rmse']:.2f} | {r['test_r2']:.3f} | "
            f"{r['test_within_1sigma'] * 100:.1f} % ({r['raw_within_1sigma'] * 100:.1f} %) | "
            f"{r['test_within_2sigma'] * 100:.1f} % ({r['raw_within_2sigma'] * 100:.1f} %) | {r['seconds'] / 60:.1f} |"
        )
    lines += [
        "",
        "| method | seeds | test RMSE | test R² | 1σ coverage | 2σ coverage | 1σ / 2σ uncalibrated | "
        "minutes per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['seeds']} | {fmt(s['test_rmse'])} | {fmt(s['test_r2'])} | "
            f"{fmt(s['test_within_1sigma'], True)} % | {fmt(s['test_within_2sigma'], True)} % | "
            f"{s['raw_within_1sigma'][0] * 100:.1f} / {s['raw_within_2sigma'][0] * 100:.1f} % | {s['minutes']:.1f} |"
        )
    return "\n".join([*lines, "", *goal_lines(summary)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data",
        default=str(ROOT.parent / "shared" / "data" / "gedi-s1s2-real"),
        help="a folder with inputs/ and labels/ in the dataset layout",
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "real-cpu.yaml"))
    p.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE for both searches (repeatable)")
    p.add_argument("--cv-k", type=int, default=3)
    p.add_argument("--cv-block", type=int, default=2, help="cv block side in tile steps")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--seeds-per-config", type=int, default=3, help="cv_top_k_seeds: seeds of each configuration")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--outer-k", type=int, default=0, help="outer spatial folds over all the tiles (0: --data's split)")
    p.add_argument("--outer-val-share", type=float, default=0.15, help="share of the labels in an outer fold's val")
    p.add_argument("--out", help="folder for searches and runs (default: a temporary one)")
    p.add_argument("--json", help="also write the rows and the summary to this JSON file")
    a = p.parse_args(argv)
    a.methods = [m for m in a.methods.split(",") if m]
    if not 0 < a.outer_val_share < 1:
        p.error(f"--outer-val-share: must be between 0 and 1 (a share of the labels); got {a.outer_val_share}")
    if bad := [m for m in a.methods if m not in METHODS]:
        p.error(f"--methods: unknown {', '.join(bad)}; known: {', '.join(METHODS)}")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    data_dir = Path(a.data)
    data = ["--input-dir", str(data_dir / "inputs"), "--label-dir", str(data_dir / "labels")]
    base = yaml.safe_load(Path(a.space).read_text())
    base["experiment"]["time_budget_s"] = None  # every search runs all its trials, whatever the machine's speed
    base.pop("final", None)  # each method says how its final model is built: the space's final: recipe is not used
    base = apply_changes(base, dict(parse_change(s, "--set") for s in a.set))
    out = Path(a.out or tempfile.mkdtemp(prefix="real_selection_"))
    (out / "runs").mkdir(parents=True, exist_ok=True)

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows: list[dict[str, Any]] = []
    per_fold: list[dict[str, Any]] = []
    folds = outer_splits(tile_labels(data_dir), a.outer_k, a.outer_val_share) if a.outer_k else []
    for j, fold in enumerate(folds):
        print(f"outer fold {j}: " + "; ".join(f"{s} {' '.join(n[5:] for n in fold[s])}" for s in fold), flush=True)
    start = time.perf_counter()
    try:
        for i, seed in enumerate(seeds):
            if not folds:
                rows += run_seed(seed, a, base, out, data)
            else:
                got = []
                for j, fold in enumerate(folds):
                    where = out / f"outer{j}"
                    (where / "runs").mkdir(parents=True, exist_ok=True)
                    got.append(run_seed(seed, a, base, where, outer_data(data_dir, fold, where / "data")))
                for m in a.methods:
                    r, f = pooled(m, seed, [next(r for r in g if r["method"] == m) for g in got])
                    rows.append(r)
                    per_fold += f
            el = time.perf_counter() - start
            print(
                f"[{el / 60:.1f} min after {i + 1} of {len(seeds)} seeds; about {el / (i + 1) * len(seeds) / 60:.0f}"
                " min in all]",
                flush=True,
            )
    finally:
        ray.shutdown()
    summary = summarise(rows, a.methods)
    ex = base["experiment"]
    header = (
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads. Data "
        f"{data_dir}. Space {a.space} ({ex['num_samples']} trials, no time budget), cv k={a.cv_k} blocks of "
        f"{a.cv_block}x{a.cv_block} tiles, top-K K={a.top_k}. Seeds {a.seeds}. "
        + (
            f"Outer spatial folds: {a.outer_k} (val share {a.outer_val_share}); every row pools their test "
            "predictions. "
            if folds
            else ""
        )
        + f"Wall time of this run: "
        f"{(time.perf_counter() - start) / 60:.1f} min (reused results included; the minutes column counts the search "
        f"in every method that uses it).\nCommand: `python bench/real_selection.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`"
    )
    text = markdown(rows, summary, header) + ("\n".join(fold_markdown(per_fold)) if per_fold else "")
    print("\n" + text)
    print(f"\nsearches and runs in {out}")
    if a.json:
        got = {"header": header, "rows": rows, "summary": summary, "folds": per_fold}
        Path(a.json).write_text(json.dumps(got, indent=1))


if __name__ == "__main__":
    main()
