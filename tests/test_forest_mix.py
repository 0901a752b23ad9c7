"""The final model's forest part (``final_train --forest W``, ``final: {forest: W}``): final_train's metrics and
predictions are the mixture of its U-Net part and the baseline texture forest (``python -m tune_agb.baseline``), each
recomputed here; ``predict`` gives the same mixture on a GeoTIFF of a test tile, seamlessly in windows; a rerun
without the forest removes it; bad weights and a damaged forest file are one line naming the option or file."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

import tune_agb.baseline as baseline
import tune_agb.final_train as final_train
from tests.raster_helpers import write_tif
from tune_agb.engine.calibration import SCALE_LEVEL, interval_halfwidth
from tune_agb.engine.inference import load_predictor
from tune_agb.errors import TuneAgbError
from tune_agb.forest_mix import ABOUT_FILE, FOREST_DIR, MODEL_FILE, load_forest_part
from tune_agb.predict import predict_map, resolve_windows
from tune_agb.runs import CALIBRATION_FILE, load_calibration, read_metrics, read_predictions
from tune_agb.search.space import parse_search_space
from tune_agb.store import DataSource

SMALL = {"base_channels": 4, "depth": 2, "batch_size": 4, "lr": 3e-3, "epochs": 2, "seed": 7}
WEIGHT = 0.5


def two_component(mu, vu, mf, vf, w):
    """The mixture with weight ``w`` on the second component, written out here (not the package's)."""
    mean = mu + w * (mf - mu)
    second = (1 - w) * (vu + (mu - mean) ** 2) + w * (vf + (mf - mean) ** 2)
    return mean, second


@pytest.fixture(scope="module")
def runs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same small final run without and with the forest part, and the baseline texture forest of that seed."""
    root = tmp_path_factory.mktemp("forest_mix")
    config = root / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    dirs = {"input_dir": tiny_data / "inputs", "label_dir": tiny_data / "labels"}
    common = {"config": config, **dirs, "device": "cpu", "progress": False}
    final_train.run(out_dir=root / "unet", **common)
    final_train.run(out_dir=root / "mixed", forest=WEIGHT, **common)
    baseline.run(["rf"], **dirs, seed=SMALL["seed"], texture_windows="3,7,15", out_dir=root / "forest")
    laplacian = {"config.loss": "laplacian_nll", "config.epochs": 1}
    final_train.run(out_dir=root / "lap", overrides=laplacian, **common)
    final_train.run(out_dir=root / "lap_mixed", forest=WEIGHT, overrides=laplacian, **common)
    return {
        "unet": root / "unet", "mixed": root / "mixed", "forest": root / "forest" / "rf", "data": tiny_data,
        "lap": root / "lap", "lap_mixed": root / "lap_mixed",
    }  # fmt: skip


def test_the_runs_predictions_are_the_mixture_of_the_unet_and_the_texture_forest(runs):
    key = ["split", "tile", "row", "col"]
    u, m, f = (read_predictions(runs[k]).set_index(key).sort_index() for k in ("unet", "mixed", "forest"))
    assert len(m) == len(u) > 20 and m.index.equals(u.index)
    f = f.loc[m.index]  # the baseline scores val and test: the same labelled pixels
    mean, var = two_component(u["mean"], u["std"] ** 2, f["mean"], f["std"] ** 2, WEIGHT)
    np.testing.assert_allclose(m["mean"], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m["std"], np.sqrt(var), rtol=1e-6, atol=1e-6)
    _, var_raw = two_component(u["mean"], u["std_uncalibrated"] ** 2, f["mean"], f["std_uncalibrated"] ** 2, WEIGHT)
    np.testing.assert_allclose(m["std_uncalibrated"], np.sqrt(var_raw), rtol=1e-6, atol=1e-6)
    # it differs from both parts, and its metrics are those of these pixels
    assert np.abs(m["mean"] - u["mean"]).max() > 1e-3 and np.abs(m["mean"] - f["mean"]).max() > 1e-3
    metrics, unet, forest = (read_metrics(runs[k]) for k in ("mixed", "unet", "forest"))
    test = m.loc["test"]
    err = np.abs(test["mean"] - test["label"])
    assert metrics["test_rmse"] == pytest.approx(float(np.sqrt(np.mean(err**2))))
    assert metrics["test_within_1sigma"] == pytest.approx(float(np.mean(err <= test["std"])))  # read as Gaussian
    # metrics.json names the forest part and each part's own scores: the U-Net run's and the baseline's
    part = metrics["forest"]
    assert part["weight"] == WEIGHT and part["texture_windows"] == [3, 7, 15]
    assert part["forest"]["n_estimators"] == 300 and part["forest"]["random_state"] == SMALL["seed"]
    assert part["unet_alone"]["test_rmse"] == pytest.approx(unet["test_rmse"], rel=1e-9)
    assert part["forest_alone"]["test_rmse"] == pytest.approx(forest["test_rmse"], rel=1e-9)
    assert part["calibration"]["scale"] == pytest.approx(forest["calibration"]["scale"], rel=1e-9)
    page = (runs["mixed"] / "report" / "index.html").read_text()
    assert "test, forest part alone" in page and "texture forest at weight 0.5" in page
    assert "forest" not in read_metrics(runs["unet"])
    assert not (runs["unet"] / FOREST_DIR).exists()


def test_a_laplacian_unet_part_is_calibrated_for_gaussian_intervals(runs):
    """The mixture is read as Gaussian, so the U-Net part's sigma factor puts 68.27 % of the labels inside +-1 sigma,
    not inside a Laplacian's +-0.81 sigma: the same quantile over a smaller half-width."""
    lap, mixed = (load_calibration(runs[k] / CALIBRATION_FILE) for k in ("lap", "lap_mixed"))
    assert (lap.loss, mixed.loss) == ("laplacian_nll", "gaussian_nll")
    assert mixed.scale == pytest.approx(lap.scale * interval_halfwidth(SCALE_LEVEL, "laplacian_nll"), rel=1e-9)
    assert interval_halfwidth(0.6827, "laplacian_nll") == pytest.approx(0.81, abs=0.01)
    m = read_metrics(runs["lap_mixed"])
    assert m["forest"]["unet_alone"]["val_within_1sigma"] == pytest.approx(0.6827, abs=1.5 / m["val_n"])


def test_predict_maps_the_mixture_seamlessly(runs, tmp_path):
    """A GeoTIFF of one test tile: predict's mean/std at its labelled pixels are predictions.parquet's; on a larger
    raster, windows give the map of one window (the forest's texture windows get their margin)."""
    # the tiles as final_train read them: the packed store's (its dtype, not the .npy files' float32)
    test = DataSource(str(runs["data"] / "inputs"), str(runs["data"] / "labels")).open().tiles["test"]
    pred = read_predictions(runs["mixed"])
    name = pred[pred.split == "test"]["tile"].value_counts().index[0]
    k = list(test.names).index(name)
    src = write_tif(tmp_path / "tile.tif", np.asarray(test.inputs[k], dtype=np.float32))
    out = predict_map(runs["mixed"], [src], tmp_path / "tile_map.tif", tile_size=64, progress=False)
    with rasterio.open(out.out) as ds:
        tile_map = ds.read()
        assert "weight 0.5" in ds.tags()["forest"]
    rows = pred[(pred.split == "test") & (pred.tile == name)]
    np.testing.assert_allclose(tile_map[0][rows.row, rows.col], rows["mean"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tile_map[1][rows.row, rows.col], rows["std"], rtol=1e-4, atol=1e-4)
    # a 64 x 64 raster of the four test tiles: in windows as at once
    x = np.asarray(test.inputs[:4], dtype=np.float32)
    big = write_tif(tmp_path / "big.tif", np.concatenate([np.concatenate(x[:2], 2), np.concatenate(x[2:], 2)], 1))
    _, overlap = resolve_windows(64, None, load_predictor(runs["mixed"], "cpu"), load_forest_part(runs["mixed"]))
    assert overlap >= 2 * 7
    maps = {}
    for tile in (128, overlap + 16):
        done = predict_map(runs["mixed"], [big], tmp_path / f"big_{tile}.tif", tile_size=tile, progress=False)
        with rasterio.open(done.out) as ds:
            maps[tile] = ds.read()
    assert done.windows > 1
    np.testing.assert_allclose(maps[overlap + 16], maps[128], rtol=1e-4, atol=1e-4)
    # without the forest part the same raster maps to the U-Net alone: another map
    alone = predict_map(runs["unet"], [big], tmp_path / "unet.tif", tile_size=128, progress=False)
    with rasterio.open(alone.out) as ds:
        assert np.abs(ds.read(1) - maps[128][0]).max() > 1e-3 and "forest" not in ds.tags()


def test_a_rerun_without_the_forest_removes_it(runs, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(runs["mixed"], out)
    assert load_forest_part(out) is not None
    final_train.run(
        config=None, input_dir=runs["data"] / "inputs", label_dir=runs["data"] / "labels", out_dir=out,
        overwrite=True, device="cpu", progress=False, overrides={f"config.{k}": v for k, v in SMALL.items()},
    )  # fmt: skip
    assert not (out / FOREST_DIR).exists() and load_forest_part(out) is None
    assert "forest" not in read_metrics(out)


@pytest.mark.parametrize("weight", [0, 1, 1.5, -0.2, True, "half"])
def test_bad_weights_are_one_line(runs, tmp_path, weight):
    with pytest.raises(TuneAgbError, match=r"forest.*must be .*\(0, 1\)") as err:
        final_train.run(config=None, out_dir=tmp_path / "x", overrides={"final.forest": weight}, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
    space = {"params": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2}}, "final": {"forest": weight}}
    with pytest.raises(TuneAgbError, match=r"final.forest.*\(0, 1\)"):
        parse_search_space(space, source="space.yaml")


def test_without_scikit_learn_the_forest_is_refused_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed
    with pytest.raises(TuneAgbError, match=r"^--forest: needs scikit-learn \(pip install 'tune_agb\[baselines\]'\)$"):
        final_train.run(config=None, out_dir=tmp_path / "x", forest=0.5, progress=False)
    assert not (tmp_path / "x").exists()


def test_the_recipe_sets_the_forest_and_a_flag_drops_it(tmp_path):
    space = {"params": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2}}, "final": {"forest": 0.25}}
    assert parse_search_space(space, source="space.yaml").final == {"forest": 0.25}
    doc = final_train.resolved_config(config=None, overrides={"final.forest": 0.25})
    assert doc["final"]["forest"] == 0.25 and doc["final"]["from"]["forest"] == "flag/--set"
    assert final_train.resolved_config(config=None)["final"]["forest"] is None


