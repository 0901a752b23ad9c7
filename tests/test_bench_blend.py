"""bench/blend.py: a U-Net run and a forest run matched pixel by pixel, and their mixture scored per weight."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import blend


def write_run(where: Path, tiles: list[str], y: np.ndarray, mu: np.ndarray, sd: np.ndarray, order: int = 1) -> Path:
    """A finished run's predictions.parquet (test rows in ``order``, plus val rows that must be ignored)."""
    where.mkdir(parents=True)
    n = len(y)
    cells = {"row": np.arange(n) % 7, "col": np.arange(n) // 7}
    d = pd.DataFrame({"split": "test", "tile": tiles, **cells, "label": y, "mean": mu, "std": sd})
    d["std_uncalibrated"] = sd
    val = d.iloc[:4].assign(split="val", mean=-500.0)
    pd.concat([d.iloc[::order], val]).to_parquet(where / "predictions.parquet")
    (where / "calibration.json").write_text(json.dumps({"scale": 1.0, "loss": "gaussian_nll"}))
    return where


def two_models(tmp_path: Path, direction: str = "ba", seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 3000
    y = rng.normal(25, 8, n)
    tiles = [f"t{i % 5}" for i in range(n)]
    e_u, e_f = rng.normal(0, 3, n), rng.normal(0, 3, n)  # independent errors: averaging halves their variance
    write_run(tmp_path / direction / "runs" / f"recipe_cv_s{seed}", tiles, y, y + e_u, np.full(n, 3.0))
    write_run(tmp_path / direction / "runs" / f"rf_s{seed}", tiles, y, y + e_f, np.full(n, 3.0), order=-1)
    return y, e_u, e_f


def test_blend_matches_pixels_across_row_orders_and_averages_independent_errors(tmp_path):
    _, e_u, e_f = two_models(tmp_path)
    d, loss = blend.paired(blend.runs_of(tmp_path, "ba", "recipe_cv", 0), blend.runs_of(tmp_path, "ba", "rf", 0))
    rows = {r["w"]: r for r in blend.blend_rows(d, [0, 0.5, 1], loss)}
    assert rows[1]["rmse"] == pytest.approx(np.sqrt(np.mean(e_u**2)))  # w = 1: the U-Net as it is
    assert rows[0]["rmse"] == pytest.approx(np.sqrt(np.mean(e_f**2)))  # the forest's rows were reversed: matched
    assert rows[0.5]["rmse"] == pytest.approx(np.sqrt(np.mean(((e_u + e_f) / 2) ** 2)))
    assert rows[0.5]["rmse"] < 0.75 * rows[1]["rmse"]  # ~ 1/sqrt(2) for independent errors
    assert abs(rows[0.5]["error_correlation"]) < 0.1
    assert rows[1]["within_1sigma"] == pytest.approx(np.mean(np.abs(e_u) <= 3.0))


def test_mixture_variance_adds_the_spread_of_the_means():
    mean, sd = blend.mixture(np.array([10.0]), np.array([1.0]), np.array([14.0]), np.array([1.0]), 0.5)
    assert mean[0] == 12.0 and sd[0] == pytest.approx(np.sqrt(1 + 4))  # 0.5 (1 + 2^2) + 0.5 (1 + 2^2)
    mean, sd = blend.mixture(np.array([10.0]), np.array([1.0]), np.array([14.0]), np.array([3.0]), 1.0)
    assert (mean[0], sd[0]) == (10.0, 1.0)


def test_pooled_cv_runs_are_the_outer_folds_in_order(tmp_path):
    for j in (0, 2, 1, 10):
        (tmp_path / "pooledcv" / f"fold{j}").mkdir(parents=True)
    got = blend.runs_of(tmp_path, "pooledcv", "rf", 3)
    assert [p.parent.parent.name for p in got] == ["fold0", "fold1", "fold2", "fold10"]
    assert all(p.name == "rf_s3" for p in got)


def test_pixels_missing_from_one_run_are_an_error(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.normal(20, 5, 50)
    write_run(tmp_path / "u", ["a"] * 50, y, y, np.ones(50))
    write_run(tmp_path / "f", ["a"] * 49, y[:49], y[:49], np.ones(49))
    with pytest.raises(SystemExit, match="50 and 49 test pixels, 49 in common"):
        blend.paired([tmp_path / "u"], [tmp_path / "f"])


def test_main_writes_a_row_per_forest_and_weight_and_fails_on_a_weight_outside_0_1(tmp_path, capsys):
    two_models(tmp_path)
    out = tmp_path / "rows.json"
    assert blend.main(["--out", str(tmp_path), "--directions", "ba,ab", "--forests", "rf",
                       "--weights", "0,0.5,1", "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["direction"], r["forest"], r["w"]) for r in rows] == [("ba", "rf", w) for w in (0, 0.5, 1)]
    assert "skipped ab seed 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        blend.main(["--out", str(tmp_path), "--weights", "0.5,1.5"])


def test_forests_calibrated_anew_are_the_baseline_run_with_that_calibration(tiny_data, tmp_path):
    """``--forest-calibration distance``: a forest run shipped with ``scale`` gets the sigma of the same baseline
    run made with ``--calibration distance`` (what final_train's forest part does under the recipe)."""
    import tune_agb.baseline as baseline

    root = tmp_path / "ba"
    (root / "runs").mkdir(parents=True)
    (root / "data").symlink_to(tiny_data, target_is_directory=True)
    dirs = {"input_dir": tiny_data / "inputs", "label_dir": tiny_data / "labels", "seed": 3, "texture_windows": "3"}
    baseline.run(["rf"], **dirs, out_dir=tmp_path / "scale")
    baseline.run(["rf"], **dirs, calibration="distance", out_dir=tmp_path / "distance")
    (tmp_path / "scale" / "rf").rename(root / "runs" / "rf_s0")
    got = blend.forest_recalibrated(root / "runs" / "rf_s0", "distance").set_index(["tile", "row", "col"])
    want = pd.read_parquet(tmp_path / "distance" / "rf" / "predictions.parquet")
    want = want[want["split"] == "test"].set_index(["tile", "row", "col"]).loc[got.index]
    shipped = pd.read_parquet(root / "runs" / "rf_s0" / "predictions.parquet").set_index(
        ["split", "tile", "row", "col"]
    )
    np.testing.assert_allclose(got["std"], want["std"], rtol=1e-6)
    assert np.abs(got["std"] - shipped.loc["test"].loc[got.index, "std"]).max() > 1e-3  # not the shipped sigma
    same = blend.forest_recalibrated(root / "runs" / "rf_s0", "scale")
    np.testing.assert_allclose(
        same["std"], shipped.loc["test"].loc[same.set_index(["tile", "row", "col"]).index, "std"], rtol=1e-6
    )
