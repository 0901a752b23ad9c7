"""bench/texture_tiles.py: a dataset copy whose inputs carry each band's local standard deviation (the texture
forest's features) as extra channels, with the labels linked."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import texture_tiles as tt


def dataset(root: Path, bands: int = 3, size: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for side in ("inputs", "labels"):
            (root / side / split).mkdir(parents=True)
        for i in range(n):
            x = rng.normal(size=(bands, size, size)).astype(np.float32)
            np.save(root / "inputs" / split / f"t{split}{i}.npy", x)
            y = np.full((size, size), np.nan, np.float32)
            y[3, 4] = 10.0 + i
            np.save(root / "labels" / split / f"t{split}{i}.npy", y)
    return root


def test_copy_appends_each_bands_local_std_per_window_and_links_the_labels(tmp_path):
    src = dataset(tmp_path / "src")
    channels = tt.texture_copy(src, (3, 5), tmp_path / "out")
    assert channels == 9
    x = np.load(src / "inputs" / "train" / "ttrain1.npy")
    got = np.load(tmp_path / "out" / "inputs" / "train" / "ttrain1.npy")
    assert got.shape == (9, 12, 12) and got.dtype == np.float32
    np.testing.assert_array_equal(got[:3], x)
    # an interior pixel: the population standard deviation of the 3 x 3 and 5 x 5 windows around it, band by band
    np.testing.assert_allclose(got[3:6, 6, 5], x[:, 5:8, 4:7].reshape(3, -1).std(axis=1), rtol=1e-4)
    np.testing.assert_allclose(got[6:9, 6, 5], x[:, 4:9, 3:8].reshape(3, -1).std(axis=1), rtol=1e-4)
    link = tmp_path / "out" / "labels" / "val" / "tval0.npy"
    assert link.is_symlink() and np.nanmax(np.load(link)) == 10.0
    assert sorted(p.name for p in (tmp_path / "out" / "inputs" / "train").iterdir()) == ["ttrain0.npy", "ttrain1.npy"]
    assert tt.texture_copy(src, (3, 5), tmp_path / "out") == 9  # a rerun overwrites and keeps the links


def test_a_tile_with_other_bands_or_an_empty_dataset_is_refused_by_name(tmp_path):
    src = dataset(tmp_path / "src")
    np.save(src / "inputs" / "val" / "tval0.npy", np.zeros((4, 12, 12), np.float32))
    with pytest.raises(SystemExit, match=r"tval0\.npy: shape"):
        tt.texture_copy(src, (3,), tmp_path / "out")
    with pytest.raises(SystemExit, match="no tile"):
        tt.texture_copy(tmp_path / "nothing", (3,), tmp_path / "out2")


def test_main_prints_the_channel_count_to_set(tmp_path, capsys):
    src = dataset(tmp_path / "src", bands=2)
    assert tt.main(["--data", str(src), "--windows", "3,7,15", "--out", str(tmp_path / "out")]) == 0
    assert "fixed.in_channels=8" in capsys.readouterr().out