def test_a_damaged_forest_part_is_one_line_naming_its_file(runs, tmp_path):
    out = tmp_path / "mixed"
    shutil.copytree(runs["mixed"], out)
    about = out / FOREST_DIR / ABOUT_FILE
    doc = json.loads(about.read_text())
    about.write_text(json.dumps(doc | {"weight": 3}))
    with pytest.raises(TuneAgbError, match=f"^{about}: .*\\(0, 1\\)"):
        load_forest_part(out)
    about.write_text(json.dumps(doc))
    (out / FOREST_DIR / MODEL_FILE).write_bytes(b"not a pickle")
    with pytest.raises(TuneAgbError, match=f"^{out / FOREST_DIR / MODEL_FILE}: cannot be read"):
        load_forest_part(out)
    about.write_text("{")
    with pytest.raises(TuneAgbError, match=f"^{about}: not a forest part"):
        load_forest_part(out)


def test_the_forest_predicts_in_chunks_as_at_once(runs):
    """RandomForest.predict goes through pixels in chunks (bounded memory): the same numbers as one chunk."""
    part = load_forest_part(runs["mixed"])
    x = np.random.default_rng(0).normal(size=(2500, len(part.norm.mean) * 4))
    whole = part.forest.predict(x)
    old, baseline.PREDICT_CHUNK = baseline.PREDICT_CHUNK, 1000
    try:
        chunked = part.forest.predict(x)
    finally:
        baseline.PREDICT_CHUNK = old
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(a, b)
    assert whole[0].std() > 0 and (whole[1] > 0).all()


