"""The demo scene as GeoTIFF + GEDI parquet, and the raster path end to end: scene -> prepare -> train -> predict."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio

from tune_agb.bands import BAND_NAMES
from tune_agb.demo import main as demo_main
from tune_agb.demo_data import rasterize_shots, synth_scene
from tune_agb.demo_scene import DEMO_CRS, write_demo_scene
from tune_agb.engine.checkpoint import save_checkpoint
from tune_agb.engine.config import TrainConfig
from tune_agb.engine.data import load_dataset
from tune_agb.engine.train import train
from tune_agb.errors import run_cli
from tune_agb.predict import main as predict_main
from tune_agb.prepare import main as prepare_main


def test_scene_files_match_the_synthetic_scene(tmp_path):
    scene = synth_scene(96, 64, 4)
    paths = write_demo_scene(tmp_path, scene)
    with rasterio.open(paths["image"]) as ds:
        assert ds.crs.to_string() == DEMO_CRS and ds.res == (10.0, 10.0)
        assert ds.descriptions == BAND_NAMES and np.isnan(ds.nodata)
        np.testing.assert_array_equal(ds.read(), scene.image)
    with rasterio.open(paths["truth"]) as ds:
        np.testing.assert_array_equal(ds.read(1), scene.agb)
    shots = pq.read_table(paths["shots"])
    assert {"lon_lowestmode", "lat_lowestmode", "agbd", "l4_quality_flag"} <= set(shots.column_names)
    assert shots.num_rows == scene.shot_value.size
    np.testing.assert_array_equal(shots.column("l4_quality_flag").to_numpy(), scene.shot_quality)
    lon, lat = shots.column("lon_lowestmode").to_numpy(), shots.column("lat_lowestmode").to_numpy()
    assert ((lon > 99.0) & (lon < 101.0) & (lat > 14.0) & (lat < 16.0)).all()


def test_prepared_scene_gives_the_demo_tiles_and_labels(tmp_path, capsys):
    scene = synth_scene(96, 64, 4)
    paths = write_demo_scene(tmp_path / "scene", scene)
    label = rasterize_shots(scene)  # the good shots, averaged per pixel
    out = tmp_path / "ds"
    code = run_cli(prepare_main, ["--image", str(paths["image"]), "--gedi", str(paths["shots"]), "--filter",
                                  "l4_quality_flag==1", "--out", str(out), "--tile-size", "32", "--block-size", "1",
                                  "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 6
    for m in rows:
        r, c = m["row_off"], m["col_off"]
        x = np.load(out / "inputs" / m["split"] / f"{m['name']}.npy")
        y = np.load(out / "labels" / m["split"] / f"{m['name']}.npy")
        np.testing.assert_array_equal(x, scene.image[:, r : r + 32, c : c + 32])
        np.testing.assert_array_equal(y, label[r : r + 32, c : c + 32])


def test_demo_cli_writes_scene_or_tiles(tmp_path, capsys):
    assert run_cli(demo_main, ["--scene", "--out", str(tmp_path / "s"), "--tile-size", "16", "--grid", "2", "3"]) == 0
    with rasterio.open(tmp_path / "s" / "scene.tif") as ds:
        assert (ds.count, ds.height, ds.width) == (14, 32, 48)
    assert (tmp_path / "s" / "gedi_shots.parquet").is_file()
    assert run_cli(demo_main, ["--out", str(tmp_path / "t"), "--tile-size", "16", "--grid", "2", "2"]) == 0
    assert (tmp_path / "t" / "inputs").is_dir() and not (tmp_path / "t" / "scene.tif").exists()


@pytest.mark.slow
def test_scene_to_map_end_to_end(tmp_path, capsys):
    paths = write_demo_scene(tmp_path / "scene", synth_scene(128, 128, 2))
    ds = tmp_path / "ds"
    code = run_cli(prepare_main, ["--image", str(paths["image"]), "--gedi", str(paths["shots"]), "--filter",
                                  "l4_quality_flag==1", "--out", str(ds), "--tile-size", "32", "--block-size", "1",
                                  "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    tiles = load_dataset(ds / "inputs", ds / "labels", in_channels=14)
    cfg = TrainConfig(base_channels=4, depth=2, epochs=2, batch_size=4, amp="none")
    states = []
    train(cfg, tiles, device="cpu", progress=False, on_epoch=lambda rep: states.append(rep.state()))
    save_checkpoint(states[-1], tmp_path / "model" / "best.pt")
    out = tmp_path / "map.tif"
    code = run_cli(predict_main, ["--model", str(tmp_path / "model"), "--image", str(paths["image"]), "--out",
                                  str(out), "--tile-size", "64", "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with rasterio.open(out) as m, rasterio.open(paths["image"]) as src:
        assert m.crs == src.crs and m.transform == src.transform and m.shape == src.shape
        mean, std = m.read()
        has_input = np.isfinite(src.read()).any(axis=0)
    assert np.isfinite(mean[has_input]).all() and (std[has_input] > 0).all()
    assert np.isnan(mean[~has_input]).all()
