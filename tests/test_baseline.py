"""The per-pixel baselines (python -m tune_agb.baseline): ridge and random forest on the tiny demo tiles, their
metrics recomputed from the predictions they write, the forest's variance recomputed from its trees."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tune_agb.baseline import RandomForest, labelled_pixels, main
from tune_agb.engine.data import compute_norm_stats, load_dataset, load_split
from tune_agb.errors import TuneAgbError, run_cli
from tune_agb.runs import CALIBRATION_FILE, load_calibration

pytest.importorskip("sklearn")


def data_args(d: Path) -> list[str]:
    return ["--input-dir", str(d / "inputs"), "--label-dir", str(d / "labels")]


def test_metrics_are_those_of_the_written_predictions(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bl"
    argv = [*data_args(tiny_data), "--model", "ridge", "rf", "--trees", "40", "--out-dir", str(out)]
    assert run_cli(main, argv) == 0
    printed = capsys.readouterr().out
    assert "ridge" in printed and "rf" in printed and "test after" in printed
    for model in ("ridge", "rf"):
        folder = out / model
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["model"] == model
        table = pq.read_table(folder / "predictions.parquet").to_pandas()
        assert list(table.columns) == ["split", "tile", "row", "col", "label", "mean", "std", "std_uncalibrated"]
        # Calibration as final_train's default: one factor on sigma with which 68.27 % of the val pixels lie within
        # 1 sigma (a quantile of the standardised residuals).
        cal = load_calibration(folder / CALIBRATION_FILE)
        val = table[table.split == "val"]
        assert (cal.method, cal.split, cal.n) == ("scale", "val", len(val))
        z = ((val.label - val["mean"]) / val.std_uncalibrated).abs()
        assert cal.scale == pytest.approx(float(np.quantile(z, 0.682689)), rel=1e-5)
        np.testing.assert_allclose(table["std"], table.std_uncalibrated * cal.scale, rtol=1e-6)
        for split in ("val", "test"):
            tiles = load_split(tiny_data / "inputs", tiny_data / "labels", split)
            rows = table[table.split == split]
            assert len(rows) == tiles.num_labelled == metrics[f"{split}_n"]  # every labelled pixel, once
            ti = [tiles.names.index(t) for t in rows.tile]
            np.testing.assert_array_equal(tiles.labels[ti, rows.row, rows.col], rows.label)
            y, m = rows.label.to_numpy(np.float64), rows["mean"].to_numpy(np.float64)
            r = y - m
            assert metrics[f"{split}_rmse"] == pytest.approx(float(np.sqrt(np.mean(r**2))), rel=1e-6)
            r2 = 1 - np.sum(r**2) / np.sum((y - y.mean()) ** 2)
            assert metrics[f"{split}_r2"] == pytest.approx(float(r2), rel=1e-6)
            for m_, col in ((metrics, "std"), (metrics["uncalibrated"], "std_uncalibrated")):
                sd = rows[col].to_numpy(np.float64)
                for k in (1, 2):
                    assert m_[f"{split}_within_{k}sigma"] == pytest.approx(float(np.mean(np.abs(r) <= k * sd)))
                nll = float(np.mean(0.5 * np.log(2 * np.pi * sd**2) + 0.5 * (r / sd) ** 2))
                assert m_[f"{split}_nll"] == pytest.approx(nll, rel=1e-5)
        if model == "ridge":  # one variance for every pixel: the train residuals' mean square
            assert table.std_uncalibrated.nunique() == 1
        else:
            assert table.std_uncalibrated.nunique() > len(table) // 2
            assert metrics["params"]["n_estimators"] == 40 and metrics["params"]["random_state"] == 0
    # Existing results are kept unless --overwrite.
    before = (out / "rf" / "metrics.json").stat().st_mtime_ns
    assert run_cli(main, [*data_args(tiny_data), "--model", "rf", "--trees", "5", "--out-dir", str(out)]) == 2
    assert "already holds a baseline's results; use --overwrite" in capsys.readouterr().err
    assert (out / "rf" / "metrics.json").stat().st_mtime_ns == before


def test_forest_variance_is_the_mixture_of_its_trees_leaves(tiny_data: Path) -> None:
    """Mean = the forest's prediction; variance = mean over trees of the variance of the train labels in the pixel's
    leaf + variance over trees of the leaf means, recomputed here from the train pixels in each leaf (without the
    bootstrap, so that every tree holds every train pixel once; the trees still differ by their split features)."""
    tiles = load_dataset(tiny_data / "inputs", tiny_data / "labels")
    norm = compute_norm_stats(tiles["train"], standardize_target=False)
    train, val = labelled_pixels(tiles["train"], norm), labelled_pixels(tiles["val"], norm)
    rf = RandomForest(trees=12, min_samples_leaf=3, max_features=0.33, seed=4)
    rf.forest.set_params(bootstrap=False)
    mean, var = rf.fit(train.x, train.y).predict(val.x)
    np.testing.assert_allclose(mean, rf.forest.predict(val.x), rtol=1e-12)
    leaf_means, leaf_vars = [], []
    for tree in rf.forest.estimators_:
        train_leaf = tree.apply(train.x.astype(np.float32))
        leaf_means.append(tree.predict(val.x))
        leaf_vars.append([np.var(train.y[train_leaf == leaf]) for leaf in tree.apply(val.x.astype(np.float32))])
    leaf_means, leaf_vars = np.array(leaf_means), np.array(leaf_vars)
    assert leaf_means.var(0).mean() > 0  # the trees differ
    np.testing.assert_allclose(var, leaf_vars.mean(0) + leaf_means.var(0), rtol=1e-6)
    assert (leaf_vars.mean(0) > 0).all()  # the label spread within leaves: not the trees' spread alone
    # With the bootstrap (the default): the forest's prediction is the mean, and the variance is above the spread.
    rf = RandomForest(trees=12, min_samples_leaf=3, seed=4).fit(train.x, train.y)
    mean, var = rf.predict(val.x)
    np.testing.assert_allclose(mean, rf.forest.predict(val.x), rtol=1e-12)
    spread = np.var([tree.predict(val.x) for tree in rf.forest.estimators_], axis=0)
    assert (var > spread).all()
    # Seeded: the same seed gives the same forest, another one another.
    again = RandomForest(trees=12, min_samples_leaf=3, seed=4).fit(train.x, train.y).predict(val.x)
    np.testing.assert_array_equal(again[1], var)
    other = RandomForest(trees=12, min_samples_leaf=3, seed=5).fit(train.x, train.y).predict(val.x)
    assert not np.array_equal(other[0], mean)


def test_texture_features_follow_the_bands(tiny_data: Path, tmp_path: Path) -> None:
    """--texture-windows: each labelled pixel's features are its bands, then each band's local standard deviation
    per window (as tune_agb.texture.Texture computes it); the run records the windows and scores differently."""
    import torch

    from tune_agb.texture import Texture

    tiles = load_dataset(tiny_data / "inputs", tiny_data / "labels")
    norm = compute_norm_stats(tiles["train"], standardize_target=False)
    plain, tex = labelled_pixels(tiles["val"], norm), labelled_pixels(tiles["val"], norm, windows=(3, 7))
    c = plain.x.shape[1]
    assert tex.x.shape == (len(plain.y), 3 * c)
    np.testing.assert_array_equal(tex.x[:, :c], plain.x)
    np.testing.assert_array_equal(tex.tile, plain.tile)
    t, f = int(tex.tile[0]), int(tex.flat[0])
    w = tiles["val"].labels.shape[-1]
    x = norm.normalize(torch.from_numpy(np.asarray(tiles["val"].inputs[t : t + 1], dtype=np.float32)))
    want = Texture((3, 7))(x)[0, :, f // w, f % w].numpy()
    np.testing.assert_allclose(tex.x[0], want, rtol=1e-6)
    assert (tex.x[:, c:] >= 0).all() and tex.x[:, c:].std() > 0
    out = tmp_path / "bl"
    for sub, extra in (("plain", []), ("tex", ["--texture-windows", "3,7"])):
        argv = [*data_args(tiny_data), "--model", "rf", "--trees", "20", "--out-dir", str(out / sub), *extra]
        assert run_cli(main, argv) == 0
    a, b = (json.loads((out / sub / "rf" / "metrics.json").read_text()) for sub in ("plain", "tex"))
    assert (a["params"]["texture_windows"], b["params"]["texture_windows"]) == ("", "3,7")
    assert a["test_rmse"] != b["test_rmse"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trees", "0"], "--trees: must be >= 1, got 0"),
        (["--max-features", "1.5"], "--max-features: must be in (0, 1], got 1.5"),
        (["--min-samples-leaf", "0"], "--min-samples-leaf: must be >= 1, got 0"),
        (
            ["--texture-windows", "4"],
            "--texture-windows: 'texture_windows' must be distinct odd window sizes >= 3, "
            'comma-separated (e.g. "3,7,15"), or "" for none; got \'4\'',
        ),
    ],
)
def test_bad_options_are_one_line(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(main, ["--model", "rf", *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_forest_without_scikit_learn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.ensemble", None)
    with pytest.raises(
        TuneAgbError, match=r"--model rf: scikit-learn is not installed \(pip install 'tune_agb\[baselines\]'"
    ):
        RandomForest()