def test_with_distance_calibration_the_forest_part_widens_as_the_unets_do(runs, tmp_path):
    """``--calibration distance`` (the shipped recipe's) calibrates the forest part by ``distance`` too: its sigma is
    the baseline forest's with ``--calibration distance``, widened by each pixel's raw bands, and predict gives the
    run's predictions from a GeoTIFF's bands."""
    dirs = {"input_dir": runs["data"] / "inputs", "label_dir": runs["data"] / "labels"}
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    common = {"config": config, **dirs, "device": "cpu", "progress": False, "calibration": "distance"}
    final_train.run(out_dir=tmp_path / "unet", **common)
    final_train.run(out_dir=tmp_path / "mixed", forest=WEIGHT, **common)
    baseline.run(["rf"], **dirs, seed=SMALL["seed"], texture_windows="3,7,15", calibration="distance",
                 out_dir=tmp_path / "forest")  # fmt: skip
    part = load_forest_part(tmp_path / "mixed")
    assert part.calibration.method == "distance" and part.calibration.needs_bands
    forest = read_metrics(tmp_path / "forest" / "rf")
    assert read_metrics(tmp_path / "mixed")["forest"]["calibration"]["scale"] == pytest.approx(
        forest["calibration"]["scale"], rel=1e-9
    )
    key = ["split", "tile", "row", "col"]
    u, m, f = (read_predictions(p).set_index(key).sort_index() for p in (tmp_path / "unet", tmp_path / "mixed",
                                                                          tmp_path / "forest" / "rf"))  # fmt: skip
    f = f.loc[m.index]
    mean, var = two_component(u["mean"], u["std"] ** 2, f["mean"], f["std"] ** 2, WEIGHT)
    np.testing.assert_allclose(m["mean"], mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m["std"], np.sqrt(var), rtol=1e-6, atol=1e-6)
    # the widening is there: some pixel's forest sigma is more than its plain factor gives
    ratio = f["std"] / (f["std_uncalibrated"] * forest["calibration"]["scale"])
    assert ratio.min() == pytest.approx(1.0, rel=1e-6) and ratio.max() > 1.01
    # predict on one test tile's GeoTIFF: the same mixture, widened from the raster's bands
    test = DataSource(str(runs["data"] / "inputs"), str(runs["data"] / "labels")).open().tiles["test"]
    rows = m.loc["test"].reset_index()
    name = rows["tile"].value_counts().index[0]
    src = write_tif(tmp_path / "tile.tif", np.asarray(test.inputs[list(test.names).index(name)], dtype=np.float32))
    out = predict_map(tmp_path / "mixed", [src], tmp_path / "tile_map.tif", tile_size=64, progress=False)
    with rasterio.open(out.out) as ds:
        tile_map = ds.read()
    rows = rows[rows.tile == name]
    np.testing.assert_allclose(tile_map[1][rows.row, rows.col], rows["std"], rtol=1e-4, atol=1e-4)
