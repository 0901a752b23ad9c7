"""bench/real_selection.py's outer spatial cross-validation: the strips, the fold folders, the pooled metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tune_agb.engine.calibration import fit_scale

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real_selection as rs


def grid_labels(rows: int = 2, cols: int = 7) -> dict[str, int]:
    rng = np.random.default_rng(3)
    return {f"tile_{10 + r}_{c}": int(rng.integers(20, 60)) for r in range(rows) for c in range(cols)}


@pytest.mark.parametrize("k", [2, 3, 4])
def test_outer_splits_test_every_tile_once_in_contiguous_balanced_strips(k):
    labels = grid_labels()
    folds = rs.outer_splits(labels, k, val_share=0.15)
    order = sorted(labels, key=lambda n: (int(n.split("_")[2]), int(n.split("_")[1])))
    assert sorted(n for f in folds for n in f["test"]) == sorted(labels)  # each tile tested exactly once
    total, biggest = sum(labels.values()), max(labels.values())
    for f in folds:
        assert sorted(f["train"] + f["val"] + f["test"]) == sorted(labels)  # disjoint, and nothing left out
        first = order.index(f["test"][0])
        assert f["test"] == order[first : first + len(f["test"])]  # a contiguous strip along the grid
        assert abs(sum(labels[n] for n in f["test"]) - total / k) <= biggest  # about a k-th of the labels
        val = [labels[n] for n in f["val"]]
        assert sum(val) >= 0.15 * total > sum(val[:-1])  # just enough tiles for the val share
        after = (order[first + len(f["test"]) :] + order[:first])[: len(f["val"])]
        assert f["val"] == after  # the tiles that follow the strip


def test_outer_splits_errors():
    with pytest.raises(SystemExit, match=r"tile_ROW_COL.*'scene_a'"):
        rs.outer_splits({"tile_1_1": 3, "scene_a": 4}, 2, 0.15)
    with pytest.raises(SystemExit, match=r"must be 2 to 2 .*got 3"):
        rs.outer_splits({"tile_1_1": 3, "tile_1_2": 4}, 3, 0.15)


def test_outer_data_links_each_tile_into_its_split(tmp_path):
    data = tmp_path / "data"
    for side in ("inputs", "labels"):
        for split, name in (("train", "tile_1_1"), ("test", "tile_1_2")):
            (data / side / split).mkdir(parents=True, exist_ok=True)
            np.save(data / side / split / f"{name}.npy", np.full(2, 1.0 if side == "inputs" else 2.0))
    fold = {"test": ["tile_1_1"], "val": [], "train": ["tile_1_2"]}
    flags = rs.outer_data(data, fold, tmp_path / "f0")
    assert flags == ["--input-dir", str(tmp_path / "f0" / "inputs"), "--label-dir", str(tmp_path / "f0" / "labels")]
    assert (tmp_path / "f0/inputs/test/tile_1_1.npy").resolve() == (data / "inputs/train/tile_1_1.npy").resolve()
    assert np.load(tmp_path / "f0/labels/train/tile_1_2.npy")[0] == 2.0
    assert rs.outer_data(data, fold, tmp_path / "f0") == flags  # a rerun keeps the links


def test_pooled_metrics_pool_the_folds_test_pixels(tmp_path):
    rng = np.random.default_rng(0)
    fold_rows, frames = [], []
    for j, n in enumerate((30, 90)):  # unequal folds: pooling is not the mean of the fold figures
        run = tmp_path / f"run{j}"
        run.mkdir()
        y = rng.normal(20, 5, n)
        mu = y + rng.normal(0, 2 + 3 * j, n)
        raw = np.full(n, 3.0)
        d = pd.DataFrame({"split": "test", "label": y, "mean": mu, "std": raw * 1.2, "std_uncalibrated": raw})
        val = d.iloc[:5].assign(split="val", mean=0.0)  # never counted
        pd.concat([d, val]).to_parquet(run / "predictions.parquet")
        loss = ("gaussian_nll", "laplacian_nll")[j]
        (run / "calibration.json").write_text(json.dumps({"scale": 1.2, "split": "val", "loss": loss}))
        rmse = float(np.sqrt(np.mean((y - mu) ** 2)))
        fold_rows.append({"run": str(run), "seconds": 10.0, "test_rmse": rmse})
        frames.append(d)
    row, per_fold = rs.pooled("search", 1, fold_rows)
    d = pd.concat(frames)
    err = (d["label"] - d["mean"]).abs()
    assert row["test_n"] == 120 and row["seconds"] == 20.0
    assert row["test_rmse"] == pytest.approx(float(np.sqrt(np.mean(err**2))))
    assert row["test_rmse"] != pytest.approx(np.mean([r["test_rmse"] for r in fold_rows]))
    assert row["test_r2"] == pytest.approx(1 - np.sum(err**2) / np.sum((d["label"] - d["label"].mean()) ** 2))
    lap = np.r_[np.zeros(30, bool), np.ones(90, bool)]  # fold 1's run is Laplacian: its 68.27 % interval is +-0.81 sd
    assert row["test_within_1sigma"] == pytest.approx(float(np.mean(err <= np.where(lap, 0.8117, 1.0) * d["std"])))
    assert row["raw_within_2sigma"] == pytest.approx(
        float(np.mean(err <= np.where(lap, 2.1849, 2.0) * d["std_uncalibrated"])), abs=1 / 120
    )
    assert [f["fold"] for f in per_fold] == [0, 1] and per_fold[1]["calibrated_on"] == "val"
    f1 = frames[1]
    assert per_fold[1]["test_scale"] == pytest.approx(
        fit_scale(
            f1["label"].to_numpy(), f1["mean"].to_numpy(), f1["std_uncalibrated"].to_numpy() ** 2, "laplacian_nll"
        )
    )
    assert per_fold[1]["test_scale"] > per_fold[0]["test_scale"]  # the noisier fold needs the wider sigma
    f1_gauss = fit_scale(f1["label"].to_numpy(), f1["mean"].to_numpy(), f1["std_uncalibrated"].to_numpy() ** 2)
    assert per_fold[1]["test_scale"] != pytest.approx(f1_gauss)  # fitted under the run's own loss


@pytest.mark.parametrize("loss", ["gaussian_nll", "laplacian_nll"])
def test_coverage_scale_recovers_the_factor_sigma_is_off_by(loss):
    import calibration_transfer as ct

    rng = np.random.default_rng(5)
    sd = rng.uniform(1, 4, 50_000)
    true = 1.7 * sd  # the residuals' real standard deviation: sigma is 1.7 times too small
    r = rng.normal(0, true) if loss == "gaussian_nll" else rng.laplace(0, true / np.sqrt(2))
    assert ct.coverage_scale(r, sd, loss) == pytest.approx(1.7, rel=0.02)
    assert ct.nll_scale(r, sd, loss) == pytest.approx(1.7, rel=0.02)
    # heavy tails: one wild residual moves the NLL factor (an RMS), not the coverage factor (a quantile match), nor
    # the shipped one (a 68.27 % quantile)
    r[0], sd[0] = 1e4, 1.0
    assert ct.coverage_scale(r, sd, loss) == pytest.approx(1.7, rel=0.02)
    assert fit_scale(r, np.zeros_like(r), sd**2, loss) == pytest.approx(1.7, rel=0.02)
    assert ct.nll_scale(r, sd, loss) > 1.7 * 1.1


def test_outer_val_share_must_be_a_share(capsys):
    with pytest.raises(SystemExit) as exc:
        rs.parse_args(["--outer-k", "3", "--outer-val-share", "1.5"])
    assert exc.value.code == 2
    assert "--outer-val-share: must be between 0 and 1 (a share of the labels); got 1.5" in capsys.readouterr().err


def test_rf_texture_runs_the_forest_with_texture_features(tiny_data, tmp_path):
    """rf_texture is the baseline forest with --texture-windows: its run records the windows and differs from rf's;
    it is asked for by name, not run by default."""
    assert "rf_texture" in rs.METHODS and "rf_texture" not in rs.parse_args([]).methods
    data = ["--input-dir", str(tiny_data / "inputs"), "--label-dir", str(tiny_data / "labels")]
    a, b = (rs.baseline(m, 0, tmp_path, data) for m in ("rf", "rf_texture"))
    assert (a["params"]["texture_windows"], b["params"]["texture_windows"]) == ("", rs.TEXTURE)
    assert b["run"].endswith("rf_texture_s0") and a["test_rmse"] != b["test_rmse"]


def test_goal_lines_judge_against_rf_and_name_the_texture_forest():
    def s(method, rmse, sd=0.1, c1=0.68, c2=0.95):
        return {"method": method, "test_rmse": (rmse, sd), "test_within_1sigma": (c1, 0), "test_within_2sigma": (c2, 0)}

    base = [s("rf", 8.3), s("default", 9.0, sd=1.0)]
    (line,) = rs.goal_lines([*base, s("cv_top_k", 7.4, sd=0.3, c1=0.75)])
    assert line.startswith("- cv_top_k: test RMSE 7.40 vs rf 8.30 (-10.8 %; goal <= -10 %): met;")
    assert "seed sd 0.30 vs default's 1.00 (goal <= half): met" in line and "1-sigma 75.0 % (68 +- 5): MISSED" in line
    assert "rf_texture" not in line
    (line,) = rs.goal_lines([*base, s("rf_texture", 7.6), s("cv_top_k", 8.1)])
    assert "(-2.4 %; goal <= -10 %): MISSED (vs rf_texture 7.60: +6.6 %)" in line


def test_cv_top_k_seeds_trains_each_configuration_with_several_seeds(monkeypatch, tmp_path):
    """cv_top_k_seeds is cv_top_k with --ensemble N (--seeds-per-config) on the same cv search; asked for by name."""
    assert "cv_top_k_seeds" in rs.METHODS and "cv_top_k_seeds" not in rs.parse_args([]).methods
    searched, finals = [], {}
    monkeypatch.setattr(rs, "search", lambda space, name, out, data: (searched.append(name), (f"/st/{name}", 1.0))[1])

    def final(run, options, data):  # what row() reads of a final_train run
        finals[run.name] = options
        metrics = {f"test_{k}": 1.0 for k in rs.KEYS}
        return metrics | {"seconds": 2.0, "run": str(run), "test_n": 1, "uncalibrated": metrics}

    monkeypatch.setattr(rs, "final", final)
    a = rs.parse_args(["--methods", "cv_top_k,cv_top_k_seeds", "--top-k", "2", "--seeds-per-config", "4"])
    rows = rs.run_seed(5, a, {"experiment": {}}, tmp_path, [])
    assert searched == ["cv_s5"]  # one cv search serves both
    assert finals["cv_top_k_s5"] == {"experiment": "/st/cv_s5", "ensemble_top": 2, "ensemble": 1}
    assert finals["cv_top_k_seeds_s5"] == {"experiment": "/st/cv_s5", "ensemble_top": 2, "ensemble": 4}
    assert [r["method"] for r in rows] == ["cv_top_k", "cv_top_k_seeds"] and rows[1]["seconds"] == 3.0
