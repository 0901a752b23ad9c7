"""Maps without seams: predicting a raster in small windows equals predicting it whole, for U-Nets with real
spatial context (random weights, depth 2 and 4), at the default overlap; and the window plan tiles the raster."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from tests.raster_helpers import random_unet_checkpoint, write_tif
from tune_agb.engine.inference import load_predictor
from tune_agb.engine.model import UNet
from tune_agb.engine.seams import measure_margin
from tune_agb.errors import run_cli
from tune_agb.predict import main, window_plan

C = 4


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish random scene (so the model's context matters) with a no-data hole."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(C, h, w)).astype(np.float32)
    img += np.cumsum(rng.normal(size=(C, h, 1)), axis=1).astype(np.float32) * 0.1
    img[:, 30:40, 50:60] = np.nan
    return img


@pytest.mark.parametrize(("size", "tile", "overlap"), [(100, 32, 8), (100, 40, 0), (37, 64, 8), (64, 16, 8)])
def test_window_plan_keeps_every_pixel_once_and_windows_cover_what_they_keep(size, tile, overlap):
    plan = window_plan(size, tile, overlap)
    kept = np.zeros(size, int)
    for start, stop, k0, k1 in plan:
        assert start <= k0 < k1 <= stop <= size and stop - start <= tile
        assert start % (tile - overlap) == 0 or len(plan) == 1
        kept[k0:k1] += 1
    assert (kept == 1).all()
    assert plan[0][2] == 0 and plan[-1][3] == size


@pytest.mark.parametrize("depth", [2, 4])
def test_tiled_map_equals_the_whole_image_map(tmp_path, capsys, depth):
    h, w = 200, 230
    img = _image(h, w, seed=depth)
    src = write_tif(tmp_path / "in.tif", img)
    ckpt = random_unet_checkpoint(tmp_path / "m.pt", C, depth=depth, seed=depth)
    predictor = load_predictor(ckpt, device="cpu")
    assert predictor.margin is not None and predictor.step == 2**depth
    mean_whole, std_whole = (t.numpy()[0] for t in predictor.predict(img[None]))
    hole = np.zeros((h, w), bool)
    hole[30:40, 50:60] = True
    small = 4 * predictor.margin + predictor.step  # the smallest tile the issue asks for: 4 x the margin
    maps = {}
    for tile in (small, 2 * small):
        out = tmp_path / f"map{tile}.tif"
        argv = ["--model", str(ckpt), "--image", str(src), "--out", str(out), "--tile-size", str(tile)]
        code = run_cli(main, [*argv, "--no-progress", "--device", "cpu", "--batch-size", "3"])
        assert code == 0, capsys.readouterr().err
        with rasterio.open(out) as ds:
            maps[tile] = ds.read()
        assert tile < min(h, w)  # really tiled
    for tile, (mean, std) in maps.items():
        assert np.isnan(mean[hole]).all() and np.isnan(std[hole]).all()
        tol = 1e-3 * float(np.nanmean(mean_whole))
        assert np.nanmax(np.abs(mean[~hole] - mean_whole[~hole])) <= tol, tile
        assert np.nanmax(np.abs(std[~hole] - std_whole[~hole])) <= 1e-3 * float(np.nanmean(std_whole)), tile
    # the same windows without an overlap show the seams this removes
    out = tmp_path / "seams.tif"
    argv = ["--model", str(ckpt), "--image", str(src), "--out", str(out), "--tile-size", str(small), "--overlap", "0"]
    assert run_cli(main, [*argv, "--no-progress", "--device", "cpu"]) == 0
    with rasterio.open(out) as ds:
        seamed = ds.read(1)
    # (5 x the tolerance the tiled maps meet; the random texture model's seams are the faintest, ~1e-2)
    assert np.nanmax(np.abs(seamed[~hole] - mean_whole[~hole])) > 5e-3 * float(np.nanmean(mean_whole))


def test_margin_is_none_for_a_model_that_normalises_over_the_window():
    torch.manual_seed(0)
    assert measure_margin(UNet(C, 4, 2, norm="instance"), C) is None
    margin = measure_margin(UNet(C, 4, 2, norm="batch"), C)
    assert margin is not None and margin % 4 == 0 and 0 < margin <= 44
