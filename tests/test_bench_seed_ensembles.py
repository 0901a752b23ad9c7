"""bench/seed_ensembles.py: the K-seed curve, its bias + variance / K line, blends with a baseline, and bad runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import seed_ensembles as se


def _pixels(rng: np.random.Generator, n: int, fold: int) -> pd.DataFrame:
    rows = rng.choice(100 * 100, n, replace=False)
    return pd.DataFrame({"tile": f"tile_{fold}", "row": rows // 100, "col": rows % 100})


def _write(path: Path, split_frames: dict[str, tuple[pd.DataFrame, np.ndarray, np.ndarray]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    parts = []
    for split, (px, y, m) in split_frames.items():
        parts.append(px.assign(split=split, label=y, mean=m, std=1.0))
    # rows written in another order than (tile, row, col): the reader must align them itself
    pd.concat(parts).sample(frac=1.0, random_state=1).to_parquet(path / "predictions.parquet")


def _screen(tmp: Path, seeds=(0, 1, 2, 3), folds=3, n=400, sigma=2.0, bias=3.0, seed=0):
    """A variant folder: member mean = label + a per-pixel bias shared by the seeds + seed noise (sd sigma)."""
    rng = np.random.default_rng(seed)
    truth = {}
    for f in range(folds):
        px = {s: _pixels(rng, n, f) for s in ("val", "test")}
        y = {s: rng.normal(20, 5, n) for s in ("val", "test")}
        b = {s: rng.normal(0, bias, n) for s in ("val", "test")}
        truth[f] = (px, y, b)
        for s in seeds:
            frames = {k: (px[k], y[k], y[k] + b[k] + rng.normal(0, sigma, n)) for k in ("val", "test")}
            _write(tmp / "runs" / "v" / f"s{s}_f{f}", frames)
    return tmp / "runs" / "v", truth


def test_curve_is_bias_plus_variance_over_k(tmp_path):
    runs, _ = _screen(tmp_path, n=3000, sigma=2.0, bias=3.0)
    labels, means, seeds = se.members(runs, "test")
    assert seeds == [0, 1, 2, 3] and len(labels) == 3
    curve = se.k_curve(labels, means)
    b, v = se.bias_variance(labels, means)
    # the subset average is exactly B + V / K
    np.testing.assert_allclose(curve, [b + v / k for k in range(1, 5)], rtol=1e-10)
    assert curve == sorted(curve, reverse=True)
    # and the parts are the generating ones: seed variance sigma^2, bias variance bias^2
    assert v == pytest.approx(4.0, rel=0.05)
    assert b == pytest.approx(9.0, rel=0.05)


def test_single_member_curve_is_the_mean_of_the_runs_mse(tmp_path):
    runs, truth = _screen(tmp_path, seeds=(0, 1), n=50)
    labels, means, _ = se.members(runs, "test")
    per_seed = [se.pooled_mse(labels, [m[s] for m in means]) for s in range(2)]
    assert se.k_curve(labels, means)[0] == pytest.approx(np.mean(per_seed))
    # labels read back aligned with the generating order after sorting by (tile, row, col)
    px, y, _ = truth[0]
    order = px["test"].sort_values(se.KEY).index
    np.testing.assert_array_equal(labels[0], y["test"][order])


def test_analyse_and_blend_with_a_baseline(tmp_path):
    runs, truth = _screen(tmp_path, seeds=(0, 1, 2), n=200)
    labels, means, _ = se.members(runs, "test")
    vy, vm, _ = se.members(runs, "val")
    # a baseline whose val predictions make y = 0.3 U + 0.7 R exactly: the val weight must come out 0.3
    rng = np.random.default_rng(5)
    for f, (px, y, _) in truth.items():
        u_val = vm[f].mean(0)
        order = px["val"].sort_values(se.KEY).index
        r_val = np.empty(len(order))
        r_val[order] = (vy[f] - 0.3 * u_val) / 0.7  # sorted position i is written row order[i]
        r_test = y["test"] + rng.normal(0, 4, len(y["test"]))
        frames = {"val": (px["val"], y["val"], r_val), "test": (px["test"], y["test"], r_test)}
        _write(tmp_path / f"base_f{f}", frames)
    res = se.analyse(runs, str(tmp_path / "base_f{fold}"), [0.5])
    assert res["val_weight"] == pytest.approx(0.3, abs=1e-9)
    base = se.baseline_means(str(tmp_path / "base_f{fold}"), 3, "test", labels)
    avg = [m.mean(0) for m in means]
    assert res["blend_rmse"]["1"] == pytest.approx(math.sqrt(se.pooled_mse(labels, avg)))
    assert res["blend_rmse"]["0"] == pytest.approx(math.sqrt(se.pooled_mse(labels, base)))
    half = [0.5 * u + 0.5 * r for u, r in zip(avg, base, strict=True)]
    assert res["blend_rmse"]["0.5"] == pytest.approx(math.sqrt(se.pooled_mse(labels, half)))
    assert res["rmse_by_k"][-1] == pytest.approx(res["blend_rmse"]["1"])
    assert res["test_n"] == 600 and res["seeds"] == [0, 1, 2]


def test_main_prints_and_writes_json(tmp_path, capsys):
    runs, _ = _screen(tmp_path, seeds=(0, 1), n=100)
    se.main([str(runs), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "| K=1 | K=2 |" in out and str(runs) in out
    got = json.loads((tmp_path / "r.json").read_text())
    assert len(got) == 1 and len(got[0]["rmse_by_k"]) == 2 and got[0]["rmse_unlimited_seeds"] > 0


def test_bad_runs_are_one_clear_error(tmp_path):
    runs, _ = _screen(tmp_path, seeds=(0, 1), n=30)
    # a fold missing a seed
    (runs / "s1_f2" / "predictions.parquet").unlink()
    with pytest.raises(SystemExit, match="different seeds"):
        se.members(runs, "test")
    # a run of other pixels
    runs2, _ = _screen(tmp_path / "b", seeds=(0, 1), n=30)
    d = pd.read_parquet(runs2 / "s1_f0" / "predictions.parquet")
    d.loc[d["split"] == "test", "label"] += 1.0
    d.to_parquet(runs2 / "s1_f0" / "predictions.parquet")
    with pytest.raises(SystemExit, match=r"s1_f0.*other test pixels"):
        se.members(runs2, "test")
    with pytest.raises(SystemExit, match="at least 2 seeds"):
        runs3, _ = _screen(tmp_path / "c", seeds=(0,), n=30)
        se.bias_variance(*se.members(runs3, "test")[:2])
    with pytest.raises(SystemExit, match="no s"):
        se.members(tmp_path / "nothing", "test")
    with pytest.raises(SystemExit, match="--weights"):
        se.main([str(runs2), "--weights", "1.5"])
