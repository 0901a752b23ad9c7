"""The embedded demo data: deterministic, shaped like real S1/S2 + GEDI, learnable, and needing spatial context."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tune_agb.baseline import ridge_baseline
from tune_agb.demo import main
from tune_agb.demo_data import demo_data_dir, synth_scene, write_demo_dataset
from tune_agb.engine.data import load_dataset
from tune_agb.errors import run_cli
from tune_agb.final_train.cli import main as final_train_main


def test_deterministic(tmp_path: Path) -> None:
    a = write_demo_dataset(tmp_path / "a", tile=16, grid=(2, 2), seed=11)
    b = write_demo_dataset(tmp_path / "b", tile=16, grid=(2, 2), seed=11)
    files = sorted(p.relative_to(a) for p in a.rglob("*.npy"))
    assert len(files) == 8
    for f in files:
        np.testing.assert_array_equal(np.load(a / f), np.load(b / f))
    c = write_demo_dataset(tmp_path / "c", tile=16, grid=(2, 2), seed=12)
    assert not np.array_equal(np.load(a / files[0]), np.load(c / files[0]), equal_nan=True)


def test_scene_looks_like_s1_s2_and_gedi() -> None:
    s = synth_scene(160, 160, seed=1)
    agb = s.agb
    assert agb.min() >= 0 and 300 < agb.max() <= 420
    # spatially correlated biomass
    assert np.corrcoef(agb[:, :-1].ravel(), agb[:, 1:].ravel())[0, 1] > 0.9
    # clouds blank optical bands only
    assert np.isnan(s.image[:12]).any() and not np.isnan(s.image[12:]).any()
    clear = ~np.isnan(s.image[3])
    red, vh = s.image[3], s.image[13]
    # Sentinel-2 red saturates: strong response at low biomass, little at high biomass.
    lo, hi = clear & (agb < 80), clear & (agb > 200)
    slope_lo = np.polyfit(agb[lo], red[lo], 1)[0]
    slope_hi = np.polyfit(agb[hi], red[hi], 1)[0]
    assert slope_lo < 0 and abs(slope_hi) < abs(slope_lo) / 4
    # Sentinel-1 VH in dB rises with log biomass, with speckle (single pixels noisy, neighbourhoods not).
    land = s.landcover > 0
    assert -30 < vh[land].mean() < -10
    assert np.corrcoef(np.log1p(agb[land]), vh[land])[0, 1] > 0.4
    # GEDI shots lie on tilted tracks: their offset from the track direction takes few values.
    offset = (s.shot_col - np.tan(np.deg2rad(6.0)) * s.shot_row) % 20
    spread = np.abs(offset - np.median(offset))
    assert np.mean(np.minimum(spread, 20 - spread) < 1.5) > 0.95
    # label noise grows with biomass
    truth = agb[s.shot_row.astype(int), s.shot_col.astype(int)]
    err = s.shot_value - truth
    assert err[truth > 200].std() > 2 * err[(truth > 5) & (truth < 50)].std()


def test_cli_refuses_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("x")
    assert run_cli(main, ["--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert run_cli(main, ["--out", str(tmp_path / "new"), "--tile-size", "16", "--grid", "2", "2"]) == 0
    assert json.loads((tmp_path / "new" / "demo.json").read_text())["tile"] == 16


@pytest.mark.slow
def test_ridge_is_decent_and_unet_beats_it(tmp_path: Path) -> None:
    """Ridge on single pixels reaches R^2 >= 0.3; the default U-Net (spatial context) beats its test RMSE."""
    d = demo_data_dir()
    ridge = ridge_baseline(load_dataset(d / "inputs", d / "labels"))
    assert ridge["test_r2"] >= 0.3
    out = tmp_path / "final"
    assert run_cli(final_train_main, ["--out-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    unet = json.loads((out / "metrics.json").read_text())
    assert unet["test_rmse"] < ridge["test_rmse"], (unet["test_rmse"], ridge["test_rmse"])
